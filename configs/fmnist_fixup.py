"""Fashion-MNIST (padded to 32×32), ResNet-8 with Fixup (no normalisation; last conv of
every branch and the classifier at zero, scalar biases and multipliers at lr/10 through the
no-norm recipe), 1 epoch on the first 10,000 training images:

    nio-jax train --config configs/fmnist_fixup.py
"""

from nio_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "fmnist_fixup"
  c.model.name = "resnet20"
  c.model.kwargs.depth = 8
  c.model.kwargs.variant = "fixup"
  c.model.kwargs.scan = False  # on XLA:CPU the gradient of nn.scan stacks is much slower
  c.data.dataset = "fashion_mnist"
  c.data.pad_to_32 = True
  c.data.batch_size = 128
  c.data.train_subset = 10000
  c.init.method = "fixup"
  c.init.batch_size = 64
  c.init.measure_batches = 2
  c.train.num_epochs = 1
  c.train.eval_batch_size = 1000
  return c
