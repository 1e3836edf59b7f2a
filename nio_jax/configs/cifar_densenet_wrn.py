"""DenseNet-100 and WRN-28-10 on CIFAR-10 / CIFAR-100 (the NIO paper's other CIFAR models),
with the GradInit recipes for those models. Argument `<model>,<dataset>,<method>`:

    nio-jax train --config configs/cifar_densenet_wrn.py:densenet100_bn,cifar100,nio
    nio-jax train --config configs/cifar_densenet_wrn.py:wrn28_10,cifar10,gradinit

Models: densenet100 (DenseNet-BC-100, k = 12, without BN), densenet100_bn (with BN),
wrn28_10 (WRN-28-10, BN, no dropout). Datasets: cifar10, cifar100. Methods: kaiming,
metainit, gradinit, nio. `cells()` lists all 24 combinations.

Init: gradinit = the released recipe (DenseNet-100: τ = 5e-3 without BN / 1e-2 with BN;
WRN-28-10: τ = 3e-3; 780 iterations at |S| = 64; η = 0.1, γ = 1); metainit = the GradInit
authors' RescaleAdam baseline on real batches, one pass over the training set as their
`metainit` does (782 iterations at the batch 64 used here); nio = the
released settings (B = 64, D = 4, r = 0.2, γ = 10, lr 3e-3, 100 steps). Training: the CIFAR
recipe (`nio_jax.train.default_config()`, 200 epochs, batch 128, cosine, cutout).
"""

from nio_jax.experiment_config import config_module

MODELS = {
  # name: (registry model, kwargs, GradInit recipe)
  "densenet100": ("densenet100", {"norm": "none"}, "densenet100"),
  "densenet100_bn": ("densenet100", {"norm": "bn"}, "densenet100_bn"),
  "wrn28_10": ("wrn28_10", {}, "wrn28_10"),
}
DATASETS = ("cifar10", "cifar100")
METHODS = ("kaiming", "metainit", "gradinit", "nio")


def cells() -> list[str]:
  return [f"{m},{d},{k}" for m in MODELS for d in DATASETS for k in METHODS]


def get_config(arg: str | None = None):
  arg = arg or "densenet100_bn,cifar10,nio"
  parts = [p.strip() for p in arg.split(",")]
  if (
    len(parts) != 3 or parts[0] not in MODELS or parts[1] not in DATASETS or parts[2] not in METHODS
  ):
    raise ValueError(
      f"cifar_densenet_wrn: argument {arg!r} must be '<model>,<dataset>,<method>'"
      f" with model in {list(MODELS)}, dataset in {list(DATASETS)}, method in "
      f"{list(METHODS)}"
    )
  name, dataset, method = parts
  model, kwargs, recipe = MODELS[name]
  # MetaInit: one pass at the base's |S| = 64 = ceil(50000 / 64) = 782 steps.
  return config_module("cifar10_base.py", __file__).experiment(
    f"{dataset}_{name}_{method}", model, kwargs, method, recipe, dataset=dataset
  )
