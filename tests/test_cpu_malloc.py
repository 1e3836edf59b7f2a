"""nio_jax.cpu_malloc: glibc's malloc settings for XLA:CPU's per-step buffers.

The mechanism is checked where it acts: a jitted function whose temporary buffer is larger
than a glibc thread arena's 64 MiB heap gets it from a fresh `mmap` that is unmapped after
every call, so its pages fault in, zero-filled, on every call (minor page faults per call,
`getrusage`); with the settings on, the freed buffer stays in the heap and the next call
reuses its pages: no faults. The result is the same either way. The time it saves is measured in
`benchmarks/levers.py`, not here.
"""

import json
import os
import subprocess
import sys

import pytest

from nio_jax import cpu_malloc

GLIBC = cpu_malloc._libc() is not None


def test_wanted_parses_the_environment():
  assert cpu_malloc.wanted({}) is cpu_malloc.DEFAULT
  assert cpu_malloc.wanted({cpu_malloc.ENV: ""}) is cpu_malloc.DEFAULT
  for on in ("1", "true", "yes", " On "):
    assert cpu_malloc.wanted({cpu_malloc.ENV: on}) is True
  for off in ("0", "false", "no", "off"):
    assert cpu_malloc.wanted({cpu_malloc.ENV: off}) is False


_FAULTS = r"""
import json, resource
import nio_jax, jax, jax.numpy as jnp

n, m, k = 8192, 4096, 64  # x @ w: a 128 MiB temporary, reduced to one vector
@jax.jit
def f(x, w, v):
  return (jnp.maximum(x @ w, 0.0) @ v)[:8]

x = jnp.ones((n, k), jnp.float32) * 0.01
w = jnp.ones((k, m), jnp.float32) * 0.01
v = jnp.ones((m,), jnp.float32)
temp = f.lower(x, w, v).compile().memory_analysis().temp_size_in_bytes
out = f(x, w, v).block_until_ready()
for _ in range(3):  # the heap grows to its working size in the first calls
  f(x, w, v).block_until_ready()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x, w, v).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
print(json.dumps(dict(temp=temp, pages=temp / 4096, faults=faults,
                      applied=nio_jax.cpu_malloc.APPLIED, out=[float(o) for o in out])))
"""


def _child(flag: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{cpu_malloc.ENV: flag})
  for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
    env.pop(k, None)
  out = subprocess.run(
    [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_settings_stop_the_per_call_page_faults_and_change_no_result():
  on, off = _child("1"), _child("0")
  assert on["applied"] is True and off["applied"] is False
  assert on["temp"] > 64 * 2**20  # larger than a thread arena's heap
  # without: the temporary is mapped afresh and faulted in on every call
  assert off["faults"] > 0.5 * off["pages"], off
  # with: the same heap pages serve the calls (glibc may still extend the heap once in a
  # while, when a small block has landed in the freed one: at most one call in five here)
  assert on["faults"] < 0.3 * on["pages"], on
  assert on["out"] == off["out"]
