"""ViT without learning-rate warmup (the NIO paper's transformer claim: NIO makes training
stable without warmup; the paper used Swin-Transformer on ImageNet, which is not in the
model zoo, so this is ViT-Tiny/4 on CIFAR-10). Argument: the arm of the comparison:

    nio-jax train --config configs/vit_nowarmup.py:nio             # NIO, no warmup
    nio-jax train --config configs/vit_nowarmup.py:kaiming         # default init, no warmup
    nio-jax train --config configs/vit_nowarmup.py:kaiming_warmup  # default init, 5-epoch warmup
    nio-jax train --config configs/vit_nowarmup.py:gradinit_adam   # GradInit, Adam variant

Training: the repository's trainer is SGD-only: SGD 0.9, lr 0.05, cosine over 100 epochs,
weight decay 1e-4 (none on layer norms), label smoothing 0.1, batch 128; `warmup_epochs` = 0
except in the `kaiming_warmup` arm. NIO: released settings (B = 64, D = 4, r = 0.2, γ = 10,
lr 3e-3, 100 steps). GradInit (Adam variant): the IWSLT transformer recipe (η = 1e-3,
γ = 1000, τ = 2.5e-3, β = (0.9, 0.98), layer-norm scales ≤ 100) with S/S̃ as overlapping
thirds of each batch of 96 (780 iterations).
"""

from nio_jax.experiment_config import config_from

ARMS = ("nio", "kaiming", "kaiming_warmup", "gradinit_adam")


def get_config(arg: str | None = None):
  arm = arg or "nio"
  if arm not in ARMS:
    raise ValueError(f"vit_nowarmup: argument {arg!r} must be one of {list(ARMS)}")
  c = config_from("cifar10_base.py", __file__)
  c.name = f"cifar10_vit_tiny_{arm}"
  c.model.name = "vit_tiny"
  c.init.method = {"kaiming_warmup": "kaiming"}.get(arm, arm)
  if arm == "gradinit_adam":
    c.init.batch_size = 96
  c.train.num_epochs = 100
  c.train.base_lr = 0.05
  c.train.label_smoothing = 0.1
  c.train.warmup_epochs = 5.0 if arm == "kaiming_warmup" else 0.0
  return c
