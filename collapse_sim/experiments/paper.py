"""The paper's synthetic experiments and our format sweeps, as data for ``reproduce``.

* Fig. 8: v vs v* (last token repeated), one layer, d = 64, sinusoidal positions,
  with the positions in the residual stream and in q/k only (this choice decides
  whether collapse can happen at all, so both run).
* Fig. 9: softmax of x ~ U[0,1]^n vs x* with U[0, 0.1] noise on the first k = 200
  entries; the paper's δ = Σ|softmax x − softmax x*| over 5 seeds (min/max band).
* Fig. 10: sinusoidal, RoPE, ALiBi and no positions, L1 distance.
* The copying and counting families, and the remedies (separators every 3 tokens,
  a sliding window, an fp32 softmax, fp32 throughout).
* The theorems on random instances and Thm 4.2's explicit bound at several n.

Every model experiment runs in bf16, fp16, fp8 (e4m3fn) and fp32 (emulated, every
op rounded, pairwise reductions), native float64, and a 256-bit arb-ball
reference (python-flint) up to ``ref_n``. The ``run_*`` functions return what they
measured and record it in the shared :class:`Context` (the paper-comparison rows,
the findings the report's prose cites, the CSV rows, the signal-below-noise
records); :mod:`collapse_sim.report` turns that into Markdown and figures.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import numpy as np

from ..backends import make_backend
from ..lanes import Lane
from ..model import ModelConfig, init_params
from ..policy import Policy
from ..progress import say
from ..results import UnitStore
from .collapse import CollapseResult, collapse_sweep
from .fits import N_MIN, PAPER_LINE, Decay, decay_fit, eps, first_below  # noqa: F401  (Decay, eps: public here too)
from .noise import noise_of

BUCKET = 128  # emulated streams are padded to a multiple of this: runs of nearby lengths share a compiled forward
SHORT = 512  # ... and those of sweeps up to n = SHORT to a multiple of SHORT: a short run's compile costs more
#              than its arithmetic, so the families, remedies and recipes of a model share one program per policy


REF = "arb256"


def bucket_for(n: int) -> int:
    """The multiple that an emulated sweep up to length ``n`` pads its streams to (:data:`BUCKET`, :data:`SHORT`)."""
    return SHORT if n <= SHORT else BUCKET


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
    recipe_n: int  # the kernel recipes and accumulator models (captions' model and decoder, v vs v* and counting) up to this n
    recipe_runs: int  # ... on the first this many runs of recipes.RECIPE_RUNS (each compiles a program per recipe)
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
    # The theorems: random instances per statement ("cheap", "model" cost), their longest length;
    # Thm 4.2's table at width thm42_d for n = 4, 16, 64, 256 up to thm42_n (256-bit arithmetic).
    thm_instances: tuple[int, int] = (8, 3)
    thm_max_n: int = 8
    thm42_d: int = 64
    thm42_n: int = 64


ALL = ("bf16", "fp16", "e4m3fn", "fp32")
# Quick sizes reach past the paper's crossings (Fig. 8 ≈ 500, Fig. 10 ≈ 800–1,000) in every model:
# 1,536, a multiple of the emulated bucket (BUCKET).
QUICK = Sizes(formats=ALL, fig8_formats=("bf16",), fig10_formats=("bf16",), family_formats=("bf16",),
              fig8_n=1536, fig9_n=10_000, fig9_points=40, fig10_n=1536, family_n=200, remedy_n=300,
              recipe_n=512, recipe_runs=1, ref_n=128,
              family_ref_n=200, window=32, caption_n=2048, caption_fmt_n=1536, caption_formats=("bf16",),
              caption_fmt_seeds=1, caption_ref_n=64)
FULL = Sizes(formats=ALL, fig8_formats=ALL, fig10_formats=ALL, family_formats=ALL, fig8_n=10_000, fig9_n=10_000,
             fig9_points=120, fig10_n=5000, family_n=2000, remedy_n=2000,
             recipe_n=2048, recipe_runs=3, ref_n=2048, family_ref_n=512, window=128,
             caption_n=10_000, caption_fmt_n=2048, caption_formats=("bf16", "fp16", "e4m3fn"), caption_fmt_seeds=3,
             caption_ref_n=256, thm_instances=(30, 10), thm_max_n=16, thm42_n=256)
# Toy sizes: every section and figure in seconds (tests).
TINY = Sizes(formats=("bf16",), fig8_formats=("bf16",), fig10_formats=("bf16",), family_formats=("bf16",),
             fig8_n=48, fig9_n=600, fig9_points=6, fig10_n=48, family_n=24, remedy_n=24,
             recipe_n=24, recipe_runs=1, ref_n=16, family_ref_n=16,
             window=8, caption_n=64, caption_fmt_n=48, caption_formats=("bf16",), caption_fmt_seeds=1, caption_ref_n=8,
             seeds=2, backend="native", thm_instances=(2, 1), thm42_d=8, thm42_n=16)

def unit_types() -> tuple[type, ...]:
    """The dataclasses the report's stored units hold (:class:`collapse_sim.results.UnitStore`)."""
    from ..theory.statement import Check
    from .noise import SignalNoise
    from .theorems import StatementRun

    return CollapseResult, SignalNoise, Fig9, StatementRun, Check


