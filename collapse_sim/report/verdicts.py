"""The report's closing sections and the verdict table that opens it.

* *Signal below rounding noise*: per run and format, the first n (and the n from which
  on) where the exact distance of the pair is at or below the format's rounding error
  on the two outputs (:mod:`collapse_sim.experiments.noise`).
* *Theorems*: every statement on random instances, and Thm 4.2's explicit bound beside
  the measured distance at several n for each positional setup.
* *Verdicts*: each figure and claim, the paper's value, what was measured under each
  reading, and one word, computed from the numbers above with the thresholds below.
"""

from __future__ import annotations

import math

from ..experiments.fits import N_MIN, PAPER_LINE, first_below
from ..experiments.paper import FIG8_SETUPS, Context, median_top, noise_table, run_theorems
from ..experiments.recipes import remedies
from .figures import exact_zero

VERDICT_MARK = "<!-- verdict table -->"
REPRODUCED, PARTLY, NOT_REPRODUCED, UNTESTABLE = "reproduced", "partly", "not reproduced", "not testable here"

#: A crossing within ±25 % of the paper's reading is the same point on its log-scaled axis read by eye.
SAME_READING = 0.25
#: Within a factor 2 the crossing has the paper's order of magnitude but is visibly elsewhere: "partly".
SAME_ORDER = 2.0
#: Separators "work" if they turn an exact-arithmetic tie (or a rounding-level distance) into a distance
#: at least this many times larger: far above any rounding noise of float64 (2^-53 ≈ 1e-16).
SEPARATOR_GAIN = 1e6
#: A baseline distance below this is 0 for the separators' ratio (float64's smallest normal is 2.2e-308).
ZERO_DISTANCE = 1e-300
#: The paper's Fig. 8 reading, and its Fig. 9 and Fig. 10 ranges (the text's "n ≈ ..."), for the verdicts.
PAPER_FIG8_N = 500
PAPER_FIG9_N = (2400, 2500)
PAPER_FIG10_N = (800, 1000)


def separators_work(without: float, with_commas: float) -> bool:
    """Whether commas turn 1^n vs 1^(n+1) from a rounding-level (or exactly zero) float64 distance
    ``without`` into a real one ``with_commas`` (:data:`SEPARATOR_GAIN`)."""
    return with_commas > SEPARATOR_GAIN * max(without, ZERO_DISTANCE) or without == 0 < with_commas


# --- signal below rounding noise ----------------------------------------------------------------
def _cell(sn) -> str:
    first, frm = sn.first_below(N_MIN), sn.below_from(N_MIN)
    if first is None:
        return f"never (n ≤ {int(sn.ns[-1]):,})"
    return f"{first:,}; all from {frm:,}" if frm else f"{first:,}; not all by {int(sn.ns[-1]):,}"


def noise(ctx: Context, lines: list[str]) -> None:
    lines += ["## Signal below rounding noise", "",
              "Three criteria for *collapse*: the paper's (the exact distance falls below the line 2^-7), bitwise identity "
              "of the two outputs in the format, and this one: the exact distance s_n = ‖y_n − y*_(n+1)‖₁ is at or below "
              "e_n = ‖fl(y_n) − y_n‖₁ + ‖fl(y*_(n+1)) − y*_(n+1)‖₁, the error the format's computation put on the two "
              "outputs. While s_n > e_n the two computed outputs are certainly distinct (‖fl(y_n) − fl(y*)‖₁ ≥ s_n − e_n "
              "> 0); once s_n ≤ e_n rounding alone can produce their difference, so no readout of the format's output "
              "tells the inputs apart reliably, whether or not the outputs happen to be identical. Exact values: float64 "
              "(its error, ~2^-53 relative, is far below any format's here); pairs equal in exact arithmetic carry no "
              f"signal and are not counted; n ≥ {N_MIN}.", "",
              "| run | format | first n with signal ≤ noise; from which n on | share of n with signal ≤ noise |",
              "|---|---|---|---|"]
    for run, fmt, sn in noise_table(ctx):
        lines.append(f"| {run} | {fmt} | {_cell(sn)} | {sn.share_below(N_MIN):.0%} |")
    lines.append("")


# --- theorems -----------------------------------------------------------------------------------
def _thm42_rows(setup: str, rows: list[dict]) -> list[str]:
    return [f"| {setup} | {r['n']} | {r['observed']:.3g} | {r['bound']:.3g} | {r['ratio']:.3g} | "
            f"{'met' if r['hypothesis_met'] else 'not met: ' + r['hypothesis']} |" for r in rows]


