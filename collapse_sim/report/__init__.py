"""``collapse-sim reproduce``: run the checks and experiments, write a report.

The report is a Markdown file with figures beside it, in ``--out``. Every
section records how it was computed (backend, policy, versions, flags).
The experiments (:mod:`collapse_sim.experiments.paper`, ``.captions``) measure and
return data; the modules here turn it into words, tables and figures:

* ``basics``: formats, rounding cases, reduction orders;
* ``figures``: Figs. 8, 9, 10, copying and counting, remedies (Markdown and PNG);
* ``verdicts``: signal below rounding noise, the theorems, the verdict table (and its thresholds);
* ``findings``: first-collapse lengths next to the paper, and where we disagree with it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import basics, figures, findings, verdicts


def _finish(ctx, outdir: Path, lines: list[str]) -> None:
    """The closing sections, the CSV of every pair distance, then the verdict table in place of
    its placeholder at the top."""
    from ..experiments.collapse import write_csv

    verdicts.noise(ctx, lines)
    verdicts.theorems(ctx, lines)
    findings.section(ctx, lines)
    path = write_csv(outdir / "collapse.csv", ctx.csv_rows)
    lines += [f"Every pair distance of every run above is in `{path.name}` (columns: experiment, family, "
              "backend, format, n, L1, L∞, bitwise identical, non-finite, equal in exact arithmetic).", ""]
    if verdicts.VERDICT_MARK in lines:
        i = lines.index(verdicts.VERDICT_MARK)
        lines[i:i + 1] = verdicts.verdict_table(ctx)


#: The experiment sections in report order: (progress name, fn(ctx, outdir, lines)).
SECTIONS = [("Fig. 8", figures.fig8), ("Fig. 9", figures.fig9), ("Fig. 10", figures.fig10),
            ("copying and counting", figures.families), ("remedies", figures.remedies),
            ("comparison, signal below noise, theorems, verdicts", _finish)]


def reproduce(out: str = "collapse-report", quick: bool = False, sizes=None) -> int:
    """Write ``out/report.md`` with its figures and ``collapse.csv``. ``sizes`` (an
    :class:`collapse_sim.experiments.paper.Sizes`) overrides the quick/full sizes."""
    from .. import enable_x64
    from ..compilation import cache_in_use, snapshot
    from ..experiments.paper import FULL, QUICK, Context
    from ..progress import stage
    from ..results import check_output_dir, provenance

    outdir = check_output_dir(out, writes=("report.md", "collapse.csv"))
    enable_x64()
    t0 = time.time()
    outdir.mkdir(parents=True, exist_ok=True)
    mode = "quick (smaller lengths and fewer formats; run without --quick for the full sizes)" if quick else "full"
    lines = ["# collapse_sim report", "",
             f"Mode: {mode if sizes is None else f'custom sizes, formats run on the {sizes.backend} backend'}.", "",
             verdicts.VERDICT_MARK,
             "Contents: the verdict above; the number formats and their rounding; the paper's synthetic experiments",
             "(Fig. 8, 9, 10: the captions' Gaussian model first, decoders as variants); the copying and counting",
             "families; the remedies; where each format's signal sinks below its rounding noise; the theorems with",
             "their bounds; first-collapse lengths next to the paper's readings; where we disagree with the paper and",
             "why; provenance and wall time. *Emulated* means every operation rounded to the format as IEEE",
             "arithmetic in that format would (docs/semantics.md); the reference is 256-bit arb ball arithmetic",
             "(python-flint).", ""]
    ctx = Context(sizes or (QUICK if quick else FULL))
    sections = [("formats", lambda: basics.section_formats(lines)), ("rounding", lambda: basics.section_rounding(lines)),
                ("sums", lambda: basics.section_sums(lines))]
    sections += [(name, lambda fn=fn: fn(ctx, outdir, lines)) for name, fn in SECTIONS]
    before = snapshot()
    for name, run in sections:
        with stage("[reproduce]", f"{name} ({time.time() - t0:.0f} s so far)"):
            run()
    wall = time.time() - t0
    compiled = snapshot().since(before)
    prov = provenance()
    lines += ["## Provenance", "", "```json", json.dumps(prov, indent=1), "```", "",
              f"Wall time ({'quick' if quick else 'full'} run): {wall:.1f} s ({wall / 60:.1f} min) on "
              f"{os.cpu_count()} CPU cores, of which compiling: {compiled.describe()} "
              f"(compilation cache: {cache_in_use() or 'off'}).", ""]
    tmp = outdir / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(outdir / "report.md")
    print(f"[reproduce] wrote {outdir / 'report.md'} in {wall:.1f} s; {compiled.describe()}")
    return 0
