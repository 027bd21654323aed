"""The report's comparison with the paper and the paragraphs on where we disagree with it.

Every paragraph cites numbers measured in this run (:class:`collapse_sim.experiments.paper.Context`);
the words it chooses (agrees, close to 1/n, no decay, ...) follow from the thresholds below.
"""

from __future__ import annotations

import numpy as np

from ..experiments import captions as cap
from ..experiments.fits import N_MIN, PAPER_LINE, first_below
from ..experiments.paper import FAMILY_SETUPS, FIG8_SETUPS, FIG10_SETUPS, REF, Context, median_top
from ..experiments.recipes import remedies
from .figures import exact_zero, fmt_n
from .verdicts import REPRODUCED, fig9_word, separators_work

#: A float64 decay fitted at or below this slope is read as the 1/n of Lemma B.1 (one decade of a 1/n
#: curve fitted with its rounding-level wiggles stays within 0.2 of the slope −1).
NEAR_ONE_OVER_N = -0.8
#: A slope above this is no decay: over the fitted decade the distance shrinks by less than 10^0.2 ≈ 1.6.
DECAYS = -0.2
#: "Mostly identical": bitwise identical for more than half of the lengths.
MOSTLY = 0.5


# --- comparison with the paper and the disagreements --------------------------------------------
def comparison(ctx: Context, lines: list[str]) -> None:
    lines += ["## First-collapse lengths next to the paper", "",
              "The paper reads a collapse length where the exact-arithmetic distance crosses the bf16 line 2^-7; "
              "the format's own criterion is bitwise identity of the two outputs computed in bf16. Both are here, "
              "with the float64 decay fitted over the last decade of n and extrapolated to the line.", "",
              "| figure | setup | paper (bf16) | float64 ‖·‖₁ first below 2^-7 | float64 ‖·‖∞ first below 2^-7 | "
              f"float64 ‖·‖₁ decay, extrapolated to 2^-7 | bf16: first identical (n ≥ {N_MIN}) | "
              "bf16: identical for every n from | bf16: smallest ‖·‖₁ |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in ctx.comparison:
        n = c["n_max"]
        model = c["experiment"] != "Fig. 9"
        cross = fmt_n(c["cross_l1"], n)
        if not model:
            cross = (f"{c['cross_l1']:,} – {c['cross_l1_hi']:,} (over seeds; δ = Σ|·|)" if c.get("cross_l1_hi")
                     else f"not by {n:,} in every seed")
        fit = c.get("fit")
        fit_txt = "—" if fit is None else (
            f"n^{fit.slope:+.2f}; {fit.reach_text()}")
        cells = [fmt_n(c[k], n) if model else "—" for k in ("cross_linf",)] + [fit_txt] + \
                [fmt_n(c[k], n) if model else "—" for k in ("bf16_first", "bf16_from")]
        floor = f"{c['bf16_floor']:.3g}" if c["bf16_floor"] is not None else "—"
        lines.append(f"| {c['experiment']} | {c['setup']} | {c['paper']} | {cross} | " + " | ".join(cells) + f" | {floor} |")
    lines.append("")


def _pe_step_norm(d: int = 64) -> float:
    """‖PE[n+1] − PE[n]‖₂ of the sinusoidal table: the same for every n."""
    from ..positional import sinusoidal

    pe = sinusoidal(2, d)
    return float(np.linalg.norm(pe[1] - pe[0]))


_RUN_KIND = {"fig8": "Fig. 8", "fig10": "Fig. 10", "family": "family", "remedy": "remedy"}


def _run_label(key: tuple) -> str:
    """A findings key as the report names the run: ("fig8", "residual") -> "Fig. 8, residual"."""
    return f"{_RUN_KIND.get(key[0], key[0])}, " + " / ".join(str(k) for k in key[1:])


def disagreements(ctx: Context) -> list[str]:
    """One paragraph per disagreement (or agreement) with the paper, each citing the
    numbers measured in this run."""
    out: list[str] = []
    F = ctx.findings
    rows = {(c["experiment"], c["setup"]): c for c in ctx.comparison}

    fig9 = F.get("fig9")
    if fig9 is not None:
        bf = [c.get("bf16") for c in fig9.cross]
        span = f"{min(b for b in bf if b):,}–{max(b for b in bf if b):,}" if all(bf) else "beyond N in some seed"
        at500 = fig9.at500
        close = fig9_word(fig9) == REPRODUCED
        out.append(f"**Fig. 9 (softmax only) {'agrees' if close else 'disagrees'}.** Float64 δ at n = 500 is {at500.min():.4f}–{at500.max():.4f} over "
                   f"the seeds (paper ≈ 0.026) and falls below 2^-7 at n = {span} (paper ≈ 2,400–2,500). One wording "
                   "difference: the paper calls δ a total variation, but its numbers are Σ|p − q|, twice the usual "
                   "total variation distance; with the factor ½ the crossing would move to about half the length.")

    for label, over in FIG8_SETUPS:
        ape = over["ape"]
        res = F.get(("fig8", ape))
        if res is None:
            continue
        c = rows[("Fig. 8", f"decoder: {label}")]
        fit, n = c["fit"], int(res["fp64"].ns[-1])
        crossed = c["cross_l1"] is not None
        head = (f"**Fig. 8, {label}: "
                + ("crosses the bf16 line" if crossed else "no collapse") + f" by n = {n:,}** (paper ≈ 500). ")
        why = (f"Float64 ‖·‖₁ ≈ {fit.const:.3g}·n^{fit.slope:+.2f} over the last decade, "
               f"its smallest value at n ≥ {N_MIN} is {np.min(res['fp64'].l1[res['fp64'].ns >= N_MIN]):.3g}. ")
        if ape == "residual":
            why += (f"The last token of v sits at position n and that of v* at n+1, so the residual streams differ by "
                    f"PE[n+1] − PE[n], whose norm is {_pe_step_norm():.3g} for every n: nothing in the model can make "
                    "the outputs converge. Theorem 4.2 needs positional information that decays; an absolute "
                    "encoding added to the last token does not.")
        else:
            why += ("Without positions in the residual the last tokens agree, but the query of v* is formed at "
                    "position n+1: every score moves by W_q(PE[n+1] − PE[n])·k_j, an O(1) change that does not "
                    "shrink with n, so the two attention distributions need not converge, and the fitted decay is far "
                    "from the 1/n of Lemma B.1. The paper does not say where its sinusoidal encodings enter.")
        out.append(head + why)

    fig10 = [(setup, F[("fig10", setup)]) for setup, _ in FIG10_SETUPS if ("fig10", setup) in F]
    if fig10:
        parts = []
        for setup, res in fig10:
            c = rows[("Fig. 10", f"decoder: {setup}")]
            fit = c["fit"]
            parts.append(f"{setup}: n^{fit.slope:+.2f}, "
                         + (f"‖·‖₁ below 2^-7 from n = {c['cross_l1']:,}" if c["cross_l1"] else
                            (f"extrapolated to 2^-7 near {fit.reach_text()}" if fit.reaches(PAPER_LINE) else "no decay"))
                         + (f", ‖·‖∞ below it from n = {c['cross_linf']:,}" if c["cross_linf"] else ""))
        slopes = {setup: rows[("Fig. 10", f"decoder: {setup}")]["fit"].slope for setup, _ in fig10}
        fast = [k for k, v in slopes.items() if v <= NEAR_ONE_OVER_N]
        slow = [k for k, v in slopes.items() if NEAR_ONE_OVER_N < v <= DECAYS]
        flat = [k for k, v in slopes.items() if not v <= DECAYS]
        text = ("**Fig. 10: the paper has all four curves crossing the bf16 line near n ≈ 800–1,000.** Measured "
                "(float64, L1): " + "; ".join(parts) + ".")
        if fast:
            text += (f" Close to the 1/n of Lemma B.1: {', '.join(fast)}. The constant in front is set by the width, "
                     "the initial scales and the norm, which the paper does not give; the L1 norm over 64 components "
                     "is up to 64× the L∞ norm, which alone moves a 1/n crossing by up to that factor.")
        if slow:
            text += f" Slower than 1/n over this range: {', '.join(slow)}."
        if flat:
            text += f" No decay: {', '.join(flat)}."
        if slow or flat:
            why = []
            if any("RoPE" in k for k in slow + flat):
                why.append("RoPE scores keep relative-position structure at every distance (its rotations do not "
                           "make far keys uniform; see *Round and Round We Go!*)")
            if any("ALiBi" in k for k in slow + flat):
                why.append("one ALiBi head has slope 2^-8, so a key 1,000 tokens back loses a factor e^-3.9: attention "
                           "becomes local, and the repeated token keeps a weight of order one over that window "
                           "instead of 1/n")
            if any("sinusoidal" in k for k in slow + flat):
                why.append("sinusoidal positions do not decay (Fig. 8)")
            text += " Why: " + "; ".join(why) + "."
        out.append(text)

    after = []  # v vs v* runs whose float64 distance crossed 2^-7: how often is bf16 identical beyond?
    for key, res in F.items():
        if isinstance(key, tuple) and key[0] in ("fig8", "fig10") and "bf16" in res:
            f64, r = res["fp64"], res["bf16"]
            cross = first_below(f64.ns, f64.l1, PAPER_LINE)
            if cross is None:
                continue
            beyond = r.ns >= cross
            share = r.identical_share(cross)
            after.append(f"{_run_label(key)}: float64 ‖·‖₁ first below 2^-7 at n = {cross:,}; beyond it bf16 is bitwise "
                         f"identical for {share:.0%} of n, with median bf16 ‖·‖₁ {np.median(r.l1[beyond]):.3g} against "
                         f"float64's {np.median(f64.l1[beyond]):.3g}")
    if after:
        out.append("**Crossing the line is not bitwise identity.** " + "; ".join(after) + ". Below the line the two "
                   "outputs are still computed along different paths (sums over n and n+1 terms) whose rounding "
                   "errors differ, so often one of the 64 components lands on a neighbouring bf16 value: the bf16 "
                   "distance hovers near the format's spacing at the outputs' scale instead of settling at 0. The "
                   "paper's reading (exact distance below the line) is necessary for identity, not sufficient.")

    nonfinite = {}
    for key, res in F.items():
        if isinstance(key, tuple) and "e4m3fn" in res and res["e4m3fn"].nonfinite.any():
            nonfinite[_run_label(key)] = int(res["e4m3fn"].nonfinite.sum())
    if nonfinite:
        worst = sorted(nonfinite.items(), key=lambda kv: -kv[1])[:3]
        out.append(f"**fp8 (e4m3fn) overflows.** {len(nonfinite)} of the e4m3fn runs produced NaN outputs (most: "
                   + "; ".join(f"{k}, {v:,} lengths" for k, v in worst) + "). The format has no infinity and its "
                   "largest value is 448, so a softmax denominator or a LayerNorm sum of squares above it is NaN "
                   "(Fig. 9 shows the denominator crossing 448 at n ≈ 800 even for inputs in [0, 1]). These cells are "
                   "marked non-finite, never counted as identical; an fp8 model in practice accumulates in a wider "
                   "format (e.g. `storage=e4m3fn,accumulate=fp32`).")

    ones = [(setup, F[("family", "ones", setup)]) for setup, _ in FAMILY_SETUPS if ("family", "ones", setup) in F]
    exact = [(s, r) for s, r in ones if exact_zero(r)]
    if exact:
        bits = []
        for setup, res in exact:
            bits.append(f"{setup}: bf16 identical for {res['bf16'].identical_share(N_MIN):.0%} of n")
        out.append("**Counting: exact collapse, but rounding breaks the tie.** `1^n` vs `1^(n+1)` is identical in exact "
                   "arithmetic (the 256-bit reference gives distance 0) whenever positions stay out of the values: "
                   + ", ".join(s for s, _ in exact) + " (Prop. B.9; whatever the weights, all values are equal and "
                   "the weights sum to 1). In a format the weights sum to 1 only up to rounding, and that error depends on "
                   "n: " + "; ".join(bits) + ". The representations differ, but by rounding noise that does not encode "
                   "the count, so the paper's conclusion (counting is impossible) stands; its word *identical* holds "
                   "in exact arithmetic, not bit for bit.")
    last = [F[k] for k in F if isinstance(k, tuple) and k[:2] == ("family", "last_copy")]
    if last:
        lo = min(median_top(r["fp64"]) for r in last)
        out.append(f"**Copying the last token does not collapse here** (float64 median ‖·‖₁ ≥ {lo:.3g}). The last token "
                   "is 0 in one input and 1 in the other and reaches the output through the residual stream of a "
                   "one-layer model; the paper's failures from length ~300 are Gemini/Gemma observations, not a "
                   "synthetic claim, and need depth or attention that overrides the residual.")

    rem = {k[1:]: v for k, v in F.items() if isinstance(k, tuple) and k[0] == "remedy"}
    if rem:
        def med(name, fam):
            return median_top(rem[(name, fam)]["fp64"]) if (name, fam) in rem else float("nan")
        names = [r[0] for r in remedies(ctx.sizes)]
        base, sep, win, sm = names[0], names[1], names[2], names[3]
        said = []
        if separators_work(med(base, "ones"), med(sep, "ones")):
            said.append(f"Separators every 3 tokens turn `1^n` vs `1^(n+1)` from identical in exact arithmetic (float64 "
                        f"median {med(base, 'ones'):.2g}, rounding only) into distinct inputs ({med(sep, 'ones'):.2g}): "
                        "the commas' values differ from the ones' and their share depends on n mod 3, the mechanism "
                        "the paper saw in Gemma.")
        else:
            said.append(f"Separators every 3 tokens leave `1^n` vs `1^(n+1)` at float64 median {med(sep, 'ones'):.2g} "
                        f"(without: {med(base, 'ones'):.2g}).")
        said.append(f"A sliding window puts v vs v* at {med(win, 'repeat_last'):.2g} (without: {med(base, 'repeat_last'):.2g})"
                    + (", because the repeated token's weight no longer shrinks with n" if med(win, "repeat_last") >
                       med(base, "repeat_last") else "")
                    + f", and `1^n` vs `1^(n+1)` at {med(win, 'ones'):.2g}: inside a window every `1^n` looks the same, "
                    "so a window cannot help counting.")
        key = (sm, "ones")
        if key in rem:
            pol = next(k for k in rem[key] if k not in ("fp64", REF))
            sh = rem[key][pol].identical_share(N_MIN)
            said.append(f"With an fp32 softmax in a bf16 model, `1^n` vs `1^(n+1)` is bitwise identical for {sh:.0%} of n"
                        + (": less rounding noise in the weights brings back the exact-arithmetic identity, which "
                           "hurts counting." if sh > MOSTLY else "."))
        out.append("**Remedies.** " + " ".join(said))
    return out



def caption_disagreements(ctx: Context) -> list[str]:
    """Paragraphs on the captions' reading of Figs. 8 and 10, citing this run's numbers."""
    data = ctx.findings.get("captions")
    if not data:
        return []
    out = []

    def reach(label):
        f = data[label]["fp64"]
        return f.fit_crossing if f.fit_crossing is not None else None

    keys, qk = data["sinusoidal on keys"]["fp64"], data["sinusoidal on queries and keys"]["fp64"]
    out.append(
        f"**Fig. 8, captions' reading: the crossing is near {_fmt_reach(reach('sinusoidal on keys'))}, not ≈ 500.** With "
        f"q, k, v ~ N(0, I/{cap.D}) and the sinusoidal table on the keys, the float64 mean of {len(keys.seeds)} seeds decays as "
        f"{keys.coefficient:.3g}·n^{keys.exponent:+.2f} (fit over n = {keys.fit_window[0]:,}..{keys.fit_window[1]:,}) and its "
        f"fit meets 2^-7 at n ≈ {_fmt_reach(reach('sinusoidal on keys'))} (the mean curve first dips below at "
        f"{fmt_n(keys.first_below, keys.n_max)}). On queries and keys the scores of v and v* differ by the query's step "
        f"PE[n+1] − PE[n], which does not shrink: {qk.coefficient:.3g}·n^{qk.exponent:+.2f}, "
        f"{'never reaching the line here' if qk.first_below is None else f'first below at {qk.first_below:,}'}. The "
        "1/n rate is Lemma B.1's (the repeated position's weight is ~1/n), and its constant is fixed by d, the "
        "variance and the norm: for this curve to cross at 500 its constant would have to be "
        f"{_share_for(500, reach('sinusoidal on keys'), keys.exponent)} of the measured one (the L∞ norm instead of L1 "
        "moves the crossing by up to a factor d, another variance changes how sharp the attention is). The paper does not give the variance, the normalisation or where the "
        "encodings enter, so its ≈ 500 cannot be matched from the caption alone; everything else in the figure (1/n "
        "decay, a crossing of the order of several hundred) is reproduced.")
    decaying = [lab for lab in ("no PE", "RoPE", "sinusoidal on keys") if lab in data]
    alibi = [lab for lab in data if lab.startswith("ALiBi")]
    out.append(
        "**Fig. 10, captions' reading: reproduced for no positions, RoPE and keys-only sinusoidal.** Fits meet 2^-7 at "
        + ", ".join(f"{lab} n ≈ {_fmt_reach(reach(lab))}" for lab in decaying)
        + " (paper: 800–1,000). ALiBi depends on the slope and where it is added: "
        + "; ".join(f"{lab}: {data[lab]['fp64'].coefficient:.3g}·n^{data[lab]['fp64'].exponent:+.2f}, "
                    + ("never below the line" if data[lab]["fp64"].first_below is None
                       else f"first below at {data[lab]['fp64'].first_below:,}") for lab in alibi)
        + ". A slope of 2^-8 on the scaled score makes attention local (a key 1,000 back loses e^-3.9), so the "
        "repeated position keeps an O(1) weight and the distance stays flat; the same slope added before the 1/√d "
        "scale is 8× weaker and the curve crosses slightly later than the others, as the paper draws it.")
    return out


def _share_for(target: float, reach: float | None, slope: float) -> str:
    """The factor on C that moves the crossing of C·n^slope from ``reach`` to ``target``."""
    return "—" if reach is None else f"{(target / reach) ** -slope:.0%}"


def _fmt_reach(v: float | None) -> str:
    return "never" if v is None else f"{v:,.0f}"


def section(ctx: Context, lines: list[str]) -> None:
    """The comparison table, then every disagreement paragraph (the captions' reading first)."""
    comparison(ctx, lines)
    lines += ["## Where we disagree with the paper, and why", ""]
    for para in [*caption_disagreements(ctx), *disagreements(ctx)]:
        lines += [para, ""]
