"""The paper's synthetic experiments and our format sweeps: sections of ``reproduce``.

* Fig. 8: v vs v* (last token repeated), one layer, d = 64, sinusoidal positions,
  with the positions in the residual stream and in q/k only (this choice decides
  whether collapse can happen at all, so both run).
* Fig. 9: softmax of x ~ U[0,1]^n vs x* with U[0, 0.1] noise on the first k = 200
  entries; the paper's δ = Σ|softmax x − softmax x*| over 5 seeds (min/max band).
* Fig. 10: sinusoidal, RoPE, ALiBi and no positions, L1 distance.
* The copying and counting families, and the remedies (separators every 3 tokens,
  a sliding window, an fp32 softmax, fp32 throughout).
* A table of first-collapse lengths next to the paper's readings, and a section
  that explains every disagreement from the measured numbers.

Every model experiment runs in bf16, fp16, fp8 (e4m3fn) and fp32 (emulated, every
op rounded, pairwise reductions), native float64, and a 256-bit arb-ball
reference (python-flint) up to ``ref_n``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ..backends import make_backend
from ..formats import parse as parse_format
from ..model import ModelConfig, init_params
from ..plots import plot_curves
from ..policy import Policy
from .collapse import CollapseResult, collapse_sweep
from .fits import N_MIN, PAPER_LINE, Decay, decay_fit, eps, first_below  # noqa: F401  (Decay: public here too)
from .noise import noise_of

BUCKET = 512  # emulated streams are padded to a multiple of this: fewer compiles
REF = "arb256"


@dataclasses.dataclass(frozen=True)
class Sizes:
    formats: tuple[str, ...]  # emulated formats of Fig. 9
    fig8_formats: tuple[str, ...]
    fig10_formats: tuple[str, ...]
    family_formats: tuple[str, ...]
    fig8_n: int
    fig9_n: int
    fig9_points: int
    fig10_n: int
    family_n: int
    remedy_n: int
    ref_n: int  # reference (256-bit arb balls) up to this n: Figs. 8 and 10
    family_ref_n: int  # ... the families
    window: int
    caption_n: int  # the captions' Gaussian model: float64 (three seeds) up to this n
    caption_fmt_n: int  # ... each emulated format up to this n
    caption_formats: tuple[str, ...]
    caption_fmt_seeds: int  # ... with this many of the seeds
    caption_ref_n: int  # ... and the 256-bit reference up to this n (seed 0)
    seeds: int = 5
    # "emulated" (every op rounded: the report's meaning of a format) or "native" (the format's
    # JAX dtype: what XLA does; fast to compile, used by the toy sizes that test the report's plumbing)
    backend: str = "emulated"


ALL = ("bf16", "fp16", "e4m3fn", "fp32")
# Quick sizes reach past the paper's crossings (Fig. 8 ≈ 500, Fig. 10 ≈ 800–1,000) in every model:
# 1,536 = 3 emulated buckets.
QUICK = Sizes(formats=ALL, fig8_formats=("bf16",), fig10_formats=("bf16",), family_formats=("bf16",),
              fig8_n=1536, fig9_n=10_000, fig9_points=40, fig10_n=1536, family_n=200, remedy_n=300, ref_n=128,
              family_ref_n=200, window=32, caption_n=2048, caption_fmt_n=1536, caption_formats=("bf16",),
              caption_fmt_seeds=1, caption_ref_n=64)
FULL = Sizes(formats=ALL, fig8_formats=ALL, fig10_formats=ALL, family_formats=ALL, fig8_n=10_000, fig9_n=10_000,
             fig9_points=120, fig10_n=5000, family_n=2000, remedy_n=2000, ref_n=2048, family_ref_n=512, window=128,
             caption_n=10_000, caption_fmt_n=2048, caption_formats=("bf16", "fp16", "e4m3fn"), caption_fmt_seeds=3,
             caption_ref_n=256)
# Toy sizes: every section and figure in seconds (tests).
TINY = Sizes(formats=("bf16",), fig8_formats=("bf16",), fig10_formats=("bf16",), family_formats=("bf16",),
             fig8_n=48, fig9_n=600, fig9_points=6, fig10_n=48, family_n=24, remedy_n=24, ref_n=16, family_ref_n=16,
             window=8, caption_n=64, caption_fmt_n=48, caption_formats=("bf16",), caption_fmt_seeds=1, caption_ref_n=8,
             seeds=2, backend="native")

PAPER_READING = {"Fig. 8": "≈ 500", "Fig. 9": "≈ 2,400–2,500", "Fig. 10": "≈ 800–1,000 (ALiBi slightly later)"}


def _fmt_n(v: int | None, n_max: int) -> str:
    return f"{v:,}" if v is not None else f"not by {n_max:,}"


@dataclasses.dataclass
class Context:
    outdir: Path
    sizes: Sizes
    quick: bool
    comparison: list[dict] = dataclasses.field(default_factory=list)  # rows of the paper-comparison table
    findings: dict = dataclasses.field(default_factory=dict)  # measured facts the disagreement section cites
    csv_rows: list[dict] = dataclasses.field(default_factory=list)
    noise: dict = dataclasses.field(default_factory=dict)  # run tag -> {format: SignalNoise} against float64


def _log(msg: str) -> None:
    print(f"[reproduce]   {msg}", flush=True)


def run_backends(ctx: Context, params, family: str, n: int, formats, *, tag: str, sep: int | None = None,
                 ref: bool = True, ref_n: int | None = None) -> dict[str, CollapseResult]:
    """The collapse sweep of one model and family in every emulated policy (a format
    name or a policy string), native float64 and (up to ``ref_n``) the arb reference.
    Keys: the policies as given, "fp64", REF."""
    out: dict[str, CollapseResult] = {}
    runs = [(f, format_backend(ctx.sizes, f), BUCKET) for f in formats]
    runs.append(("fp64", make_backend("native", "fp64"), None))
    ref_n = ctx.sizes.ref_n if ref_n is None else ref_n
    if ref and ref_n:
        runs.append((REF, make_backend("interval", REF), None))
    for name, be, bucket in runs:
        t0 = time.time()
        nn = min(n, ref_n) if name == REF else n
        r = collapse_sweep(params, family, nn, be, name, sep=sep, bucket=bucket, keep_outputs=name != REF)
        _log(f"{tag} / {name}: n ≤ {nn:,} in {time.time() - t0:.1f} s")
        out[name] = r
        for row in r.rows():
            row.update(experiment=tag, family=family)
            ctx.csv_rows.append(row)
    ctx.noise[tag] = {f: noise_of(out["fp64"], out[f], f) for f in formats}
    for r in out.values():  # the outputs served the noise records; keep the distances only
        r.outputs = None
    return out


def format_backend(sizes: Sizes, spec: str):
    """The backend that runs a format name or policy string at these sizes: emulated, or
    natively in the JAX dtype of the policy's storage format (``sizes.backend == "native"``)."""
    if sizes.backend == "native":
        return make_backend("native", Policy.parse(spec).storage.name)
    return make_backend("emulated", spec)


