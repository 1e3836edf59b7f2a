"""Fashion-MNIST (first 30k training images), cnn_small 16/32/64: the model's own (PyTorch-default / Kaiming) init, same training
as configs/fmnist_nio.py (the baseline to compare with):

    nio-jax train --config configs/fmnist_kaiming.py
"""

from nio_jax.experiment_config import config_from


def get_config():
  c = config_from("fmnist_base.py", __file__)
  c.name = "fmnist_kaiming"
  c.init.method = "kaiming"
  return c
