"""Reading a distance curve the way the paper's figures are read: the bf16 line 2^-7,
the first n below a line, and a power-law fit of the decay."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..formats import parse as parse_format

PAPER_LINE = 2.0**-7  # the "bf16 precision" line the paper's figures draw (eps of bf16)
N_MIN = 5  # the paper's lengths start at 5


def eps(fmt: str) -> float:
    """The format's spacing at 1, 2^(1−p): the resolution line (2^-7 for bf16)."""
    return parse_format(fmt).eps


def first_below(ns: np.ndarray, d: np.ndarray, line: float, n_min: int = N_MIN) -> int | None:
    """First n ≥ n_min whose distance is below ``line`` (the paper's reading of a crossing)."""
    hit = np.nonzero((ns >= n_min) & np.isfinite(d) & (d < line))[0]
    return int(ns[hit[0]]) if hit.size else None


@dataclasses.dataclass(frozen=True)
class Decay:
    """Least-squares fit log d = log C + s·log n over n ∈ [N/10, N] (positive d only)."""

    slope: float
    const: float

    def reaches(self, line: float) -> float | None:
        """The n at which C·n^s equals ``line``, if the fit decays (s < −0.1)."""
        if not np.isfinite(self.slope) or self.slope > -0.1:
            return None
        return float((line / self.const) ** (1.0 / self.slope))

    def reach_text(self, line: float = PAPER_LINE) -> str:
        at = self.reaches(line)
        return "never" if at is None else (f"n ≈ {at:,.0f}" if at < 1e7 else "n > 10^7")

    def describe(self, line: float = PAPER_LINE) -> str:
        if not np.isfinite(self.slope):
            return "no fit (too few positive distances)"
        tail = f"at this rate it reaches 2^-7 near {self.reach_text(line)}" if self.reaches(line) else \
            "it does not decay, so it never reaches 2^-7"
        return f"‖·‖₁ ≈ {self.const:.3g}·n^{self.slope:+.2f}; {tail}"


def decay_fit(ns: np.ndarray, d: np.ndarray) -> Decay:
    ok = (ns >= max(N_MIN, ns[-1] // 10)) & np.isfinite(d) & (d > 0)
    if ok.sum() < 3:
        return Decay(float("nan"), float("nan"))
    s, c = np.polyfit(np.log(ns[ok]), np.log(d[ok]), 1)
    return Decay(float(s), float(np.exp(c)))
