"""Where do distinct inputs become identical? The collapse sweep.

For a model, a family and a list of backends, one forward pass per run gives
both members of every pair n = 1..N; the table holds, per (backend, n), the
L1 and L∞ distances between the two last-token outputs, whether they are
bitwise identical, and whether either is non-finite.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..families import Pairs, make_pairs
from ..model import Params, forward, token_bound


@dataclasses.dataclass
class CollapseResult:
    backend: str
    fmt: str
    ns: np.ndarray
    l1: np.ndarray
    linf: np.ndarray
    identical: np.ndarray
    nonfinite: np.ndarray
    scale: float  # max |y| over both members: the representation's scale
    seconds: float

    def first_identical(self, n_min: int = 1) -> int | None:
        hit = np.nonzero(self.identical & ~self.nonfinite & (self.ns >= n_min))[0]
        return int(self.ns[hit[0]]) if hit.size else None

    def identical_share(self, n_min: int = 1) -> float:
        """Share of the pairs with n >= n_min that are bitwise identical (and finite)."""
        ok = (self.identical & ~self.nonfinite)[self.ns >= n_min]
        return float(ok.mean()) if ok.size else 0.0

    def collapsed_from(self) -> int | None:
        """Smallest n from which every pair up to N is identical (None if the last is not)."""
        ok = self.identical & ~self.nonfinite
        if not ok[-1]:
            return None
        bad = np.nonzero(~ok)[0]
        return int(self.ns[bad[-1] + 1]) if bad.size else int(self.ns[0])

    def rows(self) -> list[dict]:
        return [{"n": int(n), "backend": self.backend, "format": self.fmt, "dist_l1": float(a), "dist_linf": float(b),
                 "bitwise_identical": bool(c), "nonfinite": bool(d)}
                for n, a, b, c, d in zip(self.ns, self.l1, self.linf, self.identical, self.nonfinite)]


def pad_stream(tokens: np.ndarray, probe: np.ndarray | None, bucket: int | None):
    """The stream (and probe) padded with token 0 up to a multiple of ``bucket``.

    Attention is causal, so tokens after position i leave every output at or before
    i unchanged; in the emulated backend bit for bit (masked terms are exact zeros,
    which change no reduction order). Runs of different lengths that pad to the same
    bucket share one compiled forward."""
    if not bucket:
        return tokens, probe
    extra = -tokens.size % bucket
    pad = lambda a: None if a is None else np.concatenate([a, np.zeros(extra, a.dtype)])  # noqa: E731
    return pad(tokens), pad(probe)


def pair_outputs(params: Params, pairs: Pairs, backend, *, raw: bool = False, progress=None,
                 bucket: int | None = None):
    """Both members of every pair, ``(A, B)``, each (n, d): float64 arrays, or the
    backend's own numbers with ``raw=True`` (e.g. intervals). One forward per run;
    ``bucket`` pads each run's stream (see :func:`pad_stream`)."""
    convert = (lambda a: a) if raw else backend.to_numpy
    outs = []
    for i, run in enumerate(pairs.runs):
        t0 = time.time()
        tokens, probe = pad_stream(run.tokens, run.probe, bucket)
        res = forward(params, tokens, backend, probe=probe)
        if run.probe is None:
            outs.append({"y": convert(res), "p": None})
        else:
            outs.append({"y": convert(res[0]), "p": convert(res[1])})
        if progress:
            progress(f"{backend.label}: run {i + 1}/{len(pairs.runs)} (N={run.tokens.size}) in {time.time() - t0:.1f}s")
    (ra, ka, ia), (rb, kb, ib) = pairs.a, pairs.b
    return outs[ra][ka][ia], outs[rb][kb][ib]


def collapse_sweep(params: Params, family: str, n_max: int, backend, fmt_name: str, *, seed: int = 0,
                   sep: int | None = None, progress=None, bucket: int | None = None) -> CollapseResult:
    t0 = time.time()
    pairs = make_pairs(family, n_max, token_bound(params.config), seed=seed, sep=sep)
    A, B = pair_outputs(params, pairs, backend, progress=progress, bucket=bucket)
    nonfinite = ~(np.all(np.isfinite(A), axis=1) & np.all(np.isfinite(B), axis=1))
    with np.errstate(invalid="ignore"):
        diff = np.abs(A - B)
    identical = np.all((A == B) | (np.isnan(A) & np.isnan(B)), axis=1)
    scale = float(np.nanmax(np.abs(np.concatenate([A, B])[np.isfinite(np.concatenate([A, B]))]), initial=0.0))
    return CollapseResult(backend.label, fmt_name, pairs.ns, diff.sum(axis=1), diff.max(axis=1), identical,
                          nonfinite, scale, time.time() - t0)
