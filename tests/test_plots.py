"""Figures: they draw, their legends name formats (not policy strings), identical points,
eps lines, fp64 kept behind, over-bound points explained, bf16/fp16 marked on the scaling plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from collapse_sim import plots  # noqa: E402
from collapse_sim.experiments.collapse import CollapseResult  # noqa: E402
from collapse_sim.experiments.oversquash import OversquashResult  # noqa: E402
from collapse_sim.formats import parse  # noqa: E402
from collapse_sim.theory.scaling import ScalingResult  # noqa: E402

POLICY = "emulated:storage={f},compute={f},accumulate={f},softmax={f},order=pairwise,mode=rne,max_subtract=true"


def _result(fmt, backend, dist, identical, exact):
    ns = np.arange(1, len(dist) + 1)
    dist = np.asarray(dist, float)
    return CollapseResult(backend, fmt, ns, dist, dist, np.asarray(identical), np.zeros(ns.size, bool), 2.0, 0.0,
                          np.asarray(exact))


def _collapse_results():
    T, F = True, False
    e = [T, F, F, F, F, F]
    return [_result("bf16", POLICY.format(f="bf16"), [0, .3, 0, .1, 0, 0], [T, F, T, F, T, T], e),
            _result("fp16", POLICY.format(f="fp16"), [0, .3, .02, .1, .01, 0], [T, F, F, F, F, T], e),
            _result("fp64", "native:fp64", [1e-16, .3, .02, .1, .01, .005], [F] * 6, e)]


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def _line(fig, label):
    return next(h for h in fig.axes[0].get_lines() if h.get_label() == label)


def test_collapse_figure_legend_markers_eps_and_fp64_behind():
    res = _collapse_results()
    fig = plots.figure_collapse(res, "t")
    try:
        labels = _legend(fig)
        assert not any("storage=" in lab or "compute=" in lab for lab in labels), labels
        for f in ("bf16", "fp16", "fp64"):
            assert any(lab.startswith(f) for lab in labels), (f, labels)
        curves = {r.fmt: _line(fig, lab) for r in res for lab in labels
                  if lab.split(" (")[0] == r.fmt and "eps" not in lab}
        # eps lines: one per format, labelled, in the format's colour, at eps·max|y|
        for r in res:
            eps_line = next(h for h in fig.axes[0].get_lines() if h.get_label().startswith(f"{r.fmt} eps"))
            assert mcolors.same_color(eps_line.get_color(), curves[r.fmt].get_color())
            assert eps_line.get_ydata()[0] == parse(r.fmt).eps * r.scale
        # fp64 thinner and behind the lower-precision curves
        assert curves["fp64"].get_zorder() < curves["bf16"].get_zorder()
        assert curves["fp64"].get_linewidth() < curves["bf16"].get_linewidth()
        # bitwise-identical collapses: a marker per point at the floor, with a legend entry;
        # n = 1 (equal exactly) is drawn apart, not as a collapse
        ident = _line(fig, "bf16: bitwise identical (collapse), drawn at the floor")
        np.testing.assert_array_equal(ident.get_xdata(), [3, 5, 6])
        assert ident.get_marker() == "v" and mcolors.same_color(ident.get_color(), curves["bf16"].get_color())
        exact = _line(fig, "equal in exact arithmetic (no collapse)")
        np.testing.assert_array_equal(exact.get_xdata(), [1])
        assert "fp64: bitwise identical (collapse), drawn at the floor" not in labels
    finally:
        plt.close(fig)


def test_oversquash_figure_distinguishes_formats_and_explains_points_above_the_bound():
    n = 6
    bound = np.full(n, 1.0)
    base = np.linspace(0.2, 0.6, n)
    full = base.copy()
    full[4] = 1.5  # the full model is not covered by Thm 5.1
    prof = {"fp64 (frozen)": base, "fp32 (frozen)": base, "bf16 (frozen)": base * 1.01, "fp16 (frozen)": base,
            "fp64 (full model)": full}
    fig = plots.figure_oversquash(OversquashResult(n, prof, bound))
    try:
        labels = _legend(fig)
        for f in ("fp64", "fp32", "bf16", "fp16"):
            assert f"{f}, frozen attention and norms" in labels
        styles = {(h.get_marker(), h.get_linestyle(), h.get_linewidth()) for h in fig.axes[0].get_lines()
                  if "frozen attention" in h.get_label()}
        assert len(styles) == 4  # no two formats drawn alike
        above = [lab for lab in labels if lab.startswith("above the bound")]
        assert above == ["above the bound at i = 5: full model: outside Thm 5.1 (see note)"]
        assert any("Thm 5.1 bounds the frozen model" in t.get_text() for t in fig.axes[0].texts)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("ps,marked", [(list(range(4, 13)), {"bf16: p = 8", "fp16: p = 11"}),
                                       (list(range(4, 8)), set())])
def test_scaling_figure_marks_bf16_and_fp16(ps, marked):
    meas = [2 ** (p / 2 + 1) for p in ps]
    r = ScalingResult("zero_ones", ps, [int(m) for m in meas], [int(m) for m in meas], 2.0, 0.5, 256)
    fig = plots.figure_scaling(r)
    try:
        labels = set(_legend(fig))
        assert {lab for lab in labels if ": p = " in lab} == marked
        for lab in marked:
            x = _line(fig, lab).get_xdata()[0]
            assert x == parse(lab.split(":")[0]).p
    finally:
        plt.close(fig)


def test_plot_functions_write_pngs(tmp_path):
    n = 4
    paths = [plots.plot_collapse(_collapse_results(), tmp_path / "c.png"),
             plots.plot_oversquash(OversquashResult(n, {"fp64 (frozen)": np.ones(n)}, np.ones(n) * 2),
                                   tmp_path / "o.png"),
             plots.plot_scaling(ScalingResult("ones", [7, 8, 9], [10, None, 40], [9, 20, 41], 2.0, None, 64),
                                tmp_path / "s.png")]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_curves_drawn_in_background_equal_those_drawn_here(tmp_path):
    """Inside drawing_in_background plot_curves returns at once and a second process draws: the
    files are there when the block ends, byte for byte those drawn in this process; a figure
    that fails raises its error when the block ends, and the next block draws again."""
    x = np.arange(1, 200)
    series = [{"label": "bf16", "x": x, "y": np.where(x % 7 == 0, 0.0, 1.0 / x)}, {"label": "fp64", "x": x, "y": 1.0 / x**2}]
    kw = dict(title="t", ylabel="d", hlines=[("eps", 2.0**-8, None)], smooth=True)
    here = plots.plot_curves(series, tmp_path / "here.png", **kw)
    with plots.drawing_in_background() as drawing:
        there = plots.plot_curves(series, tmp_path / "there.png", **kw)
        assert there == tmp_path / "there.png"
        drawing.wait()
        assert there.exists()
        again = plots.plot_curves(series, tmp_path / "again.png", **kw)
    assert here.read_bytes() == there.read_bytes() == again.read_bytes()
    panels = [(f"panel {i}", series[: 1 + i % 2]) for i in range(4)]  # 4 panels on 3 columns: two left empty
    here = plots.plot_panels(panels, tmp_path / "panels_here.png", title="t", ylabel="d", smooth=True)
    with plots.drawing_in_background():
        there = plots.plot_panels(panels, tmp_path / "panels_there.png", title="t", ylabel="d", smooth=True)
    assert here.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and here.read_bytes() == there.read_bytes()
    with pytest.raises(KeyError):
        with plots.drawing_in_background():
            plots.plot_curves([{"x": x, "y": x}], tmp_path / "bad.png", title="no label")
    assert not (tmp_path / "bad.png").exists() and not plots._BACKGROUND
