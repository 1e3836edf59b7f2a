"""The experiment configs of `nio-jax`, shipped with the package.

Each file here is an `ml_collections` config file (`get_config([arg])`), loaded by path, not
imported: `nio-jax train --config fmnist_nio` (a bare name) finds `fmnist_nio.py` here from
any install, and `--config configs/fmnist_nio.py` works in a source checkout, where
`configs/` is a link to this directory. `nio_jax.experiment_config.config_path` resolves
both.
"""