def theorems(ctx: Context, lines: list[str]) -> None:
    t = run_theorems(ctx)
    lines += ["## Theorems: each bound beside the quantity it bounds", "",
              "Each statement checked on random instances (edge cases first) as `collapse-sim theorem NAME` does; "
              "model quantities measured in the 256-bit reference (proofs/ has the statements as corrected here).", "",
              "| statement | instances | checks | failed | largest observed/bound |", "|---|---|---|---|---|"]
    for r in t.runs:
        worst = "—" if math.isnan(r.worst) else f"{r.worst:.3g}"
        lines.append(f"| {r.title} | {r.instances} | {r.checks} | {len(r.failed) or 0} | {worst} |")
    lines.append("")
    head = ["| setup | n | observed | bound | observed/bound | hypothesis |", "|---|---|---|---|---|---|"]
    lines += [f"### Thm 4.2: the explicit bound beside the measured distance (d = {t.d}, one layer)", "",
              "‖y_n − y*_(n+1)‖₂ in 256-bit arithmetic against the layer-wise bound of proofs/thm42_collapse.md. "
              "A bound that cannot become small is no check of collapse: the last column says when the model is "
              "outside the theorem's hypothesis (positional information that decays with distance).", "",
              "The decoder (seed 0, random tokens):", "", *head]
    for setup, rows in t.decoder.items():
        lines += _thm42_rows(setup, rows)
    lines += ["", f"The captions' Gaussian model (d = {t.d}, seed 0, fresh ids 0..n−1; proofs/thm42_collapse.md, "
              "\"Gaussian model\"):", "", *head]
    for setup, rows in t.captions.items():
        lines += _thm42_rows(setup, rows)
    lines.append("")


# --- verdicts -----------------------------------------------------------------------------------
def _within(x: float | None, lo: float, hi: float, slack: float) -> bool:
    return x is not None and lo * (1 - slack) <= x <= hi * (1 + slack)


def _word_for_crossing(best: float | None, lo: float, hi: float) -> str:
    if _within(best, lo, hi, SAME_READING):
        return REPRODUCED
    if best is not None and lo / SAME_ORDER <= best <= hi * SAME_ORDER:
        return PARTLY
    return NOT_REPRODUCED


def fig9_word(fig9) -> str:
    """Fig. 9's verdict: every seed's float64 δ crosses 2^-7 within :data:`SAME_READING` of the
    paper's 2,400–2,500; some seed crosses elsewhere: partly; none crosses: not reproduced."""
    bf = [c.get("bf16") for c in fig9.cross]
    if all(bf) and all(_within(b, *PAPER_FIG9_N, SAME_READING) for b in (min(bf), max(bf))):
        return REPRODUCED
    return PARTLY if any(bf) else NOT_REPRODUCED


def _crossing(row) -> float | None:
    """Where a captions' row reaches 2^-7: its decay fit's crossing if the fit decays, else the
    first n its mean curve is below the line."""
    f = row["fp64"]
    return f.fit_crossing if f.fit_crossing is not None else f.first_below


def _n(v) -> str:
    return "never" if v is None else f"{v:,.0f}"


