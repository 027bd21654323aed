"""The report's figure sections: Figs. 8, 9 and 10, copying and counting, remedies.

Each section runs its experiment (:mod:`collapse_sim.experiments.paper`,
:mod:`collapse_sim.experiments.captions`), then writes its tables as Markdown and its
figures as PNG files beside the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..experiments import captions as cap
from ..experiments.collapse import CollapseResult
from ..experiments.fits import N_MIN, PAPER_LINE, Decay, eps, first_below
from ..experiments.noise import SignalNoise
from ..experiments.paper import REF, Context, median_top, ref_agreement, run_families, run_fig9, run_fig10, start_fig8
from ..experiments.recipes import (ACCUMULATORS, KERNELS, RECIPE_RUNS, REMEDY_FAMILIES, remedy_mechanism, run_policies,
                                    start_remedies)
from ..formats import parse as parse_format
from ..plots import plot_curves, plot_panels
from ..policy import Policy

#: Below this the 256-bit reference's distance counts as exactly 0: the two inputs are equal in exact
#: arithmetic. It sits 2^50 above the reference's rounding (2^-256 relative, on outputs of order 1,
#: over the few thousand operations of these runs) and far below anything float64 resolves (2^-53).
EXACT_ZERO = 2.0**-200


def fmt_n(v: int | None, n_max: int) -> str:
    return f"{v:,}" if v is not None else f"not by {n_max:,}"


def exact_zero(res: dict[str, CollapseResult]) -> bool:
    """Whether the reference ran and puts every distance at 0 (:data:`EXACT_ZERO`)."""
    return REF in res and bool(np.all(res[REF].l1 < EXACT_ZERO))


def _collapse_rows(res: dict[str, CollapseResult], formats, n_max: int) -> list[str]:
    """Table lines: per format, the paper-style crossing (float64 below eps(format)) and
    the format's own bitwise collapse (n ≥ N_MIN: at n = 1, v and v* are often equal exactly)."""
    f64 = res["fp64"]
    lines = []
    for f in formats:
        r = res[f]
        big = r.ns >= N_MIN
        nf = int(r.nonfinite.sum())
        lines.append(
            f"| {f} | {eps(f):.3g} | {fmt_n(first_below(f64.ns, f64.l1, eps(f)), n_max)} | "
            f"{fmt_n(first_below(f64.ns, f64.linf, eps(f)), n_max)} | {fmt_n(r.first_identical(N_MIN), n_max)} | "
            f"{fmt_n(r.collapsed_from(), n_max)} | {r.identical_share(N_MIN):.1%} | {np.nanmin(r.l1[big]):.3g} | "
            f"{nf if not nf else f'**{nf}** (overflow)'} |")
    return lines


_TABLE_HEAD = ["| format | eps = 2^(1−p) | float64 ‖·‖₁ first below eps | float64 ‖·‖∞ first below eps | "
               f"first bitwise identical in the format (n ≥ {N_MIN}) | identical for every n from | "
               f"share of n ≥ {N_MIN} identical | smallest ‖·‖₁ in the format | non-finite |",
               "|---|---|---|---|---|---|---|---|---|"]


def _fit_line(res: dict[str, CollapseResult], fit: Decay) -> str:
    """The float64 decay fit (of the run's comparison row) and the agreement with the reference."""
    f64 = res["fp64"]
    text = f"Float64 over n ∈ [{max(N_MIN, int(f64.ns[-1]) // 10):,}, {int(f64.ns[-1]):,}]: {fit.describe()}."
    agree = ref_agreement(res)
    if agree is not None:
        text += (f" Float64 vs the 256-bit reference (n ≤ {int(res[REF].ns[-1]):,}): largest relative difference of "
                 f"the L1 distance {agree:.2g}.")
    return text


def _ident_cell(r: CollapseResult) -> str:
    """Where the pair is bitwise identical in the format (n ≥ N_MIN)."""
    share = r.identical_share(N_MIN)
    nf = f"; **{int(r.nonfinite.sum())} non-finite**" if r.nonfinite.any() else ""
    if not share:
        return "never" + nf
    cf = r.collapsed_from()
    return f"first {r.first_identical(N_MIN):,}, " + (f"all from {cf:,}" if cf else "not at N") + f" ({share:.0%}){nf}"


