"""The order of the report's experiment sections, and the verdict table that opens it.

``paper_sections(quick)`` gives ``(name, fn(lines, outdir))`` pairs that share one
:class:`~collapse_sim.experiments.paper.Context`. The last one writes the comparison,
the disagreements, the signal-below-noise lengths and the theorems, then replaces the
report's placeholder line :data:`VERDICT_MARK` with the verdict table.
"""

from __future__ import annotations

from pathlib import Path

from . import caption_sections as cap
from . import paper
from .paper import FULL, QUICK, Context, Sizes
from .verdicts import VERDICT_MARK, section_noise, section_theorems, verdict_table


def _figure(title: str, paper_says: str, captions_part, decoder_part):
    """A figure's section: the paper's reading, the captions' rows, then the decoder variants."""
    def section(ctx: Context, lines: list[str]) -> None:
        lines += [title, "", paper_says, ""]
        captions_part(ctx, lines)
        decoder_part(ctx, lines)
    return section


section_fig8 = _figure("## Fig. 8: v vs v* (last token repeated), sinusoidal positions",
                       "Paper: one layer, d = 64, the last token copied, lengths 5…10,000; the distance crosses the bf16 "
                       "line near n ≈ 500.", cap.section_fig8_captions, paper.section_fig8)
section_fig10 = _figure("## Fig. 10: positional encodings",
                        "Paper: one layer, d = 64, sinusoidal APE, RoPE, ALiBi and no positions; all cross the bf16 line "
                        "near n ≈ 800–1,000, ALiBi slightly later.", cap.section_fig10_captions, paper.section_fig10)


def finish(ctx: Context, lines: list[str]) -> None:
    section_noise(ctx, lines)
    section_theorems(ctx, lines)
    paper.section_comparison(ctx, lines)
    lines += ["## Where we disagree with the paper, and why", ""]
    for para in [*cap.disagreements(ctx), *paper.disagreements(ctx)]:
        lines += [para, ""]
    path = paper.write_csv(ctx)
    lines += [f"Every pair distance of every run above is in `{path.name}` (columns: experiment, family, "
              "backend, format, n, L1, L∞, bitwise identical, non-finite, equal in exact arithmetic).", ""]
    if VERDICT_MARK in lines:
        i = lines.index(VERDICT_MARK)
        lines[i:i + 1] = verdict_table(ctx)


def paper_sections(quick: bool, sizes: Sizes | None = None):
    """(name, fn(lines, outdir)) for ``reproduce``; the sections share one context.
    ``sizes`` overrides the quick/full sizes (e.g. :data:`paper.TINY` in tests)."""
    state: dict = {}

    def bind(fn):
        def run(lines: list[str], outdir: Path) -> None:
            if "ctx" not in state:
                state["ctx"] = Context(Path(outdir), sizes or (QUICK if quick else FULL), quick)
            fn(state["ctx"], lines)
        return run

    return [("Fig. 8", bind(section_fig8)), ("Fig. 9", bind(paper.section_fig9)), ("Fig. 10", bind(section_fig10)),
            ("copying and counting", bind(paper.section_families)), ("remedies", bind(paper.section_remedies)),
            ("comparison, signal below noise, theorems, verdicts", bind(finish))]
