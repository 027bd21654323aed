"""Prop. 6.1 / B.9 (without positions, outputs depend on the ratio of counts only) and
Cor. 6.2 / B.10 (collapse plus finite precision: distinct counts, identical outputs).

B.9 holds for one attention layer with any position-wise parts (norms, MLP, value
and output projections): the last token's attention output is a weighted mean over
the multiset of earlier tokens, and weights depend on the token only. With two
layers it fails (proofs/prop_b9_counting.md): the second layer reads first-layer
outputs of every prefix, and ``1100`` has a prefix ``110`` whose ratio ``10`` lacks.
"""

from __future__ import annotations

import numpy as np

from ..model import Params, forward


def b9_distance(params: Params, a, b, prec: int = 256) -> tuple[float, float]:
    """‖y(a) − y(b)‖₂ for two sequences in the reference at ``prec`` bits (differenced at
    ``prec`` bits, not after rounding to float64), and the scale max|y|."""
    from ..backends import make_backend
    from .collapse import reference_row_distances

    r = make_backend("reference", str(prec))
    ya = forward(params, np.asarray(a), r)[-1:]
    yb = forward(params, np.asarray(b), r)[-1:]
    scale = float(max(np.max(np.abs(r.to_numpy(ya))), np.max(np.abs(r.to_numpy(yb)))))
    return float(reference_row_distances(ya, yb, prec)[0]), scale


def same_ratio_partner(seq, k: int, rng) -> np.ndarray:
    """A shuffle of k copies of ``seq`` that ends in the same token: every count
    scales by k, so every ratio is kept (``10`` → ``1100`` for k = 2 up to order)."""
    seq = np.asarray(seq)
    body = np.concatenate([np.repeat(seq[:-1], k), np.repeat(seq[-1:], k - 1)])
    return np.concatenate([rng.permutation(body), seq[-1:]])


def b10_confusions(params: Params, family: str, n_max: int, policy: str, *, seed: int = 0):
    """Lengths n at which the pair of ``family`` is bitwise identical under the emulated
    ``policy`` while the interval backend certifies the exact outputs differ: at each,
    any readout gives both members the same answer, so one of the two counts is wrong."""
    from ..backends import make_backend
    from ..backends.interval import certify_distinct
    from ..pairing import collapse_sweep, pair_outputs
    from ..families import make_pairs

    res = collapse_sweep(params, family, n_max, make_backend("reference", policy), policy, seed=seed)
    pairs = make_pairs(family, n_max, params.config.vocab, seed=seed)
    distinct = certify_distinct(*pair_outputs(params, pairs, make_backend("interval", "128"), raw=True))
    return res.ns[res.identical & distinct], res.ns[~distinct]