def verdicts(ctx: Context) -> list[tuple[str, str, str, str, str]]:
    """(claim, paper, measured, verdict, section anchor) rows."""
    F, out = ctx.findings, []
    cap = F.get("captions", {})
    if cap:
        keys, qk = cap["sinusoidal on keys"], cap["sinusoidal on queries and keys"]
        best = _crossing(keys)
        measured = (f"captions' model: sinusoidal on keys reaches 2^-7 at n ≈ {_n(_crossing(keys))} (its mean curve "
                    f"first below it: {_n(keys['fp64'].first_below)}), on q and k {_n(_crossing(qk))}")
        dec = [F[("fig8", ape)]["fp64"] for _, o in FIG8_SETUPS for ape in [o["ape"]] if ("fig8", ape) in F]
        if dec:
            measured += "; decoder variants: " + ", ".join(_n(first_below(r.ns, r.l1, PAPER_LINE)) for r in dec)
        out.append(("Fig. 8: v vs v* reaches the bf16 line", "n ≈ 500", measured,
                    _word_for_crossing(best, PAPER_FIG8_N, PAPER_FIG8_N), "#fig-8-v-vs-v-last-token-repeated-sinusoidal-positions"))
    fig9 = F.get("fig9")
    if fig9 is not None:
        bf = [c.get("bf16") for c in fig9.cross]
        lo, hi = (min(b for b in bf if b), max(b for b in bf if b)) if any(bf) else (None, None)
        out.append(("Fig. 9: softmax δ reaches the bf16 line", "n ≈ 2,400–2,500; δ(500) ≈ 0.026",
                    f"n = {_n(lo)}–{_n(hi)} over seeds; δ(500) = {fig9.at500.min():.3f}–{fig9.at500.max():.3f}"
                    if fig9.at500 is not None and lo else "—", fig9_word(fig9), "#fig-9-softmax-total-variation-with-the-first-k-200-entries-perturbed"))
    if cap:
        schemes = {"no positions": ["no PE"], "RoPE": ["RoPE"],
                   "sinusoidal": ["sinusoidal on keys", "sinusoidal on queries and keys"],
                   "ALiBi": [k for k in cap if k.startswith("ALiBi")]}
        hit = {s: [lab for lab in labs if _within(_crossing(cap[lab]), *PAPER_FIG10_N, SAME_READING)] for s, labs in schemes.items()}
        n_hit = sum(bool(v) for v in hit.values())
        word = REPRODUCED if n_hit == len(schemes) else (PARTLY if n_hit else NOT_REPRODUCED)
        measured = "; ".join(f"{lab}: {_n(_crossing(cap[lab]))}" for lab in cap)
        out.append(("Fig. 10: every positional encoding reaches the bf16 line", "n ≈ 800–1,000, ALiBi slightly later",
                    f"captions' model: {measured}", word, "#fig-10-positional-encodings"))
    ones = [(s, F[("family", "ones", s)]) for s in ("no positions",) if ("family", "ones", s) in F]
    if ones:
        s, res = ones[0]
        exact0 = exact_zero(res)
        share = res["bf16"].identical_share(N_MIN) if "bf16" in res else float("nan")
        out.append(("Counting (Prop. B.9): 1^n and 1^(n+1) are identical without positions", "identical",
                    f"256-bit reference distance {'0 (below 2^-200) at every n' if exact0 else 'non-zero'}; bf16 bitwise "
                    f"identical for {share:.0%} of n", REPRODUCED if exact0 else NOT_REPRODUCED, "#copying-and-counting"))
    cb = [F[k] for k in F if isinstance(k, tuple) and k[:2] == ("family", "count_bernoulli")]
    if cb:
        hits = [r["bf16"].first_collapse() for r in cb if "bf16" in r]
        found = [h for h in hits if h is not None]
        out.append(("Cor. B.10: finite precision gives some count the wrong answer", "for large enough n",
                    f"count_bernoulli: bf16 outputs identical while the counts differ exactly from n = {min(found):,}"
                    if found else "no bitwise-identical pair of different counts in this range",
                    REPRODUCED if found else NOT_REPRODUCED, "#copying-and-counting"))
    last = [F[k] for k in F if isinstance(k, tuple) and k[:2] == ("family", "last_copy")]
    out.append(("Copying: the last digit of 1…10 fails from length ~300", "Gemini 1.5 / Gemma 7B observations",
                f"synthetic one-layer models: float64 median distance ≥ {min(median_top(r['fp64']) for r in last):.2g}, "
                "no collapse" if last else "—", UNTESTABLE, "#copying-and-counting"))
    rem = {k[1:]: v for k, v in F.items() if isinstance(k, tuple) and k[0] == "remedy"}
    if rem:
        names = [r[0] for r in remedies(ctx.sizes)]
        base, sep = names[0], names[1]
        if (base, "ones") in rem and (sep, "ones") in rem:
            b, s = median_top(rem[(base, "ones")]["fp64"]), median_top(rem[(sep, "ones")]["fp64"])
            ok = separators_work(b, s)
            out.append(("Remedy: separators (commas every 3 digits) keep counts apart", "commas keep ‖v − v*‖ ≈ 1.5 in Gemma",
                        f"1^n vs 1^(n+1), float64 median distance {b:.2g} without, {s:.2g} with commas",
                        REPRODUCED if ok else NOT_REPRODUCED, "#remedies"))
    th = F.get("theorems", {})
    t42 = F.get("thm42_table", {})
    for name, claim, paper in [("thm42", "Thm 4.2: representational collapse", "‖v_n − v*_(n+1)‖ → 0 (no rate)"),
                               ("thm51", "Thm 5.1: sensitivity ≤ path sum", "bound, no constants"),
                               ("b4", "Prop. B.4: alternating logits do not collapse", "δ → 2(e−1)/(e+1)"),
                               ("b8", "Prop. B.8: deep stacks see the first token", "→ 0 geometrically"),
                               ("b9", "Prop. B.9: one layer without positions sees count ratios only", "identical")]:
        r = th.get(name)
        if r is None:
            continue
        measured = f"bound holds in {r.checks} checks on {r.instances} instances" if r.holds else \
            f"**{len(r.failed)} of {r.checks} checks fail**"
        if name == "thm42" and t42:
            met = {s: rows[-1]["ratio"] for s, rows in t42.items() if rows[-1]["hypothesis_met"]}
            measured += "; observed/bound at the largest n: " + ", ".join(f"{s} {v:.2g}" for s, v in met.items()) + \
                " (setups outside the hypothesis: " + ", ".join(s for s, rows in t42.items() if not rows[-1]["hypothesis_met"]) + ")"
        out.append((claim, paper, measured, REPRODUCED if r.holds else NOT_REPRODUCED,
                    "#theorems-each-bound-beside-the-quantity-it-bounds"))
    return out


def verdict_table(ctx: Context) -> list[str]:
    rows = verdicts(ctx)
    counts = {w: sum(r[3] == w for r in rows) for w in (REPRODUCED, PARTLY, NOT_REPRODUCED, UNTESTABLE)}
    lines = ["## Verdict", "",
             "Each figure and claim of the paper, its value there, what this run measured (the captions' Gaussian model is "
             "the primary reading of Figs. 8 and 10; decoders are variants), and one word. Thresholds: a crossing within "
             f"±{SAME_READING:.0%} of the paper's reading is *reproduced*, within a factor {SAME_ORDER:g} *partly*. "
             + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ".", "",
             "| claim | paper | measured | verdict |", "|---|---|---|---|"]
    for claim, paper, measured, word, anchor in rows:
        lines.append(f"| [{claim}]({anchor}) | {paper} | {measured} | **{word}** |")
    return lines + [""]
