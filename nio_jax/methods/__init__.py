"""Every compared initialisation method behind one interface.

    from nio_jax.methods import initialize
    result = initialize("gradinit", loss_fn, params, batches, "resnet110_bn")

Methods (see `available_methods()`): "nio", "gradinit", "gradinit_adam", "metainit",
"fixup", "kaiming", "lsuv". A new method = one module that decorates its entry point with
`@register("name", config_cls=..., **facts)` (the `Method` facts: label, data, batches per
step, seeding, recipes, searches) + one import line below; every entry point has the shape
`fn(loss_fn, params, data, config=None, *, progress=False, mesh=None) -> InitResult`.
"""

# Registration: importing a method module registers its method.
from nio_jax.methods import nio  # noqa: F401  (the module: registers "nio")
from nio_jax.methods.fixup import FixupConfig, fixup, fixup_rules
from nio_jax.methods.gradinit import (
  GRADINIT_RECIPES,
  GradInitAdamConfig,
  GradInitConfig,
  gradinit,
  gradinit_adam,
  make_gradinit_step,
)
from nio_jax.methods.kaiming import KaimingConfig, kaiming
from nio_jax.methods.lsuv import LSUVConfig, LSUVLayer, lsuv, lsuv_layers
from nio_jax.methods.metainit import (
  MetaInitConfig,
  gradient_quotient,
  hessian_vector_product,
  make_metainit_step,
  metainit,
  random_batches,
)
from nio_jax.methods.registry import (
  DATA_KINDS,
  Method,
  available_methods,
  get_method,
  initialize,
  register,
  unregister,
)

__all__ = [
  "DATA_KINDS",
  "GRADINIT_RECIPES",
  "FixupConfig",
  "GradInitAdamConfig",
  "GradInitConfig",
  "KaimingConfig",
  "LSUVConfig",
  "LSUVLayer",
  "Method",
  "MetaInitConfig",
  "available_methods",
  "fixup",
  "fixup_rules",
  "get_method",
  "gradient_quotient",
  "gradinit",
  "gradinit_adam",
  "hessian_vector_product",
  "initialize",
  "kaiming",
  "lsuv",
  "lsuv_layers",
  "make_gradinit_step",
  "make_metainit_step",
  "metainit",
  "random_batches",
  "register",
  "unregister",
]
