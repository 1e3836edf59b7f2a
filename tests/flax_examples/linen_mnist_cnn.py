# Copied from https://github.com/google/flax, file examples/mnist/train.py at commit
# 772d99741458a843bb86c875ac3480bc1ac63656.
# Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0);
# the original copyright and licence notice follows unchanged. nio_jax test fixture (issue 29):
# model code nobody here wrote, run through nio_jax.flax_utils.
# The linen MNIST example (the last commit before examples/mnist moved to NNX, 0ef9abb).
# Only the CNN class: train.py imports absl, flax.metrics.tensorboard, ml_collections and
# tensorflow_datasets at module level (not all installed here). Below this header: the file's
# copyright notice (lines 1-13), the import lines the class needs (copied from line 25), and
# the class (lines 36-52), all verbatim.
# Copyright 2024 The Flax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

from flax import linen as nn


class CNN(nn.Module):
  """A simple CNN model."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x

