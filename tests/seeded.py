"""Seeded weights and inputs shared with the generator of tests/data (see tests/data/README.md).

The reference arrays under tests/data were produced by the original repositories' code running on
weights drawn by exactly this recipe; the tests draw the same values for the same PyTorch state-dict
keys, so only inputs' and outputs' arrays are committed, never weights.
"""

from __future__ import annotations

import zlib

import numpy as np


def draw(seed: int, name: str, shape) -> np.ndarray:
    """Standard normal float32 draws, one stream per (seed, name): order-independent."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal(tuple(shape)).astype(np.float32)


def value(seed: int, key: str, shape) -> np.ndarray:
    """The recipe: norm/BN scales ~ 1 + 0.2 n, running variances 0.5 + 0.5 |n|, other vectors 0.2 n,
    LPIPS linear heads |n| / sqrt(fan_in) (they are non-negative), everything else n / sqrt(fan_in)."""
    n = draw(seed, key, shape)
    if key.endswith("running_var"):
        return 0.5 + 0.5 * np.abs(n)
    if len(shape) == 1:
        return 1 + 0.2 * n if key.endswith("weight") else 0.2 * n
    root = np.float32(np.sqrt(int(np.prod(shape[1:]))))  # float32 maths under numpy 1 and 2 alike
    if key.startswith("lin") and key.endswith("model.1.weight"):
        return np.abs(n) / root
    return n / root


def state_dict(seed: int, shapes: dict) -> dict[str, np.ndarray]:
    return {k: value(seed, k, s) for k, s in shapes.items()}