#: One colour per format, shared by a format's curve and its eps line.
FORMAT_COLORS = {"bf16": "tab:blue", "fp16": "tab:orange", "e4m3fn": "tab:green", "fp32": "tab:red"}
SETUP_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
#: one colour per row of a recipe figure (kernels, accumulators, remedies: up to ten rows; more repeat, dashed)
RECIPE_COLORS = SETUP_COLORS + ["tab:pink", "tab:gray", "tab:olive", "tab:cyan"]


def _curves(res: dict[str, CollapseResult], metric: str = "l1"):
    """Float64 wide and pale in black, behind, so that a format's curve that follows it stays visible
    on top and float64 shows around it (as :func:`_setup_curves` and :func:`_policy_panels` draw it);
    each format in its own colour (:data:`FORMAT_COLORS`)."""
    series = []
    for name, r in sorted(res.items(), key=lambda kv: kv[0] not in ("fp64", REF)):  # formats drawn last, on top
        style = {"fp64": dict(color="k", lw=2.4, alpha=0.3, zorder=1), REF: dict(color="tab:gray", ls=":", lw=2.2)}.get(
            name, dict(color=FORMAT_COLORS.get(name, "tab:purple")))
        series.append(dict(label="float64 (native)" if name == "fp64" else
                           ("reference (256-bit arb)" if name == REF else f"{name} (emulated)"),
                           x=r.ns, y=getattr(r, metric), **style))
    return series


def _eps_lines(formats):
    return [(f"eps {f} = 2^{1 - parse_format(f).p}" + (" (the paper's bf16 line)" if f == "bf16" else ""), eps(f),
             FORMAT_COLORS.get(f)) for f in formats]


def _setup_curves(setup: str, res: dict[str, CollapseResult], color: str) -> list[dict]:
    """A setup's float64 curve (wide and pale, behind) and its bf16 curve (thin, dashed, on top) in one colour:
    where bf16 follows float64 both stay visible."""
    return [dict(label=f"{setup}: float64", x=res["fp64"].ns, y=res["fp64"].l1, color=color, lw=2.6, alpha=0.4,
                 zorder=1),
            dict(label=f"{setup}: bf16", x=res["bf16"].ns, y=res["bf16"].l1, color=color, lw=0.7, ls="--", zorder=3)]


BF16_LINE = ("bf16 line 2^-7", PAPER_LINE, "k")


# --- the captions' Gaussian model ---------------------------------------------------------------
def _noise_cell(sns: list[SignalNoise]) -> str:
    firsts = [s.first_below(N_MIN) for s in sns]
    froms = [s.below_from(N_MIN) for s in sns]
    if not any(firsts):
        return "never"
    return ("first " + ", ".join("—" if v is None else f"{v:,}" for v in firsts)
            + "; all from " + ", ".join("—" if v is None else f"{v:,}" for v in froms))


def _ident(r) -> str:
    if all(v is None for v in r.first_identical):
        return "never"
    return ", ".join("—" if v is None else f"{v:,}" for v in r.first_identical) + \
        f" ({np.mean(r.identical_share):.0%} of n ≥ {N_MIN})"


