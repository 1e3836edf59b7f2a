"""nio_jax.compile_cache: where the CLI's persistent compilation cache goes, and that a second
process loads a compiled step from it instead of writing it again."""

from __future__ import annotations

import os
import subprocess
import sys

from nio_jax import compile_cache

_PROGRAM = """
import sys
import jax, jax.numpy as jnp
from nio_jax import compile_cache
compile_cache.MIN_COMPILE_SECS = 0.0
print(compile_cache.enable())
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print(float(f(jnp.arange(12.0).reshape(3, 4))))
"""


def test_cache_dir_follows_the_environment(tmp_path):
  assert compile_cache.cache_dir({"NIO_JAX_COMPILE_CACHE": "0"}) is None
  assert compile_cache.cache_dir({"NIO_JAX_COMPILE_CACHE": "off"}) is None
  assert compile_cache.cache_dir({"NIO_JAX_COMPILE_CACHE": str(tmp_path)}) == str(tmp_path)
  assert compile_cache.cache_dir({"XDG_CACHE_HOME": "/x"}) == os.path.join("/x", "nio_jax", "xla")


def test_second_process_reads_the_cache(tmp_path):
  env = {**os.environ, "NIO_JAX_COMPILE_CACHE": str(tmp_path / "xla"), "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)

  def run():
    out = subprocess.run(
      [sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()

  first = run()
  assert first[0] == f"compile cache: {tmp_path / 'xla'}"
  entries = sorted(os.listdir(tmp_path / "xla"))
  assert entries, "the first process wrote no cache entry"
  second = run()
  assert second == first  # same result
  assert sorted(os.listdir(tmp_path / "xla")) == entries  # loaded, not compiled and written again


def test_off_and_unwritable_are_reported(tmp_path):
  env = {**os.environ, "NIO_JAX_COMPILE_CACHE": "0", "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run(
    [sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.splitlines()[0] == "compile cache: off (NIO_JAX_COMPILE_CACHE=0)"
  blocker = tmp_path / "file"
  blocker.write_text("")
  line = compile_cache.enable({"NIO_JAX_COMPILE_CACHE": str(blocker / "xla")})
  assert line.startswith("compile cache: off (") and "unusable" in line
