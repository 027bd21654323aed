"""``collapse-sim reproduce``: run the checks and experiments, write a report.

The report is a Markdown file with figures beside it, in ``--out``. Every
section records how it was computed (backend, policy, versions, flags).
The experiments (:mod:`collapse_sim.experiments.paper`, ``.captions``) measure and
return data; the modules here turn it into words, tables and figures:

* ``basics``: formats, rounding cases, reduction orders;
* ``figures``: Figs. 8, 9, 10, copying and counting, kernels and remedies, accumulators (Markdown and PNG);
* ``verdicts``: signal below rounding noise, the theorems, the verdict table (and its thresholds);
* ``findings``: first-collapse lengths next to the paper, and where we disagree with it.

Every measured unit (each backend's run of each setup, each captions' row, Fig. 9, the
theorems, the basics' tables) is stored under ``--out``/.runs as it finishes
(:class:`collapse_sim.results.UnitStore`): a rerun into the same folder reuses what is
stored and measures only what is missing, so a long run can be interrupted and resumed,
or assembled over several invocations with ``only`` (docs/reproduce.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

#: The measured sections in the order they run: (name for --only, heading). The report places each
#: where its heading belongs (the theorems after the signal-below-noise table).
SECTIONS = [("rounding", "Rounding: known hard cases"), ("sums", "Reduction order"), ("fig8", "Fig. 8"),
            ("fig9", "Fig. 9"), ("fig10", "Fig. 10"), ("families", "Copying and counting"), ("remedies", "Kernels and remedies"),
            ("accumulators", "Accumulators and block-scaled formats"),
            ("theorems", "Theorems")]
NAMES = tuple(name for name, _ in SECTIONS)  # (this module imports no experiment: the CLI lists these names)


def _section_fns() -> dict:
    """Each section's fn(ctx, outdir, lines) by name."""
    from . import basics, figures, verdicts

    def stored_lines(name: str, section):
        """A basics section as a measured unit: its lines, stored under :func:`basics.inputs`."""

        def run(ctx, outdir: Path, lines: list[str]) -> None:
            def measure():
                out: list[str] = []
                section(out)
                return out

            lines += ctx.stored(f"basics: {name}", basics.inputs(name), measure)

        return run

    return {"rounding": stored_lines("rounding", basics.section_rounding), "sums": stored_lines("sums", basics.section_sums),
            "fig8": figures.fig8, "fig9": figures.fig9, "fig10": figures.fig10, "families": figures.families,
            "remedies": figures.remedies, "accumulators": figures.accumulators,
            "theorems": lambda ctx, outdir, lines: verdicts.theorems(ctx, lines)}


def parse_only(text: str) -> list[str]:
    """The section names of ``--only`` (comma-separated), each one of :data:`NAMES`."""
    from ..errors import UsageError

    names = [t.strip() for t in text.split(",")]
    bad = [t for t in names if t not in NAMES]
    if bad or not text.strip():
        raise UsageError(f"--only takes section names from {', '.join(NAMES)}, got {', '.join(map(repr, bad or [text]))}")
    return names


def _not_run(name: str, heading: str, command: str) -> list[str]:
    return [f"## {heading}", "", f"*Not run yet.* `{command} --only {name}` measures it into this folder; the report "
            "then includes it.", ""]


