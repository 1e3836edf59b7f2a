"""One interface for every initialisation method: `initialize(method, loss_fn, params, data)`.

A method is a function `fn(loss_fn, params, data, config=None, *, progress=False, mesh=None)
-> InitResult` registered under a name with `@register("name", config_cls=...)`: every method
takes `mesh` (those that do no data-dependent work ignore it), and its config class has
`create(config=None, **overrides)` and `to_dict()`. Adding a method = one new
module in `nio_jax/methods/` that decorates its entry point, plus one import line in
`nio_jax/methods/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from nio_jax import checks
from nio_jax.results import InitResult

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method: its name, entry point and (optional) config class."""

  name: str
  fn: Callable[..., InitResult]
  config_cls: type | None = None

  @property
  def doc(self) -> str:
    """The first line of the entry point's docstring ("" without one)."""
    return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, config_cls: type | None = None):
  """Decorator registering `fn` under `name` (a name can be registered once)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"method name must be a non-empty string, got {name!r}.")

  def deco(fn):
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
      raise ValueError(
        f"method {name!r} is already registered "
        f"(by {_REGISTRY[name].fn.__module__}.{_REGISTRY[name].fn.__name__})."
      )
    _REGISTRY[name] = Method(name, fn, config_cls)
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
