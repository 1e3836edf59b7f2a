"""Every cell of the published CIFAR-10 table (GradInit paper, Table 1) plus NIO.

Select a cell with the config argument `<row>,<column>`:

    nio-jax train --config configs/cifar10_table.py:resnet110_bn,gradinit

Rows: vgg19 (VGG-19 w/o BN), vgg19_bn, resnet110 (w/o BN), resnet110_bn, resnet1202_bn.
Columns: kaiming, const (+1 epoch at constant lr), warmup (+1 epoch of linear warmup),
metainit, gradinit, nio. `cells()` lists all 30; docs/cli.md has every command with the
published Acc_1 / Acc_best next to it (also in `config.published`).

Training: the recipe the numbers came from (SGD 0.9, lr 0.1, batch 128, per-iteration cosine
over 200 epochs, weight decay 1e-4, crop+flip+cutout; without BN: biases/scalars at lr/10 and
gradient clipping at 1) = `nio_jax.train.default_config()`.

Init methods:
  * kaiming / const / warmup: the model's He init; const / warmup add the extra epoch
    (`train.baseline`).
  * gradinit: the released CIFAR recipe of the row (`GRADINIT_RECIPES`: η = 0.1, γ = 1,
    390 iterations, |S| = 128, scale lr per model). ResNet-1202 has no released recipe; the
    ResNet-110-BN one (τ = 1e-3) is used.
  * metainit: the GradInit authors' MetaInit baseline: RescaleAdam on the gradient quotient
    over real CIFAR batches (lr 1e-3, min scale 0.01, clip 1), one pass over CIFAR-10 at batch
    128 as their `metainit` does: 391 iterations (docs/methods.md, MetaInit).
  * nio: the released NIO settings (B = 64, D = 4, r = 0.2, γ = 10, lr 3e-3, 100 steps,
    objective gc_gn_sqrt); the GradInit table has no NIO column (published = None).
"""

from nio_jax.experiment_config import config_module

ROWS = {
  # row: (label, registry model, model kwargs, GradInit recipe)
  "vgg19": ("VGG-19 w/o BN", "vgg19", {}, "vgg19"),
  "vgg19_bn": ("VGG-19 with BN", "vgg19_bn", {}, "vgg19_bn"),
  "resnet110": ("ResNet-110 w/o BN", "resnet110", {"norm": "none"}, "resnet110"),
  "resnet110_bn": ("ResNet-110 with BN", "resnet110", {"norm": "bn"}, "resnet110_bn"),
  "resnet1202_bn": ("ResNet-1202 with BN", "resnet1202", {"norm": "bn"}, "resnet110_bn"),
}
COLUMNS = {
  # column: (label, init method, train.baseline)
  "kaiming": ("Kaiming", "kaiming", "none"),
  "const": ("+1 ep. const", "kaiming", "extra_epoch_constant"),
  "warmup": ("+1 ep. warmup", "kaiming", "extra_epoch_warmup"),
  "metainit": ("MetaInit", "metainit", "none"),
  "gradinit": ("GradInit", "gradinit", "none"),
  "nio": ("NIO", "nio", "none"),
}
# (Acc_1, Acc_best) in %, GradInit paper Table 1 (CIFAR-10).
PUBLISHED = {
  "vgg19": {
    "kaiming": (29.1, 94.5),
    "const": (37.2, 94.4),
    "warmup": (37.4, 94.4),
    "metainit": (30.5, 94.6),
    "gradinit": (29.3, 94.7),
  },
  "vgg19_bn": {
    "kaiming": (12.6, 94.4),
    "const": (19.6, 94.5),
    "warmup": (53.5, 94.7),
    "metainit": (35.1, 94.6),
    "gradinit": (47.8, 95.1),
  },
  "resnet110": {
    "kaiming": (16.1, 94.2),
    "const": (21.0, 93.9),
    "warmup": (19.8, 94.1),
    "metainit": (14.6, 94.2),
    "gradinit": (36.2, 94.6),
  },
  "resnet110_bn": {
    "kaiming": (23.2, 95.0),
    "const": (32.5, 94.7),
    "warmup": (48.7, 95.1),
    "metainit": (29.0, 94.8),
    "gradinit": (38.2, 95.4),
  },
  "resnet1202_bn": {
    "kaiming": (12.9, 94.4),
    "const": (12.6, 94.0),
    "warmup": (28.1, 95.4),
    "metainit": (11.7, 95.0),
    "gradinit": (29.0, 96.2),
  },
}
DEFAULT = "resnet110_bn,gradinit"


def cells() -> list[str]:
  """All `row,column` arguments."""
  return [f"{r},{c}" for r in ROWS for c in COLUMNS]


def get_config(arg: str | None = None):
  arg = arg or DEFAULT
  parts = [p.strip() for p in arg.split(",")]
  if len(parts) != 2 or parts[0] not in ROWS or parts[1] not in COLUMNS:
    raise ValueError(
      f"cifar10_table: argument {arg!r} must be '<row>,<column>' with row in "
      f"{list(ROWS)} and column in {list(COLUMNS)}"
    )
  row, col = parts
  _, model, kwargs, recipe = ROWS[row]
  _, method, baseline = COLUMNS[col]

  # |S| = 128 of the recipes; MetaInit: one pass = ceil(50000 / 128) = 391 steps.
  c = config_module("cifar10_base.py", __file__).experiment(
    f"cifar10_{row}_{col}", model, kwargs, method, recipe, search_batch_size=128
  )
  c.train.baseline = baseline
  pub = PUBLISHED[row].get(col)
  if pub is not None:
    c.published.acc_1, c.published.acc_best = pub
    c.published.source = "GradInit paper (Zhu et al., 2021), Table 1, CIFAR-10"
  return c
