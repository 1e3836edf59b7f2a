"""`nio-jax`: the command line of nio_jax, driven by `ml_collections` config files.

    nio-jax init    --config configs/fmnist_nio.py [--set key=value ...] [--config.key=value ...]
    nio-jax train   --config configs/cifar10_table.py:resnet110_bn,gradinit
    nio-jax compare --config configs/fmnist_compare.py   # kaiming, nio, gradinit: one picture
    nio-jax measure runs/fmnist_nio                 # GC / gradient norm of the saved params
    nio-jax report  runs/fmnist_nio runs/fmnist_kaiming --out runs/report
    nio-jax bench   --models resnet20 --batches 32  # nio_jax.bench (needs the torch extra)

Config files, their schema and the `--set k=v` / `--config.k=v` override parser live in
`nio_jax.experiment_config`; every subcommand runs through `nio_jax.experiment` (the same driver as
`benchmarks/sweep.py`); reports and plots are `nio_jax.reports`. This package only parses
arguments (here) and prints (`commands`).

Outputs in the workdir (default `runs/<config.name>`): `init_params.msgpack` (flax msgpack
serialization of the initialised variables, never pickle), `init_history.json`,
`init_report.json` (GC / gradient norm before and after), `scales.json`, `run.json` (how
the run was launched, used by `measure`), `config.json`; `train` adds the trainer's
`metrics.jsonl`, `curves.png`, `checkpoints/`, `final_params.msgpack`, `run_record.json`
(the run's one record: accuracies, GC report, search / training / evaluation wall times)
and `report.md` with its plots.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nio_jax import compile_cache
from nio_jax.cli.commands import (
  cmd_bench,
  cmd_compare,
  cmd_init,
  cmd_measure,
  cmd_report,
  cmd_train,
)
from nio_jax.errors import ConfigError, DivergedError
from nio_jax.experiment_config import split_overrides

OVERRIDES_HELP = """\
config overrides (any number, after the subcommand):
  --set key.path=value       e.g. --set init.config.num_steps=50
  --config.key.path=value    e.g. --config.train.num_epochs=2 (also --config.key.path value)
  Values are Python literals (ast.literal_eval: numbers, strings, tuples, dicts,
  True/False/None), anything else a plain string; never evaluated as code. A dict replaces
  a whole group: --set model.kwargs="{'hidden': (32,)}". Switching --set init.method=NAME
  drops the file's init.config keys (--set init.config={} starts from NAME's defaults).
  See docs/cli.md."""

WORKDIR_HELP = """\
reruns: a workdir that holds a run of the same config is continued (train / compare:
from its last checkpoint, no new search; init searches again); one of another config is
refused: pass --overwrite (deletes that run's files, then starts afresh) or another
--workdir."""


def make_parser() -> argparse.ArgumentParser:
  """The argparse parser: one subparser per subcommand (overrides are split off first)."""
  raw = argparse.RawDescriptionHelpFormatter
  p = argparse.ArgumentParser(
    prog="nio-jax",
    description="Learned neural-network initialisation (NIO/GradCosine, "
    "GradInit, MetaInit, Fixup, Kaiming) in JAX/Flax.",
    epilog=OVERRIDES_HELP,
    formatter_class=raw,
  )
  sub = p.add_subparsers(dest="command", required=True)

  def common(sp, config_required=True):
    sp.add_argument(
      "--config",
      required=config_required,
      metavar="FILE[:ARG]",
      help="config file (configs/x.py[:arg]) or the name of a shipped config "
      "(e.g. fmnist_nio, cifar10_table:vgg19,nio)",
    )
    sp.add_argument("--workdir", default=None, help="output directory (default runs/<name>)")
    sp.add_argument(
      "--overwrite",
      action="store_true",
      help="the workdir holds a run of another config: delete that run's files, start afresh",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")

  def subparser(name, help_, epilog=OVERRIDES_HELP + "\n\n" + WORKDIR_HELP, example=""):
    ex = f"example:\n  {example}\n\n" if example else ""
    return sub.add_parser(name, help=help_, epilog=ex + epilog, formatter_class=raw)

  sp = subparser(
    "init",
    "run the init method, save params and a GC report",
    example="nio-jax init --config configs/fmnist_nio.py --set init.config.num_steps=10",
  )
  common(sp)
  sp.set_defaults(fn=cmd_init)
  sp = subparser(
    "train",
    "init + train, then a small report (table + plots)",
    example="nio-jax train --config fmnist_nio --set train.num_epochs=2 --workdir runs/x",
  )
  common(sp)
  sp.set_defaults(fn=cmd_train)
  sp = subparser(
    "compare",
    "init + train with several methods, then one picture comparing them",
    example="nio-jax compare --config configs/fmnist_compare.py --methods kaiming,nio",
  )
  common(sp)
  sp.add_argument(
    "--methods",
    default=None,
    help="comma-separated methods, e.g. kaiming,nio,gradinit (default: compare.methods)",
  )
  sp.set_defaults(fn=cmd_compare)
  sp = subparser(
    "measure",
    "GC / gradient norm of saved params",
    epilog=OVERRIDES_HELP,
    example="nio-jax measure runs/fmnist_nio --fresh --set init.measure_chunks=None",
  )
  sp.add_argument("run_dir", nargs="?", help="run directory (its run.json gives the config)")
  sp.add_argument(
    "--config",
    default=None,
    metavar="FILE[:ARG]",
    help="config file or shipped config name (instead of run_dir/run.json)",
  )
  sp.add_argument("--params", action="append", default=[], help="msgpack params file(s)")
  sp.add_argument(
    "--batches", type=int, default=None, help="number of batches (default init.measure_batches)"
  )
  sp.add_argument(
    "--checkpoint",
    action="append",
    default=[],
    metavar="STEP",
    help="a trainer checkpoint of run_dir (a step, or 'latest'; step 0 holds "
    "the initialised params)",
  )
  sp.add_argument("--fresh", action="store_true", help="also measure the model's own init")
  sp.add_argument("--json", default=None, help="write the numbers to this JSON file")
  sp.add_argument("--no-progress", action="store_true")
  sp.set_defaults(fn=cmd_measure)
  sp = sub.add_parser("report", help="markdown table + PNG plots from run directories")
  sp.add_argument("run_dirs", nargs="+")
  sp.add_argument(
    "--out", default=None, help="output dir (default: the run dir, or runs/report for several)"
  )
  sp.set_defaults(fn=cmd_report)
  sp = sub.add_parser(
    "bench", help="JAX vs PyTorch benchmark (nio_jax.bench; needs the torch extra)", add_help=False
  )
  sp.add_argument("bench_args", nargs=argparse.REMAINDER)
  sp.set_defaults(fn=cmd_bench)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of `nio-jax`.

  Args:
    argv: the arguments (default `sys.argv[1:]`).

  Returns:
    The exit status: 0; 2 for a user error, 1 for a diverged training run (both printed
    as `nio-jax: error: ...`).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  from nio_jax.distributed import cli_setup  # noqa: PLC0415 (issue 32: multi-process hook)

  cli_setup()  # NIO_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID: started before JAX
  try:
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark script
      return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    rest, overrides = split_overrides(argv)
    args = make_parser().parse_args(rest)
    args.overrides = overrides
    if overrides and args.command in ("report",):
      raise ConfigError("report takes no config overrides")
    if args.command != "report":  # the steps compile once per machine (nio_jax.compile_cache)
      print(f"nio-jax: {compile_cache.enable()}", file=sys.stderr)
    return int(args.fn(args) or 0)
  except ConfigError as e:
    print(f"nio-jax: error: {e}", file=sys.stderr)
    return 2
  except DivergedError as e:
    print(f"nio-jax: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
