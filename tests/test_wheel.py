"""The built wheel works on its own: `nio-jax bench --help` and a tiny `nio-jax init` of a
config shipped in the wheel (`--config fmnist_nio`), run from a temporary directory by a fresh virtual environment that has only the wheel installed.

How the environment is made without downloading anything: `python -m venv` creates it, a
`.pth` file in its site-packages appends THIS interpreter's site-packages (jax, flax, torch...
already installed) after its own, and `pip install --no-deps` installs the wheel built by
`pip wheel --no-deps --no-build-isolation` from a copy of the sources. `.pth` files inside the
appended directory are not processed, so this checkout's editable install of nio_jax is not
visible: the venv's own site-packages, holding the wheel, is the only nio_jax there. The test
checks that, and it runs every command with the temporary directory as working directory and
no PYTHONPATH, so nothing is imported from the source tree.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import site
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(cmd, cwd, env, timeout=900):
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
  return out.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
  base = tmp_path_factory.mktemp("wheel")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
  env["JAX_PLATFORMS"] = "cpu"
  src = base / "src"  # only what the wheel is built from; the build leaves the checkout clean
  shutil.copytree(ROOT / "nio_jax", src / "nio_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for f in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / f, src / f)
  pip = [sys.executable, "-m", "pip"]
  _run(
    [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "dist"), str(src)],
    base,
    env,
  )
  (whl,) = (base / "dist").glob("nio_jax-*.whl")
  venv = base / "venv"
  _run([sys.executable, "-m", "venv", str(venv)], base, env)
  vpy = venv / "bin" / "python"
  vsite = _run([str(vpy), "-c", "import site; print(site.getsitepackages()[0])"], base, env).strip()
  (pathlib.Path(vsite) / "_test_host_site_packages.pth").write_text(
    "\n".join(site.getsitepackages()) + "\n"
  )
  _run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", str(whl)], base, env)
  work = base / "elsewhere"
  work.mkdir()
  return dict(venv=venv, site=vsite, work=work, env=env, whl=whl)


def test_wheel_ships_the_bench_and_not_the_source_tree(wheel_venv):
  import zipfile

  names = zipfile.ZipFile(wheel_venv["whl"]).namelist()
  for f in ("nio_jax/bench/engine.py", "nio_jax/bench/torch_baseline/models.py"):
    assert f in names
  # The configs ship in the package (`--config NAME`); `configs/` of a checkout links there.
  shipped = sorted(p.name for p in (ROOT / "nio_jax" / "configs").glob("*.py"))
  assert len(shipped) > 10 and all(f"nio_jax/configs/{f}" in names for f in shipped)
  assert not any(n.startswith(("benchmarks/", "tests/", "configs/")) for n in names)
  vpy = str(wheel_venv["venv"] / "bin" / "python")
  where = _run(
    [vpy, "-c", "import nio_jax, nio_jax.bench.engine as e; print(nio_jax.__file__, e.__file__)"],
    wheel_venv["work"],
    wheel_venv["env"],
  ).split()
  assert all(p.startswith(wheel_venv["site"]) for p in where), where  # the wheel, not the tree


def test_bench_help_from_the_wheel(wheel_venv):
  out = _run(
    [str(wheel_venv["venv"] / "bin" / "nio-jax"), "bench", "--help"],
    wheel_venv["work"],
    wheel_venv["env"],
  )
  assert "usage: nio-jax bench" in out and "--models" in out and "--no-memory" in out


def test_tiny_init_from_the_wheel(wheel_venv):
  from nio_jax.data import find_fashion_mnist_dir

  try:
    find_fashion_mnist_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  workdir = wheel_venv["work"] / "run"
  sets = [
    "model.name=mlp",
    "model.kwargs={'hidden': (16,)}",
    "data.train_subset=128",
    "data.test_subset=128",
    "data.batch_size=64",
    "data.prefetch=0",
    "init.batch_size=32",
    "init.config.num_steps=2",
    "init.measure_batches=1",
  ]
  _run(
    [
      str(wheel_venv["venv"] / "bin" / "nio-jax"),
      "init",
      "--config",
      "fmnist_nio",  # a bare name: the config shipped in the wheel
      "--workdir",
      str(workdir),
      "--no-progress",
      *[f"--set={s}" for s in sets],
    ],
    wheel_venv["work"],
    wheel_venv["env"],
  )
  assert (workdir / "init_params.msgpack").is_file() and (workdir / "init_report.json").is_file()
  import json

  spec = json.loads((workdir / "run.json").read_text())["config"]
  assert spec.startswith(wheel_venv["site"]) and spec.endswith("nio_jax/configs/fmnist_nio.py")
