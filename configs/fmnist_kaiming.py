"""Fashion-MNIST (first 30k training images), cnn_small 16/32/64: the model's own (PyTorch-default / Kaiming) init, same training
as configs/fmnist_nio.py (the baseline to compare with):

    nio-jax train --config configs/fmnist_kaiming.py
"""

from nio_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "fmnist_kaiming"
  c.model.name = "cnn_small"
  c.model.kwargs.channels = (16, 32)
  c.model.kwargs.hidden = 64
  c.data.train_subset = 30000
  c.data.dataset = "fashion_mnist"
  c.data.batch_size = 128
  c.init.method = "kaiming"
  c.init.batch_size = 64
  c.init.measure_batches = 3
  c.train.num_epochs = 1
  c.train.eval_batch_size = 1000
  return c
