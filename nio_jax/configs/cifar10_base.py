"""Base config of the CIFAR experiments (`cifar10_table.py`, `cifar_densenet_wrn.py`,
`vit_nowarmup.py` start from it and change only what differs; CIFAR-100 runs change
`data.dataset`).

CIFAR-10, batch 128 with the recipe augmentation, the published SGD recipe
(`nio_jax.train.default_config()`: lr 0.1, cosine, weight decay 1e-4) for 200 epochs;
searches on batches of 64; the GC / gradient-norm report over 10 batches. Method
hyper-parameters are the method config classes' defaults (`NIOConfig` holds NIO's released
settings) unless an experiment sets one. On its own (cnn_small: the schema's default model):

    nio-jax init --config configs/cifar10_base.py
"""

import math

from nio_jax.experiment_config import base_config

TRAIN_SIZE = 50_000  # training images of CIFAR-10 and CIFAR-100


def get_config():
  c = base_config()
  c.name = "cifar10"
  c.data.dataset = "cifar10"
  c.data.batch_size = 128
  c.init.batch_size = 64
  c.init.measure_batches = 10
  c.train.num_epochs = 200
  return c


def experiment(
  name: str,
  model: str,
  model_kwargs: dict,
  method: str,
  recipe: str,
  *,
  dataset: str = "cifar10",
  search_batch_size: int | None = None,
):
  """The base config with a model and an init method set as the GradInit authors' CIFAR
  experiments run them (`cifar10_table.py`, `cifar_densenet_wrn.py`).

  Args:
    name: the config's name (its default workdir).
    model: registry model name; `model_kwargs` update its kwargs.
    model_kwargs: model kwargs.
    method: init method. GradInit runs the model's released `recipe`; MetaInit the GradInit
      authors' RescaleAdam baseline (lr 1e-3) on real batches for one pass over the
      training set at `init.batch_size`; other methods keep their config defaults.
    recipe: the model's GradInit recipe (`nio_jax.methods.GRADINIT_RECIPES`).
    dataset: "cifar10" or "cifar100".
    search_batch_size: `init.batch_size` of the GradInit / MetaInit searches (None: the
      base's 64).

  Returns:
    The config.
  """
  c = get_config()
  c.name = name
  c.data.dataset = dataset
  c.model.name = model
  c.model.kwargs.update(model_kwargs)
  c.init.method = method
  if method in ("gradinit", "metainit") and search_batch_size is not None:
    c.init.batch_size = search_batch_size
  if method == "gradinit":
    c.init.recipe = recipe
  elif method == "metainit":
    c.init.config.variant = "rescale_adam"
    c.init.config.lr = 1e-3
    c.init.config.num_steps = math.ceil(TRAIN_SIZE / c.init.batch_size)  # one pass
  return c