def caption_table(ctx: Context, labels) -> list[str]:
    """The captions' rows of one figure as Markdown."""
    sz = ctx.sizes
    data = cap.report_rows(ctx)
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
                 fmt_n(f.first_below, f.n_max)]
        for fmt in fmts:
            r = row[fmt]
            cells += [_ident(r), _noise_cell(row["noise"][fmt]), f"**{r.nonfinite:,}**" if r.nonfinite else "0"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    agree = [(lab, data[lab]["ref_agree"]) for lab in labels if data[lab]["ref_agree"] is not None]
    notes = [""]
    if agree:
        notes.append(f"Float64 against the 256-bit reference (seed {cap.CAPTION_SEEDS[0]}, n ≤ {sz.caption_ref_n:,}): "
                     "largest relative difference of the L1 distance " + ", ".join(f"{lab} {v:.2g}" for lab, v in agree) + ".")
    notes.append(f"Emulated formats run n ≤ {sz.caption_fmt_n:,} with {sz.caption_fmt_seeds} seed(s); the float64 mean "
                 f"curve n ≤ {sz.caption_n:,} with {len(cap.CAPTION_SEEDS)} seeds. *Signal ≤ noise*: the exact distance of the pair "
                 "is at or below what the format's rounding moved the two outputs (section *Signal below rounding noise*).")
    return lines + notes + [""]


def caption_figure(ctx: Context, outdir: Path, labels, name: str, title: str) -> str:
    data = cap.report_rows(ctx)
    series = []
    for label, c in zip(labels, SETUP_COLORS):
        f = data[label]["fp64"]
        series.append(dict(label=f"{label}: float64, mean of {len(f.seeds)} seeds", x=f.ns, y=f.mean_l1, color=c, lw=1.5))
        if "bf16" in data[label]:
            b = data[label]["bf16"]
            series.append(dict(label=f"{label}: bf16 (emulated), seed {b.seeds[0]}", x=b.runs[0].ns, y=b.runs[0].l1,
                               color=c, lw=0.8, ls="--"))
    png = plot_curves(series, outdir / name, title=title, ylabel="‖y_n − y*_(n+1)‖₁",
                      hlines=[("2^-7 (the paper's bf16 line)", PAPER_LINE, "k")], x_min=N_MIN, smooth=True)
    return f"![{title}]({png.name})"


def _captions_part(ctx: Context, outdir: Path, lines: list[str], labels, experiment: str, says: str, png: str,
                   title: str) -> None:
    cap.compare(ctx, labels, experiment)  # measures the rows on first use
    lines += ["### The captions' reading (primary)", "", says, "", *caption_table(ctx, labels),
              caption_figure(ctx, outdir, labels, png, title), ""]


# --- Fig. 8 -------------------------------------------------------------------------------------
def fig8(ctx: Context, outdir: Path, lines: list[str]) -> None:
    sz = ctx.sizes
    lines += ["## Fig. 8: v vs v* (last token repeated), sinusoidal positions", "",
              "Paper: one layer, d = 64, the last token copied, lengths 5…10,000; the distance crosses the bf16 "
              "line near n ≈ 500.", ""]
    decoder = start_fig8(ctx)  # queued first: they run while the captions' rows are waited for
    _captions_part(ctx, outdir, lines, cap.FIG8_ROWS, "Fig. 8",
                   f"q_i, k_i, v_i ~ N(0, I/d) per position, d = {cap.D}, one head, no weights, the attention output, L1 "
                   "distance between v (length n) and v* (its last position repeated). The caption applies the original "
                   "Transformer's sinusoidal encodings without saying where; both placements that leave the values alone "
                   f"run (keys only; queries and keys). Float64 n ≤ {sz.caption_n:,}.",
                   "fig8_captions.png", "Fig. 8, captions' model: sinusoidal positions, d = 64")
    n = sz.fig8_n
    lines += ["### Decoder variants", "",
              f"A decoder instead of drawn q, k, v: one layer, d = 64, one head, LayerNorm, W_q, W_k, W_v ~ N(0, 1/d), "
              f"random tokens, n = 1..{n:,}. "
              "Distances between the last-token outputs of v (length n) and v* (length n+1). "
              "Whether the last token's own absolute position enters the residual stream decides whether the "
              "distance can vanish, so both placements run.", ""]
    for run in decoder():
        setup, res = run.setup, run.res
        lines += [f"#### Decoder, {setup}", "", *_TABLE_HEAD, *_collapse_rows(res, sz.fig8_formats, n), "",
                  _fit_line(res, run.comparison["fit"]), ""]
        png = plot_curves(_curves(res), outdir / f"fig8_{run.over['ape']}.png",
                          title=f"Fig. 8: v vs v*, {setup}, d = 64", ylabel="‖y_n − y*_(n+1)‖₁",
                          hlines=_eps_lines(sz.fig8_formats), x_min=N_MIN, smooth=True)
        lines += [f"![Fig. 8, {setup}]({png.name})", ""]


# --- Fig. 9 -------------------------------------------------------------------------------------
def fig9(ctx: Context, outdir: Path, lines: list[str]) -> None:
    sz = ctx.sizes
    r = run_fig9(ctx)
    N, k, grid = r.n, r.k, r.grid
    lines += ["## Fig. 9: softmax total variation with the first k = 200 entries perturbed", "",
              f"x ~ U[0,1]^N (N = {N:,}; the length-n input is the first n entries), x* = x with U[0, 0.1] noise "
              f"added to the first k = {k} entries, {r.seeds} seeds. The paper's δ is Σ|softmax x − softmax x*| "
              "(no factor ½: its numbers, ≈ 0.026 at n = 500, match this sum). Float64 at every n; each format at "
              f"{grid.size} lengths, with the softmax evaluated as the attention does it in that format.", ""]
    if r.at500 is not None:
        lines += [f"δ at n = 500, float64: {r.at500.min():.4f} – {r.at500.max():.4f} over the seeds (paper ≈ 0.026).", ""]
    lines += ["| format | eps | float64 δ first below eps (min – max over seeds) | δ in the format at n = N (median) | "
              "lengths where the format's two softmaxes are bitwise identical |", "|---|---|---|---|---|"]
    for f in sz.formats:
        cs = [c[f] for c in r.cross]
        span = (f"{min(cs):,} – {max(cs):,}" if all(cs) else
                f"not by {N:,}" if not any(cs) else f"{min(c for c in cs if c):,} – not by {N:,}")
        same, tvs = r.fmt_same[f], r.fmt_tv[f]
        bad = ~np.isfinite(tvs)
        at_n = (f"{np.median(tvs[:, -1]):.3g}" if not bad[:, -1].any() else
                f"**non-finite** from n = {int(grid[bad.any(axis=0)][0]):,} (the denominator overflows max = "
                f"{parse_format(f).max:g})")
        lines.append(f"| {f} | {eps(f):.3g} | {span} | {at_n} | {int((same & ~bad).any(axis=0).sum())} of {grid.size} |")
    lines.append("")
    lines += ["Reference check (seed 0, mpmath at 200 bits): " +
              "; ".join(f"n = {n:,}: δ = {ref:.12g}, float64 {f:.12g}" for n, ref, f in r.checks) + ".", ""]
    ns = np.arange(1, N + 1)
    series = [dict(label="float64, median of seeds", x=ns, y=np.median(r.exact, 0), color="k", lw=1.4)]
    for f in sz.formats:
        series.append(dict(label=f"{f} (emulated), median", x=grid, y=np.median(r.fmt_tv[f], 0), lw=1.0))
    png = plot_curves(series, outdir / "fig9_softmax_tv.png",
                      title=f"Fig. 9: δ(softmax x, softmax x*), first k = {k} entries perturbed, {r.seeds} seeds",
                      ylabel="Σ|softmax(x) − softmax(x*)|",
                      bands=[dict(label="float64 min–max over seeds", x=ns, lo=r.exact.min(0), hi=r.exact.max(0),
                                  color="0.6")],
                      hlines=_eps_lines(sz.formats), x_min=N_MIN)
    lines += [f"![Fig. 9]({png.name})", ""]


# --- Fig. 10 ------------------------------------------------------------------------------------
def fig10(ctx: Context, outdir: Path, lines: list[str]) -> None:
    sz = ctx.sizes
    lines += ["## Fig. 10: positional encodings", "",
              "Paper: one layer, d = 64, sinusoidal APE, RoPE, ALiBi and no positions; all cross the bf16 line "
              "near n ≈ 800–1,000, ALiBi slightly later.", ""]
    _captions_part(ctx, outdir, lines, [label for label, _ in cap.ROWS], "Fig. 10",
                   "The same Gaussian model with each positional scheme: none, RoPE on q and k, sinusoidal on the keys or "
                   "on queries and keys, ALiBi with one head of slope 2^-8 added after the 1/√d scale, or before it "
                   f"(effective slope 2^-8/8 = 2^-11). Float64 n ≤ {sz.caption_n:,}.",
                   "fig10_captions.png", "Fig. 10, captions' model: positional encodings, d = 64")
    n = sz.fig10_n
    lines += ["### Decoder variants", "",
              f"v vs v* in a decoder: one layer, d = 64, one head, LayerNorm, L1 distance, n = 1..{n:,}. "
              f"Emulated formats: {', '.join(sz.fig10_formats)}; float64; the reference up to n = {min(n, sz.ref_n):,}.", ""]
    series, table, fits = [], [], []
    for run, c in zip(run_fig10(ctx), SETUP_COLORS):
        for line in _collapse_rows(run.res, sz.fig10_formats, n):
            table.append(f"| {run.setup} " + line)
        fits.append(f"- {run.setup}: {_fit_line(run.res, run.comparison['fit'])}")
        series += _setup_curves(run.setup, run.res, c)
    lines += ["| setup " + _TABLE_HEAD[0], "|---" + _TABLE_HEAD[1], *table, "", *fits, ""]
    png = plot_curves(series, outdir / "fig10_positional.png", title="Fig. 10: v vs v* by positional encoding, d = 64",
                      ylabel="‖y_n − y*_(n+1)‖₁", hlines=[BF16_LINE], x_min=N_MIN, smooth=True)
    lines += [f"![Fig. 10]({png.name})", ""]


# --- copying and counting -----------------------------------------------------------------------
def families(ctx: Context, outdir: Path, lines: list[str]) -> None:
    sz = ctx.sizes
    n = sz.family_n
    fmts = sz.family_formats
    lines += ["## Copying and counting", "",
              f"One layer, d = 64, LayerNorm, n = 1..{n:,}. Format cells: where the pair is bitwise identical in "
              f"that format for n ≥ {N_MIN} (first n, the n from which every pair is, and the share of n). Float64 "
              "column: the median L1 distance over n ∈ [N/2, N]; “exact 0” when the 256-bit reference puts every "
              f"distance up to n = {min(n, sz.family_ref_n):,} below 2^-200 (the two inputs are identical in exact arithmetic).", "",
              "| family | setup | float64 ‖·‖₁ | " + " | ".join(fmts) + " |",
              "|---|---|---|" + "---|" * len(fmts)]
    pngs = []
    for fam, desc, runs in run_families(ctx):
        series = []
        for run, c in zip(runs, SETUP_COLORS):
            res = run.res
            cells = [_ident_cell(res[f]) for f in fmts]
            lines.append(f"| {desc} | {run.setup} | {median_top(res['fp64']):.3g}{' (exact 0)' if exact_zero(res) else ''} | "
                         + " | ".join(cells) + " |")
            series += _setup_curves(run.setup, res, c)
        pngs.append((desc, plot_curves(series, outdir / f"family_{fam}.png", title=f"{desc}, d = 64",
                                       ylabel="L1 distance of the pair", hlines=[BF16_LINE], x_min=N_MIN, smooth=True)))
    lines.append("")
    for desc, png in pngs:
        lines += [f"![{desc}]({png.name})", ""]


# --- remedies -----------------------------------------------------------------------------------
_CRITERIA_HEAD = ["| run | {what} | eps of its compute format | float64 ‖·‖₁ first below eps | bitwise identical "
                  f"(n ≥ {N_MIN}) | signal below rounding noise (first n; every n from) | "
                  "float64 median ‖·‖₁, n ∈ [N/2, N] |",
                  "|---|---|---|---|---|---|---|"]


def _criteria_row(run: str, name: str, pol: str, res: dict[str, CollapseResult], sn: SignalNoise, n_max: int) -> str:
    """One run under one policy, by the three criteria (docs/reproduce.md, "Three criteria"): float64's
    exact-arithmetic stand-in below the policy's eps, bitwise identity in the policy, signal below its noise."""
    f64, e = res["fp64"], Policy.parse(pol).compute.eps
    first, every = sn.first_below(N_MIN), sn.below_from(N_MIN)
    noise = "never" if first is None else f"{first:,}; " + (f"{every:,}" if every else "not at N")
    return (f"| {run} | {name} | 2^{int(np.log2(e))} | {fmt_n(first_below(f64.ns, f64.l1, e), n_max)} | "
            f"{_ident_cell(res[pol])} | {noise} | {median_top(f64):.2g} |")


def _policy_panels(rows, run: str) -> list[tuple[str, list[dict]]]:
    """A panel per row (name, policy, runs) of a remedy or recipe table: its own model's float64 curve of
    ``run`` (wide, pale, behind), its policy's on top, and, from the second panel on, the first row's (the
    baseline's) dotted, so that rows that would hide each other on one axes are read side by side."""
    def of(runs):
        return next(r for label, r, _ in runs if label == run)

    base_name, base_pol, base_runs = rows[0]
    base = of(base_runs)[base_pol]
    panels = []
    for i, (name, pol, runs) in enumerate(rows):
        res = of(runs)
        series = [dict(label="float64 (native)", x=res["fp64"].ns, y=res["fp64"].l1, color="k", lw=2.4, alpha=0.3,
                       zorder=1)]
        if i:
            series.append(dict(label=base_name, x=base.ns, y=base.l1, color="0.4", lw=0.6, ls=":", zorder=2,
                               faint=False))
        series.append(dict(label=pol if len(pol) <= 24 else "the row's policy", x=res[pol].ns, y=res[pol].l1,
                           color=RECIPE_COLORS[i % len(RECIPE_COLORS)], zorder=3))
        panels.append((name, series))
    return panels


def _recipe_table(ctx: Context, outdir: Path, lines: list[str], rows, what: str, png: str, title: str, says: str,
                  also: str = "") -> None:
    """A table of every recipe row (name, policy, why) of ``rows`` (:data:`KERNELS`, :data:`ACCUMULATORS`) by
    the three criteria on each run of :data:`RECIPE_RUNS`, a sentence per row, and a figure of the first run."""
    sz = ctx.sizes
    kn = sz.recipe_n
    lines += [f"{says}, n = 1..{kn:,}: "
              + ("the captions' Gaussian model (no positions, seed 0, d = 64) and a one-layer RoPE decoder (d = 64)."
                 if sz.recipe_runs > 1 else "the captions' Gaussian model (no positions, seed 0, d = 64); the full run "
                 "adds a one-layer RoPE decoder.") + " The float64 column is the model as drawn (weights and inputs "
              "unrounded) in native float64: each row departs from it by its rounding, including the rounding of the "
              "weights and inputs to its storage format" + also + ".", "",
              *(h.format(what=what) for h in _CRITERIA_HEAD)]
    measured = run_policies(ctx, rows, what)
    for label, _, _ in RECIPE_RUNS[:sz.recipe_runs]:
        for name, pol, runs in measured:
            res, sn = next((r, s) for lab, r, s in runs if lab == label)
            lines.append(_criteria_row(label, name, pol, res, sn, kn))
    lines.append("")
    lines += [f"- **{name}** (`{pol}`): {why}." for name, pol, why in rows]
    path = plot_panels(_policy_panels(measured, RECIPE_RUNS[0][0]), outdir / png,
                       title=f"{title}: {RECIPE_RUNS[0][0]}, d = 64", ylabel="L1 distance of the pair",
                       hlines=_eps_lines(["bf16", "e4m3fn"]), x_min=N_MIN, smooth=True)
    lines += ["", f"![{title}]({path.name})", ""]


def accumulators(ctx: Context, outdir: Path, lines: list[str]) -> None:
    lines += ["## Accumulators and block-scaled formats", ""]
    _recipe_table(ctx, outdir, lines, ACCUMULATORS, "accumulator", "accumulators.png", "Accumulators and MX formats",
                  "How dot products and sums accumulate (docs/semantics.md §3: IEEE per-op pairwise sums, an fp32 "
                  "accumulator, a tensor core's block FMA, a short accumulator promoted into fp32), weights stored "
                  "in OCP MX block formats (§5.1, §13) and dot products taking both operands in MX blocks, as MX "
                  "GEMMs do (§13.1)", also=" (in the MX weights rows, the weights' block quantisation; the MX "
                  "dot-product rows' noise does not include their operands' quantisation, which happens inside the "
                  "forward)")


def remedies(ctx: Context, outdir: Path, lines: list[str]) -> None:
    n = ctx.sizes.remedy_n
    lines += ["## Kernels and remedies", "", "### Kernel recipes", ""]
    remedy_rows = start_remedies(ctx)  # queued first: they run while the kernels' rows are waited for
    _recipe_table(ctx, outdir, lines, KERNELS, "kernel", "kernels.png", "Kernel recipes",
                  "How the attention is evaluated (docs/semantics.md §8.8)",
                  also=" (and, in FlashAttention-3's recipe, the quantisation of Q, K and V to e4m3)")
    lines += ["### Remedies", "",
              f"RoPE (the positional scheme of most current decoders; it puts no positions in the residual stream), "
              f"one layer, d = 64, n = 1..{n:,}.", "", *(h.format(what="remedy") for h in _CRITERIA_HEAD)]
    rows = remedy_rows()
    for fam, desc in REMEDY_FAMILIES:
        for name, pol, runs in rows:
            res, sn = next((r, s) for f, r, s in runs if f == fam)
            lines.append(_criteria_row(desc, name, pol, res, sn, n))
    lines.append("")
    lines += [f"- **{name}**: {why}." for name, _, _ in rows if (why := remedy_mechanism(name))]
    png = plot_panels(_policy_panels(rows, REMEDY_FAMILIES[0][0]), outdir / "remedies.png",
                      title=f"Remedies: {REMEDY_FAMILIES[0][1]}, RoPE decoder, d = 64", ylabel="L1 distance of the pair",
                      hlines=[BF16_LINE], x_min=N_MIN, smooth=True)
    lines += ["", f"![remedies]({png.name})", "",
              "p-RoPE, Scalable-Softmax, the sink token and adaptive temperature are defined op by op in "
              "docs/semantics.md §8.7; "
              "the models are untrained, so these rows show each remedy's arithmetic, not a trained model's use of it.", ""]
