"""Every compared initialisation method behind one interface.

    from nio_jax.methods import initialize
    result = initialize("gradinit", loss_fn, params, batches, "resnet110_bn")

Methods (see `available_methods()`): "nio", "gradinit", "gradinit_adam", "metainit",
"fixup", "kaiming", "lsuv". A new method = one module that decorates its entry point with
`@register("name")` + one import line below.
"""

# Registration: one import per method module.
from nio_jax.methods import (
  builtin,  # noqa: F401  (nio)
  fixup_entry,  # noqa: F401  (fixup)
)
from nio_jax.methods import gradinit as _gradinit_module  # noqa: F401
from nio_jax.methods import kaiming as _kaiming_module  # noqa: F401
from nio_jax.methods import lsuv as _lsuv_module  # noqa: F401
from nio_jax.methods import metainit as _metainit_module  # noqa: F401
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
from nio_jax.methods.registry import Method, available_methods, get_method, initialize, register

__all__ = [
  "GRADINIT_RECIPES",
  "GradInitAdamConfig",
  "GradInitConfig",
  "KaimingConfig",
  "LSUVConfig",
  "LSUVLayer",
  "Method",
  "MetaInitConfig",
  "available_methods",
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
]