PAPER_READING = {"Fig. 8": "≈ 500", "Fig. 9": "≈ 2,400–2,500", "Fig. 10": "≈ 800–1,000 (ALiBi slightly later)"}


def _canon(key: dict) -> str:
    """``key`` as text, the same for equal inputs (:meth:`Context.once`)."""
    return json.dumps(key, sort_keys=True, default=str)


def untagged(key: dict) -> dict:
    """A unit's inputs without its tag: the key it is measured once per process under (:meth:`Context.once`)."""
    return dict(key, tag=None)


@dataclasses.dataclass
class Context:
    """Everything one report's experiments measured, shared by its sections."""

    sizes: Sizes
    comparison: list[dict] = dataclasses.field(default_factory=list)  # rows of the paper-comparison table
    findings: dict = dataclasses.field(default_factory=dict)  # measured facts the disagreement section cites
    csv_rows: list[dict] = dataclasses.field(default_factory=list)
    noise: dict = dataclasses.field(default_factory=dict)  # run tag -> {format: SignalNoise} against float64
    store: UnitStore | None = None  # where measured units are kept between runs (None: measure everything)
    # what this process measured, by its inputs without the unit's name: a section that runs the
    # same sweep as an earlier one (Fig. 10's sinusoidal setups are Fig. 8's) takes its data
    measured: dict = dataclasses.field(default_factory=dict)
    # the XLA runs of a section, two at a time (:meth:`queue`), and those queued, by their inputs
    lane: Lane = dataclasses.field(default_factory=Lane)
    queued: dict = dataclasses.field(default_factory=dict)
    # host work (the arb reference, :meth:`ahead`), one computation at a time beside the lane's
    host: Lane = dataclasses.field(default_factory=lambda: Lane("collapse-sim-host", jax_work=False))

    def stored(self, unit: str, key: dict, compute):
        """``compute()``, or the data of ``unit`` stored with the same inputs ``key`` (:attr:`store`)."""
        return compute() if self.store is None else self.store.get(unit, key, compute)

    def once(self, key: dict, compute):
        """``compute()``, measured once per process for equal inputs ``key`` (a JSON-able dict of
        everything that decides the data): a later call with the same inputs returns the same data."""
        canon = _canon(key)
        if canon not in self.measured:
            self.measured[canon] = compute()
        return self.measured[canon]

    def will_compute(self, unit: str, key: dict, once: dict | None = None) -> bool:
        """Whether ``stored(unit, key, ...)`` (inside ``once(once, ...)`` where ``once`` is given) would call
        its ``compute``: not where this process measured ``once`` already, nor where the store serves the unit."""
        return not ((once is not None and _canon(once) in self.measured)
                    or (self.store is not None and not self.store.will_measure(unit, key)))

    def ahead(self, unit: str, key: dict, compute, *, once: dict | None = None):
        """What to measure ``unit`` with in place of ``compute`` (``stored(unit, key, ...)``, inside
        ``once(once, ...)`` where ``once`` is given): where that would call it, ``compute`` is queued on
        :attr:`host`, whose thread takes such computations one at a time in order, and the returned function
        waits for its result (running it itself if no thread has started it); otherwise ``compute`` itself,
        not started. For host work, the arb reference in Python numbers, so that it runs while the XLA
        threads compile and run programs (which let go of the interpreter lock), one at a time so that it
        takes the interpreter from them no more than one thread does; its result is used (and stored) only
        where :meth:`stored` asks for it, so an interrupted run keeps nothing of it."""
        return self.host.submit(compute) if self.will_compute(unit, key, once) else compute

    def queue(self, key: dict, compute):
        """``compute`` (XLA work) queued on :attr:`lane`, once per section for equal inputs ``key``: the
        function that waits for its value, running queued work itself meanwhile. The lane runs a section's
        programs two at a time (the caller's thread and the lane's), so one compiles while another compiles
        or runs: XLA:CPU keeps one core busy compiling, and the other only in part running. Values do not
        depend on the thread that computed them (:mod:`collapse_sim.lanes`); only progress lines' order does."""
        canon = _canon(key)
        if canon not in self.queued:
            self.queued[canon] = self.lane.submit(compute)
        return self.queued[canon]

    def start(self, units: dict, computes: dict, first=None) -> dict:
        """What to measure each unit of ``units`` (name -> (unit, key, once): :meth:`stored` of ``unit`` with
        inputs ``key``, inside :meth:`once` of ``once`` where it is not None) with: where that would measure it,
        ``computes[name]`` queued (:meth:`queue`, under ``once``'s inputs, else ``key``'s), ``first()`` called
        before any is (e.g. to queue a run they all read); elsewhere ``computes[name]`` itself, never called."""
        will = [name for name, (unit, key, once) in units.items() if self.will_compute(unit, key, once)]
        if will and first is not None:
            first()
        return {name: self.queue(key if once is None else once, computes[name]) if name in will else computes[name]
                for name, (unit, key, once) in units.items()}

    def settle(self) -> None:
        """End a section's queues: work no thread started is dropped (a section that failed), the lanes'
        threads finish what they run, and the values waited for are let go."""
        for lane in (self.lane, self.host):
            lane.drop()
            lane.join()
        self.queued.clear()

    def checkpoint(self) -> tuple:
        """What the context holds now, for :meth:`rollback`."""
        return len(self.comparison), len(self.csv_rows), set(self.findings), set(self.noise)

    def rollback(self, mark: tuple) -> None:
        """Forget what was recorded since :meth:`checkpoint` (a section that could not finish)."""
        n_cmp, n_csv, findings, noise = mark
        del self.comparison[n_cmp:], self.csv_rows[n_csv:]
        for d, keep in ((self.findings, findings), (self.noise, noise)):
            for k in set(d) - keep:
                del d[k]


