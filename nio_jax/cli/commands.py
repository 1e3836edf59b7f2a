"""The subcommands of `nio-jax`: each loads its config, calls `nio_jax.experiment` and prints."""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

from nio_jax import experiment, files, reports
from nio_jax.errors import ConfigError, DivergedError
from nio_jax.experiment_config import config_path, load_config


def _workdir(cfg, arg: str | None) -> pathlib.Path:
  """The run's directory (`--workdir`, else `workdir`, else `runs/<name>`)."""
  return pathlib.Path(arg or cfg.get("workdir") or os.path.join("runs", cfg.name))


def _absolute_spec(spec: str) -> str:
  """`path.py[:arg]` (or a shipped config's NAME) with an absolute path (so `measure` works
  from any directory)."""
  path, arg = config_path(spec)
  path = os.path.abspath(path)
  return path if arg is None else f"{path}:{arg}"


def _prepare(args, command: str):
  """The config of `args` and its workdir, checked (`experiment.check_workdir`: a workdir
  holding a run of another config is refused unless `--overwrite`), with `run.json` /
  `config.json` written."""
  cfg = load_config(args.config, args.overrides)
  if getattr(args, "no_progress", False):
    cfg.train.progress = False
  workdir = _workdir(cfg, args.workdir)
  note = experiment.check_workdir(cfg, workdir, overwrite=getattr(args, "overwrite", False))
  if note and command == "init" and note.startswith("resuming"):
    note = "same config as the run in this workdir: the search runs again (init always searches)"
  files.write_json(
    workdir / "run.json",
    {
      "command": command,
      "config": _absolute_spec(args.config),
      "overrides": list(args.overrides),
      "name": cfg.name,
      "argv": sys.argv,
    },
  )
  print(
    f"[nio-jax] {cfg.name}: {cfg.model.name} on {cfg.data.dataset}, method "
    f"{cfg.init.method}; workdir {workdir}",
    flush=True,
  )
  if note:
    print(f"[nio-jax] {note}", flush=True)
  return cfg, workdir


def cmd_init(args) -> int:
  """`nio-jax init`: the configured method alone, with the GC report before and after."""
  cfg, workdir = _prepare(args, "init")
  out = experiment.init_run(cfg, workdir, progress=not args.no_progress)
  what = f"{out.result.num_steps} steps" if out.result.num_steps else "applied"
  print(
    f"\n{cfg.init.method}: {what} in {out.seconds:.1f} s (incl. compilation)\n"
    + reports.before_after_table(out.before, out.after)
  )
  print(f"\nparams: {out.params_path}\nhistory: {workdir / 'init_history.json'}")
  return 0


def cmd_train(args) -> int:
  """`nio-jax train`: `experiment.train_run`, then the report of the run.

  Raises:
    DivergedError: the training loss became NaN/inf (the run's record says where).
  """
  cfg, workdir = _prepare(args, "train")
  record = experiment.train_run(cfg, workdir)
  if record["status"] != "finished":
    raise DivergedError(
      f"training {record['status']}; the last good checkpoint is in {workdir / 'checkpoints'}"
    )
  text, plots = reports.report([workdir], workdir)
  print("\n" + text)
  print("plots: " + ", ".join(str(p) for p in plots))
  return 0


def cmd_compare(args) -> int:
  """`nio-jax compare`: `train` for every method of `compare.methods` (or `--methods`) on one
  config, then one picture and table comparing them (`compare.md`, `compare.png`)."""
  cfg, workdir = _prepare(args, "compare")
  names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
  out = experiment.compare_run(cfg, workdir, methods_=names, overwrite=args.overwrite)
  bad = {m: r["status"] for m, r in out["records"].items() if r["status"] != "finished"}
  text, png = reports.compare_report(out, workdir, title=f"{cfg.name}: {cfg.model.name}")
  print("\n" + text)
  print(f"picture: {png}\nreport: {workdir / 'compare.md'}")
  if out["reused"]:
    print(f"(finished runs read back, not repeated: {', '.join(out['reused'])})")
  print(f"compare wall time: {out['wall_seconds']:.0f} s")
  for m, status in bad.items():  # a diverged method is a result of the comparison
    print(f"warning: {m}: training {status}; its curve stops there", file=sys.stderr)
  return 0


def cmd_measure(args) -> int:
  """`nio-jax measure`: the GC report of saved params, checkpoints or the model's own init."""
  rundir = pathlib.Path(args.run_dir) if args.run_dir else None
  if rundir is not None and not rundir.is_dir():
    raise ConfigError(f"run directory not found: {rundir}")
  if args.config:
    cfg = load_config(args.config, args.overrides)
  elif rundir is not None and (rundir / "run.json").exists():
    info = json.loads((rundir / "run.json").read_text())
    cfg = load_config(info["config"], list(info.get("overrides", [])) + list(args.overrides))
  else:
    where = f"{rundir} has no run.json" if rundir is not None else "no run directory given"
    raise ConfigError(
      f"measure needs a run directory written by nio-jax init/train (with run.json), or "
      f"--config: {where}"
    )
  if args.batches is not None:
    cfg.init.measure_batches = int(args.batches)
  if int(cfg.init.measure_batches) < 1:
    cfg.init.measure_batches = 5
  run = experiment.build(cfg)
  sources: list[tuple[str, Any]] = [(str(p), p) for p in map(pathlib.Path, args.params)]
  for step in args.checkpoint:
    if rundir is None:
      raise ConfigError("--checkpoint needs the run directory")
    sources.append((f"checkpoint {step}", ("ckpt", step)))
  if not sources and rundir is not None:
    sources = [
      (str(p), p)
      for p in (rundir / "init_params.msgpack", rundir / "final_params.msgpack")
      if p.exists()
    ]
  if not sources and not args.fresh:
    raise ConfigError(
      f"no saved params in {rundir} (init_params.msgpack / final_params.msgpack); "
      "pass --params FILE or --checkpoint STEP"
    )
  out = {}
  progress = not args.no_progress
  if args.fresh:
    loss_fn, params = experiment.init_loss_fn(run)
    out["fresh (model init)"] = experiment.measure_params(run, loss_fn, params, progress=progress)
  for name, src in sources:
    if isinstance(src, tuple):
      v = files.load_checkpoint_variables(rundir / "checkpoints", src[1], run.variables)
    else:
      v = files.load_variables(src, run.variables)
    loss_fn, params = experiment.init_loss_fn(run, v)
    out[name] = experiment.measure_params(run, loss_fn, params, progress=progress)
  print(reports.gc_table(out, "params"))
  if args.json:
    files.write_json(args.json, out)
  return 0


def cmd_report(args) -> int:
  """`nio-jax report`: the markdown table and plots of one or more run directories."""
  dirs = [pathlib.Path(d) for d in args.run_dirs]
  for d in dirs:
    if not d.is_dir():
      raise ConfigError(f"run directory not found: {d}")
  out = (
    pathlib.Path(args.out)
    if args.out
    else (dirs[0] if len(dirs) == 1 else pathlib.Path("runs/report"))
  )
  text, plots = reports.report(dirs, out)
  print(text)
  print("plots: " + ", ".join(str(p) for p in plots))
  return 0


def cmd_bench(args) -> int:
  """`nio-jax bench ...`: the JAX vs PyTorch benchmark (`nio_jax.bench`, torch extra)."""
  from nio_jax.bench import TorchMissingError, engine  # noqa: PLC0415  (only this command)

  try:
    engine.main(list(args.bench_args))
  except TorchMissingError as e:
    print(f"nio-jax bench: {e}", file=sys.stderr)
    return 2
  return 0
