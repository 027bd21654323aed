"""Both members of every pair of a family, from one forward pass per run, and their
comparison per n: the runs that theory checks and experiments share.

For a model, a family and a backend, one forward pass per run gives both members of
every pair n = 1..N (:func:`pair_outputs`); :func:`collapse_sweep` holds, per n, the
L1 and L∞ distances between the two last-token outputs, whether they are bitwise
identical, whether either is non-finite, and whether the pair is equal in exact
arithmetic (:func:`exactly_equal`).

A *collapse* is a pair that is bitwise identical (and finite) although its exact
outputs differ: a pair that is equal in exact arithmetic (at n = 1, ``repeat_last``
without positions compares ``a`` with ``a a``) is identical in every format and
says nothing about precision, so :func:`first_collapse` skips it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .backends import is_stochastic
from .families import Pairs, make_pairs
from .model import Params, forward, token_bound


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
    exact_equal: np.ndarray | None = None  # the pair is equal in exact arithmetic (None: not known)
    outputs: tuple[np.ndarray, np.ndarray] | None = None  # both members (A, B), float64, with keep_outputs=True

    def _exact(self) -> np.ndarray:
        return np.zeros(self.ns.shape, bool) if self.exact_equal is None else self.exact_equal

    def first_collapse(self) -> int | None:
        """Smallest n whose pair is bitwise identical and finite but differs in exact arithmetic."""
        return first_collapse(self.ns, self.identical, self.nonfinite, self._exact())

    def first_identical(self, n_min: int = 1) -> int | None:
        hit = np.nonzero(self.identical & ~self.nonfinite & (self.ns >= n_min))[0]
        return int(self.ns[hit[0]]) if hit.size else None

    def identical_share(self, n_min: int = 1) -> float:
        """Share of the pairs with n >= n_min that are bitwise identical (and finite)."""
        ok = (self.identical & ~self.nonfinite)[self.ns >= n_min]
        return float(ok.mean()) if ok.size else 0.0

    def collapsed_from(self) -> int | None:
        """Smallest n from which every pair up to N that differs in exact arithmetic is
        identical (None if the last such pair is not, or if there is none)."""
        distinct = ~self._exact()
        ns, ok = self.ns[distinct], (self.identical & ~self.nonfinite)[distinct]
        if not ok.size or not ok[-1]:
            return None
        bad = np.nonzero(~ok)[0]
        return int(ns[bad[-1] + 1]) if bad.size else int(ns[0])

    def describe_collapsed_from(self) -> str | None:
        """:meth:`collapsed_from` as the table and the figure say it: ``"n"``, or ``"n (the last
        n only)"`` where it rests on the last length alone; None where there is none."""
        cf = self.collapsed_from()
        if cf is None:
            return None
        return f"{cf} (the last n only)" if cf == int(self.ns.max()) else str(cf)

    def rows(self) -> list[dict]:
        return [{"n": int(n), "backend": self.backend, "format": self.fmt, "dist_l1": float(a), "dist_linf": float(b),
                 "bitwise_identical": bool(c), "nonfinite": bool(d), "exact_equal": bool(e)}
                for n, a, b, c, d, e in zip(self.ns, self.l1, self.linf, self.identical, self.nonfinite, self._exact())]


def first_collapse(ns, identical, nonfinite, exact_equal) -> int | None:
    """Smallest n with a bitwise-identical, finite pair that is not equal in exact arithmetic."""
    hit = np.nonzero(np.asarray(identical) & ~np.asarray(nonfinite) & ~np.asarray(exact_equal))[0]
    return int(np.asarray(ns)[hit[0]]) if hit.size else None