@dataclasses.dataclass
class SetupRuns:
    """One model setup of an experiment, measured on every backend (keys of ``res``: the
    policies as given, "fp64", REF) and, for the figures, its paper-comparison row."""

    setup: str
    over: dict  # the model's fields that differ from the report's base model
    res: dict[str, CollapseResult]
    comparison: dict | None = None


def log(msg: str) -> None:
    say("[reproduce]", f"  {msg}")  # whole lines: the reference's thread logs too


def without_outputs(r: CollapseResult) -> CollapseResult:
    """``r`` without its pair outputs (they serve the noise records; the report keeps the distances)."""
    return dataclasses.replace(r, outputs=None)


def run_backends(ctx: Context, params, family: str, n: int, formats, *, tag: str, sep: int | None = None,
                 ref: bool = True, ref_n: int | None = None, share_with=()) -> dict[str, CollapseResult]:
    """The collapse sweep of one model and family in every emulated policy (a format
    name or a policy string), native float64 and (up to ``ref_n``) the arb reference.
    Keys: the policies as given, "fp64", REF. :func:`start_backends`, then its result."""
    return start_backends(ctx, params, family, n, formats, tag=tag, sep=sep, ref=ref, ref_n=ref_n,
                          share_with=share_with)()


def start_backends(ctx: Context, params, family: str, n: int, formats, *, tag: str, sep: int | None = None,
                   ref: bool = True, ref_n: int | None = None, share_with=()):
    """:func:`run_backends`'s work begun: the runs it will measure queued (:meth:`Context.start`, the
    reference on the host queue, :meth:`Context.ahead`); returns the function that waits for them and records them, in
    order, so that a section starts all its setups' runs before it waits for the first.
    Each backend's run is one stored unit (:meth:`Context.stored`); a format's unit holds its
    signal-below-noise record too.
    A policy that shares the emulated shared program with another of ``formats`` or of
    ``share_with`` (policies the caller runs on the same model, e.g. in other calls) runs
    it from the first (``shared="first"``): one compiled program for all of them."""
    ref_n = ctx.sizes.ref_n if ref_n is None else ref_n
    inputs = dict(tag=tag, config=dataclasses.asdict(params.config), family=family, sep=sep, seed=0)

    def sweep(name, be, nn, bucket, keep):
        t0 = time.time()
        r = collapse_sweep(params, family, nn, be, name, sep=sep, bucket=bucket, keep_outputs=keep)
        log(f"{tag} / {name}: n ≤ {nn:,} in {time.time() - t0:.1f} s")
        return r

    grouped = shared_first(ctx.sizes, [*formats, *share_with])
    keys = {f: dict(inputs, n=n, backend=f"{ctx.sizes.backend}:{f}", bucket=bucket_for(n)) for f in formats}
    keys["fp64"] = dict(inputs, n=n, backend="native:fp64", bucket=bucket_for(n))
    units = {name: (f"{tag} / {name}", key, untagged(key)) for name, key in keys.items()}
    runs = {}
    if ref and ref_n:  # the reference's host arithmetic starts first, to run beside the XLA programs
        nn = min(n, ref_n)
        keys[REF] = dict(inputs, n=nn, backend=f"interval:{REF}")
        runs[REF] = ctx.ahead(f"{tag} / {REF}", keys[REF], once=untagged(keys[REF]),
                              compute=lambda: sweep(REF, make_backend("interval", REF), nn, None, False))

    def f64_queued():  # the float64 run with its outputs (every format's noise record reads them)
        return ctx.queue(dict(untagged(keys["fp64"]), outputs=True),
                         lambda: sweep("fp64", make_backend("native", "fp64"), n, bucket_for(n), True))

    def measure(f):
        r = sweep(f, format_backend(ctx.sizes, f, shared="first" if f in grouped else None), n, bucket_for(n), True)
        return without_outputs(r), noise_of(f64_queued()(), r, f)

    computes = {f: functools.partial(measure, f) for f in formats}
    computes["fp64"] = lambda: without_outputs(f64_queued()())
    runs.update(ctx.start(units, computes, first=f64_queued))  # the float64 run first in the queue

    def finish() -> dict[str, CollapseResult]:
        out: dict[str, CollapseResult] = {}
        noise = {}
        for name, key in keys.items():  # each unit measured once per process for its inputs whatever the tag
            got = ctx.stored(f"{tag} / {name}", key, lambda: ctx.once(untagged(key), runs[name]))
            if name in formats:
                out[name], noise[name] = got
            else:
                out[name] = got
        for r in out.values():
            for row in r.rows():
                row.update(experiment=tag, family=family)
                ctx.csv_rows.append(row)
        ctx.noise[tag] = noise
        return out

    return finish


