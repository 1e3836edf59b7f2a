"""One interface for every initialisation method: `initialize(method, loss_fn, params, data)`.

A method is a function `fn(loss_fn, params, data, config=None, *, progress=False, mesh=None)
-> InitResult` registered under a name with `@register("name", config_cls=..., **facts)`:
every method takes `mesh` (those that do no data-dependent work ignore it), and its config
class has `create(config=None, **overrides)` and `to_dict()`. The facts (`Method`: its
label, the data it accepts, batches per step, seeding, recipes, whether it searches) are
what the experiment layer and the reports read; they never test a method's name. Adding a
method = one new module in `nio_jax/methods/` that decorates its entry point, plus one
import line in `nio_jax/methods/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from nio_jax import checks
from nio_jax.results import InitResult

PyTree = Any


# The kinds of data a method can be handed (`init.data` in an experiment config).
DATA_KINDS = ("real", "random")


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method: its name, entry point, config class and the facts the layers above
  read (the experiment config, the driver, the reports), so that adding a method touches
  only `nio_jax/methods/`.

  Attributes:
    name: the registered name.
    fn: the entry point `fn(loss_fn, params, data, config, *, progress, mesh) -> InitResult`.
    config_cls: its config class (`create(config=None, **overrides)`, `to_dict()`), or None.
    label: the display name in reports ("NIO"); default: `name`.
    data: the kinds of data it accepts: "real" (an iterable of training batches) and/or
      "random" (a shape spec `{"image": (B, ...), "num_classes": K}` for Gaussian inputs).
      The first is the default.
    batches_per_step: batches one step consumes, an int or `fn(config) -> int` (GradInit: 2,
      1 with `lookahead="thirds"`); with the config's `num_steps` this gives `num_batches`.
    seeded: the data kinds under which the config's `seed` defaults to the run's seed (MetaInit
      under "random": its Gaussian inputs; LSUV under "real": its orthonormal kernels).
    recipes: named sets of config values (`init.recipe`), merged under the config's own.
    searches: True when it does data-dependent work whose cost is reported against a
      training step (a search); False for rules applied to the params (Kaiming, Fixup).
  """

  name: str
  fn: Callable[..., InitResult]
  config_cls: type | None = None
  label: str = ""
  data: tuple[str, ...] = ("real",)
  batches_per_step: int | Callable[[Any], int] = 1
  seeded: tuple[str, ...] = ()
  recipes: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  searches: bool = False

  def __post_init__(self):
    if not self.label:
      object.__setattr__(self, "label", self.name)
    for field in ("data", "seeded"):
      kinds = tuple(getattr(self, field))
      object.__setattr__(self, field, kinds)
      bad = [k for k in kinds if k not in DATA_KINDS]
      if bad or (field == "data" and not kinds):
        raise ValueError(
          f"method {self.name!r}: {field} must be kinds of {DATA_KINDS}, got {kinds!r}."
        )

  @property
  def doc(self) -> str:
    """The first line of the entry point's docstring ("" without one)."""
    return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""

  def num_batches(self, config) -> int:
    """Batches the method consumes with `config` (its built config, a dict or None): the
    config's `num_steps` (1 without one) x `batches_per_step`."""
    steps = getattr(config, "num_steps", None)
    if steps is None and isinstance(config, Mapping):
      steps = config.get("num_steps")
    per = self.batches_per_step
    per = per(config) if callable(per) else per
    return int(steps or 1) * int(per or 1)

  def is_seeded(self, data: str) -> bool:
    """True when the config's `seed` defaults to the run's seed under `data`."""
    return data in self.seeded


_REGISTRY: dict[str, Method] = {}


def register(
  name: str,
  *,
  config_cls: type | None = None,
  label: str = "",
  data: tuple[str, ...] = ("real",),
  batches_per_step: int | Callable[[Any], int] = 1,
  seeded: tuple[str, ...] = (),
  recipes: Mapping[str, Mapping[str, Any]] | None = None,
  searches: bool = False,
):
  """Decorator registering `fn` under `name` with its facts (the `Method` attributes); a name
  can be registered once."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"method name must be a non-empty string, got {name!r}.")
  facts = dict(
    label=label,
    data=data,
    batches_per_step=batches_per_step,
    seeded=seeded,
    recipes=dict(recipes or {}),
    searches=bool(searches),
  )

  def deco(fn):
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
      raise ValueError(
        f"method {name!r} is already registered "
        f"(by {_REGISTRY[name].fn.__module__}.{_REGISTRY[name].fn.__name__})."
      )
    _REGISTRY[name] = Method(name, fn, config_cls, **facts)
    return fn

  return deco


def unregister(name: str) -> None:
  """Removes the method registered under `name` (a no-op for an unknown name); for tests and
  interactive sessions that register a method of their own."""
  _REGISTRY.pop(name, None)


def available_methods() -> tuple[str, ...]:
  """The registered method names, sorted."""
  return tuple(sorted(_REGISTRY))


def get_method(method: str) -> Method:
  """The registered `Method`; unknown names raise ValueError listing the known ones."""
  if not isinstance(method, str) or method not in _REGISTRY:
    raise ValueError(
      f"unknown initialisation method {method!r}; known: {', '.join(available_methods())}."
    )
  return _REGISTRY[method]


def initialize(
  method: str,
  loss_fn: Callable,
  params: PyTree,
  data: Any,
  config=None,
  *,
  progress: bool = False,
  mesh=None,
) -> InitResult:
  """Runs the initialisation method `method` and returns its `InitResult`.

  Args:
    method: a registered name: "nio", "gradinit", "gradinit_adam", "metainit", "fixup",
      "kaiming", "lsuv" (see `available_methods()`).
    loss_fn: `loss_fn(params, batch) -> [B]` per-example losses.
    params: initial parameters θ0 (from the model's own init).
    data: what the method consumes: an iterable of batches (NIO, GradInit, MetaInit on real
      data; LSUV uses the first batch), or MetaInit's random-input shape spec; ignored by
      Kaiming and Fixup.
    config: None = the method's published defaults; otherwise the method's config class,
      a dict or ConfigDict of overrides (or, for GradInit, a recipe name).
    progress: show a progress bar (searches only).
    mesh: optional `jax.sharding.Mesh` (`nio_jax.distributed.make_mesh()`), passed to every
      method: data parallel for those that do data-dependent work (nio, gradinit,
      gradinit_adam, metainit, lsuv); Kaiming and Fixup ignore it.
  """
  m = get_method(method)
  checks.check_not_callable(params)  # initialize(method, params, loss_fn, ...): say so
  return m.fn(loss_fn, params, data, config, progress=progress, mesh=mesh)
