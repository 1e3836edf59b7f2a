"""Drop NIO into a linen `TrainState` loop (a batch-norm CNN, so `batch_stats` is handled)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import nio_jax
from nio_jax.flax_utils import linen_loss_fn


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class TrainState(train_state.TrainState):
  batch_stats: dict


model = CNN()
key = jax.random.PRNGKey(0)
images = jax.random.normal(key, (64, 28, 28, 1))
labels = jax.random.randint(key, (64,), 0, 10)
batches = [{"image": images[i : i + 16], "label": labels[i : i + 16]} for i in range(0, 64, 16)]
variables = model.init(key, images[:2], train=False)

# 1. NIO tunes one scale per parameter tensor of variables["params"]. The loss uses batch
#    statistics and discards their update: the running statistics stay untouched.
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
def train_step(state, batch):
  def loss(params):
    logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      batch["image"],
      train=True,
      mutable=["batch_stats"],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses.mean(), updates["batch_stats"]

  (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=stats), value


for batch in batches:
  state, value = train_step(state, batch)
print("last training loss:", float(value))
