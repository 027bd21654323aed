"""The over-squashing profile: ‖∂y_n/∂v_i^(0)‖ over i, per format, beside the path-sum bound.

:func:`run_oversquash` is the whole ``collapse-sim oversquash`` run without argparse: the
profile on random tokens, ``oversquash.csv`` and ``oversquash.png``;
:func:`check_oversquash` refuses bad lengths and formats before any model is built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..model import Params
from ..theory.oversquash import path_sum_bound, sensitivity
from ..theory.trace import trace

#: The formats JAX differentiates natively.
NATIVE = ("fp64", "fp32", "bf16", "fp16")
#: Longest sequence: the Jacobian is n·d×d per format.
MAX_N = 512


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


def check_oversquash(n: int, formats: str) -> list[str]:
    """The run's length and formats (``formats``: comma-separated names), checked before any
    model is built; returns the format names."""
    from ..formats import parse_list

    if not 1 <= n <= MAX_N:
        raise UsageError(f"--n must lie in 1..{MAX_N} (the Jacobian is n·d×d per format), got {n}")
    fmts = [f.name for f in parse_list(formats)]
    for f in fmts:
        if f not in NATIVE:
            raise UsageError(f"format {f} cannot be differentiated natively; autodiff runs in fp64, fp32, bf16 or fp16")
    return fmts


@dataclasses.dataclass
class OversquashRun:
    """What :func:`run_oversquash` measured and wrote."""

    result: OversquashResult
    fmts: list[str]
    files: tuple[Path, ...]  # oversquash.csv, oversquash.json, oversquash.png
    config: object = None  # the model's ModelConfig (the float64 check's op count)

    def summary(self) -> str:
        """The lines the command prints: every profile at the first, middle and last token, and where it
        exceeds the path-sum bound. The bound is Thm 5.1's for the frozen model (attention weights held
        fixed) in exact arithmetic: the float64 frozen profile is checked against it widened by
        γ_k(2^-53), k the forward's op count (theory.statement.forward_ops); the low-precision and full
        models are only compared with it."""
        from ..theory.statement import forward_ops, gamma

        r, n = self.result, self.result.n
        c = self.config
        slack = gamma(forward_ops(n, c.d, c.n_layers), 2.0**-53) if c is not None else 0.0
        lines = []
        for key, prof in r.profiles.items():
            over = np.nonzero(prof > r.bound * (1 + slack))[0] + 1
            where = ("within the path-sum bound at every i" if not over.size else
                     f"above the path-sum bound at i = {', '.join(map(str, over[:8]))}{' ...' if over.size > 8 else ''}")
            note = (" (the bound's own case: float64, frozen)" if key == "fp64 (frozen)" else
                    " (attention weights differentiated too: not what the bound covers)" if "full" in key else
                    " (rounded: compared, not covered)")
            lines.append(f"{key}: first token {prof[0]:.4g}, middle {prof[n // 2]:.4g}, last {prof[-1]:.4g}; {where}{note}")
        f64 = r.profiles["fp64 (frozen)"]
        lines.append(f"largest float64 frozen observed/bound {np.max(f64 / r.bound):.4g}")
        return "\n".join(lines)


def run_oversquash(params: Params, n: int, fmts: list[str], out: Path, *, seed: int = 0, log=None) -> OversquashRun:
    """The ``oversquash`` experiment: the sensitivity profile of ``n`` random tokens (drawn with
    ``seed``) through ``params`` in every format of ``fmts`` (from :func:`check_oversquash`);
    writes oversquash.csv, oversquash.json (the model's config, the tokens, the seed and the
    provenance) and oversquash.png into ``out`` (a folder already checked with
    :func:`collapse_sim.results.check_output_dir`; created once the profile is measured).
    ``log`` prints the progress lines."""
    import json

    from ..plots import plot_oversquash
    from ..progress import stage
    from ..results import provenance, write_csv

    log = log or (lambda m: print(m, flush=True))
    toks = np.random.default_rng(seed).integers(0, params.config.vocab, n)
    c = params.config
    with stage("[oversquash]", f"n={n}, d={c.d}, L={c.n_layers}, formats {', '.join(fmts)}"):
        r = oversquash_profile(params, toks, fmts, progress=lambda m: log(f"[oversquash]   {m}"))
    out.mkdir(parents=True, exist_ok=True)
    files = (out / "oversquash.csv", out / "oversquash.json", out / "oversquash.png")
    write_csv(files[0], r.rows())
    files[1].write_text(json.dumps({"provenance": provenance(), "config": dataclasses.asdict(c), "n": n, "seed": seed,
                                    "tokens": toks.tolist(), "formats": list(fmts)}, indent=1, default=str))
    plot_oversquash(r, files[2], title=f"n={n}, pe={c.pe}, d={c.d}, L={c.n_layers}, seed={seed}")
    return OversquashRun(r, fmts, files, c)