def exactly_equal(config, pairs: Pairs) -> np.ndarray:
    """Per n, whether the pair's two outputs are equal in exact arithmetic, by this rule:
    both members are one and the same token repeated (``a^k`` vs ``a^(k+1)``) and no
    absolute position enters the values (``pe`` none, RoPE or ALiBi, or ``ape="scores"``).
    Then, by induction over layers, every position of either member holds the same
    vector (attention averages equal values with weights that sum to 1; the rest is
    position-wise), so the last outputs agree whatever the weights. Every other pair
    is taken to differ: for generic weights it does (the interval backend certifies
    it at small n in tests/test_summaries.py). A sink token (docs/semantics.md §8.7)
    breaks the rule: ``sink a^k`` and ``sink a^(k+1)`` differ, the sink's share of the
    attention changing with k."""
    ns = pairs.ns
    if config.sink or (config.pe in ("sinusoidal", "learned") and config.ape == "residual"):
        return np.zeros(ns.shape, bool)

    def member(side):
        run_i, kind, idx = side
        run = pairs.runs[run_i]
        first = run.tokens[0]
        const = np.logical_and.accumulate(run.tokens == first)[idx]
        if kind == "p":
            const &= run.probe[idx] == first
        return const, first

    (ca, ta), (cb, tb) = member(pairs.a), member(pairs.b)
    return ca & cb & (ta == tb)


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


#: Bucketed runs without probes up to this many tokens run the program with probes
#: (:func:`shares_probe_program`): below it a run's arithmetic costs less than a compile.
PROBE_PROGRAM_MAX_N = 1024


def shares_probe_program(backend, n: int, bucket: int | None) -> bool:
    """Whether a run of ``n`` (padded) tokens without probes runs the compiled forward with
    probes instead, its probe rows computed and dropped: families with and without probes
    (``repeat_last`` and ``ones``) then share one program per model, policy and bucket. Only
    bucketed runs of the emulated backend up to :data:`PROBE_PROGRAM_MAX_N`: there every
    stream row's bits are defined without the probes (docs/semantics.md §10), so they are the
    same either way (tests/test_pairing.py); not under stochastic rounding, whose draws count
    the probes' roundings too. Natively only in float64: XLA's bits depend on the whole
    program, and a float64 stream row computed beside probes may differ from one computed
    without them in its last bits; that moves distances that are roundoff only (families whose
    exact distance is 0) visibly and the others in their last bits (the report's float64
    runs, docs/reproduce.md "Speed"). A narrower native dtype keeps its own program."""
    if not bucket or n > PROBE_PROGRAM_MAX_N:
        return False
    kind = getattr(backend, "kind", None)
    if kind == "native":
        return getattr(backend, "dtype", None) == np.float64
    return kind == "emulated" and not is_stochastic(backend)


def pair_outputs(params: Params, pairs: Pairs, backend, *, raw: bool = False, progress=None,
                 bucket: int | None = None):
    """Both members of every pair, ``(A, B)``, each (n, d): float64 arrays, or the
    backend's own numbers with ``raw=True`` (e.g. intervals). One forward per run;
    ``bucket`` pads each run's stream (see :func:`pad_stream`), and a short emulated or native
    float64 run without probes may run the program with probes (:func:`shares_probe_program`)."""
    convert = (lambda a: a) if raw else backend.to_numpy
    outs = []
    for i, run in enumerate(pairs.runs):
        t0 = time.time()
        tokens, probe = pad_stream(run.tokens, run.probe, bucket)
        if probe is None and shares_probe_program(backend, tokens.size, bucket):
            res = forward(params, tokens, backend, probe=tokens)[0]
        else:
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
                   sep: int | None = None, progress=None, bucket: int | None = None,
                   keep_outputs: bool = False) -> CollapseResult:
    t0 = time.time()
    pairs = make_pairs(family, n_max, token_bound(params.config), seed=seed, sep=sep)
    A, B = pair_outputs(params, pairs, backend, progress=progress, bucket=bucket)
    nonfinite = ~(np.all(np.isfinite(A), axis=1) & np.all(np.isfinite(B), axis=1))
    with np.errstate(invalid="ignore"):
        diff = np.abs(A - B)
    identical = np.all((A == B) | (np.isnan(A) & np.isnan(B)), axis=1)
    scale = float(np.nanmax(np.abs(np.concatenate([A, B])[np.isfinite(np.concatenate([A, B]))]), initial=0.0))
    return CollapseResult(backend.label, fmt_name, pairs.ns, diff.sum(axis=1), diff.max(axis=1), identical,
                          nonfinite, scale, time.time() - t0, exactly_equal(params.config, pairs),
                          (A, B) if keep_outputs else None)
