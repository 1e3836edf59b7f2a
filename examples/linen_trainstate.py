"""Drop NIO into a linen `TrainState` loop: a CNN with BatchNorm and Dropout, a `training`
flag, and `(images, labels)` tuple batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import nio_jax
from nio_jax.flax_utils import linen_loss_fn


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not training)(nn.Conv(8, (3, 3))(x)))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.Dropout(0.2, deterministic=not training)(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
  batch_stats: dict


model = CNN()
key = jax.random.PRNGKey(0)
images = jax.random.normal(key, (64, 28, 28, 1))
labels = jax.random.randint(key, (64,), 0, 10)
batches = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)]
variables = model.init(key, images[:2])

# 1. NIO tunes one scale per parameter tensor of variables["params"]. The loss runs the model
#    as in training (training=True, found in the signature): batch statistics, whose update
#    is discarded (the running statistics stay untouched), and dropout with a fresh key for
#    every batch (dropout=False turns it off for the search).
loss_fn = linen_loss_fn(model, batch_stats=variables["batch_stats"])
result = nio_jax.nio(
  loss_fn,
  variables["params"],
  batches,
  {"num_steps": 8, "num_chunks": 4, "overlap": 0.2, "lr": 0.01},
)
print("GC per step:", result.history["gc"].round(3))

# 2. Train from the initialised params as usual.
state = TrainState.create(
  apply_fn=model.apply,
  params=result.params,
  batch_stats=variables["batch_stats"],
  tx=optax.sgd(0.05, momentum=0.9),
)


@jax.jit
def train_step(state, batch, key):
  x, y = batch

  def loss(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      x,
      training=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses.mean(), updates["batch_stats"]

  (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=stats), value


for step, batch in enumerate(batches):
  state, value = train_step(state, batch, jax.random.fold_in(key, step))
print("last training loss:", float(value))