def shared_first(sizes: Sizes, policies) -> set:
    """The policies of ``policies`` that share an emulated formats-as-data program with another of them, so
    that each runs it from the first (``shared="first"``): one program for all, and which of two run side by
    side comes first (an automatic choice) cannot decide what a warm rerun must find."""
    if sizes.backend != "emulated":
        return set()
    from ..backends.emulated.backend import shared_groups

    return set().union(*shared_groups(policies))


def format_backend(sizes: Sizes, spec: str, shared: "str | None" = None):
    """The backend that runs a format name or policy string at these sizes: emulated, or
    natively in the JAX dtype of the policy's storage format (``sizes.backend == "native"``: the toy
    sizes, which test the report's plumbing; the dtype's arithmetic stands in for the policy's order
    and kernel). A weights role is applied to the weights on the host before any forward
    (docs/semantics.md §5.1), so a native run takes it too; an operands role (§13.1) is not, so
    such a policy runs emulated at every size. ``shared``: the emulated backend's program choice
    (:class:`collapse_sim.backends.emulated.EmulatedBackend`; None: automatic)."""
    if sizes.backend == "native" and Policy.parse(spec).operands is None:
        pol = Policy.parse(spec)
        be = make_backend("native", pol.storage.name)
        if pol.weights is not None:
            be.policy = pol  # its weights role is read (quantize_weights)
        return be
    from ..backends.emulated.backend import EmulatedBackend

    return EmulatedBackend(spec, shared=shared)


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


