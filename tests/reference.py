"""Reference implementations for the tests, written from ../shared/ALGORITHMS.md in plain
Python/numpy (no library code)."""

import numpy as np


class RefRescaleAdam:
  """RescaleAdam on a dict of Python floats (ALGORITHMS.md, "NIO search loop")."""

  def __init__(self, keys, lr, b1=0.9, b2=0.999, eps=1e-8, clip=1.0):
    """`keys`: (module, leaf name) pairs; a key whose leaf name is "bias" gets the lower
    bound 0, every other key 0.01."""
    self.keys = list(keys)
    self.lr, self.b1, self.b2, self.eps, self.clip = lr, b1, b2, eps, clip
    self.m = {True: {k: 0.0 for k in self.keys}, False: {k: 0.0 for k in self.keys}}
    self.v = {k: 0.0 for k in self.keys}
    self.n = {True: 0, False: 0}

  def step(self, s, grads, constraint):
    self.n[constraint] += 1
    bc1 = 1 - self.b1 ** self.n[constraint]
    bc2 = 1 - self.b2 ** (self.n[True] + self.n[False])
    out = {}
    for k in self.keys:
      g = float(np.clip(float(grads[k]), -self.clip, self.clip)) if self.clip else float(grads[k])
      self.m[constraint][k] = self.b1 * self.m[constraint][k] + (1 - self.b1) * g
      self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
      if s[k] == 0:  # a zero-norm parameter is skipped for ever
        out[k] = s[k]
        continue
      upd = (self.m[constraint][k] / bc1) / (np.sqrt(self.v[k] / bc2) + self.eps)
      lo = 0.0 if k[1] == "bias" else 0.01
      out[k] = max(s[k] - self.lr * upd, lo)
    return out
