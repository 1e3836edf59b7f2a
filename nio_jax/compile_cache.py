"""JAX's persistent compilation cache for the command line: compile a step once per machine.

A NIO, GradInit or MetaInit step of a CIFAR ResNet takes 20-70 s to compile on XLA:CPU
(docs/performance.md), and every `nio-jax` run, and every run of a sweep, compiles the same
steps again. `enable()` points JAX's persistent compilation cache
(`jax_compilation_cache_dir`) at a directory, so that a step compiled by an earlier run with
the same program, shapes, JAX version and XLA flags is loaded from disk instead.

Used by the `nio-jax` subcommands (not `bench`, which times compilation, nor
`benchmarks/sweep.py`, whose run records include the searches' wall time). Importing the library changes nothing: a user's own program enables
JAX's cache itself (`jax.config.update("jax_compilation_cache_dir", ...)`) if it wants one.

Where: `$NIO_JAX_COMPILE_CACHE`, else `$XDG_CACHE_HOME/nio_jax/xla` (`~/.cache/nio_jax/xla`).
`NIO_JAX_COMPILE_CACHE=0` (or `off`) turns it off. A cache directory the user already gave JAX
(`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is kept.

Guarantees: the cache only skips compilation; JAX keys every entry by the program, the
compile options, the backend and the JAX/XLA versions, so a hit runs the same executable.
An unusable directory (not writable) is reported by `enable` and compilation goes on
uncached.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV = "NIO_JAX_COMPILE_CACHE"
# Only steps that took at least this long to compile are written (JAX's default is 1 s).
MIN_COMPILE_SECS = 1.0


def cache_dir(environ: Mapping[str, str] | None = None) -> str | None:
  """The directory `enable` uses, or None where `NIO_JAX_COMPILE_CACHE` turns it off."""
  environ = os.environ if environ is None else environ
  value = environ.get(ENV)
  if value is not None and value.strip().lower() in ("", "0", "off", "false", "no"):
    return None
  if value:
    return os.path.expanduser(value)
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "nio_jax", "xla")


def enable(environ: Mapping[str, str] | None = None) -> str:
  """Turns JAX's persistent compilation cache on; returns one line saying where (or why not).

  Call before the first compilation. Keeps a cache directory already set for JAX.
  """
  import jax

  current = jax.config.jax_compilation_cache_dir
  if current:
    return f"compile cache: {current} (set for JAX already)"
  path = cache_dir(environ)
  if path is None:
    return f"compile cache: off ({ENV}=0)"
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    return f"compile cache: off ({path} is unusable: {e})"
  if not os.access(path, os.W_OK):
    return f"compile cache: off ({path} is not writable)"
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  return f"compile cache: {path}"
