"""The Fig. 8 / Fig. 10 captions' reading, measured: v vs v* on the Gaussian model.

The captions describe queries, keys and values sampled per position from a
Gaussian (no embeddings, no weight matrices), one head, d = 64, the last position
repeated, L1 distance, against the absolute line 2^-7. Here that is
``collapse_sim.model`` with ``kind="gaussian"`` (q, k, v ~ N(0, I/d), output = the
attention output, no norm) and the ``repeat_last`` family, run through
:func:`collapse_sim.experiments.collapse.collapse_sweep` once per seed (the prefix
trick gives every n ≤ n_max from one forward). Per setup (:data:`ROWS`) the seeds'
L1 curves are averaged; the mean curve gets a power-law fit ``C·n^s`` over a window
and its first n below the line.

``caption_table()`` measures every row in float64 (native, the fp64 ops IEEE
binary64 already are); ``caption_table(fmt="bf16")`` (or fp16, e4m3fn, any format)
measures the same rows on the emulated backend, each op rounded to the format, where
the pairs also become bitwise identical (``first_identical`` per seed).

``report_rows(ctx)`` measures every row once for a report (float64 mean of three
seeds, each emulated format with its signal-below-noise records, the 256-bit
reference at small n); ``compare(ctx, labels, experiment)`` adds their rows to the
report's comparison with the paper.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from ..backends import backend_for_format, make_backend
from ..model import gaussian_config, init_params
from .collapse import collapse_sweep
from .fits import N_MIN, PAPER_LINE, Decay, decay_fit, first_below
from .noise import noise_of
from .paper import PAPER_READING, REF, Context, bucket_for, log, ref_agreement, shared_first, without_outputs

ROWS: tuple[tuple[str, dict], ...] = (
    ("no PE", dict(pe="none")),
    ("RoPE", dict(pe="rope")),
    ("sinusoidal on keys", dict(pe="sinusoidal", sin_at="keys")),
    ("sinusoidal on queries and keys", dict(pe="sinusoidal", sin_at="qk")),
    ("ALiBi m = 2^-8 after 1/sqrt(d)", dict(pe="alibi", alibi_slope=2.0**-8, alibi_at="after")),
    ("ALiBi m = 2^-8 before 1/sqrt(d)", dict(pe="alibi", alibi_slope=2.0**-8, alibi_at="before")),
)


@dataclasses.dataclass
class CaptionRow:
    """One setup's measurement: the mean L1 curve over seeds and what it shows."""

    label: str
    setup: dict  # the model fields of this row (gaussian_config keywords)
    fmt: str
    backend: str  # the backend's label
    seeds: tuple[int, ...]
    n_max: int  # the largest n measured
    ns: np.ndarray
    mean_l1: np.ndarray  # mean over seeds of ‖y_n − y*_(n+1)‖₁
    exponent: float  # s of the fit C·n^s of mean_l1 (nan: too few positive points)
    coefficient: float  # C
    fit_window: tuple[int, int]  # the n range the fit used
    fit_crossing: float | None  # n where C·n^s = line (None if the fit does not decay; may lie beyond n_max)
    first_below: int | None  # first n >= 5 where the mean curve is below the line
    first_identical: tuple[int | None, ...]  # per seed: first n >= 5 whose pair is bitwise identical
    identical_share: tuple[float, ...]  # per seed: share of the pairs n >= 5 that are bitwise identical
    nonfinite: int  # pairs with a non-finite output, all seeds together
    line: float
    seconds: float
    runs: tuple = ()  # the per-seed CollapseResults (with their pair outputs), with keep_runs=True

    def as_dict(self) -> dict:
        """The scalars (no curves), for tables and JSON."""
        skip = {"ns", "mean_l1", "runs"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def caption_row(label: str, setup: dict, *, n_max: int = 10_000, seeds=(0, 1, 2), d: int = 64, fmt: str = "fp64",
                backend: str = "native", order: str = "pairwise", fit_from: int | None = None,
                line: float = PAPER_LINE, progress=None, keep_runs: bool = False,
                bucket: int | None = None, shared: "str | None" = None) -> CaptionRow:
    """Measure one setup: one forward per seed up to ``n_max``.

    ``keep_runs`` keeps each seed's CollapseResult with both members of every pair
    (for the signal-below-noise criterion); ``bucket`` pads the streams (one compiled
    forward for runs of nearby lengths, :func:`collapse_sim.experiments.collapse.pad_stream`).

    ``fit_from``: the fit window is [fit_from, n_max] (default n_max/10; the fit
    never starts below n_max/10 or 5, :func:`collapse_sim.experiments.paper.decay_fit`).
    ``backend``: "native" or "emulated" (``fmt`` fp64 always runs natively) or
    "reference" (op by op in mpmath; small n only). ``shared``: the emulated backend's program
    choice (:func:`collapse_sim.backends.backend_for_format`)."""
    t0 = time.time()
    be = backend_for_format(backend, fmt, order, shared=shared)
    curves, ident, share, nonfinite, runs = [], [], [], 0, []
    for s in seeds:
        params = init_params(gaussian_config(d, seed=s, **setup))
        r = collapse_sweep(params, "repeat_last", n_max, be, fmt, seed=s, progress=progress, bucket=bucket,
                           keep_outputs=keep_runs)
        if keep_runs:
            runs.append(r)
        curves.append(r.l1)
        ident.append(r.first_identical(N_MIN))
        share.append(r.identical_share(N_MIN))
        nonfinite += int(r.nonfinite.sum())
    ns = r.ns
    mean = np.mean(curves, axis=0)
    lo = max(fit_from if fit_from is not None else n_max // 10, n_max // 10, N_MIN)
    sel = ns >= lo
    fit = decay_fit(ns[sel], mean[sel])
    return CaptionRow(label, dict(setup), fmt, be.label, tuple(seeds), int(ns[-1]), ns, mean, fit.slope, fit.const,
                      (int(lo), int(ns[-1])), fit.reaches(line), first_below(ns, mean, line), tuple(ident), tuple(share), nonfinite,
                      line, time.time() - t0, tuple(runs))


def caption_table(fmt: str = "fp64", *, n_max: int | None = None, seeds=(0, 1, 2), rows=ROWS, d: int = 64,
                  backend: str | None = None, order: str = "pairwise", fit_from: int | None = None,
                  line: float = PAPER_LINE, progress=None) -> list[CaptionRow]:
    """Every row of :data:`ROWS` (or ``rows``) in format ``fmt``.

    Defaults: float64 natively up to n = 10,000 (5–8 s per row, 35 s for the six rows on
    two quiet cores); any other format on the emulated backend (uniform policy of that
    format, ``order``) up to n = 2,000 (bf16: 27 s per row of three seeds on quiet
    cores, 1–4 min under load)."""
    if backend is None:
        backend = "native" if fmt == "fp64" else "emulated"
    if n_max is None:
        n_max = 10_000 if fmt == "fp64" else 2_000
    return [caption_row(label, setup, n_max=n_max, seeds=seeds, d=d, fmt=fmt, backend=backend, order=order,
                        fit_from=fit_from, line=line, progress=progress) for label, setup in rows]


def format_table(rows: list[CaptionRow]) -> str:
    """A Markdown table of the rows' scalars."""
    out = ["| setup | format | fit C·n^s (window) | fitted n at line | first n below line (mean) | first identical, n ≥ 5 (per seed) | identical share (per seed) | n_max |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cross = "never" if r.fit_crossing is None else f"{r.fit_crossing:,.0f}" + (
            " (beyond n_max)" if r.fit_crossing > r.n_max else "")
        below = "-" if r.first_below is None else f"{r.first_below:,}"
        ident = ", ".join("-" if x is None else str(x) for x in r.first_identical)
        share = ", ".join(f"{x:.2f}" for x in r.identical_share)
        out.append(f"| {r.label} | {r.fmt} | {r.coefficient:.3g}·n^{r.exponent:+.2f} ({r.fit_window[0]}..{r.fit_window[1]}) "
                   f"| {cross} | {below} | {ident} | {share} | {r.n_max:,} |")
    return "\n".join(out)


# --- the report's captions' rows ----------------------------------------------------------------
CAPTION_SEEDS = (0, 1, 2)
FIG8_ROWS = ("sinusoidal on keys", "sinusoidal on queries and keys")  # the caption: sinusoidal, placement unsaid
D = 64


def report_rows(ctx: Context) -> dict:
    """Every caption row, computed once per report: ``{label: {"fp64": CaptionRow, fmt: CaptionRow,
    "noise": {fmt: [SignalNoise per seed]}, "ref_agree": float | None}}``. Each (row, backend)
    is one stored unit (:meth:`collapse_sim.experiments.paper.Context.stored`); a format's unit
    holds its signal-below-noise records too."""
    if "captions" in ctx.findings:
        return ctx.findings["captions"]
    sz = ctx.sizes
    fseeds = CAPTION_SEEDS[:sz.caption_fmt_seeds]
    units, runs = {}, {}
    grouped = shared_first(sz, sz.caption_formats)
    for label, setup in ROWS:  # every row's runs queued (Context.queue) before the first is waited for
        inputs = dict(label=label, setup=setup, d=D)
        units[label] = {"fp64": (f"captions' model, {label} / fp64",
                                 dict(inputs, n=sz.caption_n, seeds=CAPTION_SEEDS, backend="native:fp64"))}
        for fmt in sz.caption_formats:
            units[label][fmt] = (f"captions' model, {label} / {fmt}",
                                 dict(inputs, n=sz.caption_fmt_n, seeds=fseeds, backend=f"{sz.backend}:{fmt}",
                                      bucket=bucket_for(sz.caption_fmt_n)))
        if sz.caption_ref_n:
            units[label][REF] = (f"captions' model, {label} / {REF}",
                                 dict(inputs, n=sz.caption_ref_n, seed=CAPTION_SEEDS[0], backend=f"interval:{REF}"))

        def f64_measure(label=label, setup=setup):
            r = caption_row(label, setup, n_max=sz.caption_n, seeds=CAPTION_SEEDS, d=D, keep_runs=True)
            log(f"captions' model, {label}: float64 n ≤ {sz.caption_n:,}, {len(CAPTION_SEEDS)} seeds in {r.seconds:.1f} s")
            return r

        def f64_queued(key=dict(units[label]["fp64"][1], outputs=True), f64_measure=f64_measure):
            return ctx.queue(key, f64_measure)  # the float64 row with its outputs (the noise records read them)

        def measure(fmt, label=label, setup=setup, f64_queued=f64_queued):
            r = caption_row(label, setup, n_max=sz.caption_fmt_n, seeds=fseeds, d=D, fmt=fmt, backend=sz.backend,
                            keep_runs=True, bucket=bucket_for(sz.caption_fmt_n),
                            shared="first" if fmt in grouped else None)
            log(f"captions' model, {label} / {fmt}: n ≤ {sz.caption_fmt_n:,}, {len(fseeds)} seed(s) in {r.seconds:.1f} s")
            return _without_outputs(r), [noise_of(f, e, fmt) for f, e in zip(f64_queued()().runs, r.runs)]

        def ref_sweep(setup=setup):
            params = init_params(gaussian_config(D, seed=CAPTION_SEEDS[0], **setup))
            return collapse_sweep(params, "repeat_last", sz.caption_ref_n, make_backend("interval", REF), REF,
                                  seed=CAPTION_SEEDS[0])

        computes = {"fp64": lambda f64_queued=f64_queued: _without_outputs(f64_queued()()),
                    **{fmt: functools.partial(measure, fmt) for fmt in sz.caption_formats}}
        if sz.caption_ref_n:  # the reference's host arithmetic starts first, to run beside the XLA programs
            runs[label, REF] = ctx.ahead(*units[label][REF], ref_sweep)
        xla = {b: (*units[label][b], None) for b in computes}  # the float64 row first in the queue
        runs.update(((label, b), run) for b, run in ctx.start(xla, computes, first=f64_queued).items())
    out = {}
    for label, _ in ROWS:
        row = {"fp64": ctx.stored(*units[label]["fp64"], runs[label, "fp64"]), "noise": {}}
        for fmt in sz.caption_formats:
            row[fmt], row["noise"][fmt] = ctx.stored(*units[label][fmt], runs[label, fmt])
        row["ref_agree"] = None
        if sz.caption_ref_n:
            ref = ctx.stored(*units[label][REF], runs[label, REF])
            row["ref_agree"] = ref_agreement({"fp64": row["fp64"].runs[0], REF: ref})
        out[label] = row
    ctx.findings["captions"] = out
    return out


def _without_outputs(r: CaptionRow) -> CaptionRow:
    """The row with its seeds' runs kept without their pair outputs (they served the noise records)."""
    return dataclasses.replace(r, runs=tuple(without_outputs(run) for run in r.runs))


def compare(ctx: Context, labels, experiment: str) -> None:
    """Add the rows ``labels`` of :func:`report_rows` to the comparison with the paper as ``experiment``."""
    data = report_rows(ctx)
    for label in labels:
        row, f = data[label], data[label]["fp64"]
        ctx.comparison.append(dict(
            experiment=experiment, setup=f"captions' model: {label}", paper=PAPER_READING.get(experiment, "—"),
            n_max=f.n_max, cross_l1=f.first_below, cross_linf=None, fit=Decay(f.exponent, f.coefficient),
            bf16_first=(min((v for v in row["bf16"].first_identical if v), default=None) if "bf16" in row else None),
            bf16_from=None, bf16_floor=None))
