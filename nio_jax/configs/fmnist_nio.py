"""Fashion-MNIST, cnn_small: NIO (batch GradCosine, D=4, r=0.2) then a short training run.

Runs on a 2-core CPU in a few minutes (see docs/cli.md for the measured time):

    nio-jax train --config configs/fmnist_nio.py

Just the search and the GC / gradient-norm report:

    nio-jax init --config configs/fmnist_nio.py

Model: cnn_small with 16/32 channels and a 64-unit hidden layer. Data: the first 30,000
training images, the full 10,000-image test set. NIO here: 30 steps on batches of 64 with
the released update (RescaleAdam, objective gc_gn_sqrt); γ = 5 suits this small net's gradient norms better than the ImageNet γ = 10
(which is never reached here, so every step would be an objective step either way).
Training: the repository's SGD recipe (no-norm model: biases at lr/10, clip 1), 1 epoch.
"""

from nio_jax.experiment_config import config_from


def get_config():
  c = config_from("fmnist_base.py", __file__)
  c.name = "fmnist_nio"
  c.init.method = "nio"
  c.init.config.num_steps = 30
  c.init.config.gamma = 5.0
  return c
