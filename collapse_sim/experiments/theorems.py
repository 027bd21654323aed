"""Every formal statement on random instances: the report's "Theorems" section.

Each statement of :mod:`collapse_sim.theory` is checked on ``instances`` random cases
(the edge cases first, then plain draws), exactly as ``collapse-sim theorem NAME`` does;
the summary keeps, per statement, how many checks ran, how many failed, and how tight
the bound was (largest observed/bound).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..theory import EDGES, STATEMENTS, Case, Check


def draw_cases(seed: int, instances: int, max_n: int) -> list[Case]:
    """The cases ``collapse-sim theorem`` checks: the plain draw and every edge case first,
    then plain draws; seeds and lengths from one generator."""
    rng = np.random.default_rng(seed)
    edges = [None, *EDGES]
    return [Case(int(rng.integers(2**32)), int(rng.integers(1, max_n + 1)), edges[k] if k < len(edges) else None)
            for k in range(instances)]


@dataclasses.dataclass(frozen=True)
class StatementRun:
    name: str
    title: str
    instances: int
    checks: int
    failed: tuple[Check, ...]
    worst: float  # largest observed/bound over checks with a positive bound (nan if none)

    @property
    def holds(self) -> bool:
        return not self.failed


def run_statement(name: str, cases: list[Case]) -> StatementRun:
    stmt = STATEMENTS[name]
    rows = [c for case in cases for c in stmt.check(case)]
    ratios = [c.tightness for c in rows if not math.isnan(c.tightness)]
    return StatementRun(name, stmt.title, len(cases), len(rows), tuple(c for c in rows if not c.holds),
                        max(ratios) if ratios else math.nan)


def run_all(instances: dict[str, int], max_n: int, seed: int = 0, progress=None) -> list[StatementRun]:
    """Every statement on ``instances[cost]`` cases ("cheap" or "model", see Statement.cost)."""
    out = []
    for name, stmt in STATEMENTS.items():
        cases = draw_cases(seed, instances[stmt.cost], max_n)
        out.append(run_statement(name, cases))
        if progress:
            progress(f"{name}: {out[-1].checks} checks on {len(cases)} instances")
    return out
