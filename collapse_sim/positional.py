"""Positional information: none, sinusoidal (absolute), learned (absolute), RoPE, ALiBi.

Absolute encodings are added to the token embeddings; RoPE rotates queries and
keys; ALiBi adds ``-slope * (i - j)`` to the score of query i and key j. A
sliding window (``window=w``) restricts query i to keys ``i-w+1 .. i``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

KINDS = ("none", "sinusoidal", "learned", "rope", "alibi")
SINUSOIDAL = "pe.sinusoidal"  # the key of the (need, d) sinusoidal table the model passes with its weights


def sinusoidal(n: int, d: int, base: float = 10000.0) -> np.ndarray:
    """The Vaswani et al. table: PE[t, 2i] = sin(t / base^(2i/d)), PE[t, 2i+1] = cos(...)."""
    pos = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange((d + 1) // 2, dtype=np.float64)[None, :]
    ang = pos / base ** (2 * i / d)
    pe = np.zeros((n, d))
    pe[:, 0::2] = np.sin(ang)[:, : (d + 1) // 2]
    pe[:, 1::2] = np.cos(ang)[:, : d // 2]
    return pe


def rope_pairs(dh: int, fraction: float = 1.0) -> int:
    """How many of RoPE's ``dh/2`` frequency pairs rotate under p-RoPE with ``fraction``:
    ``⌊f · dh/2⌋``, ``f`` the decimal number ``repr(fraction)`` shows (so 0.29 of 100 pairs is 29)."""
    return math.floor(Fraction(repr(float(fraction))) * (dh // 2))


def rope_tables(positions: np.ndarray, dh: int, base: float = 10000.0, fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables (len(positions), dh/2) for rotating pairs (x[2i], x[2i+1]).
    p-RoPE (``fraction < 1``): only the first :func:`rope_pairs` pairs (the highest
    frequencies) rotate; the others have frequency 0 (cos 1, sin 0: left as they are)."""
    if dh % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {dh}")
    inv = base ** (-np.arange(dh // 2, dtype=np.float64) * 2 / dh)
    inv[rope_pairs(dh, fraction):] = 0.0
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang), np.sin(ang)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Press et al.'s geometric slopes 2^(-8h/H), h = 1..H."""
    return 2.0 ** (-8.0 * np.arange(1, n_heads + 1) / n_heads)