def reproduce(out: str = "collapse-report", quick: bool = False, sizes=None, *, only=None, fresh: bool = False) -> int:
    """Write ``out/report.md`` with its figures and ``collapse.csv``. ``sizes`` (an
    :class:`collapse_sim.experiments.paper.Sizes`) overrides the quick/full sizes.

    Measured units are stored under ``out/.runs`` and reused by a later call with the same
    inputs (``fresh=True`` measures everything again). ``only`` (names of :data:`NAMES`)
    measures those sections only; every other section comes from stored units if they are
    all there, else the report marks it "not run yet"."""
    from .. import enable_x64
    from ..compilation import cache_in_use, snapshot
    from ..experiments import captions as cap
    from ..experiments.paper import FULL, QUICK, Context, log, unit_types
    from ..progress import stage
    from ..results import NotStored, UnitStore, check_output_dir, environment, provenance, write_atomic, write_csv
    from ..plots import drawing_in_background
    from . import basics, findings, verdicts

    only = list(NAMES) if only is None else [n for n in NAMES if n in set(only)]
    outdir = check_output_dir(out, writes=("report.md", "collapse.csv"))
    enable_x64()
    t0 = time.time()
    outdir.mkdir(parents=True, exist_ok=True)
    mode = "quick (smaller lengths and fewer formats; run without --quick for the full sizes)" if quick else "full"
    head = ["# collapse_sim report", "",
            f"Mode: {mode if sizes is None else f'custom sizes, formats run on the {sizes.backend} backend'}.", "",
            verdicts.VERDICT_MARK,
            "Contents: the verdict above; the number formats and their rounding; the paper's synthetic experiments",
            "(Fig. 8, 9, 10: the captions' Gaussian model first, decoders as variants); the copying and counting",
            "families; the remedies; where each format's signal sinks below its rounding noise; the theorems with",
            "their bounds; first-collapse lengths next to the paper's readings; where we disagree with the paper and",
            "why; provenance and wall time. *Emulated* means every operation rounded to the format as IEEE",
            "arithmetic in that format would (docs/semantics.md); the reference is 256-bit arb ball arithmetic",
            "(python-flint).", ""]
    store = UnitStore(outdir / ".runs", types=(*unit_types(), cap.CaptionRow), fresh=fresh, log=log,
                      environment=environment())
    ctx = Context(sizes or (QUICK if quick else FULL), store=store)
    command = f"collapse-sim reproduce{' --quick' if quick else ''} --out {outdir}"
    parts: dict[str, list[str]] = {}
    total = len(SECTIONS) + 2
    before = snapshot()
    with stage("[reproduce]", f"formats (section 1 of {total})"):
        basics.section_formats(formats := [])
    with drawing_in_background() as drawing:  # figures drawn by a second process while the sections compute
        fns = _section_fns()
        for i, (name, heading) in enumerate(SECTIONS, 2):
            parts[name] = []
            store.reuse_only = name not in only
            with stage("[reproduce]", f"{heading} (section {i} of {total})" + ("" if name in only else ", stored units only"),
                       every_thread=True):
                mark = ctx.checkpoint()
                try:
                    fns[name](ctx, outdir, parts[name])
                except NotStored as e:
                    ctx.rollback(mark)
                    parts[name] = _not_run(name, heading, command)
                    log(f"{heading}: not run yet ({e} is not stored)")
                finally:
                    ctx.settle()  # the section's runs two at a time (Context.queue): none outlives it
        store.reuse_only = False
        lines = head + formats + [ln for name in NAMES if name != "theorems" for ln in parts[name]]
        with stage("[reproduce]", f"comparison, signal below noise, verdicts (section {total} of {total})"):
            verdicts.noise(ctx, lines)
            lines += parts["theorems"]
            findings.section(ctx, lines)
            if ctx.csv_rows:
                path = write_csv(outdir / "collapse.csv", ctx.csv_rows)
                lines += [f"Every pair distance of every run above is in `{path.name}` (columns: experiment, family, "
                          "backend, format, n, L1, L∞, bitwise identical, non-finite, equal in exact arithmetic).", ""]
            else:
                (outdir / "collapse.csv").unlink(missing_ok=True)  # no run yet: no table of another run's distances
            i = lines.index(verdicts.VERDICT_MARK)
            lines[i:i + 1] = verdicts.verdict_table(ctx)
        with stage("[reproduce]", "the figures still being drawn"):
            drawing.wait()
    wall = time.time() - t0
    compiled = snapshot().since(before)
    prov = provenance()
    lines += ["## Provenance", "", "```json", json.dumps(prov, indent=1), "```", "",
              f"Wall time ({'quick' if quick else 'full'} run): {wall:.1f} s ({wall / 60:.1f} min) on "
              f"{os.cpu_count()} CPU cores, of which compiling: {compiled.describe()} "
              f"(compilation cache: {cache_in_use() or 'off'}); {store.reused} of {store.reused + store.computed} "
              "measured units reused from earlier runs into this folder.", ""]
    write_atomic(outdir / "report.md", lambda fh: fh.write("\n".join(lines)), text=True)
    print(f"[reproduce] wrote {outdir / 'report.md'} in {wall:.1f} s; {compiled.describe()}; "
          f"{store.reused} stored units reused, {store.computed} measured")
    return 0
