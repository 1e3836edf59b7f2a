"""Fashion-MNIST (first 30k training images), cnn_small 16/32/64: MetaInit as in the paper's listing (sign-momentum on the norms of
the ≥2-dim weights, lr 0.1, momentum 0.9) on random Gaussian inputs with random labels,
30 steps of batch 64 (the paper: 500), then the same training as configs/fmnist_nio.py:

    nio-jax train --config configs/fmnist_metainit.py
"""

from nio_jax.experiment_config import config_from


def get_config():
  c = config_from("fmnist_base.py", __file__)
  c.name = "fmnist_metainit"
  c.init.method = "metainit"
  c.init.data = "random"
  c.init.config.num_steps = 30
  return c
