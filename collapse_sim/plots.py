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
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path
