"""Model definitions copied verbatim from google/flax's examples (Apache 2.0; each file's
header names its source path and commit). Excluded from ruff so they stay verbatim."""
