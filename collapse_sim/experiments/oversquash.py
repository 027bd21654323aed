"""The over-squashing profile: ‖∂y_n/∂v_i^(0)‖ over i, per format, beside the path-sum bound."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..model import Params
from ..theory.oversquash import path_sum_bound, sensitivity
from ..theory.trace import trace


@dataclasses.dataclass
class OversquashResult:
    n: int
    profiles: dict[str, np.ndarray]  # "fp64 (frozen)", "bf16 (frozen)", "fp64 (full model)", ...
    bound: np.ndarray  # the path-sum bound (consistent variant), fp64 trace

    def rows(self) -> list[dict]:
        out = []
        for i in range(self.n):
            r = {"i": i + 1, "path_sum_bound": float(self.bound[i])}
            r.update({k: float(v[i]) for k, v in self.profiles.items()})
            out.append(r)
        return out


def oversquash_profile(params: Params, tokens, formats=("fp64", "fp32", "bf16", "fp16"), progress=None) -> OversquashResult:
    tokens = np.asarray(tokens)
    prof = {}
    for f in formats:
        prof[f"{f} (frozen)"] = sensitivity(params, tokens, frozen=True, dtype=f)
        if progress:
            progress(f"{f}: Jacobian of the frozen model done")
    prof["fp64 (full model)"] = sensitivity(params, tokens, frozen=False)
    return OversquashResult(tokens.size, prof, path_sum_bound(params, tokens, trace(params, tokens)))
