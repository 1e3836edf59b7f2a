"""`nio_jax.step_cache.StepCache`: build once per key, LRU bound, unhashable keys uncached."""

import pytest

from nio_jax.step_cache import StepCache


def test_builds_once_per_key_and_evicts_the_least_recently_used():
  calls = []
  cache = StepCache("t", maxsize=2)

  def build(k):
    return lambda: calls.append(k) or f"step-{k}"

  assert cache.get("a", build("a")) == "step-a"
  assert cache.get("a", build("a")) == "step-a"
  assert cache.get("b", build("b")) == "step-b"
  cache.get("a", build("a"))  # "a" is now the most recently used
  cache.get("c", build("c"))  # evicts "b"
  assert calls == ["a", "b", "c"]
  assert "a" in cache and "b" not in cache and len(cache) == 2
  cache.get("b", build("b"))
  assert calls == ["a", "b", "c", "b"]


def test_unhashable_key_builds_every_time_and_stores_nothing():
  cache = StepCache("t")
  n = []
  for _ in range(2):
    cache.get(([1],), lambda: n.append(1))
  assert len(n) == 2 and len(cache) == 0 and ([1],) not in cache


def test_bad_size():
  with pytest.raises(ValueError, match="maxsize must be >= 1"):
    StepCache("t", maxsize=0)
