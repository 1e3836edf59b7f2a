"""nio_jax: learned neural-network initialisation in JAX (NIO/GradCosine and its baselines).

Where things are:
  * GradCosine is computed in `nio_jax.cosine` (`gradcosine`, `gc_from_grads`, `measure`);
  * per-example / sub-batch gradients (the pullbacks) in `nio_jax.per_example`;
  * how they are computed ("auto" resolved once, the im2col memory guard) in
    `nio_jax.formulation`; the jaxpr rewrites it uses (convolutions as matmuls, canonical
    convolutions, cross-example coupling) in `nio_jax.jaxpr_rewrites`;
  * scales meet params in `nio_jax.scales` (`init_scales`, `apply_scales`);
  * what each leaf is (kernel, bias, batch norm, layer norm, ...) in `nio_jax.leaves`;
  * the scale optimiser (clip → split-moment Adam → bound) in `nio_jax.rescale_adam`;
  * the NIO search in `nio_jax.methods.nio`; the shared host loop in `nio_jax.search`;
  * Flax adapters (linen / NNX loss functions) in `nio_jax.flax_utils`; the per-batch PRNG
    keys of stochastic losses (dropout during a search) in `nio_jax.stochastic`;
  * GradInit, MetaInit, Fixup, Kaiming, LSUV and `initialize` in `nio_jax.methods`;
  * scale-out (Mesh, shard_batch, shard_map stats) in `nio_jax.distributed`;
  * the XLA:CPU flags set at import (and how to turn them off) in `nio_jax.xla_defaults`.
"""

# Before anything can create a JAX backend: XLA reads XLA_FLAGS once, at backend creation.
from nio_jax import xla_defaults

xla_defaults.BACKENDS_BEFORE_IMPORT = xla_defaults.backends_initialized()
xla_defaults.apply()


from nio_jax.cosine import GCStats, gc_brute_force, gc_from_grads, gradcosine, measure
from nio_jax.errors import NonFiniteError, ZeroGradientError
from nio_jax.leaves import LeafKinds, default_grad_filter

# The compared methods (after the core: they build on it).
from nio_jax.methods import (  # noqa: E402
  GRADINIT_RECIPES,
  GradInitConfig,
  LSUVConfig,
  MetaInitConfig,
  available_methods,
  get_method,
  gradinit,
  initialize,
  kaiming,
  lsuv,
  metainit,
  register,
)
from nio_jax.methods.nio import NIOConfig, make_nio_step, nio, nio_objective
from nio_jax.per_example import per_example_grads, subbatch_bounds, subbatch_weights
from nio_jax.rescale_adam import freeze, project_min_scale, rescale_adam, scale_by_split_adam
from nio_jax.results import InitResult
from nio_jax.scales import ScaleSpec, apply_scales, init_scales
from nio_jax.search import SearchStep

__version__ = "0.1.0"

__all__ = [
  "GCStats",
  "InitResult",
  "LeafKinds",
  "NIOConfig",
  "NonFiniteError",
  "ScaleSpec",
  "SearchStep",
  "ZeroGradientError",
  "apply_scales",
  "default_grad_filter",
  "freeze",
  "gc_brute_force",
  "gc_from_grads",
  "gradcosine",
  "init_scales",
  "make_nio_step",
  "measure",
  "nio",
  "nio_objective",
  "per_example_grads",
  "project_min_scale",
  "rescale_adam",
  "scale_by_split_adam",
  "subbatch_bounds",
  "subbatch_weights",
  "GRADINIT_RECIPES",
  "GradInitConfig",
  "LSUVConfig",
  "MetaInitConfig",
  "available_methods",
  "get_method",
  "gradinit",
  "initialize",
  "kaiming",
  "lsuv",
  "metainit",
  "register",
]
