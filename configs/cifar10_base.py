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

from nio_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "cifar10"
  c.data.dataset = "cifar10"
  c.data.batch_size = 128
  c.init.batch_size = 64
  c.init.measure_batches = 10
  c.train.num_epochs = 200
  return c
