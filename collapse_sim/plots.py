"""Figures (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def plot_collapse(results, path: "str | Path", title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .formats import parse

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        c = colors[i % len(colors)]
        d = np.where(r.linf > 0, r.linf, np.nan)
        ax.plot(r.ns, d, color=c, lw=1.2, label=f"{r.backend}")
        try:
            eps = parse(r.fmt).eps
        except Exception:  # noqa: BLE001 - reference precisions have no registered format
            eps = None
        if eps is not None and r.scale > 0 and eps * r.scale > 1e-300:
            ax.axhline(eps * r.scale, color=c, ls="--", lw=0.8, alpha=0.7)
        cf = r.collapsed_from()
        if cf is not None:
            ax.axvline(cf, color=c, ls=":", lw=1.0)
        if r.nonfinite.any():
            ax.plot(r.ns[r.nonfinite], np.full(int(r.nonfinite.sum()), np.nanmin(d) if np.isfinite(np.nanmin(d)) else 1.0),
                    "x", color=c, label=f"{r.backend}: non-finite")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("‖y − y*‖∞ (0 not drawn: bitwise identical)")
    ax.set_title(title or "representational collapse")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    ax.text(0.01, 0.01, "dashed: format spacing at the output's scale (eps·max|y|); dotted: identical from here on",
            transform=ax.transAxes, fontsize=6, alpha=0.8)
    return _save(fig, path)


def _save(fig, path: "str | Path") -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_oversquash(result, path: "str | Path", title: str = "") -> Path:
    """‖∂y_n/∂v_i‖ over i per format, with the path-sum bound of Thm 5.1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    i = np.arange(1, result.n + 1)
    for name, prof in result.profiles.items():
        ax.plot(i, prof, marker=".", lw=1.0, ls="--" if "full" in name else "-", label=name)
    ax.plot(i, result.bound, color="k", lw=1.5, label="path-sum bound C·[Π(Λ̄/β₁+I)]_(n,i)")
    ax.set_yscale("log")
    ax.set_xlabel("input position i")
    ax.set_ylabel("‖∂y_n / ∂v_i^(0)‖₂")
    ax.set_title(title or f"over-squashing profile, n = {result.n}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_scaling(result, path: "str | Path", title: str = "") -> Path:
    """log2 of the first-collapse length against p, measured and predicted, with the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ps = np.array(result.ps, float)
    m = np.array([np.nan if v is None else v for v in result.measured], float)
    q = np.array([np.nan if v is None else v for v in result.predicted], float)
    ax.plot(ps, np.log2(m), "o", label="measured first collapse (emulated)")
    ax.plot(ps, np.log2(q), "s", mfc="none", label="predicted: exact distance < 1 ulp")
    ok = np.isfinite(m)
    if result.slope is not None:
        b = np.mean(np.log2(m[ok]) - result.slope * ps[ok])
        ax.plot(ps, result.slope * ps + b, "-", lw=1, label=f"fit: slope {result.slope:.3f}")
        b2 = np.mean(np.log2(m[ok]) - result.predicted_slope * ps[ok])
        ax.plot(ps, result.predicted_slope * ps + b2, ":", lw=1, label=f"theory: slope 1/r = {result.predicted_slope:.3f}")
    ax.set_xlabel("significand bits p")
    ax.set_ylabel("log2 n*")
    ax.set_title(title or f"collapse scaling law, family {result.family}")
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_curves(series, path: "str | Path", *, title: str, xlabel: str = "n", ylabel: str = "",
                hlines=(), bands=(), note: str = "", x_min: float | None = None, smooth: bool = False) -> Path:
    """Curves on log-log axes. ``series``: dicts with ``label``, ``x``, ``y`` and optional
    ``color``, ``ls``, ``lw``; zeros (bitwise identical) cannot be drawn on a log axis
    and are marked as ticks along the bottom edge in the curve's colour. ``hlines``:
    (label, y, color or None); ``bands``: dicts with ``label``, ``x``, ``lo``, ``hi``;
    ``x_min``: points left of it are not drawn; ``smooth``: each curve drawn faintly with
    its rolling median (:func:`rolling_median`) on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.transforms as mtransforms
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bottom = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for j, b in enumerate(bands):
        c = b.get("color", colors[j % len(colors)])
        keep = np.asarray(b["x"]) >= (x_min or -np.inf)
        ax.fill_between(np.asarray(b["x"])[keep], np.asarray(b["lo"])[keep], np.asarray(b["hi"])[keep], color=c,
                        alpha=0.25, lw=0, label=b["label"])
    for i, s in enumerate(series):
        c = s.get("color") or colors[(i + len(bands)) % len(colors)]
        x, y = np.asarray(s["x"], float), np.asarray(s["y"], float)
        keep = x >= (x_min or -np.inf)
        x, y = x[keep], y[keep]
        if smooth and x.size > 50:
            ax.plot(x, np.where(y > 0, y, np.nan), color=c, ls=s.get("ls", "-"), lw=0.5, alpha=0.3)
            xm, ym = rolling_median(x, y)
            ax.plot(xm, ym, color=c, ls=s.get("ls", "-"), lw=s.get("lw", 1.1) + 0.6, label=s["label"])
        else:
            ax.plot(x, np.where(y > 0, y, np.nan), color=c, ls=s.get("ls", "-"), lw=s.get("lw", 1.1), label=s["label"])
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=6, ncol=2)
    if smooth:
        note = (note + "; " if note else "") + "thick: rolling median over ±10% of n; faint: every n"
    if note:
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=6, alpha=0.8)
    return _save(fig, path)


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
