"""The third collapse criterion: the signal sinks below the format's rounding noise.

For a pair (y_n, y*_{n+1}) the *signal* is the exact-arithmetic distance
s_n = ‖y_n − y*_{n+1}‖₁ and the *noise* is what the format's computation moved each
member away from its exact value, e_n = ‖fl(y_n) − y_n‖₁ + ‖fl(y*_{n+1}) − y*_{n+1}‖₁
(fl: the same forward evaluated in the format). By the triangle inequality

    s_n − e_n  ≤  ‖fl(y_n) − fl(y*_{n+1})‖₁  ≤  s_n + e_n,

so while s_n > e_n the format's two outputs are certainly distinct, and their
difference is the exact one up to e_n < s_n; once s_n ≤ e_n the computed difference
can be produced by rounding alone:
the format may return identical outputs, or outputs that differ by as much as the
signal in a direction that has nothing to do with the inputs. No readout of the
format's output can then tell the two inputs apart reliably. This is the n from which
a format has lost the information, whether or not its two outputs happen to be
bitwise identical (docs/reproduce.md, "Three criteria").

The exact values come from a backend whose own error is negligible against the
format's: the 256-bit reference, or float64 where the signal is far above float64's
rounding (u = 2^-53 against the format's u ≥ 2^-24); the report says which.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SignalNoise:
    fmt: str
    ns: np.ndarray
    signal: np.ndarray  # s_n: exact-arithmetic L1 distance of the pair
    noise: np.ndarray  # e_n: the format's L1 error on both members (inf where the format's output is non-finite)
    exact_from: str  # which backend stood in for exact arithmetic

    @property
    def below(self) -> np.ndarray:
        """s_n ≤ e_n for pairs that differ in exact arithmetic (s_n > 0); a non-finite output counts as below."""
        return (self.signal > 0) & (self.signal <= self.noise)

    def first_below(self, n_min: int = 1) -> int | None:
        """First n ≥ n_min with a non-zero signal at or below the noise."""
        hit = np.nonzero(self.below & (self.ns >= n_min))[0]
        return int(self.ns[hit[0]]) if hit.size else None

    def below_from(self, n_min: int = 1) -> int | None:
        """Smallest n from which every pair with a non-zero signal up to N is below the noise
        (None if the last such pair is not)."""
        keep = (self.signal > 0) & (self.ns >= n_min)
        if not keep.any():
            return None
        ns, below = self.ns[keep], self.below[keep]
        if not below[-1]:
            return None
        above = np.nonzero(~below)[0]
        return int(ns[above[-1] + 1]) if above.size else int(ns[0])

    def share_below(self, n_min: int = 1) -> float:
        keep = (self.signal > 0) & (self.ns >= n_min)
        return float(self.below[keep].mean()) if keep.any() else 0.0


def signal_noise(fmt: str, ns: np.ndarray, exact: tuple[np.ndarray, np.ndarray],
                 in_format: tuple[np.ndarray, np.ndarray], exact_from: str) -> SignalNoise:
    """Signal and noise per n from both members of every pair, ``(A, B)`` each (n, d), in
    exact (stand-in) arithmetic and in the format (as float64 values)."""
    (xa, xb), (fa, fb) = exact, in_format
    if xa.shape != fa.shape or xb.shape != fb.shape or xa.shape != xb.shape:
        raise ValueError(f"pair outputs of different shapes: exact {xa.shape}/{xb.shape}, "
                         f"{fmt} {fa.shape}/{fb.shape}")
    signal = np.abs(xa - xb).sum(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        noise = np.abs(fa - xa).sum(axis=1) + np.abs(fb - xb).sum(axis=1)
    noise = np.where(np.isfinite(noise), noise, np.inf)
    return SignalNoise(fmt, np.asarray(ns), signal, noise, exact_from)


def noise_of(f64, r, fmt: str) -> SignalNoise:
    """The format's signal-below-noise record against the float64 run of the same pairs
    (both CollapseResults kept their outputs); pairs equal in exact arithmetic carry no signal."""
    m = r.ns.size
    (xa, xb), (fa, fb) = f64.outputs, r.outputs
    sn = signal_noise(fmt, r.ns, (xa[:m], xb[:m]), (fa, fb), "float64")
    if f64.exact_equal is not None:
        sn.signal[f64.exact_equal[:m]] = 0.0
    return sn