def report_model(**over):
    """The report's decoder: one layer, one head, d = 64, LayerNorm, 16 tokens, seed 0, with ``over``."""
    base = dict(d=64, n_layers=1, n_heads=1, vocab=16, seed=0, norm="layernorm")
    base.update(over)
    return init_params(ModelConfig(**base))


def median_top(r: CollapseResult) -> float:
    """Median L1 distance over n ∈ [N/2, N] (families like count_bernoulli alternate)."""
    return float(np.median(r.l1[r.ns >= r.ns[-1] // 2]))


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


def start_fig8(ctx: Context):
    """The decoder variants of Fig. 8: v vs v*, sinusoidal positions in the residual or in q/k only, their
    runs queued (:func:`start_backends`); returns the function that waits for them (a :class:`SetupRuns` each)."""
    sz = ctx.sizes
    started = [start_backends(ctx, report_model(**over), "repeat_last", sz.fig8_n, sz.fig8_formats,
                              tag=f"Fig. 8, {setup}") for setup, over in FIG8_SETUPS]

    def finish() -> list[SetupRuns]:
        out = []
        for (setup, over), done in zip(FIG8_SETUPS, started):
            res = done()
            row = _comparison(ctx, "Fig. 8", f"decoder: {setup}", res, sz.fig8_n)
            ctx.findings[("fig8", over["ape"])] = res
            out.append(SetupRuns(setup, over, res, row))
        return out

    return finish


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
    import jax.numpy as jnp

    valid = jnp.asarray(np.arange(X.shape[1])[None, :] < ns[:, None])
    A, B = (np.asarray(v, np.float64) for v in _softmax_pair(fmt)(jnp.asarray(X), jnp.asarray(Xs), valid))
    return np.abs(A - B).sum(axis=1), np.all(A == B, axis=1)


@functools.lru_cache(maxsize=None)
def _softmax_pair(fmt: str):
    """The masked softmax of two batches in ``fmt`` under jit: one compiled program per format
    and shape however many seeds call it (a function traced afresh per call is traced again)."""
    import jax

    from ..backends.emulated import Emulator, masked_softmax

    emu = Emulator(Policy.uniform(fmt))

    @jax.jit
    def both(a, b, valid):
        return masked_softmax(emu, emu.store(a), valid), masked_softmax(emu, emu.store(b), valid)

    return both


FIG9_K = 200  # the paper perturbs the first k = 200 entries
FIG9_AT = 500  # the paper quotes δ ≈ 0.026 at this n


@dataclasses.dataclass
class Fig9:
    """Fig. 9 measured: float64 δ at every n per seed, each format's δ on a grid of lengths."""

    n: int  # N, the longest input
    k: int
    seeds: int
    grid: np.ndarray  # the lengths each format runs
    exact: np.ndarray  # (seeds, N): float64 δ(n), n = 1..N
    fmt_tv: dict[str, np.ndarray]  # format -> (seeds, grid): δ with both softmaxes in the format
    fmt_same: dict[str, np.ndarray]  # format -> (seeds, grid): the two weight vectors bitwise identical
    cross: list[dict]  # per seed: format -> first n whose float64 δ is below eps(format)
    checks: list[tuple[int, float, float]]  # seed 0: (n, δ at 200 bits, float64 δ)
    at500: np.ndarray | None  # float64 δ at n = FIG9_AT = 500 per seed (the paper's ≈ 0.026), if N ≥ 500


def run_fig9(ctx: Context) -> Fig9:
    """Fig. 9 measured (one stored unit), recorded in the context."""
    sz = ctx.sizes
    key = dict(n=sz.fig9_n, k=FIG9_K, points=sz.fig9_points, seeds=sz.seeds, formats=sz.formats, at=FIG9_AT)
    fig9 = ctx.stored("Fig. 9", key, lambda: measure_fig9(sz))
    ctx.findings["fig9"] = fig9
    bf = [c["bf16"] for c in fig9.cross if "bf16" in c]
    ctx.comparison.append(dict(experiment="Fig. 9", setup=f"softmax only, k = {fig9.k}, {sz.seeds} seeds",
                               paper=PAPER_READING["Fig. 9"], n_max=fig9.n,
                               cross_l1=(min(v for v in bf if v) if all(bf) else None),
                               cross_l1_hi=(max(bf) if all(bf) else None), cross_linf=None,
                               bf16_first=None, bf16_from=None, bf16_floor=None))
    return fig9


def measure_fig9(sz: Sizes) -> Fig9:
    from ..theory.softmax import b2_tv

    N, k = sz.fig9_n, FIG9_K
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
                log(f"Fig. 9 / {f}: {grid.size} lengths up to {N:,} in {time.time() - t0:.1f} s")
        if seed == 0:
            for n in (FIG9_AT, min(2500, N)):
                ref = float(b2_tv(x[:n], xs[:n], prec=200))
                checks.append((n, ref, float(tv[n - 1])))
    exact = np.array(exact)
    return Fig9(N, k, sz.seeds, grid, exact, {f: np.array(v) for f, v in fmt_tv.items()},
                {f: np.array(v) for f, v in fmt_same.items()}, cross, checks, exact[:, FIG9_AT - 1] if N >= FIG9_AT else None)


# --- Fig. 10 ------------------------------------------------------------------------------------
FIG10_SETUPS = [("sinusoidal APE (residual)", dict(pe="sinusoidal", ape="residual")),
                ("sinusoidal APE (q/k only)", dict(pe="sinusoidal", ape="scores")),
                ("RoPE", dict(pe="rope")), ("ALiBi", dict(pe="alibi")), ("no positions", dict(pe="none"))]


def run_fig10(ctx: Context) -> list[SetupRuns]:
    """The decoder variants of Fig. 10: v vs v* under each positional encoding."""
    sz, out = ctx.sizes, []
    started = [start_backends(ctx, report_model(**over), "repeat_last", sz.fig10_n, sz.fig10_formats,
                              tag=f"Fig. 10, {setup}") for setup, over in FIG10_SETUPS]
    for (setup, over), finish in zip(FIG10_SETUPS, started):
        res = finish()
        row = _comparison(ctx, "Fig. 10", f"decoder: {setup}", res, sz.fig10_n)
        ctx.findings[("fig10", setup)] = res
        out.append(SetupRuns(setup, over, res, row))
    return out


# --- copying and counting -----------------------------------------------------------------------
FAMILY_SETUPS = [("no positions", dict(pe="none")), ("sinusoidal APE (residual)", dict(pe="sinusoidal")),
                 ("RoPE", dict(pe="rope"))]
FAMILIES = [("first_copy", "copy the first token: 0 1^n vs 1 1^n"),
            ("last_copy", "copy the last token: 1^n 0 vs 1^(n+1)"),
            ("ones", "count ones: 1^n vs 1^(n+1)"),
            ("zero_ones", "count ones after a 0: 0 1^n vs 0 1^(n+1)"),
            ("count_bernoulli", "count ones in a Bernoulli(0.7) string s vs s 1"),
            ("sum_ones", "sum 1+…+1 with n vs n+1 ones")]


def run_families(ctx: Context) -> list[tuple[str, str, list[SetupRuns]]]:
    """(family, description, its runs in every setup of :data:`FAMILY_SETUPS`) for every family."""
    sz, out = ctx.sizes, []
    started = {(fam, setup): start_backends(ctx, report_model(**over), fam, sz.family_n, sz.family_formats,
                                            tag=f"{fam}, {setup}", ref_n=sz.family_ref_n)
               for fam, _ in FAMILIES for setup, over in FAMILY_SETUPS}
    for fam, desc in FAMILIES:
        runs = []
        for setup, over in FAMILY_SETUPS:
            res = started[fam, setup]()
            ctx.findings[("family", fam, setup)] = res
            runs.append(SetupRuns(setup, over, res))
        out.append((fam, desc, runs))
    return out


# --- signal below rounding noise, theorems ------------------------------------------------------
def noise_table(ctx: Context) -> list[tuple[str, str, object]]:
    """(run, format, SignalNoise) of every run that has one: the captions' rows (seed 0) and
    the decoder runs (Figs. 8, 10, the families, the remedies)."""
    rows = []
    for label, row in ctx.findings.get("captions", {}).items():
        for fmt, sns in row["noise"].items():
            rows.append((f"captions' model: {label}", fmt, sns[0]))
    for tag, by_fmt in ctx.noise.items():
        for fmt, sn in by_fmt.items():
            rows.append((tag, fmt, sn))
    return rows


THM42_SETUPS = [("no positions", dict(pe="none")), ("ALiBi", dict(pe="alibi")), ("RoPE", dict(pe="rope")),
                ("sinusoidal APE (residual)", dict(pe="sinusoidal", ape="residual")),
                ("sinusoidal APE (q/k only)", dict(pe="sinusoidal", ape="scores"))]

CAPTION_THM42_SETUPS = [("no positions", dict(pe="none")), ("RoPE", dict(pe="rope")),
                        ("sinusoidal on keys", dict(pe="sinusoidal", sin_at="keys")),
                        ("ALiBi m = 2^-8", dict(pe="alibi", alibi_slope=2.0**-8))]


@dataclasses.dataclass
class Theorems:
    runs: list  # StatementRun per statement (collapse_sim.experiments.theorems)
    d: int  # the width of Thm 4.2's models
    decoder: dict[str, list[dict]]  # setup -> thm42_table rows (the decoder, random tokens)
    captions: dict[str, list[dict]]  # setup -> thm42_table rows (the captions' Gaussian model)


def run_theorems(ctx: Context) -> Theorems:
    """Every statement on random instances, and Thm 4.2's bound beside the measured distance."""
    from ..model import gaussian_config
    from ..theory.collapse import thm42_table
    from .theorems import run_all

    sz = ctx.sizes
    instances = dict(zip(("cheap", "model"), sz.thm_instances))
    runs = ctx.stored("theorems: statements", dict(instances=instances, max_n=sz.thm_max_n, seed=0),
                      lambda: run_all(instances, max_n=sz.thm_max_n, seed=0))
    ctx.findings["theorems"] = {r.name: r for r in runs}
    ns = [n for n in (4, 16, 64, 256) if n <= sz.thm42_n]
    d = sz.thm42_d
    tokens = np.random.default_rng(0).integers(0, 16, max(ns))

    def table(model: str, setup: str, over: dict, make, toks):
        key = dict(model=model, over=over, d=d, ns=ns, tokens=toks.tolist(), seed=0)
        return ctx.stored(f"theorems: Thm 4.2, {model}, {setup}", key, lambda: thm42_table(make(), toks, ns))

    decoder = {setup: table("decoder", setup, over, lambda over=over: report_model(d=d, **over), tokens)
               for setup, over in THM42_SETUPS}
    captions = {setup: table("captions' model", setup, over,
                             lambda over=over: init_params(gaussian_config(d, seed=0, **over)), np.arange(max(ns)))
                for setup, over in CAPTION_THM42_SETUPS}
    ctx.findings["thm42_table"] = {**decoder, **{f"captions' model: {s}": rows for s, rows in captions.items()}}
    return Theorems(runs, d, decoder, captions)
