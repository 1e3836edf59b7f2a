"""The subcommands of `nio-jax`: each loads its config, calls `nio_jax.experiment` and prints."""

from __future__ import annotations

import pathlib
import sys

from nio_jax import experiment, files, reports
from nio_jax.errors import ConfigError, DivergedError
from nio_jax.experiment_config import load_config


def _prepare(args, command: str):
  """The config of `args`, its method config (built once, by `load_config`) and its workdir,
  started (`experiment.start_run`: a workdir holding a run of another config is refused
  unless `--overwrite`; `config.json` and `run.json`)."""
  cfg, mcfg = load_config(args.config, args.overrides)
  if getattr(args, "no_progress", False):
    cfg.train.progress = False
  workdir = experiment.default_workdir(cfg, args.workdir)
  note = experiment.start_run(
    cfg,
    workdir,
    command=command,
    config_spec=args.config,
    overrides=args.overrides,
    overwrite=getattr(args, "overwrite", False),
    method_config=mcfg,
  )
  print(
    f"[nio-jax] {cfg.name}: {cfg.model.name} on {cfg.data.dataset}, method "
    f"{cfg.init.method}; workdir {workdir}",
    flush=True,
  )
  if note:
    print(f"[nio-jax] {note}", flush=True)
  return cfg, mcfg, workdir


def cmd_init(args) -> int:
  """`nio-jax init`: the configured method alone, with the GC report before and after."""
  cfg, mcfg, workdir = _prepare(args, "init")
  out = experiment.init_run(cfg, workdir, progress=not args.no_progress, method_config=mcfg)
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
  cfg, mcfg, workdir = _prepare(args, "train")
  record = experiment.train_run(cfg, workdir, method_config=mcfg)
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
  cfg, _, workdir = _prepare(args, "compare")  # each method's config is built by compare_run
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
    cfg, mcfg = load_config(args.config, args.overrides)
  elif rundir is not None:
    cfg, mcfg = experiment.load_run_config(rundir, args.overrides)
  else:
    raise ConfigError(
      "measure needs a run directory written by nio-jax init/train (with run.json), or "
      "--config: no run directory given"
    )
  out = experiment.measure_run(
    cfg,
    rundir,
    params=args.params,
    checkpoints=args.checkpoint,
    fresh=args.fresh,
    num_batches=args.batches,
    progress=not args.no_progress,
    method_config=mcfg,
  )
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
