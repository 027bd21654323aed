"""Input families: pairs of sequences whose last-token outputs should differ.

Every family turns a maximum length N into one or two *runs* (a token stream,
optionally with a probe token after every prefix) and says, for each n, which
two outputs form the pair. One forward pass per run covers every n ≤ N (the
prefix trick of collapse_sim.model).

Tokens: 0 and 1 are the digits, ``PLUS`` = 2, ``SEP`` = 3 (a comma), and
4.. are free tokens for random base sequences.

| family | pair at n |
|---|---|
| ``repeat_last`` | a random sequence v of length n vs v with its last token repeated (Thm 4.2) |
| ``ones`` | ``1^n`` vs ``1^(n+1)`` |
| ``first_copy`` | ``0 1^n`` vs ``1 1^n`` (copy the first token) |
| ``zero_ones`` | ``0 1^n`` vs ``0 1^(n+1)`` (count the ones after a distinct first token) |
| ``last_copy`` | ``1^n 0`` vs ``1^(n+1)`` (copy the last token) |
| ``count_bernoulli`` | a Bernoulli(p) 0/1 string s vs ``s 1`` (count the ones) |
| ``sum_ones`` | ``1+1+…+1`` with k ones vs k+1 ones (n = k) |

``sep=k`` inserts a SEP token after every k content tokens of the stream.

``vocab=None`` is an unbounded vocabulary (the Gaussian model, whose token ids are
draw ids: ``collapse_sim.model.token_bound``): ``repeat_last`` then gives every
position a fresh token, ``FIRST_FREE + i`` for content position i, so v is a sequence
of independent Gaussian positions and v* repeats the last one. The other families
use the fixed tokens 0..3 and work unchanged: for the Gaussian model each of those
tokens is one fixed (q, k, v) draw (``ones`` repeats one draw, ``first_copy`` starts
with draw 0 or 1, ...).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import CollapseSimError

ZERO, ONE, PLUS, SEP = 0, 1, 2, 3
FIRST_FREE = 4
NAMES = ("repeat_last", "ones", "first_copy", "zero_ones", "last_copy", "count_bernoulli", "sum_ones")


class FamilyError(CollapseSimError):
    """An unknown family or bad family parameter."""


@dataclasses.dataclass(frozen=True)
class Run:
    tokens: np.ndarray
    probe: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Pairs:
    """For each n in ``ns``: output ``(run_a, kind_a, index_a)`` vs ``(run_b, kind_b, index_b)``,
    kind "y" (stream output at that index) or "p" (probe output)."""

    runs: tuple[Run, ...]
    ns: np.ndarray
    a: tuple[int, str, np.ndarray]
    b: tuple[int, str, np.ndarray]


def _with_sep(content: np.ndarray, sep: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Insert SEP after every ``sep`` content tokens; return (stream, index of each content token)."""
    if not sep:
        return content, np.arange(content.size)
    out, idx = [], []
    for i, t in enumerate(content):
        idx.append(len(out))
        out.append(int(t))
        if (i + 1) % sep == 0:
            out.append(SEP)
    return np.asarray(out), np.asarray(idx)


def make_pairs(name: str, n_max: int, vocab: int | None, *, seed: int = 0, p: float = 0.7,
               sep: int | None = None) -> Pairs:
    """The runs and pairings of family ``name`` for every n = 1..n_max (``vocab=None``:
    unbounded token ids, see the module docstring)."""
    if name not in NAMES:
        raise FamilyError(f"unknown family {name!r}; use one of {', '.join(NAMES)}")
    if n_max < 1:
        raise FamilyError(f"the maximum length must be >= 1, got {n_max}")
    if sep is not None and sep < 1:
        raise FamilyError(f"separator spacing must be >= 1, got {sep}")
    need = FIRST_FREE + (1 if name == "repeat_last" else 0)  # tokens 0..3, and one free token for random bases
    if vocab is not None and vocab < need:
        raise FamilyError(f"family {name} needs a vocabulary of at least {need} tokens, the model has {vocab}")
    rng = np.random.default_rng(seed)
    ns = np.arange(1, n_max + 1)
    if name == "repeat_last":
        base = FIRST_FREE + np.arange(n_max) if vocab is None else rng.integers(FIRST_FREE, vocab, n_max)
        stream, idx = _with_sep(base, sep)
        probe = np.zeros_like(stream)
        probe[idx] = base  # after the prefix ending at content token i, repeat it
        r = Run(stream, probe)
        return Pairs((r,), ns, (0, "y", idx), (0, "p", idx))
    if name == "ones":
        stream, idx = _with_sep(np.full(n_max + 1, ONE), sep)
        return Pairs((Run(stream),), ns, (0, "y", idx[:-1]), (0, "y", idx[1:]))
    if name == "first_copy":
        sa, idx = _with_sep(np.concatenate([[ZERO], np.full(n_max, ONE)]), sep)
        sb, _ = _with_sep(np.concatenate([[ONE], np.full(n_max, ONE)]), sep)
        return Pairs((Run(sa), Run(sb)), ns, (0, "y", idx[1:]), (1, "y", idx[1:]))
    if name == "zero_ones":
        stream, idx = _with_sep(np.concatenate([[ZERO], np.full(n_max + 1, ONE)]), sep)
        return Pairs((Run(stream),), ns, (0, "y", idx[1:-1]), (0, "y", idx[2:]))
    if name == "last_copy":
        stream, idx = _with_sep(np.full(n_max + 1, ONE), sep)
        probe = np.full_like(stream, ZERO)
        return Pairs((Run(stream, probe),), ns, (0, "p", idx[:-1]), (0, "y", idx[1:]))
    if name == "count_bernoulli":
        if not 0 <= p <= 1:
            raise FamilyError(f"Bernoulli p must lie in [0, 1], got {p}")
        s = (rng.random(n_max) < p).astype(int)
        stream, idx = _with_sep(s, sep)
        probe = np.full_like(stream, ONE)
        return Pairs((Run(stream, probe),), ns, (0, "y", idx), (0, "p", idx))
    # sum_ones: 1 + 1 + ... ; separators count content tokens (digits and pluses)
    content = np.array([ONE if i % 2 == 0 else PLUS for i in range(2 * n_max + 1)])
    stream, idx = _with_sep(content, sep)
    ones_at = idx[0::2]
    return Pairs((Run(stream),), ns, (0, "y", ones_at[:-1]), (0, "y", ones_at[1:]))
