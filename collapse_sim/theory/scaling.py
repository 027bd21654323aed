"""The collapse scaling law: how the first-collapse length grows with precision.

If the exact distance between the two members of a family decays like
D(n) ≈ A·n^(−r), and a format with p significand bits resolves differences down to
about 2^(−p)·|y| (half an ulp at the representation's scale), the pair first becomes
identical near n*(p) ≈ (A / (2^(−p)|y|))^(1/r), so

    log2 n*(p) ≈ p / r + const:     slope 1/r.

``zero_ones`` (``0 1^n`` vs ``0 1^(n+1)``) on one attention layer without positions has
the closed form D(n) = K·c/((c+n)(c+n+1)) (proofs/first_copy_closed_form.md): r = 2,
slope ½. ``first_copy`` and ``repeat_last`` without positions decay like 1/n: slope 1.
docs/theory.md gives the derivation and the tolerance of the fit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CollapseSimError
from ..families import make_pairs
from ..model import Params


#: The smallest normal exponent of the formats the scaling law compares (float64's range).
EMIN = -1022


def ulp(y: np.ndarray, p: int) -> np.ndarray:
    """Spacing of a p-bit format with float64's exponent range at each |y|: :meth:`Format.ulp`
    of ``Format(p, -1022, 1023)``, exactly, 2^(max(e, -1022) − p + 1) with e = ⌊log2|y|⌋
    (values below 2^-1022, zero included, get the spacing at 2^-1022). e comes from the
    float64 exponent (``frexp``: |y| = m·2^E, m ∈ [½, 1), so e = E − 1), and the power of two
    is exact (``ldexp``), so no value goes through Python's rationals."""
    y = np.asarray(y, dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise CollapseSimError("a format's spacing is taken at finite values; the exact outputs hold inf or NaN")
    e = np.frexp(np.abs(y))[1] - 1
    return np.ldexp(1.0, np.where(y == 0, EMIN, np.maximum(e, EMIN)) - p + 1)


def exact_pair_outputs(params: Params, family: str, n_max: int, *, seed: int = 0):
    """float64 outputs (the 'exact' values to format precision ≤ 25) of both members, per n."""
    from ..backends import make_backend
    from ..pairing import pair_outputs

    return pair_outputs(params, make_pairs(family, n_max, params.config.vocab, seed=seed), make_backend("native", "fp64"))


def predicted_first_collapse(A: np.ndarray, B: np.ndarray, p: int) -> int | None:
    """First n at which every coordinate's exact difference is below one ulp of the
    p-bit format at that coordinate: two reals further apart than an ulp never round to
    the same number, closer ones can."""
    ok = np.all(np.abs(A - B) < ulp(A, p), axis=1)
    hit = np.nonzero(ok)[0]
    return int(hit[0]) + 1 if hit.size else None


def decay_rate(A: np.ndarray, B: np.ndarray) -> float:
    """r in D(n) ∝ n^(−r), fitted on the upper half of the lengths (ℓ∞ distances)."""
    D = np.max(np.abs(A - B), axis=1)
    n = np.arange(1, D.size + 1)
    sel = (n >= D.size // 2) & (D > 0)
    return float(-np.polyfit(np.log2(n[sel]), np.log2(D[sel]), 1)[0])


def fit_slope(ps, ns) -> float:
    """Least-squares slope of log2 n* against p."""
    return float(np.polyfit(np.asarray(ps, float), np.log2(np.asarray(ns, float)), 1)[0])


def slope_tolerance(ps, octaves: float) -> float:
    """If every log2 n*(p) lies within ``octaves`` of a line, the least-squares slope lies
    within octaves·Σ|p − p̄| / Σ(p − p̄)² of that line's slope."""
    ps = np.asarray(ps, float)
    dev = ps - ps.mean()
    return float(octaves * np.sum(np.abs(dev)) / np.sum(dev**2))


@dataclasses.dataclass
class ScalingResult:
    family: str
    ps: list[int]
    measured: list[int | None]
    predicted: list[int | None]
    rate: float  # fitted decay exponent r of the exact distance
    slope: float | None  # fitted slope of log2 measured n* vs p
    n_max: int

    @property
    def predicted_slope(self) -> float:
        return 1.0 / self.rate

    def rows(self) -> list[dict]:
        return [{"p": p, "measured_first_collapse": m, "predicted_first_collapse": q}
                for p, m, q in zip(self.ps, self.measured, self.predicted)]


def scaling_sweep(params: Params, family: str, ps, n_max: int, *, order: str = "pairwise", emax: int = 60,
                  seed: int = 0, progress=None) -> ScalingResult:
    """Measured (emulated custom formats p bits, exponent range ±emax, so no
    over/underflow interferes) and predicted first-collapse lengths for each p.

    Every p runs in the emulated backend's shared program (formats as data, the same bits as
    the program specialised to each format): one compiled forward serves the whole sweep,
    where the automatic choice would compile the specialised one for the first p as well.
    Formats outside the shared program's class (e.g. emax >= 128) and streams longer than
    SHARED_MAX_N take the automatic choice."""
    from ..backends.emulated import SHARED_MAX_N, EmulatedBackend
    from ..backends.emulated.ops import shared_class_refusal
    from ..pairing import collapse_sweep
    from ..policy import Policy

    A, B = exact_pair_outputs(params, family, n_max, seed=seed)
    measured, predicted = [], []
    for p in ps:
        pol = f"compute=(p={p},emax={emax}),order={order}"
        share = shared_class_refusal(Policy.parse(pol)) is None and n_max + 1 <= SHARED_MAX_N
        res = collapse_sweep(params, family, n_max, EmulatedBackend(pol, shared=share or None), f"p={p}", seed=seed)
        measured.append(res.first_identical())
        predicted.append(predicted_first_collapse(A, B, p))
        if progress:
            progress(f"p={p}: first collapse at n={measured[-1]} (predicted {predicted[-1]}) in {res.seconds:.1f}s")
    ok = [(p, m) for p, m in zip(ps, measured) if m is not None]
    slope = fit_slope(*zip(*ok)) if len(ok) >= 2 else None
    return ScalingResult(family, list(ps), measured, predicted, decay_rate(A, B), slope, n_max)


def scaling_model(seed: int = 11) -> Params:
    """The fixed model of the scaling check: one attention layer, d = 4, no positions,
    no norms, no projections (the closed-form setting of ``zero_ones``)."""
    from ..model import ModelConfig, init_params

    return init_params(ModelConfig(d=4, n_layers=1, vocab=4, pe="none", norm="none", value_proj=False,
                                   qk_std=1.0, seed=seed))
