"""Experiments: sweeps and the paper's figures. Each adds sections to the report."""

from __future__ import annotations


def report_sections(quick: bool, sizes=None) -> list:
    """(name, fn(lines, outdir)) pairs for ``collapse-sim reproduce``; ``sizes`` overrides
    the quick/full sizes (:class:`collapse_sim.experiments.paper.Sizes`)."""
    from .sections import paper_sections

    return paper_sections(quick, sizes)
