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

from nio_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "fmnist_nio"
  c.model.name = "cnn_small"
  c.model.kwargs.channels = (16, 32)
  c.model.kwargs.hidden = 64
  c.data.dataset = "fashion_mnist"
  c.data.batch_size = 128
  c.init.method = "nio"
  c.init.batch_size = 64
  c.init.config.num_steps = 30
  c.init.config.num_chunks = 4
  c.init.config.overlap = 0.2
  c.init.config.gamma = 5.0
  c.init.config.lr = 3e-3
  c.init.measure_batches = 3
  c.data.train_subset = 30000
  c.train.num_epochs = 1
  c.train.eval_batch_size = 1000
  c.train.log_every = 50
  return c
