"""What the methods' config classes share (NIOConfig, GradInitConfig, MetaInitConfig, ...):
`config_values` (a plain dict of field values from None, an instance, a dict, a ConfigDict
or a named recipe), `to_plain_dict`, `static_mask` and two value checks.

The experiment config's `init` group becomes one of these classes in
`nio_jax.experiment_config.build_method_config`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def config_values(
  cls, config, overrides: dict, what: str, named: Mapping[str, Mapping[str, Any]] | None = None
) -> dict:
  """Plain dict of field values from None / instance / dict / ConfigDict / a named recipe.

  Unknown keys raise `ValueError` listing the known ones.
  """
  if config is None:
    values = {}
  elif isinstance(config, cls):
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
  elif isinstance(config, str):
    if not named or config not in named:
      raise ValueError(
        f"unknown {what} recipe {config!r}; known: {', '.join(sorted(named or {})) or '(none)'}."
      )
    values = dict(named[config])
  elif hasattr(config, "to_dict"):
    values = dict(config.to_dict())
  elif isinstance(config, Mapping):
    values = dict(config)
  else:
    raise TypeError(
      f"config must be None, {cls.__name__}, a dict, an ml_collections ConfigDict"
      f"{' or a recipe name' if named else ''}; got {type(config).__name__}."
    )
  values.update(overrides)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown {what} config key(s) {unknown}; known: {sorted(known)}.")
  return values


def check_int(name: str, value, minimum: int, hint: str = "") -> None:
  """Raises `TypeError` unless `value` is an int, `ValueError` when it is below `minimum`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}{hint}.")


def check_betas(b1, b2) -> None:
  """Raises unless the Adam betas `b1`, `b2` are finite numbers in [0, 1)."""
  for n, b in (("b1", b1), ("b2", b2)):
    if isinstance(b, bool) or not isinstance(b, (int, float, np.number)) or not math.isfinite(b):
      raise TypeError(f"{n} must be a number, got {b!r}.")
  if not (0 <= b1 < 1 and 0 <= b2 < 1):
    raise ValueError(f"Adam betas ({b1}, {b2}) must lie in [0, 1).")


def to_plain_dict(cfg) -> dict:
  """`dataclasses.asdict` with callables replaced by their names (for InitResult.config)."""
  d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  for k, v in d.items():
    if callable(v):
      d[k] = getattr(v, "__name__", repr(v))
  return d


def static_mask(params, predicate) -> Any:
  """Tree of Python bools, `predicate(path, leaf)` per leaf (all True for None)."""
  import jax

  if predicate is None:
    return jax.tree_util.tree_map(lambda _: True, params)
  return jax.tree_util.tree_map_with_path(lambda p, x: bool(predicate(p, x)), params)
