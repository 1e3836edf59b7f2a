"""The main demo: Kaiming, NIO and GradInit on VGG-19 without normalisation (x1/8), Fashion-MNIST.

    nio-jax compare --config configs/fmnist_compare.py        # what `bash scripts/demo.sh` runs

The reproduction grid's protocol (`configs/sweep_fmnist.py`), shortened to fit a few minutes
on a 2-core CPU: all 60,000 training images (zero-padded to 32x32), batch 128, SGD momentum
0.9, lr 0.1 constant, the no-norm recipe (biases at lr/10, clipping at norm 1, weight decay
1e-4), seed 0 for every method (the same initial params and the same data order). 150
training steps, test accuracy on the first 2,000 test images every 25 steps. Searches on
batches of 64: NIO with its released defaults (batch setting, gamma = 10) and GradInit with
the VGG-19 recipe, each shortened (see `SEARCH_STEPS`); GC and gradient norm before and
after each search on the same 2 batches.

This net without normalisation is where a learned init shows most clearly in the grid
(README, "Reproduction"): over 3 seeds and 100-step searches, Kaiming reaches 30.4 % at step
50 against NIO's 62.5 % and GradInit's 50.5 %.
"""

from nio_jax.experiment_config import config_module

SEARCH_STEPS = {"nio": 40, "gradinit": 25}
TRAIN_STEPS = 150
EVAL_EVERY = 25


def get_config():
  c = config_module("sweep_fmnist.py", __file__).cell_config("vgg19_nobn", "kaiming")
  c.name = "fmnist_compare"
  c.seed = 0
  c.max_steps = TRAIN_STEPS
  c.eval.steps = tuple(range(EVAL_EVERY, TRAIN_STEPS + 1, EVAL_EVERY))
  c.eval.last_on_full_test = False  # every point of the curve on the same 2,000 images
  c.train.progress = True
  c.compare.methods = ("kaiming", "nio", "gradinit")
  c.compare.overrides.nio = (f"init.config.num_steps={SEARCH_STEPS['nio']}",)
  c.compare.overrides.gradinit = (
    "init.recipe=vgg19",
    f"init.config.num_steps={SEARCH_STEPS['gradinit']}",
    "init.config.batch_size=None",
  )
  return c