def ref_agreement(res: dict[str, CollapseResult]) -> float | None:
    """Largest relative difference of the float64 L1 distance from the reference's, n ≤ ref_n."""
    if REF not in res:
        return None
    ref, f64 = res[REF], res["fp64"]
    k = ref.ns.size
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(f64.l1[:k] - ref.l1) / ref.l1
    rel = rel[np.isfinite(rel)]
    return float(rel.max()) if rel.size else None


def _model(**over):
    base = dict(d=64, n_layers=1, n_heads=1, vocab=16, seed=0, norm="layernorm")
    base.update(over)
    return init_params(ModelConfig(**base))


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
            f"| {f} | {eps(f):.3g} | {_fmt_n(first_below(f64.ns, f64.l1, eps(f)), n_max)} | "
            f"{_fmt_n(first_below(f64.ns, f64.linf, eps(f)), n_max)} | {_fmt_n(r.first_identical(N_MIN), n_max)} | "
            f"{_fmt_n(r.collapsed_from(), n_max)} | {r.identical_share(N_MIN):.1%} | {np.nanmin(r.l1[big]):.3g} | "
            f"{nf if not nf else f'**{nf}** (overflow)'} |")
    return lines


_TABLE_HEAD = ["| format | eps = 2^(1−p) | float64 ‖·‖₁ first below eps | float64 ‖·‖∞ first below eps | "
               f"first bitwise identical in the format (n ≥ {N_MIN}) | identical for every n from | "
               f"share of n ≥ {N_MIN} identical | smallest ‖·‖₁ in the format | non-finite |",
               "|---|---|---|---|---|---|---|---|---|"]


def _fit_line(res: dict[str, CollapseResult], fit: Decay) -> str:
    """The float64 decay fit (as stored by :func:`_comparison`) and the agreement with the reference."""
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


