"""Fashion-MNIST (first 30k training images), cnn_small 16/32/64: GradInit (SGD variant, CIFAR hyper-parameters η = 0.1, γ = 1,
normalised gradient, scale lr 1e-2) for 30 steps on S = 64 (two batches per step: S and the
fresh half B2), then the same training as configs/fmnist_nio.py:

    nio-jax train --config configs/fmnist_gradinit.py
"""

from nio_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "fmnist_gradinit"
  c.model.name = "cnn_small"
  c.model.kwargs.channels = (16, 32)
  c.model.kwargs.hidden = 64
  c.data.train_subset = 30000
  c.data.dataset = "fashion_mnist"
  c.data.batch_size = 128
  c.init.method = "gradinit"
  c.init.batch_size = 64
  c.init.config.num_steps = 30
  c.init.config.eta = 0.1
  c.init.config.gamma = 1.0
  c.init.config.lr = 1e-2
  c.init.config.batch_size = 64
  c.init.measure_batches = 3
  c.train.num_epochs = 1
  c.train.eval_batch_size = 1000
  return c
