"""Fashion-MNIST (first 30k training images), cnn_small 16/32/64: GradInit (SGD variant, CIFAR hyper-parameters η = 0.1, γ = 1,
normalised gradient, scale lr 1e-2) for 30 steps on S = 64 (two batches per step: S and the
fresh half B2), then the same training as configs/fmnist_nio.py:

    nio-jax train --config configs/fmnist_gradinit.py
"""

from nio_jax.experiment_config import config_from


def get_config():
  c = config_from("fmnist_base.py", __file__)
  c.name = "fmnist_gradinit"
  c.init.method = "gradinit"
  c.init.config.num_steps = 30
  c.init.config.lr = 1e-2
  c.init.config.batch_size = 64
  return c
