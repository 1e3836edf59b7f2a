"""Sweep grid `fmnist`: the papers' protocol scaled to 2 shared CPU cores (~60 min in total).

    python -m benchmarks.sweep --grid fmnist

Same protocol for every method (no per-method tuning): Fashion-MNIST zero-padded to 32x32
(CIFAR-shaped models), the first TRAIN_SUBSET training images, the first TEST_SUBSET test
images, batch 64 (lr 0.1*64/128 = 0.05, SGD 0.9, wd 1e-4, per-iteration cosine to 0 over
EPOCHS epochs; without norm layers biases/scalars at lr/10 and clipping at 1 =
`nio_jax.train.default_config()`), no augmentation. The "+1 epoch warmup" baseline adds one
linear-warmup epoch before the same schedule.

Searches keep the published hyper-parameters and shorten only the iteration counts by the
same factor (the grid's epoch is much shorter than a CIFAR epoch):
  * GradInit: the released CIFAR recipe of the model family (η 0.1, γ 1, τ per model),
    GRADINIT_STEPS iterations (recipe: 390 = one CIFAR epoch at |S| = 128), |S| = 64.
  * MetaInit: the GradInit authors' baseline (RescaleAdam on the gradient quotient over
    real batches, lr 1e-3), METAINIT_STEPS iterations, batch 64.
  * NIO: released settings (B 64, D 4, r 0.2, γ 10, lr 3e-3, gc_gn_sqrt), NIO_STEPS
    iterations (released: 100).
Every model is built with scan=False, as in the recorded runs: at the time, on XLA:CPU the
gradient of the nn.scan stacks was ~40x slower per step than the unrolled model (34.6 s vs
0.8 s per ResNet-20 step). Since `per_example.canonical_convs` the scanned layout is as fast.
"""

TRAIN_SUBSET = 1280  # 20 steps per epoch at batch 64
TEST_SUBSET = 500
EPOCHS = 2
SEEDS = [0, 1, 2]
GRADINIT_STEPS = 20  # = one epoch of the grid, as 390 = one CIFAR epoch in the recipe
METAINIT_STEPS = 20
NIO_STEPS = 10  # a half epoch (the released run: 100 steps at batch 64)
RESNET_WIDTH = 8  # half the standard 16/32/64 channels (CPU budget)
VGG_WIDTH = 0.125  # VGG-19 with 8..64 channels instead of 64..512


def _gradinit(recipe):
  return {
    "init": "gradinit",
    "config": recipe,
    "config_overrides": {"num_steps": GRADINIT_STEPS, "batch_size": None},
  }


def get_grid():
  methods = {
    "kaiming": {"init": "kaiming"},
    "warmup": {"init": "kaiming", "train": {"baseline": "extra_epoch_warmup"}},
    "fixup": {"init": "kaiming", "model_kwargs": {"variant": "fixup"}},
    "metainit": {
      "init": "metainit",
      "config": {"variant": "rescale_adam", "lr": 1e-3, "num_steps": METAINIT_STEPS},
    },
    "gradinit": _gradinit("resnet110"),
    "nio": {
      "init": "nio",
      "config": {
        "num_steps": NIO_STEPS,
        "num_chunks": 4,
        "overlap": 0.2,
        "gamma": 10.0,
        "lr": 3e-3,
        "objective": "gc_gn_sqrt",
      },
    },
  }
  searches = ["kaiming", "warmup", "metainit", "gradinit", "nio"]
  models = {
    "resnet20_nobn": {
      "model": "resnet20",
      "kwargs": {"norm": "none", "scan": False, "width": RESNET_WIDTH},
      "methods": searches[:2] + ["fixup"] + searches[2:],
      "method_overrides": {"gradinit": _gradinit("resnet110")},
    },
    "resnet20_bn": {
      "model": "resnet20",
      "kwargs": {"norm": "bn", "scan": False, "width": RESNET_WIDTH},
      "methods": searches,
      "method_overrides": {"gradinit": _gradinit("resnet110_bn")},
    },
    "vgg19_narrow_nobn": {
      "model": "vgg19",
      "kwargs": {"norm": "none", "width_mult": VGG_WIDTH},
      "methods": searches,
      "method_overrides": {"gradinit": _gradinit("vgg19")},
    },
    # No published SGD recipe for a ViT: GradInit uses its code default tau = 1e-3.
    "vit_mini": {
      "model": "vit_mini",
      "kwargs": {"scan": False, "dim": 64, "depth": 4},
      "methods": searches,
      "method_overrides": {
        "gradinit": {
          "init": "gradinit",
          "config": {"num_steps": GRADINIT_STEPS, "batch_size": None},
        }
      },
    },
  }
  return {
    "dataset": "fashion_mnist",
    "pad_to_32": True,
    "batch_size": 64,
    "train_subset": TRAIN_SUBSET,
    "test_subset": TEST_SUBSET,
    "epochs": EPOCHS,
    "seeds": SEEDS,
    "eval_steps": [10],
    "log_every": 2,
    "measure_batches": 2,
    "measure_chunks": 4,
    "train": {},
    "methods": methods,
    "models": models,
  }
