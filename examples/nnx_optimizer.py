"""Drop NIO into an NNX `nnx.Optimizer` loop."""

import jax
import optax
from flax import nnx

import nio_jax
from nio_jax.flax_utils import classification_losses, nnx_loss_fn


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(784, 64, rngs=rngs)
    self.l2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x.reshape(x.shape[0], -1))))


model = MLP(nnx.Rngs(0))
key = jax.random.PRNGKey(1)
images = jax.random.normal(key, (64, 28, 28, 1))
labels = jax.random.randint(key, (64,), 0, 10)
batches = [{"image": images[i : i + 16], "label": labels[i : i + 16]} for i in range(0, 64, 16)]

# 1. NIO on the model's nnx.Param state; the model object is untouched until nnx.update.
loss_fn, params = nnx_loss_fn(model)
result = nio_jax.nio(loss_fn, params, batches, {"num_steps": 8, "lr": 0.01})
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


for batch in batches:
  value = train_step(model, optimizer, batch)
print("last training loss:", float(value))
