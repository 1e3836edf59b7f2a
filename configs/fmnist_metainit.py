"""Fashion-MNIST (first 30k training images), cnn_small 16/32/64: MetaInit as in the paper's listing (sign-momentum on the norms of
the ≥2-dim weights, lr 0.1, momentum 0.9) on random Gaussian inputs with random labels,
30 steps of batch 64 (the paper: 500), then the same training as configs/fmnist_nio.py:

    nio-jax train --config configs/fmnist_metainit.py
"""

from nio_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "fmnist_metainit"
  c.model.name = "cnn_small"
  c.model.kwargs.channels = (16, 32)
  c.model.kwargs.hidden = 64
  c.data.train_subset = 30000
  c.data.dataset = "fashion_mnist"
  c.data.batch_size = 128
  c.init.method = "metainit"
  c.init.data = "random"
  c.init.batch_size = 64
  c.init.config.variant = "sign_momentum"
  c.init.config.num_steps = 30
  c.init.measure_batches = 3
  c.train.num_epochs = 1
  c.train.eval_batch_size = 1000
  return c
