"""Drop NIO into an NNX `nnx.Optimizer` loop: a CNN with `nnx.BatchNorm` and `nnx.Dropout`."""

import jax
import numpy as np
import optax
from flax import nnx

import nio_jax
from nio_jax.flax_utils import classification_losses, nnx_loss_fn


class CNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.head(self.dropout(x.mean(axis=(1, 2))))


model = CNN(nnx.Rngs(0))
key = jax.random.PRNGKey(1)
images = jax.random.normal(key, (64, 28, 28, 1))
labels = jax.random.randint(key, (64,), 0, 10)
batches = [{"image": images[i : i + 16], "label": labels[i : i + 16]} for i in range(0, 64, 16)]

# 1. NIO on the model's nnx.Param state. Each loss call runs a fresh copy of the model in
#    training mode (batch statistics, dropout with a fresh key per batch); the model object,
#    its BatchStats and its RNG counters are untouched until nnx.update.
loss_fn, params = nnx_loss_fn(model)
mean_before = np.array(model.bn.mean[...])
result = nio_jax.nio(loss_fn, params, batches, {"num_steps": 8, "lr": 0.01})
assert np.array_equal(mean_before, model.bn.mean[...])
nnx.update(model, result.params)
print("GC per step:", result.history["gc"].round(3))

# 2. Train as usual.
optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, batch):
  def loss(m):
    return classification_losses(m(batch["image"]), batch["label"]).mean()

  value, grads = nnx.value_and_grad(loss)(model)
  optimizer.update(model, grads)
  return value


model.train()
for batch in batches:
  value = train_step(model, optimizer, batch)
print("last training loss:", float(value))
