"""How busy the machine was, how much memory a process used, and what its matmul peak is.

Torch-free, so the other scripts in `benchmarks/` can record the same figures.

A timing is a result only when nothing else computed meanwhile. `CpuWindow` measures,
around one part of a benchmark, the CPU time the whole machine spent busy (`/proc/stat`)
minus the CPU time of this process and its waited-for children (`os.times`). What remains
was used by OTHER processes. The part is `NOISY` when that exceeds `NOISE_SHARE` of
the machine (wall time x cores), the rule of `shared/tools/quiet`. The 1-, 5- and 15-minute
load averages before and after are recorded too, but do not decide: the 1-minute average
still counts this process' own previous part for a minute after it ended.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

# Share of the machine (wall x cores) that other processes may use during a part before the
# part is marked NOISY (same rule as shared/tools/quiet).
NOISE_SHARE = 0.05


# The source checkout `environment` reads the commit of (none for an installed wheel).
REPO = pathlib.Path(__file__).resolve().parents[2]

# Distributions whose versions every result file records.
DISTS = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint")


def git_commit(dirty_paths: Sequence[str] = ()) -> str:
  """`git rev-parse HEAD` of the source checkout ("" outside one), with "+uncommitted" when
  any of `dirty_paths` (relative to the checkout) has uncommitted changes."""

  def git(*args) -> str:
    try:
      r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    except OSError:
      return ""
    return r.stdout.strip() if r.returncode == 0 else ""

  commit = git("rev-parse", "HEAD")
  if commit and dirty_paths and git("status", "--porcelain", *dirty_paths):
    commit += "+uncommitted"
  return commit


def allocator_env(environ=None) -> dict:
  """The environment variables that change the C allocator: `GLIBC_TUNABLES`, `MALLOC_*`
  (glibc's malloc settings) and `LD_PRELOAD` (a replacement allocator)."""
  environ = os.environ if environ is None else environ
  return {
    k: v
    for k, v in sorted(environ.items())
    if k in ("GLIBC_TUNABLES", "LD_PRELOAD") or k.startswith("MALLOC_")
  }


def minor_faults_per_call(fn: Callable[[], object], calls: int = 2) -> int:
  """Minor page faults of this process per call of `fn` (`getrusage`, over `calls` calls):
  XLA:CPU's temporary buffer, when glibc maps it afresh for every step, faults in on every
  call (docs/performance.md)."""
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    fn()
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // calls


def transparent_hugepage() -> str | None:
  """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`; None where
  the kernel does not say): glibc's `hugetlb=1` tunable acts only under `madvise` or
  `always`."""
  try:
    text = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    return None
  m = re.search(r"\[(\w+)\]", text)
  return m.group(1) if m else None


def environment(
  command: str | None = None,
  *,
  extra_dists: Sequence[str] = (),
  dirty_paths: Sequence[str] = (),
) -> dict:
  """What every result file records about where and how it ran: the one recorder.

  Keys: `date_utc`, `devices` (every JAX device), `device` ("platform:kind" of the first),
  `device_kind`, `device_count`, `backend`, `cpu_count`, `cores` (`cores()`), `platform`
  (the OS), `processor`, `python`, `versions` (`DISTS` and `extra_dists`, from the installed
  distributions: nothing is imported), `git_commit` (`git_commit(dirty_paths)`),
  `load_average_at_start`, `xla_flags`, `allocator_env` (the environment variables that
  change where memory comes from: `GLIBC_TUNABLES`, glibc's `MALLOC_*`, `LD_PRELOAD`; they
  change step times, docs/performance.md), `transparent_hugepage` (the kernel's mode) and,
  when given, `command`.
  """
  import jax  # noqa: PLC0415

  vers = {"python": platform.python_version()}
  for dist in (*DISTS, *extra_dists):
    try:
      vers[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  dev = jax.devices()[0]
  env = {
    "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "devices": [str(d) for d in jax.devices()],
    "device": f"{dev.platform}:{getattr(dev, 'device_kind', dev.platform)}",
    "device_kind": str(getattr(dev, "device_kind", dev.platform)),
    "device_count": jax.device_count(),
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "cores": cores(),
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "python": vers["python"],
    "versions": vers,
    "git_commit": git_commit(dirty_paths),
    "load_average_at_start": load_average(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "allocator_env": allocator_env(),
    "transparent_hugepage": transparent_hugepage(),
  }
  if command is not None:
    env["command"] = command
  return env


def cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
  """The 1-, 5- and 15-minute load averages, rounded, or None where the OS has none."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def busy_cpu_seconds() -> float | None:
  """CPU seconds the whole machine has spent not idle since boot (`/proc/stat`), or None."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
  """CPU seconds of this process (all its threads) and of its waited-for children."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def other_share(busy_s: float, own_s: float, wall_s: float, num_cores: int) -> float:
  """Share of the machine (`wall_s * num_cores`) used by other processes.

  Args:
    busy_s: CPU seconds the whole machine was busy during the window.
    own_s: CPU seconds this process (and its children) used during the window.
    wall_s: length of the window in seconds.
    num_cores: cores of the machine.

  Returns:
    `max(0, busy_s - own_s) / (wall_s * num_cores)`.
  """
  return max(0.0, busy_s - own_s) / max(wall_s * num_cores, 1e-9)


def is_noisy(share: float | None) -> bool | None:
  """True when other processes used more than `NOISE_SHARE`; None when unmeasured."""
  return None if share is None else share > NOISE_SHARE


class CpuWindow:
  """Measures how busy the machine was while a block ran: `with CpuWindow() as w: ...`.

  After the block, `record` gives the load averages before and after, the cores, the
  wall time, this process' CPU time, the other processes' CPU time and share, and the
  verdict `noisy` (None where `/proc/stat` is missing).
  """

  def __enter__(self) -> CpuWindow:
    self.load_before = load_average()
    self._busy0, self._own0, self._t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    self._busy1, self._own1, self._t1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    self.load_after = load_average()

  def record(self) -> dict:
    """The window's figures (see the class docstring) as a JSON-ready dict."""
    wall = self._t1 - self._t0
    own = self._own1 - self._own0
    n = cores()
    rec = dict(
      load_before=self.load_before,
      load_after=self.load_after,
      cores=n,
      wall_s=round(wall, 3),
      own_cpu_s=round(own, 3),
    )
    if self._busy0 is None or self._busy1 is None:
      rec.update(other_cpu_s=None, other_share=None, noisy=None)
      return rec
    busy = self._busy1 - self._busy0
    share = other_share(busy, own, wall, n)
    rec.update(
      other_cpu_s=round(max(0.0, busy - own), 3), other_share=round(share, 4), noisy=is_noisy(share)
    )
    return rec


def verdict(window: dict) -> dict:
  """The quiet verdict of a measured part from its `CpuWindow.record`.

  Returns:
    `{"other_cpu_share", "verdict", "threshold", ...}`: the share of the machine (wall time x
    cores) that other processes used during the part (machine busy CPU time from /proc/stat
    minus this process' own CPU time), `"NOISY"` above `NOISE_SHARE` (5 %, the rule of
    `shared/tools/quiet`), `"QUIET"` otherwise, None where /proc/stat is missing; plus the
    window's figures (other / own CPU seconds, cores, wall seconds, load averages).
  """
  noisy = window.get("noisy")
  return {
    "other_cpu_share": window.get("other_share"),
    "verdict": None if noisy is None else ("NOISY" if noisy else "QUIET"),
    "threshold": NOISE_SHARE,
    "other_cpu_s": window.get("other_cpu_s"),
    "own_cpu_s": window.get("own_cpu_s"),
    "cores": window.get("cores"),
    "wall_s": window.get("wall_s"),
    "load_before": window.get("load_before"),
    "load_after": window.get("load_after"),
  }


def verdict_markdown(quiet: dict | None) -> str:
  """A `verdict` as a Markdown phrase for a result file's header: "other processes' CPU
  share 0.0046: **QUIET**" (**unknown** where /proc/stat was missing), or "quiet verdict
  not recorded" for a result file written before the verdict was stored (`quiet` None)."""
  if quiet is None:
    return "quiet verdict not recorded"
  word = quiet.get("verdict") or "unknown"
  return f"other processes' CPU share {quiet.get('other_cpu_share')}: **{word}**"


def maxrss_mb() -> float:
  """This process' peak resident set size so far, in MiB.

  On Linux this is `VmHWM` of `/proc/self/status`, the high-water mark of the process'
  own address space, which starts afresh at `exec`. `ru_maxrss` does not: a child forked
  from a large parent reports the parent's size until it outgrows it, which made every
  fresh-subprocess memory figure 0 under the benchmark (measured: the baseline of each
  memory subprocess grew with the parent, 1.4 -> 2.4 -> 3.4 GB). Elsewhere: `ru_maxrss`.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0  # kB
  except OSError:
    pass
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, else KiB


def matmul_gflops(run: Callable[[], object], n: int, reps: int = 5) -> float:
  """GFLOP/s of `run()`, an n x n by n x n matmul that blocks until done (median of reps).

  Args:
    run: performs one matmul and waits for its result (already compiled / warmed up once).
    n: the matrix size.
    reps: repetitions; the median time counts.

  Returns:
    `2 n^3 / median seconds / 1e9`.
  """
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return 2.0 * n**3 / statistics.median(times) / 1e9