def _median_top(r: CollapseResult) -> float:
    """Median L1 distance over n ∈ [N/2, N] (families like count_bernoulli alternate)."""
    return float(np.median(r.l1[r.ns >= r.ns[-1] // 2]))


#: One colour per format, shared by a format's curve and its eps line.
FORMAT_COLORS = {"bf16": "tab:blue", "fp16": "tab:orange", "e4m3fn": "tab:green", "fp32": "tab:red"}


def _curves(res: dict[str, CollapseResult], metric: str = "l1"):
    """Float64 thin and dashed in black so the formats' curves stay visible above it; each
    format in its own colour (:data:`FORMAT_COLORS`)."""
    series = []
    for name, r in sorted(res.items(), key=lambda kv: kv[0] not in ("fp64", REF)):  # formats drawn last, on top
        style = {"fp64": dict(color="k", lw=0.8, ls="--"), REF: dict(color="tab:gray", ls=":", lw=2.2)}.get(
            name, dict(color=FORMAT_COLORS.get(name, "tab:purple")))
        series.append(dict(label="float64 (native)" if name == "fp64" else
                           ("reference (256-bit arb)" if name == REF else f"{name} (emulated)"),
                           x=r.ns, y=getattr(r, metric), **style))
    return series


def _eps_lines(formats):
    return [(f"eps {f} = 2^{1 - parse_format(f).p}" + (" (the paper's bf16 line)" if f == "bf16" else ""), eps(f),
             FORMAT_COLORS.get(f)) for f in formats]


def _comparison(ctx: Context, experiment: str, setup: str, res: dict[str, CollapseResult], n_max: int) -> dict:
    """Append (and return) the paper-comparison row of one model run, with its float64 decay fit."""
    f64, bf = res["fp64"], res.get("bf16")
    row = dict(
        experiment=experiment, setup=setup, paper=PAPER_READING.get(experiment, "—"), n_max=n_max,
        cross_l1=first_below(f64.ns, f64.l1, PAPER_LINE), cross_linf=first_below(f64.ns, f64.linf, PAPER_LINE),
        fit=decay_fit(f64.ns, f64.l1),
        bf16_first=bf.first_identical(N_MIN) if bf else None, bf16_from=bf.collapsed_from() if bf else None,
        bf16_floor=float(np.min(bf.l1[bf.ns >= N_MIN])) if bf else None)
    ctx.comparison.append(row)
    return row


# --- Fig. 8 -------------------------------------------------------------------------------------
FIG8_SETUPS = [("sinusoidal APE in the residual stream", dict(pe="sinusoidal", ape="residual")),
               ("sinusoidal APE in q/k only", dict(pe="sinusoidal", ape="scores"))]


def section_fig8(ctx: Context, lines: list[str]) -> None:
    sz = ctx.sizes
    n = sz.fig8_n
    lines += ["### Decoder variants", "",
              f"A decoder instead of drawn q, k, v: one layer, d = 64, one head, LayerNorm, W_q, W_k, W_v ~ N(0, 1/d), "
              f"random tokens, n = 1..{n:,}. "
              "Distances between the last-token outputs of v (length n) and v* (length n+1). "
              "Whether the last token's own absolute position enters the residual stream decides whether the "
              "distance can vanish, so both placements run.", ""]
    for setup, over in FIG8_SETUPS:
        res = run_backends(ctx, _model(**over), "repeat_last", n, sz.fig8_formats, tag=f"Fig. 8, {setup}")
        row = _comparison(ctx, "Fig. 8", f"decoder: {setup}", res, n)
        ctx.findings[("fig8", over["ape"])] = res
        lines += [f"#### Decoder, {setup}", "", *_TABLE_HEAD, *_collapse_rows(res, sz.fig8_formats, n), "",
                  _fit_line(res, row["fit"]), ""]
        png = plot_curves(_curves(res), ctx.outdir / f"fig8_{over['ape']}.png",
                          title=f"Fig. 8: v vs v*, {setup}, d = 64", ylabel="‖y_n − y*_(n+1)‖₁",
                          hlines=_eps_lines(sz.fig8_formats), x_min=N_MIN,
                          smooth=True)
        lines += [f"![Fig. 8, {setup}]({png.name})", ""]


# --- Fig. 9 -------------------------------------------------------------------------------------
def tv_all_n(x: np.ndarray, xs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """δ(n) = Σ_i |softmax(x[:n])_i − softmax(x*[:n])_i| for every n = 1..N in float64,
    with x and x* equal beyond index k (so the tail is one term per n)."""
    e, es = np.exp(x), np.exp(xs)
    S, Ss = np.cumsum(e), np.cumsum(es)
    ns = np.arange(1, x.size + 1)
    kk = min(k, x.size)
    head = np.abs(e[None, :kk] / S[:, None] - es[None, :kk] / Ss[:, None])
    head = np.where(np.arange(kk)[None, :] < ns[:, None], head, 0.0).sum(axis=1)
    tail = np.where(ns > kk, S - S[kk - 1], 0.0) * np.abs(1 / S - 1 / Ss)
    return ns, head + tail


def tv_in_format(fmt: str, X: np.ndarray, Xs: np.ndarray, ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same δ with both softmaxes evaluated in ``fmt`` (inputs stored in the format,
    max subtracted, exp, pairwise denominator, one division: the attention's softmax);
    also whether the two weight vectors are bitwise identical. Rows: prefixes ns."""
    import jax
    import jax.numpy as jnp

    from ..backends.emulated import Emulator, masked_softmax

    emu = Emulator(Policy.uniform(fmt))
    valid = jnp.asarray(np.arange(X.shape[1])[None, :] < ns[:, None])

    @jax.jit
    def both(a, b):
        return masked_softmax(emu, emu.store(a), valid), masked_softmax(emu, emu.store(b), valid)

    A, B = (np.asarray(v, np.float64) for v in both(jnp.asarray(X), jnp.asarray(Xs)))
    return np.abs(A - B).sum(axis=1), np.all(A == B, axis=1)


def section_fig9(ctx: Context, lines: list[str]) -> None:
    from ..theory.softmax import b2_tv

    sz = ctx.sizes
    N, k = sz.fig9_n, 200
    grid = np.unique(np.geomspace(10, N, sz.fig9_points).astype(int))
    exact, fmt_tv, fmt_same, cross = [], {f: [] for f in sz.formats}, {f: [] for f in sz.formats}, []
    checks = []
    for seed in range(sz.seeds):
        rng = np.random.default_rng(seed)
        x = rng.random(N)
        xs = x.copy()
        xs[:k] += rng.uniform(0.0, 0.1, k)
        ns, tv = tv_all_n(x, xs, k)
        exact.append(tv)
        cross.append({f: first_below(ns, tv, eps(f)) for f in sz.formats})
        Xg = np.broadcast_to(x, (grid.size, N))
        Xsg = np.broadcast_to(xs, (grid.size, N))
        for f in sz.formats:
            t0 = time.time()
            d, same = tv_in_format(f, Xg, Xsg, grid)
            fmt_tv[f].append(d)
            fmt_same[f].append(same)
            if seed == 0:
                _log(f"Fig. 9 / {f}: {grid.size} lengths up to {N:,} in {time.time() - t0:.1f} s")
        if seed == 0:
            for n in (500, min(2500, N)):
                ref = float(b2_tv(x[:n], xs[:n], prec=200))
                checks.append((n, ref, float(tv[n - 1])))
    exact = np.array(exact)
    lo, hi, med = exact.min(0), exact.max(0), np.median(exact, 0)
    at500 = exact[:, 499] if N >= 500 else None
    ctx.findings["fig9"] = dict(cross=cross, at500=at500)
    bf = [c["bf16"] for c in cross if "bf16" in c]
    ctx.comparison.append(dict(experiment="Fig. 9", setup=f"softmax only, k = {k}, {sz.seeds} seeds", paper=PAPER_READING["Fig. 9"],
                               n_max=N, cross_l1=(min(v for v in bf if v) if all(bf) else None),
                               cross_l1_hi=(max(bf) if all(bf) else None), cross_linf=None,
                               bf16_first=None, bf16_from=None, bf16_floor=None))
    lines += ["## Fig. 9: softmax total variation with the first k = 200 entries perturbed", "",
              f"x ~ U[0,1]^N (N = {N:,}; the length-n input is the first n entries), x* = x with U[0, 0.1] noise "
              f"added to the first k = {k} entries, {sz.seeds} seeds. The paper's δ is Σ|softmax x − softmax x*| "
              "(no factor ½: its numbers, ≈ 0.026 at n = 500, match this sum). Float64 at every n; each format at "
              f"{grid.size} lengths, with the softmax evaluated as the attention does it in that format.", ""]
    if at500 is not None:
        lines += [f"δ at n = 500, float64: {at500.min():.4f} – {at500.max():.4f} over the seeds (paper ≈ 0.026).", ""]
    lines += ["| format | eps | float64 δ first below eps (min – max over seeds) | δ in the format at n = N (median) | "
              "lengths where the format's two softmaxes are bitwise identical |", "|---|---|---|---|---|"]
    for f in sz.formats:
        cs = [c[f] for c in cross]
        span = (f"{min(cs):,} – {max(cs):,}" if all(cs) else
                f"not by {N:,}" if not any(cs) else f"{min(c for c in cs if c):,} – not by {N:,}")
        same, tvs = np.array(fmt_same[f]), np.array(fmt_tv[f])
        bad = ~np.isfinite(tvs)
        at_n = (f"{np.median(tvs[:, -1]):.3g}" if not bad[:, -1].any() else
                f"**non-finite** from n = {int(grid[bad.any(axis=0)][0]):,} (the denominator overflows max = "
                f"{parse_format(f).max:g})")
        lines.append(f"| {f} | {eps(f):.3g} | {span} | {at_n} | {int((same & ~bad).any(axis=0).sum())} of {grid.size} |")
    lines.append("")
    lines += ["Reference check (seed 0, mpmath at 200 bits): " +
              "; ".join(f"n = {n:,}: δ = {r:.12g}, float64 {f:.12g}" for n, r, f in checks) + ".", ""]
    series = [dict(label="float64, median of seeds", x=np.arange(1, N + 1), y=med, color="k", lw=1.4)]
    for f in sz.formats:
        series.append(dict(label=f"{f} (emulated), median", x=grid, y=np.median(np.array(fmt_tv[f]), 0), lw=1.0))
    png = plot_curves(series, ctx.outdir / "fig9_softmax_tv.png",
                      title=f"Fig. 9: δ(softmax x, softmax x*), first k = {k} entries perturbed, {sz.seeds} seeds",
                      ylabel="Σ|softmax(x) − softmax(x*)|",
                      bands=[dict(label="float64 min–max over seeds", x=np.arange(1, N + 1), lo=lo, hi=hi, color="0.6")],
                      hlines=_eps_lines(sz.formats), x_min=N_MIN)
    lines += [f"![Fig. 9]({png.name})", ""]


# --- Fig. 10 ------------------------------------------------------------------------------------
FIG10_SETUPS = [("sinusoidal APE (residual)", dict(pe="sinusoidal", ape="residual")),
                ("sinusoidal APE (q/k only)", dict(pe="sinusoidal", ape="scores")),
                ("RoPE", dict(pe="rope")), ("ALiBi", dict(pe="alibi")), ("no positions", dict(pe="none"))]


def section_fig10(ctx: Context, lines: list[str]) -> None:
    sz = ctx.sizes
    n = sz.fig10_n
    lines += ["### Decoder variants", "",
              f"v vs v* in a decoder: one layer, d = 64, one head, LayerNorm, L1 distance, n = 1..{n:,}. "
              f"Emulated formats: {', '.join(sz.fig10_formats)}; float64; the reference up to n = {min(n, sz.ref_n):,}.", ""]
    series, table, fits = [], [], []
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for (setup, over), c in zip(FIG10_SETUPS, colors):
        res = run_backends(ctx, _model(**over), "repeat_last", n, sz.fig10_formats, tag=f"Fig. 10, {setup}")
        row = _comparison(ctx, "Fig. 10", f"decoder: {setup}", res, n)
        ctx.findings[("fig10", setup)] = res
        for line in _collapse_rows(res, sz.fig10_formats, n):
            table.append(f"| {setup} " + line)
        fits.append(f"- {setup}: {_fit_line(res, row['fit'])}")
        series.append(dict(label=f"{setup}: float64", x=res["fp64"].ns, y=res["fp64"].l1, color=c, lw=1.4))
        series.append(dict(label=f"{setup}: bf16", x=res["bf16"].ns, y=res["bf16"].l1, color=c, lw=0.7, ls="--"))
    lines += ["| setup " + _TABLE_HEAD[0], "|---" + _TABLE_HEAD[1], *table, "", *fits, ""]
    png = plot_curves(series, ctx.outdir / "fig10_positional.png", title="Fig. 10: v vs v* by positional encoding, d = 64",
                      ylabel="‖y_n − y*_(n+1)‖₁", hlines=[("bf16 line 2^-7", PAPER_LINE, "k")], x_min=N_MIN,
                      smooth=True)
    lines += [f"![Fig. 10]({png.name})", ""]


# --- copying and counting -----------------------------------------------------------------------
FAMILY_SETUPS = [("no positions", dict(pe="none")), ("sinusoidal APE (residual)", dict(pe="sinusoidal")),
                 ("RoPE", dict(pe="rope"))]
FAMILIES = [("first_copy", "copy the first token: 0 1^n vs 1 1^n"),
            ("last_copy", "copy the last token: 1^n 0 vs 1^(n+1)"),
            ("ones", "count ones: 1^n vs 1^(n+1)"),
            ("zero_ones", "count ones after a 0: 0 1^n vs 0 1^(n+1)"),
            ("count_bernoulli", "count ones in a Bernoulli(0.7) string s vs s 1"),
            ("sum_ones", "sum 1+…+1 with n vs n+1 ones")]


def section_families(ctx: Context, lines: list[str]) -> None:
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
    for fam, desc in FAMILIES:
        series = []
        for (setup, over), c in zip(FAMILY_SETUPS, ["tab:blue", "tab:orange", "tab:green"]):
            res = run_backends(ctx, _model(**over), fam, n, fmts, tag=f"{fam}, {setup}", ref_n=sz.family_ref_n)
            ctx.findings[("family", fam, setup)] = res
            f64 = res["fp64"]
            zero = REF in res and bool(np.all(res[REF].l1 < 2.0**-200))
            cells = [_ident_cell(res[f]) for f in fmts]
            lines.append(f"| {desc} | {setup} | {_median_top(f64):.3g}{' (exact 0)' if zero else ''} | "
                         + " | ".join(cells) + " |")
            series.append(dict(label=f"{setup}: float64", x=f64.ns, y=f64.l1, color=c, lw=1.4))
            series.append(dict(label=f"{setup}: bf16", x=res["bf16"].ns, y=res["bf16"].l1, color=c, lw=0.7, ls="--"))
        pngs.append((desc, fam, plot_curves(series, ctx.outdir / f"family_{fam}.png", title=f"{desc}, d = 64",
                                            ylabel="L1 distance of the pair",
                                            hlines=[("bf16 line 2^-7", PAPER_LINE, "k")], x_min=N_MIN,
                                            smooth=True)))
    lines.append("")
    for desc, fam, png in pngs:
        lines += [f"![{desc}]({png.name})", ""]


# --- remedies -----------------------------------------------------------------------------------
REMEDY_FAMILIES = [("repeat_last", "v vs v*"), ("last_copy", "copy last"), ("ones", "count ones"),
                   ("count_bernoulli", "count Bernoulli ones")]


def remedies(sz: Sizes):
    """(name, model overrides, separator spacing, emulated policy)."""
    return [("bf16 (baseline)", {}, None, "bf16"),
            ("commas every 3 tokens", {}, 3, "bf16"),
            (f"sliding window {sz.window}", dict(window=sz.window), None, "bf16"),
            ("fp32 softmax (bf16 storage)", {}, None, "storage=bf16,compute=bf16,accumulate=fp32,softmax=fp32"),
            ("fp32 throughout", {}, None, "fp32")]


def section_remedies(ctx: Context, lines: list[str]) -> None:
    sz = ctx.sizes
    n = sz.remedy_n
    lines += ["## Remedies", "",
              f"RoPE (the positional scheme of most current decoders; it puts no positions in the residual stream), "
              f"one layer, d = 64, n = 1..{n:,}. Cells: where the pair is bitwise identical in the emulated policy "
              f"(n ≥ {N_MIN}: first n, the n from which every pair is, share of n), and the float64 median L1 "
              "distance over n ∈ [N/2, N] of the same model and inputs.", "",
              "| remedy | " + " | ".join(d for _, d in REMEDY_FAMILIES) + " |", "|---|" + "---|" * len(REMEDY_FAMILIES)]
    for name, over, sep, pol in remedies(sz):
        params = _model(pe="rope", **over)
        cells = []
        for fam, _ in REMEDY_FAMILIES:
            res = run_backends(ctx, params, fam, n, [pol], tag=f"remedy {name}, {fam}", sep=sep, ref=False)
            r, f64 = res[pol], res["fp64"]
            ctx.findings[("remedy", name, fam)] = res
            cells.append(f"{_ident_cell(r)}; float64 {_median_top(f64):.2g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")


# --- comparison with the paper and the disagreements --------------------------------------------
def section_comparison(ctx: Context, lines: list[str]) -> None:
    lines += ["## First-collapse lengths next to the paper", "",
              "The paper reads a collapse length where the exact-arithmetic distance crosses the bf16 line 2^-7; "
              "the format's own criterion is bitwise identity of the two outputs computed in bf16. Both are here, "
              "with the float64 decay fitted over the last decade of n and extrapolated to the line.", "",
              "| figure | setup | paper (bf16) | float64 ‖·‖₁ first below 2^-7 | float64 ‖·‖∞ first below 2^-7 | "
              f"float64 ‖·‖₁ decay, extrapolated to 2^-7 | bf16: first identical (n ≥ {N_MIN}) | "
              "bf16: identical for every n from | bf16: smallest ‖·‖₁ |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in ctx.comparison:
        n = c["n_max"]
        model = c["experiment"] != "Fig. 9"
        cross = _fmt_n(c["cross_l1"], n)
        if not model:
            cross = (f"{c['cross_l1']:,} – {c['cross_l1_hi']:,} (over seeds; δ = Σ|·|)" if c.get("cross_l1_hi")
                     else f"not by {n:,} in every seed")
        fit = c.get("fit")
        fit_txt = "—" if fit is None else (
            f"n^{fit.slope:+.2f}; {fit.reach_text()}")
        cells = [_fmt_n(c[k], n) if model else "—" for k in ("cross_linf",)] + [fit_txt] + \
                [_fmt_n(c[k], n) if model else "—" for k in ("bf16_first", "bf16_from")]
        floor = f"{c['bf16_floor']:.3g}" if c["bf16_floor"] is not None else "—"
        lines.append(f"| {c['experiment']} | {c['setup']} | {c['paper']} | {cross} | " + " | ".join(cells) + f" | {floor} |")
    lines.append("")


def _pe_step_norm(d: int = 64) -> float:
    """‖PE[n+1] − PE[n]‖₂ of the sinusoidal table: the same for every n."""
    from ..positional import sinusoidal

    pe = sinusoidal(2, d)
    return float(np.linalg.norm(pe[1] - pe[0]))


_RUN_KIND = {"fig8": "Fig. 8", "fig10": "Fig. 10", "family": "family", "remedy": "remedy"}


def _run_label(key: tuple) -> str:
    """A findings key as the report names the run: ("fig8", "residual") -> "Fig. 8, residual"."""
    return f"{_RUN_KIND.get(key[0], key[0])}, " + " / ".join(str(k) for k in key[1:])


def disagreements(ctx: Context) -> list[str]:
    """One paragraph per disagreement (or agreement) with the paper, each citing the
    numbers measured in this run."""
    out: list[str] = []
    F = ctx.findings
    rows = {(c["experiment"], c["setup"]): c for c in ctx.comparison}

    fig9 = F.get("fig9")
    if fig9 is not None:
        bf = [c.get("bf16") for c in fig9["cross"]]
        span = f"{min(b for b in bf if b):,}–{max(b for b in bf if b):,}" if all(bf) else "beyond N in some seed"
        at500 = fig9["at500"]
        close = all(bf) and 0.8 * 2450 <= min(bf) and max(bf) <= 1.2 * 2450
        out.append(f"**Fig. 9 (softmax only) {'agrees' if close else 'disagrees'}.** Float64 δ at n = 500 is {at500.min():.4f}–{at500.max():.4f} over "
                   f"the seeds (paper ≈ 0.026) and falls below 2^-7 at n = {span} (paper ≈ 2,400–2,500). One wording "
                   "difference: the paper calls δ a total variation, but its numbers are Σ|p − q|, twice the usual "
                   "total variation distance; with the factor ½ the crossing would move to about half the length.")

    for ape, label in (("residual", "sinusoidal APE in the residual stream"), ("scores", "sinusoidal APE in q/k only")):
        res = F.get(("fig8", ape))
        if res is None:
            continue
        c = rows[("Fig. 8", f"decoder: {label}")]
        fit, n = c["fit"], int(res["fp64"].ns[-1])
        crossed = c["cross_l1"] is not None
        head = (f"**Fig. 8, {label}: "
                + ("crosses the bf16 line" if crossed else "no collapse") + f" by n = {n:,}** (paper ≈ 500). ")
        why = (f"Float64 ‖·‖₁ ≈ {fit.const:.3g}·n^{fit.slope:+.2f} over the last decade, "
               f"its smallest value at n ≥ {N_MIN} is {np.min(res['fp64'].l1[res['fp64'].ns >= N_MIN]):.3g}. ")
        if ape == "residual":
            why += (f"The last token of v sits at position n and that of v* at n+1, so the residual streams differ by "
                    f"PE[n+1] − PE[n], whose norm is {_pe_step_norm():.3g} for every n: nothing in the model can make "
                    "the outputs converge. Theorem 4.2 needs positional information that decays; an absolute "
                    "encoding added to the last token does not.")
        else:
            why += ("Without positions in the residual the last tokens agree, but the query of v* is formed at "
                    "position n+1: every score moves by W_q(PE[n+1] − PE[n])·k_j, an O(1) change that does not "
                    "shrink with n, so the two attention distributions need not converge, and the fitted decay is far "
                    "from the 1/n of Lemma B.1. The paper does not say where its sinusoidal encodings enter.")
        out.append(head + why)

    fig10 = [(setup, F[("fig10", setup)]) for setup, _ in FIG10_SETUPS if ("fig10", setup) in F]
    if fig10:
        parts = []
        for setup, res in fig10:
            c = rows[("Fig. 10", f"decoder: {setup}")]
            fit = c["fit"]
            parts.append(f"{setup}: n^{fit.slope:+.2f}, "
                         + (f"‖·‖₁ below 2^-7 from n = {c['cross_l1']:,}" if c["cross_l1"] else
                            (f"extrapolated to 2^-7 near {fit.reach_text()}" if fit.reaches(PAPER_LINE) else "no decay"))
                         + (f", ‖·‖∞ below it from n = {c['cross_linf']:,}" if c["cross_linf"] else ""))
        slopes = {setup: rows[("Fig. 10", f"decoder: {setup}")]["fit"].slope for setup, _ in fig10}
        fast = [k for k, v in slopes.items() if v <= -0.8]
        slow = [k for k, v in slopes.items() if -0.8 < v <= -0.2]
        flat = [k for k, v in slopes.items() if not v <= -0.2]
        text = ("**Fig. 10: the paper has all four curves crossing the bf16 line near n ≈ 800–1,000.** Measured "
                "(float64, L1): " + "; ".join(parts) + ".")
        if fast:
            text += (f" Close to the 1/n of Lemma B.1: {', '.join(fast)}. The constant in front is set by the width, "
                     "the initial scales and the norm, which the paper does not give; the L1 norm over 64 components "
                     "is up to 64× the L∞ norm, which alone moves a 1/n crossing by up to that factor.")
        if slow:
            text += f" Slower than 1/n over this range: {', '.join(slow)}."
        if flat:
            text += f" No decay: {', '.join(flat)}."
        if slow or flat:
            why = []
            if any("RoPE" in k for k in slow + flat):
                why.append("RoPE scores keep relative-position structure at every distance (its rotations do not "
                           "make far keys uniform; see *Round and Round We Go!*)")
            if any("ALiBi" in k for k in slow + flat):
                why.append("one ALiBi head has slope 2^-8, so a key 1,000 tokens back loses a factor e^-3.9: attention "
                           "becomes local, and the repeated token keeps a weight of order one over that window "
                           "instead of 1/n")
            if any("sinusoidal" in k for k in slow + flat):
                why.append("sinusoidal positions do not decay (Fig. 8)")
            text += " Why: " + "; ".join(why) + "."
        out.append(text)

    after = []  # v vs v* runs whose float64 distance crossed 2^-7: how often is bf16 identical beyond?
    for key, res in F.items():
        if isinstance(key, tuple) and key[0] in ("fig8", "fig10") and "bf16" in res:
            f64, r = res["fp64"], res["bf16"]
            cross = first_below(f64.ns, f64.l1, PAPER_LINE)
            if cross is None:
                continue
            beyond = r.ns >= cross
            share = r.identical_share(cross)
            after.append(f"{_run_label(key)}: float64 ‖·‖₁ first below 2^-7 at n = {cross:,}; beyond it bf16 is bitwise "
                         f"identical for {share:.0%} of n, with median bf16 ‖·‖₁ {np.median(r.l1[beyond]):.3g} against "
                         f"float64's {np.median(f64.l1[beyond]):.3g}")
    if after:
        out.append("**Crossing the line is not bitwise identity.** " + "; ".join(after) + ". Below the line the two "
                   "outputs are still computed along different paths (sums over n and n+1 terms) whose rounding "
                   "errors differ, so often one of the 64 components lands on a neighbouring bf16 value: the bf16 "
                   "distance hovers near the format's spacing at the outputs' scale instead of settling at 0. The "
                   "paper's reading (exact distance below the line) is necessary for identity, not sufficient.")

    nonfinite = {}
    for key, res in F.items():
        if isinstance(key, tuple) and "e4m3fn" in res and res["e4m3fn"].nonfinite.any():
            nonfinite[_run_label(key)] = int(res["e4m3fn"].nonfinite.sum())
    if nonfinite:
        worst = sorted(nonfinite.items(), key=lambda kv: -kv[1])[:3]
        out.append(f"**fp8 (e4m3fn) overflows.** {len(nonfinite)} of the e4m3fn runs produced NaN outputs (most: "
                   + "; ".join(f"{k}, {v:,} lengths" for k, v in worst) + "). The format has no infinity and its "
                   "largest value is 448, so a softmax denominator or a LayerNorm sum of squares above it is NaN "
                   "(Fig. 9 shows the denominator crossing 448 at n ≈ 800 even for inputs in [0, 1]). These cells are "
                   "marked non-finite, never counted as identical; an fp8 model in practice accumulates in a wider "
                   "format (e.g. `storage=e4m3fn,accumulate=fp32`).")

    ones = [(setup, F[("family", "ones", setup)]) for setup, _ in FAMILY_SETUPS if ("family", "ones", setup) in F]
    exact = [(s, r) for s, r in ones if REF in r and np.all(r[REF].l1 < 2.0**-200)]
    if exact:
        bits = []
        for setup, res in exact:
            bits.append(f"{setup}: bf16 identical for {res['bf16'].identical_share(N_MIN):.0%} of n")
        out.append("**Counting: exact collapse, but rounding breaks the tie.** `1^n` vs `1^(n+1)` is identical in exact "
                   "arithmetic (the 256-bit reference gives distance 0) whenever positions stay out of the values: "
                   + ", ".join(s for s, _ in exact) + " (Prop. B.9; whatever the weights, all values are equal and "
                   "the weights sum to 1). In a format the weights sum to 1 only up to rounding, and that error depends on "
                   "n: " + "; ".join(bits) + ". The representations differ, but by rounding noise that does not encode "
                   "the count, so the paper's conclusion (counting is impossible) stands; its word *identical* holds "
                   "in exact arithmetic, not bit for bit.")
    last = [F[k] for k in F if isinstance(k, tuple) and k[:2] == ("family", "last_copy")]
    if last:
        lo = min(_median_top(r["fp64"]) for r in last)
        out.append(f"**Copying the last token does not collapse here** (float64 median ‖·‖₁ ≥ {lo:.3g}). The last token "
                   "is 0 in one input and 1 in the other and reaches the output through the residual stream of a "
                   "one-layer model; the paper's failures from length ~300 are Gemini/Gemma observations, not a "
                   "synthetic claim, and need depth or attention that overrides the residual.")

    rem = {k[1:]: v for k, v in F.items() if isinstance(k, tuple) and k[0] == "remedy"}
    if rem:
        def med(name, fam):
            return _median_top(rem[(name, fam)]["fp64"]) if (name, fam) in rem else float("nan")
        names = [r[0] for r in remedies(ctx.sizes)]
        base, sep, win, sm = names[0], names[1], names[2], names[3]
        said = []
        if med(sep, "ones") > 1e6 * max(med(base, "ones"), 1e-300) or (med(base, "ones") == 0 < med(sep, "ones")):
            said.append(f"Separators every 3 tokens turn `1^n` vs `1^(n+1)` from identical in exact arithmetic (float64 "
                        f"median {med(base, 'ones'):.2g}, rounding only) into distinct inputs ({med(sep, 'ones'):.2g}): "
                        "the commas' values differ from the ones' and their share depends on n mod 3, the mechanism "
                        "the paper saw in Gemma.")
        else:
            said.append(f"Separators every 3 tokens leave `1^n` vs `1^(n+1)` at float64 median {med(sep, 'ones'):.2g} "
                        f"(without: {med(base, 'ones'):.2g}).")
        said.append(f"A sliding window puts v vs v* at {med(win, 'repeat_last'):.2g} (without: {med(base, 'repeat_last'):.2g})"
                    + (", because the repeated token's weight no longer shrinks with n" if med(win, "repeat_last") >
                       med(base, "repeat_last") else "")
                    + f", and `1^n` vs `1^(n+1)` at {med(win, 'ones'):.2g}: inside a window every `1^n` looks the same, "
                    "so a window cannot help counting.")
        key = (sm, "ones")
        if key in rem:
            pol = next(k for k in rem[key] if k not in ("fp64", REF))
            sh = rem[key][pol].identical_share(N_MIN)
            said.append(f"With an fp32 softmax in a bf16 model, `1^n` vs `1^(n+1)` is bitwise identical for {sh:.0%} of n"
                        + (": less rounding noise in the weights brings back the exact-arithmetic identity, which "
                           "hurts counting." if sh > 0.5 else "."))
        out.append("**Remedies.** " + " ".join(said))
    return out


def write_csv(ctx: Context) -> Path:
    import csv

    path = ctx.outdir / "collapse.csv"
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ctx.csv_rows[0]))
        w.writeheader()
        w.writerows(ctx.csv_rows)
    tmp.replace(path)
    return path
