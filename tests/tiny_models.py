"""Tiny models shared by the core tests: plain-JAX MLP and conv net with named leaves."""

import jax
import jax.numpy as jnp
import numpy as np


def mlp_params(key, sizes=(5, 8, 3), bias=0.1):
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a),
      "bias": bias * (i + 1) * (jnp.linspace(-1.0, 1.0, b) + 0.5),
    }
  return params


def mlp_logits(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


def xent(logits, y):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def mlp_loss(params, batch):
  return xent(mlp_logits(params, batch["x"]), batch["y"])


def mlp_batch(key, b=8, d=5, c=3):
  k1, k2 = jax.random.split(key)
  return {"x": jax.random.normal(k1, (b, d)), "y": jax.random.randint(k2, (b,), 0, c)}


def conv_params(key, cin=2, ch=3, classes=3):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "conv0": {
      "kernel": jax.random.normal(k1, (3, 3, cin, ch)) / np.sqrt(9 * cin),
      "bias": jnp.full((ch,), 0.05),
    },
    "conv1": {
      "kernel": jax.random.normal(k2, (3, 3, ch, ch)) / np.sqrt(9 * ch),
      "bias": jnp.full((ch,), -0.05),
    },
    "head": {
      "kernel": jax.random.normal(k3, (ch, classes)) / np.sqrt(ch),
      "bias": 0.02 * (jnp.arange(classes) - 0.5),
    },
  }


def _conv(x, k, b):
  y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + b


def conv_logits(params, x):
  h = jax.nn.relu(_conv(x, params["conv0"]["kernel"], params["conv0"]["bias"]))
  h = jnp.tanh(_conv(h, params["conv1"]["kernel"], params["conv1"]["bias"]))
  h = jnp.mean(h, axis=(1, 2))
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def conv_loss(params, batch):
  return xent(conv_logits(params, batch["x"]), batch["y"])


def conv_batch(key, b=8, hw=5, cin=2, c=3):
  k1, k2 = jax.random.split(key)
  return {"x": jax.random.normal(k1, (b, hw, hw, cin)), "y": jax.random.randint(k2, (b,), 0, c)}
