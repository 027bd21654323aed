"""The ``scaling`` command's run without argparse: first-collapse length against significand bits.

The sweep and its prediction are :func:`collapse_sim.theory.scaling.scaling_sweep` (the
theory's scaling check runs it too); :func:`run_scaling` runs it on the fixed model of the
check and writes ``scaling.csv``, ``scaling.json`` and ``scaling.png``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..results import write_csv


def run_scaling(family: str, ps: list[int], max_len: int, out: Path, *, seed: int = 11, log=None):
    """The first-collapse length of ``family`` (n ≤ ``max_len``) in an emulated format of p bits
    for every p of ``ps``, measured and predicted on :func:`collapse_sim.theory.scaling.scaling_model`;
    writes the three files into ``out`` (a folder already checked) and returns the
    :class:`collapse_sim.theory.scaling.ScalingResult`. ``log`` prints the progress lines."""
    from ..plots import plot_scaling
    from ..progress import stage
    from ..results import provenance
    from ..theory.scaling import scaling_model, scaling_sweep, slope_tolerance

    log = log or (lambda m: print(m, flush=True))
    params = scaling_model(seed)
    with stage("[scaling]", f"family {family}, p = {ps[0]}..{ps[-1]}, n ≤ {max_len}, one attention layer, d = 4"):
        r = scaling_sweep(params, family, ps, max_len, seed=seed, progress=lambda m: log(f"[scaling]   {m}"))
    out.mkdir(parents=True, exist_ok=True)  # only now: a stopped run leaves nothing behind
    write_csv(out / "scaling.csv", r.rows())
    (out / "scaling.json").write_text(json.dumps({"provenance": provenance(), "family": family, "p": list(ps),
                                                  "max_len": max_len, "seed": seed,
                                                  "config": dataclasses.asdict(params.config),
                                                  "rate": r.rate, "slope": r.slope,
                                                  "predicted_slope": r.predicted_slope,
                                                  "slope_tolerance": slope_tolerance(ps, 1.5)}, indent=1, default=str))
    plot_scaling(r, out / "scaling.png")
    return r
