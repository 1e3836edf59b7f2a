"""How exact float32 is under the current XLA_FLAGS: ResNet-20 ±BN, B=16, against float64.

    python -m benchmarks.xla_precision                              # nio_jax's defaults
    NIO_JAX_XLA_DEFAULTS=0 python -m benchmarks.xla_precision       # XLA's own CPU fusions

Prints one JSON line: for each model, the training gradient's and dGC/dscales' largest
absolute error relative to the largest float64 entry, and |GC32 - GC64| (batch setting, D=4,
r=0.2). The loss is computed in the parameters' dtype (no float32 cast), so float64 is a true
reference.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nio_jax import apply_scales, gradcosine, init_scales, models
from nio_jax.flax_utils import linen_loss_fn

jax.config.update("jax_enable_x64", True)

out = {"flags": os.environ.get("XLA_FLAGS", "")}
for norm in ("none", "bn"):
  m = models.get("resnet20", norm=norm, scan=False)
  rng = np.random.default_rng(int(os.environ.get("SEED", "0")))
  x = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, 16)
  v = m.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)

  def cast(t, d):
    return jax.tree.map(lambda a: a.astype(d), t)

  res = {}
  for d in (jnp.float32, jnp.float64):
    vv = cast(v, d)
    batch = {"image": jnp.asarray(x, d), "label": jnp.asarray(y)}
    lf = linen_loss_fn(
      m,
      batch_stats=vv.get("batch_stats"),
      losses=lambda l, t: optax.softmax_cross_entropy_with_integer_labels(l, t),
    )
    p = vv["params"]
    sc, _ = init_scales(p)
    sc = cast(sc, d)
    g = jax.jit(jax.grad(lambda p: lf(p, batch).mean()))(p)
    gcf = lambda s: gradcosine(lf, apply_scales(p, s), batch, num_chunks=4, overlap=0.2).gc
    gc, dgc = jax.value_and_grad(gcf)(sc)
    res[str(d.dtype) if hasattr(d, "dtype") else str(d)] = (g, gc, dgc)
  (g32, gc32, d32), (g64, gc64, d64) = res.values()

  def relerr(a, b):
    a = jax.tree.leaves(a)
    b = jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float64) - y))) for x, y in zip(a, b)) / max(
      float(jnp.max(jnp.abs(y))) for y in b
    )

  out[norm] = {
    "train_grad": relerr(g32, g64),
    "gc_abs": abs(float(gc32) - float(gc64)),
    "dgc": relerr(d32, d64),
  }
print(json.dumps(out))
