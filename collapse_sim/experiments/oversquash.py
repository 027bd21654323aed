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

    def summary(self) -> str:
        """The line the command prints: the first format's profile at three places, and the bound."""
        r, n = self.result, self.result.n
        key = f"{self.fmts[0]} (frozen)"
        prof, f64 = r.profiles[key], r.profiles["fp64 (frozen)"]
        return (f"{key}: first token {prof[0]:.4g}, middle {prof[n // 2]:.4g}, last {prof[-1]:.4g}; "
                f"bound holds at every i: {bool(np.all(f64 <= r.bound * (1 + 1e-12)))}; "
                f"largest observed/bound {np.max(f64 / r.bound):.4g}")


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
    return OversquashRun(r, fmts, files)
