"""Every measured figure in README.md and docs/*.md is generated from a committed result file
(`python -m benchmarks.docs_figures`), and every cited file records its quiet verdict, its
command and its commit, or is listed in `docs_figures.UNRECORDED` with the reason."""

import json

import pytest

from benchmarks import docs_figures as df

DOC_BLOCKS = [(p, m) for p in df.DOCS for m in df.blocks_in(p.read_text())]


def test_the_docs_hold_generated_blocks():
  names = {m["name"] for _, m in DOC_BLOCKS}
  assert {
    "demo",
    "perf-defaults",
    "memory",
    "sweep-quiet",
    "gc-every",
    "multiprocess-cost",
    "onednn-prototype",
    *(f"sweep-vs-kaiming-{m}" for m in ("mlp20", "resnet32_nobn", "vgg19_nobn", "vgg19_bn")),
    "sweep-vs-kaiming-vit_mini",
  } <= names, names
  assert set(names) <= set(df.BLOCKS)


@pytest.mark.parametrize(
  "path,match", DOC_BLOCKS, ids=[f"{p.name}:{m['name']}" for p, m in DOC_BLOCKS]
)
def test_block_equals_what_its_files_render(path, match):
  name = match["name"]
  assert match.group(0).splitlines()[0] == df.marker(name), (
    f"{path.name}: the marker of {name} must name its source files; {df.TOOL}"
  )
  assert match["body"].strip() == df.BLOCKS[name][1]().strip(), (
    f"{path.name}: block {name} differs from its result file; run {df.TOOL}"
  )


CITED = sorted({p for src, _ in df.BLOCKS.values() for p in src if p.exists()})


@pytest.mark.parametrize("path", CITED, ids=[df.rel(p) for p in CITED])
def test_cited_file_records_verdict_command_and_commit(path):
  missing = [g for g in df.gaps(path) if (df.rel(path), g) not in df.UNRECORDED]
  assert not missing, (
    f"{df.rel(path)} records no {missing}: rerun it QUIET, or list it in UNRECORDED"
  )


def test_unrecorded_lists_only_real_gaps():
  """An excuse for an item the file now records is stale and must go."""
  for (name, item), why in df.UNRECORDED.items():
    path = df.RESULTS / name
    if path.exists():
      assert item in df.gaps(path), f"{name} now records its {item}: drop it from UNRECORDED"
    assert why


def test_a_missing_or_noisy_record_is_said_so(tmp_path):
  """The provenance line says 'not recorded' for what a file lacks, and NOISY windows."""
  p = tmp_path / "x.json"
  p.write_text(json.dumps({"rows": [{"m": {"noisy": True, "other_share": 0.08}}]}))
  prov = df.provenance(p)
  assert prov["verdict"].startswith("NOISY in 1 of 1") and prov["command"] is None


def test_demo_picture_is_rendered_from_the_demo_record(tmp_path):
  if df.demo_record() is None:
    pytest.skip("no demo record yet: bash scripts/demo.sh writes it")
  assert df.DEMO_PNG.exists()
  png = df.render_demo_picture(tmp_path / "demo.png")
  assert png.read_bytes() == df.DEMO_PNG.read_bytes(), f"stale picture: {df.TOOL}"
