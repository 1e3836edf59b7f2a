"""Fashion-MNIST (padded to 32×32), ResNet-8 with Fixup (no normalisation; last conv of
every branch and the classifier at zero, scalar biases and multipliers at lr/10 through the
no-norm recipe), 1 epoch on the first 10,000 training images:

    nio-jax train --config configs/fmnist_fixup.py
"""

from nio_jax.experiment_config import config_from


def get_config():
  c = config_from("fmnist_base.py", __file__)
  c.name = "fmnist_fixup"
  c.model.name = "resnet20"
  c.model.kwargs = {"depth": 8, "variant": "fixup", "scan": False}  # as in the recorded runs
  c.data.pad_to_32 = True
  c.data.train_subset = 10000
  c.init.method = "fixup"
  c.init.measure_batches = 2
  return c
