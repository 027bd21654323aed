"""The captions' reading of Figs. 8 and 10 in the report: the Gaussian model first.

The figure captions describe queries, keys and values drawn per position from a
Gaussian (no embeddings, no weight matrices), one head, d = 64, L1 distance against the
line 2^-7. :mod:`collapse_sim.experiments.captions` measures that model; this module
runs it once for both figures (every row of :data:`captions.ROWS`: float64 mean of three
seeds, each emulated format, the 256-bit reference at small n), computes the
signal-below-noise lengths, and writes the tables and figures.
"""

from __future__ import annotations

import numpy as np

from ..backends import make_backend
from ..model import gaussian_config, init_params
from ..plots import plot_curves
from .captions import ROWS, CaptionRow, caption_row
from .collapse import collapse_sweep
from .fits import N_MIN, PAPER_LINE, Decay
from .noise import SignalNoise, noise_of
from .paper import BUCKET, PAPER_READING, REF, Context, _fmt_n, _log, ref_agreement

CAPTION_SEEDS = (0, 1, 2)
FIG8_ROWS = ("sinusoidal on keys", "sinusoidal on queries and keys")  # the caption: sinusoidal, placement unsaid
D = 64


def captions(ctx: Context) -> dict:
    """Every caption row, computed once per report: ``{label: {"fp64": CaptionRow, fmt: CaptionRow,
    "noise": {fmt: SignalNoise}, "ref_agree": float | None}}``."""
    if "captions" in ctx.findings:
        return ctx.findings["captions"]
    sz = ctx.sizes
    out = {}
    for label, setup in ROWS:
        f64 = caption_row(label, setup, n_max=sz.caption_n, seeds=CAPTION_SEEDS, d=D, keep_runs=True)
        row = {"fp64": f64, "noise": {}}
        fseeds = CAPTION_SEEDS[:sz.caption_fmt_seeds]
        for fmt in sz.caption_formats:
            r = caption_row(label, setup, n_max=sz.caption_fmt_n, seeds=fseeds, d=D, fmt=fmt, backend=sz.backend,
                            keep_runs=True, bucket=BUCKET)
            row[fmt] = r
            row["noise"][fmt] = [noise_of(f, e, fmt) for f, e in zip(f64.runs, r.runs)]
            _log(f"captions' model, {label} / {fmt}: n ≤ {sz.caption_fmt_n:,}, {len(fseeds)} seed(s) in {r.seconds:.1f} s")
        row["ref_agree"] = None
        if sz.caption_ref_n:
            params = init_params(gaussian_config(D, seed=CAPTION_SEEDS[0], **setup))
            ref = collapse_sweep(params, "repeat_last", sz.caption_ref_n, make_backend("interval", REF), REF,
                                 seed=CAPTION_SEEDS[0])
            row["ref_agree"] = ref_agreement({"fp64": f64.runs[0], REF: ref})
        for r in [f64, *(row[f] for f in sz.caption_formats)]:
            for run in r.runs:  # the outputs served the noise records; keep the distances only
                run.outputs = None
        _log(f"captions' model, {label}: float64 n ≤ {sz.caption_n:,}, {len(CAPTION_SEEDS)} seeds in {f64.seconds:.1f} s")
        out[label] = row
    ctx.findings["captions"] = out
    return out


def _noise_cell(sns: list[SignalNoise]) -> str:
    firsts = [s.first_below(N_MIN) for s in sns]
    froms = [s.below_from(N_MIN) for s in sns]
    if not any(firsts):
        return "never"
    return ("first " + ", ".join("—" if v is None else f"{v:,}" for v in firsts)
            + "; all from " + ", ".join("—" if v is None else f"{v:,}" for v in froms))


def _ident(r: CaptionRow) -> str:
    if all(v is None for v in r.first_identical):
        return "never"
    return ", ".join("—" if v is None else f"{v:,}" for v in r.first_identical) + \
        f" ({np.mean(r.identical_share):.0%} of n ≥ {N_MIN})"


