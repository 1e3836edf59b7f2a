"""Versions users can trust: pyproject bounds, the tested set (constraints.txt), and the guard
that stops the jaxpr-internal conv rewrite on a JAX release no test has run it on."""

from __future__ import annotations

import pathlib
import re
import tomllib
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packaging.requirements import Requirement

from nio_jax import jaxpr_rewrites

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _requirements():
  proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  reqs = [Requirement(r) for r in proj["dependencies"]]
  for extra in proj["optional-dependencies"].values():
    reqs += [Requirement(r) for r in extra]
  return reqs


def _constraints():
  pins = {}
  for line in (ROOT / "constraints.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[re.sub(r"[-_.]+", "-", name).lower()] = version
  return pins


def test_every_dependency_bounded_and_pinned_inside_its_bound():
  pins = _constraints()
  for req in _requirements():
    spec = req.specifier
    assert any(s.operator in ("<", "==", "<=", "~=") for s in spec), f"{req} has no upper bound"
    name = re.sub(r"[-_.]+", "-", req.name).lower()
    assert name in pins, f"{req.name} is not in constraints.txt (the tested set)"
    assert spec.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} outside {spec}"


def test_installed_versions_inside_the_bounds():
  """The environment the suite runs in is inside pyproject's bounds (what CI tests)."""
  for req in _requirements():
    try:
      version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
      continue  # an extra not installed here (its tests skip)
    public = version.split("+")[0]  # torch's local "+cpu"
    assert req.specifier.contains(public, prereleases=True), f"{req.name} {version} vs {req}"


def _conv_loss(params, batch):
  y = jax.lax.conv_general_dilated(
    batch["x"], params["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jnp.mean(y**2, axis=(1, 2, 3))


def _conv_args():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.standard_normal((2, 5, 5, 2)), jnp.float32)}
  return params, batch


@pytest.mark.parametrize("version", ["0.11.0", "0.13.1", "1.0.0", "0.9.2", "nightly"])
def test_conv_rewrite_refuses_an_untested_jax(monkeypatch, version):
  monkeypatch.delenv(jaxpr_rewrites.ALLOW_UNTESTED_JAX_ENV, raising=False)
  monkeypatch.setattr(jax, "__version__", version)
  params, batch = _conv_args()
  with pytest.raises(RuntimeError, match=rf"tested on jax 0\.10\.x only; this is jax {version}"):
    jaxpr_rewrites.rewrite_convs(_conv_loss, "im2col")
  with pytest.raises(RuntimeError, match="NIO_JAX_ALLOW_UNTESTED_JAX=1"):
    jaxpr_rewrites.im2col_bytes(_conv_loss, params, batch)


def test_conv_rewrite_runs_on_the_tested_jax_and_when_allowed(monkeypatch):
  params, batch = _conv_args()
  want = _conv_loss(params, batch)
  monkeypatch.delenv(jaxpr_rewrites.ALLOW_UNTESTED_JAX_ENV, raising=False)
  monkeypatch.setattr(jax, "__version__", "0.10.7")  # a patch release of the tested minor
  np.testing.assert_allclose(
    jaxpr_rewrites.rewrite_convs(_conv_loss)(params, batch), want, rtol=1e-5
  )
  monkeypatch.setattr(jax, "__version__", "0.12.0")
  monkeypatch.setenv(jaxpr_rewrites.ALLOW_UNTESTED_JAX_ENV, "1")  # the user's explicit choice
  np.testing.assert_allclose(
    jaxpr_rewrites.rewrite_convs(_conv_loss)(params, batch), want, rtol=1e-5
  )
  assert jaxpr_rewrites.im2col_bytes(_conv_loss, params, batch) == 2 * 5 * 5 * 9 * 2 * 4
