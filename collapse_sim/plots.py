"""Figures (matplotlib, Agg).

:func:`drawing_in_background`: inside it, :func:`plot_curves` hands each figure to a second
process and returns at once, so that a report draws its figures while it computes (15 figures,
~9 s of one core in the quick report); every figure is written, or the first error raised,
when the block ends.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

_BACKGROUND: list = []  # the _Drawing of drawing_in_background while it runs


class _Drawing:
    """The figures handed to the background process (:func:`drawing_in_background`)."""

    def __init__(self, pool):
        self.pool, self.futures = pool, []

    def wait(self) -> None:
        """Wait for every figure asked so far; raise the first error of any."""
        futures, self.futures = self.futures, []
        for f in futures:
            f.result()


@contextlib.contextmanager
def drawing_in_background():
    """Figures of :func:`plot_curves` in the block are drawn by one worker process (started with
    ``spawn``: a fork of a process running XLA is unsafe), in the order asked; the block's end
    waits for all of them and raises the first error of any (call the handle's ``wait`` inside a
    progress stage to show that wait). Nested blocks share the outer one."""
    if _BACKGROUND:
        yield _BACKGROUND[0]
        return
    import concurrent.futures
    import multiprocessing

    pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    drawing = _Drawing(pool)
    _BACKGROUND.append(drawing)
    ok = False
    try:
        yield drawing
        ok = True
    finally:
        _BACKGROUND.clear()
        try:
            if ok:
                drawing.wait()
        finally:
            pool.shutdown(wait=True, cancel_futures=not ok)


# Fixed colours for the named formats, the same in every figure; other formats take the
# default cycle's remaining colours. fp64 is grey and drawn thin, behind the others.
FORMAT_COLORS = {"bf16": "C0", "fp16": "C1", "fp32": "C2", "fp64": "0.45", "e4m3fn": "C4", "e5m2": "C5"}
_SPARE = ("C3", "C6", "C8", "C9", "C7")


def _colors(names) -> dict:
    """A colour per format name: FORMAT_COLORS, then spare colours in order."""
    spare = iter(c for c in _SPARE)
    return {n: FORMAT_COLORS.get(n) or next(spare, "k") for n in dict.fromkeys(names)}


def _precision(name: str) -> int:
    from .formats import FormatError, parse

    try:
        return parse(name).p
    except FormatError:
        return 0


def _floor(ax):
    """x in data units, y in axes fraction: where points that cannot sit on a log axis go."""
    import matplotlib.transforms as mtransforms

    return mtransforms.blended_transform_factory(ax.transData, ax.transAxes)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_collapse(results, title: str = ""):
    """‖y − y*‖∞ against n per format (legend: format names). Bitwise-identical pairs that
    differ exactly (collapses) are drawn as ▼ along the floor, one row per format; pairs
    equal in exact arithmetic as grey ○ (not collapses); each format's spacing at the
    output's scale (eps·max|y|) is a labelled line in its colour; the highest precision
    (fp64) is thin, dashed and behind, so the lower-precision curves stay visible."""
    plt = _plt()
    import numpy as np

    from .formats import parse

    fig, ax = plt.subplots(figsize=(10, 5.0))
    floor = _floor(ax)
    colors = _colors(r.fmt for r in results)
    kinds = {r.backend.split(":")[0] for r in results}
    top = max((_precision(r.fmt) for r in results), default=0)
    exact_drawn = False
    positive = []
    for i, r in enumerate(sorted(results, key=lambda r: -_precision(r.fmt))):
        c = colors[r.fmt]
        label = r.fmt if len(kinds) == 1 else f"{r.fmt} ({r.backend.split(':')[0]})"
        behind = len(results) > 1 and _precision(r.fmt) == top
        style = dict(lw=0.8, ls="--", zorder=1) if behind else dict(lw=1.3, ls="-", zorder=3)
        d = np.where(r.linf > 0, r.linf, np.nan)
        positive.append(d[np.isfinite(d)])
        ax.plot(r.ns, d, color=c, label=label, **style)
        try:
            eps = parse(r.fmt).eps
        except Exception:  # noqa: BLE001 - reference precisions have no registered format
            eps = None
        if eps is not None and r.scale > 0 and eps * r.scale > 1e-300:
            ax.axhline(eps * r.scale, color=c, ls=(0, (5, 3)), lw=0.9, alpha=0.9, zorder=2,
                       label=f"{r.fmt} eps·max|y| = {eps * r.scale:.2g}")
            positive.append(np.array([eps * r.scale]))
        exact = r._exact()
        ok = ~r.nonfinite
        hit = r.identical & ok & ~exact
        if hit.any():
            ax.plot(r.ns[hit], np.full(int(hit.sum()), 0.02 + 0.03 * i), "v", color=c, ms=4, transform=floor,
                    zorder=4, clip_on=False, label=f"{r.fmt}: bitwise identical (collapse), drawn at the floor")
        if exact.any() and not exact_drawn:
            ax.plot(r.ns[exact], np.full(int(exact.sum()), 0.02 + 0.03 * len(results)), "o", mfc="none",
                    color="0.3", ms=4, transform=floor, zorder=4, clip_on=False,
                    label="equal in exact arithmetic (no collapse)")
            exact_drawn = True
        cf = r.collapsed_from()
        if cf is not None:
            ax.axvline(cf, color=c, ls=":", lw=1.0, label=f"{r.fmt}: identical from n = {r.describe_collapsed_from()}")
        if r.nonfinite.any():
            ax.plot(r.ns[r.nonfinite], np.full(int(r.nonfinite.sum()), 0.97), "x", color=c, transform=floor,
                    label=f"{r.fmt}: non-finite")
    ax.set_xscale("log")
    ax.set_yscale("log")
    pos = np.concatenate(positive) if positive else np.array([])
    lo, hi = (np.log10(pos.min()), np.log10(pos.max()) + 0.5) if pos.size else (-16.0, 0.0)
    band = 0.04 + 0.03 * len(results)  # the floor markers' band: axes fraction, below every value
    f0 = band + 0.08  # the lowest value sits this high, clear of the band and its label
    ax.set_ylim(10 ** (lo - f0 / (1 - f0) * (hi - lo)), 10**hi)
    ax.plot([0, 1], [band, band], transform=ax.transAxes, color="0.6", lw=0.6)
    ax.text(0.995, band + 0.01, "markers below this line: distance 0 (bitwise identical)", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=6, color="0.35")
    # legend: grouped by format in the order given (drawing runs from the highest precision down)
    handles, labels = ax.get_legend_handles_labels()
    rank = {r.fmt: k for k, r in enumerate(results)}
    group = [min((k for f, k in rank.items() if lab == f or lab.startswith(f + " ") or lab.startswith(f + ":")),
                 default=len(rank)) for lab in labels]
    order = sorted(range(len(labels)), key=lambda j: (group[j], j))
    handles, labels = [handles[j] for j in order], [_wrap_label(labels[j]) for j in order]
    ax.set_xlabel("n")
    ax.set_ylabel("‖y − y*‖∞")
    ax.set_title(title or "representational collapse")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(handles, labels, fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def _wrap_label(label: str, width: int = 36) -> str:
    """A legend label on lines of at most ~``width`` characters, broken after the commas outside
    parentheses (a long policy string, e.g. storage=bf16,compute=fp32,...,kernel=flash3fp8(64),
    would otherwise widen the legend until it squeezes the axes)."""
    from .formats import split_top_level

    parts = split_top_level(label, "a legend label")
    parts = [p + "," for p in parts[:-1]] + parts[-1:]
    lines = [""]
    for part in parts:
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def plot_collapse(results, path: "str | Path", title: str = "") -> Path:
    return _save(figure_collapse(results, title), path)


def _save(fig, path: "str | Path", tight: bool = True, dpi: int = 130) -> Path:
    plt = _plt()

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    if tight:  # one more rendering pass: a figure of many panels lays itself out instead (draw_panels)
        fig.tight_layout()
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


_OVERSQUASH_STYLE = {"fp64": dict(lw=2.8, alpha=0.5, zorder=1),
                     "fp32": dict(marker="^", ms=5, lw=0.9, ls="-.", zorder=3),
                     "bf16": dict(marker="o", mfc="none", ms=7, lw=0.9, zorder=3),
                     "fp16": dict(marker="x", ms=6, lw=0.9, ls=":", zorder=4)}


def figure_oversquash(result, title: str = ""):
    """‖∂y_n/∂v_i‖ over i per format, with the path-sum bound of Thm 5.1. Each format has
    its colour, marker and line style (fp64 a wide pale line behind); points above the bound
    are ringed in red and the legend and caption say why."""
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 5.0))
    i = np.arange(1, result.n + 1)
    colors = _colors(k.split()[0] for k in result.profiles)
    for name, prof in result.profiles.items():
        fmt = name.split()[0]
        full = "full" in name
        style = dict(color="C3", lw=1.1, ls="--", marker=".", zorder=2) if full else \
            {"color": colors[fmt], "marker": ".", "lw": 1.0, **_OVERSQUASH_STYLE.get(fmt, {})}
        label = f"{fmt}, full model (attention and norms vary)" if full else f"{fmt}, frozen attention and norms"
        ax.plot(i, prof, label=label, **style)
    ax.plot(i, result.bound, color="k", lw=1.5, zorder=5, label="path-sum bound C·[Π(Λ/β₁+I)]_(n,i) (Thm 5.1)")
    for name, prof in result.profiles.items():
        above = prof > result.bound
        if above.any():
            why = ("full model: outside Thm 5.1 (see note)" if "full" in name
                   else f"{name}: VIOLATES the bound")
            ax.plot(i[above], prof[above], "o", ms=12, mfc="none", mec="red", mew=1.4, zorder=6,
                    label=f"above the bound at i = {', '.join(map(str, i[above]))}: {why}")
    ax.set_yscale("log")
    ax.set_xlabel("input position i")
    ax.set_ylabel("‖∂y_n / ∂v_i^(0)‖₂")
    ax.set_title(title or f"over-squashing profile, n = {result.n}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.text(1.01, 0.0, "Thm 5.1 bounds the frozen model: attention\nweights and norm scales held constant.\n"
            "The full model's Jacobian also flows\nthrough the attention weights and the norms,\n"
            "which the theorem leaves out: its points\nmay lie above the bound without contradicting it.",
            transform=ax.transAxes, fontsize=6.5, va="bottom", ha="left", color="0.25")
    return fig


def plot_oversquash(result, path: "str | Path", title: str = "") -> Path:
    """‖∂y_n/∂v_i‖ over i per format, with the path-sum bound of Thm 5.1 (:func:`figure_oversquash`)."""
    return _save(figure_oversquash(result, title), path)


_MARKED_P = {"bf16": 8, "fp16": 11}


def figure_scaling(result, title: str = ""):
    """log2 of the first-collapse length against p, measured and predicted, with the fit;
    p = 8 (bf16) and p = 11 (fp16) marked where they fall in the range."""
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ps = np.array(result.ps, float)
    m = np.array([np.nan if v is None else v for v in result.measured], float)
    q = np.array([np.nan if v is None else v for v in result.predicted], float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ax.plot(ps, np.log2(m), "o", color="k", label="measured first collapse (emulated)", zorder=3)
        ax.plot(ps, np.log2(q), "s", mfc="none", color="0.4", label="predicted: exact distance < 1 ulp", zorder=3)
    ok = np.isfinite(m)
    if result.slope is not None:
        b = np.mean(np.log2(m[ok]) - result.slope * ps[ok])
        ax.plot(ps, result.slope * ps + b, "-", lw=1, color="C3", label=f"fit: slope {result.slope:.3f}")
        b2 = np.mean(np.log2(m[ok]) - result.predicted_slope * ps[ok])
        ax.plot(ps, result.predicted_slope * ps + b2, ":", lw=1, color="C3",
                label=f"theory: slope 1/r = {result.predicted_slope:.3f}")
    for name, p in _MARKED_P.items():
        if ps.size and ps.min() <= p <= ps.max():
            ax.axvline(p, color=FORMAT_COLORS[name], lw=1.2, ls="--", zorder=1, label=f"{name}: p = {p}")
            ax.text(p, 0.98, f" {name}", color=FORMAT_COLORS[name], transform=_floor(ax), va="top", fontsize=8)
    ax.set_xlabel("significand bits p")
    ax.set_ylabel("log2 n*")
    ax.set_title(title or f"collapse scaling law, family {result.family}")
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_scaling(result, path: "str | Path", title: str = "") -> Path:
    """log2 of the first-collapse length against p (:func:`figure_scaling`)."""
    return _save(figure_scaling(result, title), path)


_SMOOTH_NOTE = "thick: rolling median over ±10% of n; faint: every n"  # what smooth=True draws (rolling_median)


def _drawn(draw, data, path: "str | Path", **kw) -> Path:
    """``draw(data, path, **kw)`` now, or in the background process inside :func:`drawing_in_background`
    (the path is returned at once; the file is there when the block ends)."""
    if not _BACKGROUND:
        return draw(data, path, **kw)
    drawing = _BACKGROUND[0]
    drawing.futures.append(drawing.pool.submit(draw, data, path, **kw))
    return Path(path)


def plot_curves(series, path: "str | Path", **kw) -> Path:
    """:func:`draw_curves`, now or in the background process (:func:`_drawn`)."""
    return _drawn(draw_curves, series, path, **kw)


def draw_curves(series, path: "str | Path", *, title: str, xlabel: str = "n", ylabel: str = "",
                hlines=(), bands=(), note: str = "", x_min: float | None = None, smooth: bool = False) -> Path:
    """Curves on log-log axes. ``series``: dicts with ``label``, ``x``, ``y`` and optional
    ``color``, ``ls``, ``lw``, ``alpha``, ``zorder``, ``faint`` (False: with ``smooth``, the median only);
    zeros (bitwise identical) cannot be drawn on a log axis and are marked as ticks along the bottom edge
    in the curve's colour. ``hlines``:
    (label, y, color or None); ``bands``: dicts with ``label``, ``x``, ``lo``, ``hi``;
    ``x_min``: points left of it are not drawn; ``smooth``: each curve drawn faintly with
    its rolling median (:func:`rolling_median`) on top."""
    plt = _plt()

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    _draw_axes(ax, series, bands, hlines, x_min, smooth)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    if smooth:
        note = (note + "; " if note else "") + _SMOOTH_NOTE
    if note:  # below the axes, at the left: inside them a legend could hide it
        fig.text(0.01, 0.01, note, fontsize=6, alpha=0.8)
    return _save(fig, path)


def plot_panels(panels, path: "str | Path", **kw) -> Path:
    """:func:`draw_panels`, now or in the background process (:func:`_drawn`)."""
    return _drawn(draw_panels, panels, path, **kw)


def draw_panels(panels, path: "str | Path", *, title: str, xlabel: str = "n", ylabel: str = "", hlines=(),
                x_min: float | None = None, smooth: bool = False, ncols: int = 3) -> Path:
    """Small multiples: one log-log panel per ``(panel title, series)`` of ``panels``, each drawn as
    :func:`draw_curves` draws its series, the axes shared, so that curves that would hide each other
    on one panel are read side by side."""
    plt = _plt()

    nrows = -(-len(panels) // ncols)
    height = 2.5 * nrows + 1.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, height), sharex=True, sharey=True, squeeze=False)
    # a fixed layout (inches turned into fractions): tight_layout's extra rendering pass costs ~1 s at 9-12 panels
    fig.subplots_adjust(left=0.55 / (3.6 * ncols), right=0.99, bottom=0.55 / height, top=1 - 0.75 / height,
                        wspace=0.06, hspace=0.28)
    for ax, (name, series) in zip(axes.flat, panels):
        _draw_axes(ax, series, (), hlines, x_min, smooth, minor_grid=False)
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=5.5, loc="lower left")
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for col in range(ncols):  # the lowest drawn panel of each column carries the x axis's labels
        drawn = [axes[r, col] for r in range(nrows) if r * ncols + col < len(panels)]
        if drawn:
            drawn[-1].xaxis.set_tick_params(labelbottom=True)
            drawn[-1].set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title + (f"\n({_SMOOTH_NOTE})" if smooth else ""), fontsize=10)
    return _save(fig, path, tight=False, dpi=100)  # a wide grid: 100 dpi is ~1,100 pixels across


def _draw_axes(ax, series, bands, hlines, x_min, smooth, minor_grid: bool = True) -> None:
    """``series``, ``bands`` and ``hlines`` of :func:`draw_curves` on ``ax``, log-log, with a grid (at the
    minor ticks too unless ``minor_grid`` is false)."""
    import matplotlib.pyplot as plt
    import matplotlib.transforms as mtransforms
    import numpy as np

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bottom = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for j, b in enumerate(bands):
        c = b.get("color", colors[j % len(colors)])
        keep = np.asarray(b["x"]) >= (x_min or -np.inf)
        ax.fill_between(np.asarray(b["x"])[keep], np.asarray(b["lo"])[keep], np.asarray(b["hi"])[keep], color=c,
                        alpha=0.25, lw=0, label=b["label"])
    for i, s in enumerate(series):
        c = s.get("color") or colors[(i + len(bands)) % len(colors)]
        style = dict(color=c, ls=s.get("ls", "-"), alpha=s.get("alpha", 1.0), zorder=s.get("zorder", 2))
        x, y = np.asarray(s["x"], float), np.asarray(s["y"], float)
        keep = x >= (x_min or -np.inf)
        x, y = x[keep], y[keep]
        if smooth and x.size > 50:
            if s.get("faint", True):
                ax.plot(x, np.where(y > 0, y, np.nan), lw=0.5, **{**style, "alpha": 0.3 * style["alpha"]})
            xm, ym = rolling_median(x, y)
            ax.plot(xm, ym, lw=s.get("lw", 1.1) + 0.6, label=s["label"], **style)
        else:
            ax.plot(x, np.where(y > 0, y, np.nan), lw=s.get("lw", 1.1), label=s["label"], **style)
        zero = y == 0
        if zero.any():
            ax.plot(x[zero], np.full(int(zero.sum()), 0.01), "|", color=c, ms=6, transform=bottom,
                    label=f"{s['label']}: bitwise identical")
        bad = ~np.isfinite(y)
        if bad.any():
            ax.plot(x[bad], np.full(int(bad.sum()), 0.97), "x", color=c, ms=4, transform=bottom,
                    label=f"{s['label']}: non-finite")
    for label, y, c in hlines:
        ax.axhline(y, color=c or "k", ls="--", lw=0.9, alpha=0.8, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both" if minor_grid else "major", alpha=0.25)


def rolling_median(x, y, width: float = 0.1, points: int = 200):
    """Median of ``y`` over x ∈ [t/(1+width), t·(1+width)] at ``points`` log-spaced t:
    a readable trend of curves that jump by orders of magnitude from one n to the next
    (zeros count as zeros, non-finite values are skipped)."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    ts = np.unique(np.geomspace(x.min(), x.max(), points))
    out = np.full(ts.size, np.nan)
    for i, t in enumerate(ts):
        w = y[(x >= t / (1 + width)) & (x <= t * (1 + width)) & np.isfinite(y)]
        if w.size:
            out[i] = np.median(w)
    return ts, np.where(out > 0, out, np.nan)
