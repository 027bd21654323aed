"""The model's constants as real numbers rounded once to a storage format (docs/semantics.md §5.7)."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import mpmath.libmp as mlib
import numpy as np

from ... import positional
from ...positional import SINUSOIDAL
from .arith import RefArith


class ExactConstants:
    """The model's constants as real numbers rounded once to a storage format
    (docs/semantics.md §5.7), keyed by the float64 value the model passes for each.

    * 1/√d_h: correctly rounded (a quadratic irrational or exact; evaluated at
      ``2p + 64`` bits, truncated with a sticky bit).
    * ε: the decimal number ``repr(eps)`` shows (``1e-5`` is 1/100000), correctly rounded.
    * ALiBi: −2^(−8h/H)·(i − j), sinusoidal sin/cos(t / 10000^(2i/d)), RoPE
      cos/sin(t · 10000^(−2i/d_h)): evaluated by mpmath at ``2p + 64 + log2(t_max)``
      bits and rounded once (faithful; correctly rounded unless the value lies
      within ~2^-(2p+60) relative of a rounding boundary of the format).
    """

    def __init__(self, storage: RefArith):
        self.storage = storage
        self.work = 2 * storage.fmt.p + 64

    def _round(self, value: "mpmath.mpf"):
        return self.storage.round(value._mpf_)

    def for_run(self, config, arrays, n: int, probe: bool) -> dict:
        need = n + int(probe)
        out: dict = {}
        dh = config.dh
        out[float(1 / np.sqrt(dh))] = self.inv_sqrt(dh)
        out[float(config.norm_eps)] = self.decimal(config.norm_eps)
        if config.pe == "alibi":
            for h, slope in enumerate(positional.alibi_slopes(config.n_heads), start=1):
                out[("alibi", float(slope))] = self.alibi(h, config.n_heads)
        if config.pe == "sinusoidal" and SINUSOIDAL in arrays:
            t = np.asarray(arrays[SINUSOIDAL], dtype=np.float64)
            out[(t.shape, t.tobytes())] = self.sinusoidal(need, config.d)
        if config.pe == "rope":
            for pos in [np.arange(n)] + ([np.arange(n) + 1] if probe else []):
                cos, sin = positional.rope_tables(pos, dh, fraction=config.rope_fraction)
                ecos, esin = self.rope(pos, dh, config.rope_fraction)
                out[(cos.shape, cos.tobytes())] = ecos
                out[(sin.shape, sin.tobytes())] = esin
        return out

    def _prec(self, largest: int) -> int:
        """Working bits for values computed from integers up to ``largest`` (positions,
        distances): their size adds to the absolute error of an angle or a product."""
        return self.work + max(1, int(largest)).bit_length()

    def inv_sqrt(self, dh: int):
        """1/√d_h = √d_h / d_h. Exact when d_h is a power of 4; otherwise irrational, and a
        quadratic irrational lies at least ~2^-(2p+2+log2 d_h) (relative) from every
        rounding boundary of a p-bit format, far more than the ~2^-(2p+62) error of this
        evaluation: the sticky bit then rounds it as the true value."""
        dhm = mlib.from_int(dh)
        r = mlib.mpf_div(mlib.mpf_sqrt(dhm, self.work + 8, "d"), dhm, self.work, "d")
        exact = mlib.mpf_mul(mlib.mpf_mul(r, r, 0), dhm, 0) == mlib.fone
        return self.storage.round(self.storage._sticky(r, exact))

    def decimal(self, c: float):
        f = Fraction(repr(float(c)))
        r = mlib.from_rational(f.numerator, f.denominator, self.work, "d")
        exact = Fraction(*mlib.to_rational(r)) == f
        return self.storage.round(self.storage._sticky(r, exact))

    def alibi(self, h: int, n_heads: int):
        """The bias −slope·dist for a distance, as a function (the attention asks per distance)."""
        work = self._prec(2**32)  # distances below 2^32
        with mpmath.workprec(work):
            slope = mpmath.power(2, mpmath.mpf(-8 * h) / n_heads)

        def bias(dist: int):
            with mpmath.workprec(work):
                return self._round(-slope * dist) if dist else mlib.fzero

        return bias

    def sinusoidal(self, n: int, d: int) -> np.ndarray:
        out = np.empty((n, d), dtype=object)
        with mpmath.workprec(self._prec(n)):
            for i in range((d + 1) // 2):
                freq = mpmath.power(10000, mpmath.mpf(2 * i) / d)
                for t in range(n):
                    ang = t / freq
                    out[t, 2 * i] = self._round(mpmath.sin(ang))
                    if 2 * i + 1 < d:
                        out[t, 2 * i + 1] = self._round(mpmath.cos(ang))
        return out

    def rope(self, positions, dh: int, fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        cos = np.empty((len(positions), dh // 2), dtype=object)
        sin = np.empty_like(cos)
        rotating = positional.rope_pairs(dh, fraction)  # p-RoPE: the other pairs have frequency 0
        with mpmath.workprec(self._prec(max(positions, default=1))):
            for i in range(dh // 2):
                inv = mpmath.power(10000, -mpmath.mpf(2 * i) / dh) if i < rotating else mpmath.mpf(0)
                for r, t in enumerate(positions):
                    ang = int(t) * inv
                    cos[r, i], sin[r, i] = self._round(mpmath.cos(ang)), self._round(mpmath.sin(ang))
        return cos, sin
