"""Base config of the Fashion-MNIST experiments: every `configs/fmnist_*.py` and the sweep
grid start from it and change only what differs.

Model cnn_small with 16/32 channels and a 64-unit hidden layer; data: the first 30,000
training images, batch 128, the full 10,000-image test set; searches on batches of 64; the
GC / gradient-norm report over 3 batches; training: the repository's SGD recipe
(`nio_jax.train.default_config()`; no-norm models: biases at lr/10, clip 1), 1 epoch.
Method hyper-parameters are the method config classes' defaults (`NIOConfig`, ...) unless an
experiment sets one. On its own it runs NIO with the released settings:

    nio-jax init --config configs/fmnist_base.py
"""

from nio_jax.experiment_config import base_config


def get_config():
  c = base_config()
  c.name = "fmnist"
  c.model.name = "cnn_small"
  c.model.kwargs.channels = (16, 32)
  c.model.kwargs.hidden = 64
  c.data.dataset = "fashion_mnist"
  c.data.batch_size = 128
  c.data.train_subset = 30000
  c.init.batch_size = 64
  c.init.measure_batches = 3
  c.train.num_epochs = 1
  c.train.eval_batch_size = 1000
  return c
