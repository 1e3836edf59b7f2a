"""ResNet-50 on ImageNet with NIO's released settings (and the Kaiming baseline):

    nio-jax train --config configs/imagenet_resnet50_nio.py          # NIO (default)
    nio-jax train --config configs/imagenet_resnet50_nio.py:kaiming  # baseline
    nio-jax init  --config configs/imagenet_resnet50_nio.py          # search + GC report only

NIO: B = 64, D = 4 sub-batches overlapping by r = 0.2, γ = 10, lr 3e-3, 100 steps, objective
gc_gn_sqrt (μ = 1), i.e. `nio_jax.NIOConfig()` defaults; GC and gradient norm are measured
over 10 batches before and after. The released run: 100 steps ≈ 7 min on one A100, mean
sub-batch gradient norm 4.67 → ≈ 7.9, B-GC ≈ 0.23, then 76.65 % top-1 after 100 epochs
(`published.acc_best`).

Training: 100 epochs, batch 256, SGD 0.9, lr 0.1 (base_lr 0.1 at reference batch 256),
weight decay 1e-4, step decay ×0.1 at epochs 30/60/90 (the standard torchvision recipe; our
notes do not record the NIO paper's exact schedule). Data: TFDS `imagenet2012`
(`pip install 'nio_jax[tfds]'`, prepared beforehand); the numpy loader decodes on the host,
so full-speed training needs a faster input pipeline (docs/training.md).
"""

from nio_jax.experiment_config import base_config


def get_config(arg: str | None = None):
  method = arg or "nio"
  if method not in ("nio", "kaiming"):
    raise ValueError(f"imagenet_resnet50_nio: argument {arg!r} must be 'nio' or 'kaiming'")
  c = base_config()
  c.name = f"imagenet_resnet50_{method}"
  c.model.name = "resnet50"
  c.data.dataset = "imagenet2012"
  c.data.batch_size = 256
  c.init.method = method
  c.init.batch_size = 64
  c.init.measure_batches = 10
  if method == "nio":  # released NIO settings: the NIOConfig defaults
    c.published.acc_best = 76.65
    c.published.source = "NIO paper (Yang et al., 2022), ResNet-50 ImageNet top-1, 100 epochs"
  c.train.num_epochs = 100
  c.train.base_lr = 0.1
  c.train.lr_reference_batch = 256
  c.train.schedule = "step"
  c.train.step_epochs = (30, 60, 90)
  c.train.step_decay = 0.1
  c.train.weight_decay = 1e-4
  c.train.eval_batch_size = 250
  c.train.log_every = 100
  c.train.checkpoint_every_steps = 2000
  return c
