"""Report sections: representational collapse of v vs v* (last token repeated)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from ..backends import make_backend
from ..model import ModelConfig, init_params
from ..plots import plot_collapse
from ..policy import Policy
from .collapse import collapse_sweep

# (label, model config overrides): whether the last token's own absolute position
# enters the residual stream decides whether the distance can vanish at all.
SETUPS = [
    ("no positional encoding", dict(pe="none")),
    ("sinusoidal APE in q/k only (ape=scores)", dict(pe="sinusoidal", ape="scores")),
    ("sinusoidal APE in the residual (GPT-style)", dict(pe="sinusoidal", ape="residual")),
    ("ALiBi", dict(pe="alibi")),
]


def collapse_sections(quick: bool):
    def section(lines: list[str], outdir: Path) -> None:
        n_max = 256 if quick else 4096
        setups = SETUPS[:3] if quick else SETUPS
        formats = ["bf16", "fp16"] if quick else ["bf16", "fp16", "e4m3fn", "fp32"]
        lines += ["## Representational collapse: v vs v* (Theorem 4.2)", "",
                  f"One layer, d = 64, one head, LayerNorm, Gaussian init (W_q, W_k, W_v ~ N(0, 1/d)), "
                  f"random tokens, n = 1..{n_max}; emulated formats with pairwise reductions, and native float64. "
                  "A pair is *identical* when every component of the two last-token outputs is bitwise equal.", "",
                  "| setup | backend | identical from n | smallest ‖y−y*‖∞ | at n | non-finite |", "|---|---|---|---|---|---|"]
        rows_all = []
        for label, over in setups:
            params = init_params(ModelConfig(d=64, n_layers=1, n_heads=1, vocab=16, seed=0, **over))
            results = []
            backends = [(make_backend("emulated", str(Policy.uniform(f))), f) for f in formats]
            backends.append((make_backend("native", "fp64"), "fp64"))
            for be, f in backends:
                t0 = time.time()
                r = collapse_sweep(params, "repeat_last", n_max, be, f, seed=0)
                print(f"[reproduce]   {label} / {be.label.split(',')[0]}: {time.time() - t0:.1f}s", flush=True)
                results.append(r)
                i = int(r.linf.argmin())
                cf = r.collapsed_from()
                lines.append(f"| {label} | {be.label.split(',')[0].replace('storage=', '')} | {cf if cf else 'not by ' + str(n_max)} | "
                             f"{r.linf[i]:.3g} | {int(r.ns[i])} | {int(r.nonfinite.sum())} |")
                for row in r.rows():
                    row["setup"] = label
                    rows_all.append(row)
            slug = "".join(ch if ch.isalnum() else "_" for ch in label)[:40]
            png = plot_collapse(results, outdir / f"collapse_{slug}.png", title=f"v vs v*: {label}")
            lines.append("")
            lines.append(f"![{label}]({png.name})")
            lines.append("")
        with (outdir / "collapse.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows_all[0]))
            w.writeheader()
            w.writerows(rows_all)
        lines += ["Reading: with positions in the residual stream the last tokens of v and v* differ by",
                  "PE[n+1] − PE[n], which does not vanish, so the outputs stay O(1) apart (no collapse in any",
                  "format). Without positions (or with positions only in the scores) the distance falls like",
                  "1/n in float64, and low-precision formats stop following it once it reaches their spacing at",
                  "the output's scale: the curves flatten at about eps·max|y| instead of reaching bitwise",
                  "identity at this width, because independent roundings of the 64 components keep at least",
                  "one of them apart. The paper's reading (bf16 crossing its line near n ≈ 500) is the",
                  "crossing of the float64 curve with the dashed bf16 line.", ""]

    return [("collapse", section)]
