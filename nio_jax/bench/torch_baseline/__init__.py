"""PyTorch twins of the `nio_jax.models` zoo and of the NIO / GradInit steps, for the benchmark."""
