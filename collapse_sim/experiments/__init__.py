"""Experiments: sweeps and the paper's figures. Each adds sections to the report."""

from __future__ import annotations


def report_sections(quick: bool) -> list:
    """(name, fn(lines, outdir)) pairs for ``collapse-sim reproduce``."""
    from .paper import paper_sections

    return paper_sections(quick)