def caption_table(ctx: Context, labels, experiment: str) -> list[str]:
    """The captions' rows of one figure as Markdown, plus their comparison rows."""
    sz = ctx.sizes
    data = captions(ctx)
    fmts = sz.caption_formats
    head = ("| setup | float64 fit C·n^s (window) | fit reaches 2^-7 | mean curve first below 2^-7 | "
            + " | ".join(f"{f}: first bitwise identical (seeds) | {f}: signal ≤ noise (seeds) | {f}: non-finite"
                         for f in fmts) + " |")
    lines = [head, "|---" * (4 + 3 * len(fmts)) + "|"]
    for label in labels:
        row = data[label]
        f = row["fp64"]
        reach = "never" if f.fit_crossing is None else f"n ≈ {f.fit_crossing:,.0f}"
        cells = [f"{f.coefficient:.3g}·n^{f.exponent:+.2f} ({f.fit_window[0]:,}..{f.fit_window[1]:,})", reach,
                 _fmt_n(f.first_below, f.n_max)]
        for fmt in fmts:
            r = row[fmt]
            cells += [_ident(r), _noise_cell(row["noise"][fmt]), f"**{r.nonfinite:,}**" if r.nonfinite else "0"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        ctx.comparison.append(dict(
            experiment=experiment, setup=f"captions' model: {label}", paper=PAPER_READING.get(experiment, "—"),
            n_max=f.n_max, cross_l1=f.first_below, cross_linf=None, fit=Decay(f.exponent, f.coefficient),
            bf16_first=(min((v for v in row["bf16"].first_identical if v), default=None) if "bf16" in row else None),
            bf16_from=None, bf16_floor=None))
    agree = [(lab, data[lab]["ref_agree"]) for lab in labels if data[lab]["ref_agree"] is not None]
    notes = [""]
    if agree:
        notes.append(f"Float64 against the 256-bit reference (seed {CAPTION_SEEDS[0]}, n ≤ {sz.caption_ref_n:,}): largest "
                     "relative difference of the L1 distance " + ", ".join(f"{lab} {v:.2g}" for lab, v in agree) + ".")
    notes.append(f"Emulated formats run n ≤ {sz.caption_fmt_n:,} with {sz.caption_fmt_seeds} seed(s); the float64 mean "
                 f"curve n ≤ {sz.caption_n:,} with {len(CAPTION_SEEDS)} seeds. *Signal ≤ noise*: the exact distance of the pair "
                 "is at or below what the format's rounding moved the two outputs (section *Signal below rounding noise*).")
    return lines + notes + [""]


def caption_figure(ctx: Context, labels, name: str, title: str) -> str:
    data = captions(ctx)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    series = []
    for label, c in zip(labels, colors):
        f = data[label]["fp64"]
        series.append(dict(label=f"{label}: float64, mean of {len(f.seeds)} seeds", x=f.ns, y=f.mean_l1, color=c, lw=1.5))
        if "bf16" in data[label]:
            b = data[label]["bf16"]
            series.append(dict(label=f"{label}: bf16 (emulated), seed {b.seeds[0]}", x=b.runs[0].ns, y=b.runs[0].l1,
                               color=c, lw=0.8, ls="--"))
    png = plot_curves(series, ctx.outdir / name, title=title, ylabel="‖y_n − y*_(n+1)‖₁",
                      hlines=[("2^-7 (the paper's bf16 line)", PAPER_LINE, "k")], x_min=N_MIN, smooth=True)
    return f"![{title}]({png.name})"


def section_fig8_captions(ctx: Context, lines: list[str]) -> None:
    sz = ctx.sizes
    lines += ["### The captions' reading (primary)", "",
              f"q_i, k_i, v_i ~ N(0, I/d) per position, d = {D}, one head, no weights, the attention output, L1 distance "
              "between v (length n) and v* (its last position repeated). The caption applies the original "
              "Transformer's sinusoidal encodings without saying where; both placements that leave the values alone "
              f"run (keys only; queries and keys). Float64 n ≤ {sz.caption_n:,}.", "",
              *caption_table(ctx, FIG8_ROWS, "Fig. 8"),
              caption_figure(ctx, FIG8_ROWS, "fig8_captions.png", "Fig. 8, captions' model: sinusoidal positions, d = 64"), ""]


def section_fig10_captions(ctx: Context, lines: list[str]) -> None:
    sz = ctx.sizes
    labels = [label for label, _ in ROWS]
    lines += ["### The captions' reading (primary)", "",
              f"The same Gaussian model with each positional scheme: none, RoPE on q and k, sinusoidal on the keys or on "
              "queries and keys, ALiBi with one head of slope 2^-8 added after the 1/√d scale, or before it (effective "
              f"slope 2^-8/8 = 2^-11). Float64 n ≤ {sz.caption_n:,}.", "",
              *caption_table(ctx, labels, "Fig. 10"),
              caption_figure(ctx, labels, "fig10_captions.png", "Fig. 10, captions' model: positional encodings, d = 64"), ""]


def noise_rows(ctx: Context) -> list[tuple[str, str, list[SignalNoise]]]:
    """(experiment, setup, per-seed records) of every captions row and format."""
    data = ctx.findings.get("captions", {})
    return [(("Fig. 8/10" if lab in FIG8_ROWS else "Fig. 10"), f"captions' model: {lab}", row["noise"][fmt])
            for lab, row in data.items() for fmt in ctx.sizes.caption_formats]


def disagreements(ctx: Context) -> list[str]:
    """Paragraphs on the captions' reading of Figs. 8 and 10, citing this run's numbers."""
    data = ctx.findings.get("captions")
    if not data:
        return []
    out = []

    def reach(label):
        f = data[label]["fp64"]
        return f.fit_crossing if f.fit_crossing is not None else None

    keys, qk = data["sinusoidal on keys"]["fp64"], data["sinusoidal on queries and keys"]["fp64"]
    out.append(
        f"**Fig. 8, captions' reading: the crossing is near {_fmt_reach(reach('sinusoidal on keys'))}, not ≈ 500.** With "
        f"q, k, v ~ N(0, I/{D}) and the sinusoidal table on the keys, the float64 mean of {len(keys.seeds)} seeds decays as "
        f"{keys.coefficient:.3g}·n^{keys.exponent:+.2f} (fit over n = {keys.fit_window[0]:,}..{keys.fit_window[1]:,}) and its "
        f"fit meets 2^-7 at n ≈ {_fmt_reach(reach('sinusoidal on keys'))} (the mean curve first dips below at "
        f"{_fmt_n(keys.first_below, keys.n_max)}). On queries and keys the scores of v and v* differ by the query's step "
        f"PE[n+1] − PE[n], which does not shrink: {qk.coefficient:.3g}·n^{qk.exponent:+.2f}, "
        f"{'never reaching the line here' if qk.first_below is None else f'first below at {qk.first_below:,}'}. The "
        "1/n rate is Lemma B.1's (the repeated position's weight is ~1/n), and its constant is fixed by d, the "
        "variance and the norm: for this curve to cross at 500 its constant would have to be "
        f"{_share_for(500, reach('sinusoidal on keys'), keys.exponent)} of the measured one (the L∞ norm instead of L1 "
        "moves the crossing by up to a factor d, another variance changes how sharp the attention is). The paper does not give the variance, the normalisation or where the "
        "encodings enter, so its ≈ 500 cannot be matched from the caption alone; everything else in the figure (1/n "
        "decay, a crossing of the order of several hundred) is reproduced.")
    decaying = [lab for lab in ("no PE", "RoPE", "sinusoidal on keys") if lab in data]
    alibi = [lab for lab in data if lab.startswith("ALiBi")]
    out.append(
        "**Fig. 10, captions' reading: reproduced for no positions, RoPE and keys-only sinusoidal.** Fits meet 2^-7 at "
        + ", ".join(f"{lab} n ≈ {_fmt_reach(reach(lab))}" for lab in decaying)
        + " (paper: 800–1,000). ALiBi depends on the slope and where it is added: "
        + "; ".join(f"{lab}: {data[lab]['fp64'].coefficient:.3g}·n^{data[lab]['fp64'].exponent:+.2f}, "
                    + ("never below the line" if data[lab]["fp64"].first_below is None
                       else f"first below at {data[lab]['fp64'].first_below:,}") for lab in alibi)
        + ". A slope of 2^-8 on the scaled score makes attention local (a key 1,000 back loses e^-3.9), so the "
        "repeated position keeps an O(1) weight and the distance stays flat; the same slope added before the 1/√d "
        "scale is 8× weaker and the curve crosses slightly later than the others, as the paper draws it.")
    return out


def _share_for(target: float, reach: float | None, slope: float) -> str:
    """The factor on C that moves the crossing of C·n^slope from ``reach`` to ``target``."""
    return "—" if reach is None else f"{(target / reach) ** -slope:.0%}"


def _fmt_reach(v: float | None) -> str:
    return "never" if v is None else f"{v:,.0f}"
