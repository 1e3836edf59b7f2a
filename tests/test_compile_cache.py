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


def test_a_cache_directory_the_user_gave_jax_is_kept(tmp_path):
  """`enable` never replaces a cache directory already set for JAX (by jax.config or by
  JAX_COMPILATION_CACHE_DIR): the user's cache wins over NIO_JAX_COMPILE_CACHE."""
  mine, ours = tmp_path / "mine", tmp_path / "ours"
  program = (
    "import jax\n"
    f"jax.config.update('jax_compilation_cache_dir', {str(mine)!r})\n"
    "from nio_jax import compile_cache\n"
    "print(compile_cache.enable())\n"
    "print(jax.config.jax_compilation_cache_dir)\n"
  )
  env = {**os.environ, "NIO_JAX_COMPILE_CACHE": str(ours), "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run(
    [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.splitlines() == [f"compile cache: {mine} (set for JAX already)", str(mine)]
  assert not ours.exists()
  env["JAX_COMPILATION_CACHE_DIR"] = str(mine)
  program = "from nio_jax import compile_cache\nprint(compile_cache.enable())\n"
  out = subprocess.run(
    [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.splitlines() == [f"compile cache: {mine} (set for JAX already)"]
