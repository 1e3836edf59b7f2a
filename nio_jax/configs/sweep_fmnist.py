"""Sweep grid `fmnist`: the protocol of issue 13 (fixed before any run; do not tune it).

    python -m benchmarks.sweep --grid fmnist --time-one   # one run of each model, timed
    python -m benchmarks.sweep --grid fmnist              # the grid, resumable
    python -m benchmarks.sweep_stats                      # significance tables from the runs

* Data: all 60,000 Fashion-MNIST training images, shuffled per seed, batch 128, remainder
  dropped (468 steps per epoch). Test accuracy after steps 50, 100 and 200 on a fixed
  subset (the first 2,000 test images) and after the last step on all 10,000.
* Training: SGD momentum 0.9, lr 0.1 constant, weight decay 1e-4 (none on norm layers). The
  optimiser recipe follows the model (`nio_jax.train.optim.resolve_no_norm`: with normalisation
  iff the model has batch statistics or norm leaves); each run's record stores the recipe
  that ran (`recipe`, from the trainer's `metrics.jsonl`):
  - no-norm recipe (every model but `vgg19_bn`): biases and scales at lr/10 and gradient
    clipping at norm 1 (`nio_jax.train.default_config()`'s no-norm recipe);
  - recipe with normalisation (`vgg19_bn`): every leaf at lr 0.1, no clipping, weight decay
    on every leaf except the BN scales and biases.
* Models: 20-layer ReLU MLP (19 hidden layers of 256 + the classifier), He-normal fan-in
  dense init, 3 epochs (1,404 steps; Acc_1/2/3 at the epoch ends), 5 seeds; ResNet-32
  without BN, width 8, unrolled, 8 seeds (issue 23 added seeds 3-7 to the first 3); VGG-19
  without BN x1/8; VGG-19 with BN x1/8 (issue 23); vit_mini dim 64 depth 4, no warmup: 300
  steps each, 3 seeds. The CNNs see the images zero-padded to 32x32.
* Methods: kaiming (the model's own init); warmup (linear over the first 100 steps);
  fixup (ResNet without BN only); metainit, gradinit and nio with 100 search steps each at
  B = 64 (GradInit: 2 x 64 per step); lsuv (issue 23; only while `nio_jax.methods` registers
  it) with its `LSUVConfig` defaults (the `lsuv` package's) on one real batch of 64, its
  orthonormal draw seeded by the run's seed. Otherwise their released hyper-parameters:
  NIO the `NIOConfig` defaults (the batch setting, D = 4 sub-batches, as the released code
  runs BN nets too; γ = 10); GradInit the CIFAR recipe of the model family
  (`vgg19`, `vgg19_bn`, `resnet110`; γ = 1; the MLP and the ViT have none: `GradInitConfig`
  defaults); MetaInit the paper's listing (`MetaInitConfig` defaults: sign momentum, lr 0.1,
  Gaussian inputs with random labels, drawn from the run's seed).
  The equal search budget (100 steps) is a deliberate deviation from GradInit's 390 and
  MetaInit's 500 steps, so that the learned inits are compared at the same cost.
* Seeds: each seed has its own init and data order (`seed` seeds both), so seed k of two
  methods is a paired comparison.

Cells run cheapest model first (MLP, vit_mini, ResNet-32, VGG-19, VGG-19 BN), all seeds of a
cell in a row so the cell's search and train steps compile once. Finished runs (their run
directory, else their committed per-run JSON) are skipped, so adding seeds or cells runs only
the new runs.
"""

import copy

from nio_jax import methods as init_methods
from nio_jax.experiment_config import config_from

SEARCH_STEPS = 100
STEPS_PER_EPOCH = 468  # 60,000 // 128
EVAL_STEPS = (50, 100, 200)
EVAL_SUBSET = 2000
WARMUP_STEPS = 100


def base():
  c = config_from("fmnist_base.py", __file__)
  c.data.train_subset = None
  c.data.test_subset = None
  c.data.batch_size = 128
  c.init.batch_size = 64
  c.init.measure_batches = 2
  c.eval.steps = EVAL_STEPS
  c.eval.subset = EVAL_SUBSET
  c.train.lr = 0.1
  c.train.schedule = "constant"
  c.train.momentum = 0.9
  c.train.weight_decay = 1e-4
  c.train.log_every = 50
  c.train.eval_batch_size = 500
  c.train.max_to_keep = 2
  c.train.progress = False
  c.train.plots = False
  return c


# name -> (model, kwargs, pad_to_32, num_epochs, max_steps, seeds, GradInit recipe)
MODELS = {
  "mlp20": ("mlp", {"hidden": (256,) * 19, "dense_init": "he_normal"}, False, 3, None, 5, None),
  "vit_mini": ("vit_mini", {"dim": 64, "depth": 4, "scan": False}, True, 1, 300, 3, None),
  "resnet32_nobn": (
    "resnet32",
    {"norm": "none", "width": 8, "scan": False},
    True,
    1,
    300,
    8,
    "resnet110",
  ),
  "vgg19_nobn": ("vgg19", {"norm": "none", "width_mult": 0.125}, True, 1, 300, 3, "vgg19"),
  "vgg19_bn": ("vgg19_bn", {"width_mult": 0.125}, True, 1, 300, 3, "vgg19_bn"),
}
METHODS = ("kaiming", "warmup", "fixup", "metainit", "gradinit", "nio", "lsuv")


def has_method(model: str, method: str) -> bool:
  """Whether the grid has the (model, method) cell: Fixup only on the ResNets without BN;
  LSUV only once `nio_jax.methods` registers it."""
  name, kwargs = MODELS[model][:2]
  if method == "fixup":
    return name.startswith("resnet") and kwargs.get("norm") == "none"
  if method == "lsuv":
    return "lsuv" in init_methods.available_methods()
  return True


def cell_config(model: str, method: str):
  """The config of one (model, method) cell (the seed is set per run)."""
  name, kwargs, pad, epochs, max_steps, _, recipe = MODELS[model]
  c = base()
  c.name = f"sweep_fmnist_{model}_{method}"
  c.model.name = name
  c.model.kwargs = copy.deepcopy(kwargs)
  c.data.pad_to_32 = pad
  c.train.num_epochs = epochs
  c.max_steps = max_steps
  c.init.method = {"warmup": "kaiming"}.get(method, method)
  if method == "warmup":
    c.train.warmup_epochs = WARMUP_STEPS / STEPS_PER_EPOCH  # 100 steps exactly
  elif method == "fixup":
    c.model.kwargs.variant = "fixup"
  elif method == "metainit":  # the paper's listing (MetaInitConfig defaults), 100 steps
    c.init.data = "random"
    c.init.config.num_steps = SEARCH_STEPS
  elif method == "gradinit":
    if recipe is not None:
      c.init.recipe = recipe
    c.init.config.num_steps = SEARCH_STEPS
    c.init.config.batch_size = None  # |S| = init.batch_size = 64, two batches per step
  elif method == "nio":
    c.init.config.num_steps = SEARCH_STEPS
  return c


def get_grid():
  cells = []
  for model, (_, _, _, _, _, seeds, _) in MODELS.items():
    for method in METHODS:
      if not has_method(model, method):
        continue
      cells.append(
        {
          "model": model,
          "method": method,
          "seeds": list(range(seeds)),
          "config": cell_config(model, method),
        }
      )
  return {"name": "fmnist", "eval_steps": list(EVAL_STEPS), "cells": cells}
