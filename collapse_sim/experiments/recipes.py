"""The report's recipes, measured: attention kernels, accumulator models, remedies.

``run_policies`` runs v vs v* (the captions' Gaussian model and a RoPE decoder) and a counting
family (:data:`RECIPE_RUNS`) under each policy of a list: the attention recipes of
:data:`KERNELS` (docs/semantics.md §8.8) and the accumulator models of :data:`ACCUMULATORS` (§3.4);
``start_remedies`` queues the copying and counting families under each remedy of :func:`remedies`
(§8.7, separators, windows, fp32 softmax) and returns the function that gives them. Both give data, each run stored as a unit of the
report (:meth:`collapse_sim.experiments.paper.Context.stored`); :mod:`collapse_sim.report.figures`
writes the tables, sentences and figures.
"""

from __future__ import annotations

from ..model import gaussian_config, init_params
from .collapse import CollapseResult
from .paper import Context, Sizes, report_model, start_backends

# --- remedies -----------------------------------------------------------------------------------
REMEDY_FAMILIES = [("repeat_last", "v vs v*"), ("last_copy", "copy last"), ("ones", "count ones"),
                   ("count_bernoulli", "count Bernoulli ones")]


SSMAX_S = 0.5  # Scalable-Softmax's s for the report: scores ×3.8 at n = 2,000 (untrained models: the mechanism only)
P_ROPE = 0.25  # p-RoPE's share of rotating frequencies, the value "Round and Round We Go!" recommends

REMEDY_MECHANISMS = {  # one sentence per remedy row: why it could change collapse
    "commas every 3 tokens": "separators break the repeated run, so the last tokens' weights are not all alike",
    "sliding window": "a query sees at most w keys, so the repeated token's weight stays ~1/w instead of ~1/n",
    "fp32 softmax (bf16 storage)": "the softmax's sum and weights keep 24 bits, so small weight differences survive",
    "fp32 throughout": "every op keeps 24 bits: the distance must fall 2^16 times lower before it is lost",
    "p-RoPE": "only the highest RoPE frequencies rotate, the rest of q·k ignores position",
    "Scalable-Softmax": "scores grow with s·ln n, so the softmax stays sharp as n grows instead of flattening to ~1/n",
    "sink token": "a fixed first token can absorb attention, so the last token's share need not shrink like 1/n",
    "adaptive temperature": "a row whose weights' entropy H exceeds 0.5 has its scores multiplied by max(poly(H), 1) "
                            "and its softmax taken again; the printed polynomial exceeds 1 only for 0.85 < H < 5.94, "
                            "so a row spread evenly over more than ~381 keys (H > 5.94) is left as it is",
}


def remedies(sz: Sizes):
    """(name, model overrides, separator spacing, emulated policy)."""
    return [("bf16 (baseline)", {}, None, "bf16"),
            ("commas every 3 tokens", {}, 3, "bf16"),
            (f"sliding window {sz.window}", dict(window=sz.window), None, "bf16"),
            ("fp32 softmax (bf16 storage)", {}, None, "storage=bf16,compute=bf16,accumulate=fp32,softmax=fp32"),
            ("fp32 throughout", {}, None, "fp32"),
            (f"p-RoPE, a share {P_ROPE} of the frequencies", dict(rope_fraction=P_ROPE), None, "bf16"),
            (f"Scalable-Softmax, s = {SSMAX_S}", dict(ssmax=SSMAX_S), None, "bf16"),
            ("sink token", dict(sink=True), None, "bf16"),
            ("adaptive temperature", dict(adaptive_temperature=True), None, "bf16")]


def remedy_mechanism(name: str) -> str | None:
    """The sentence of :data:`REMEDY_MECHANISMS` for a row name (names carry their parameters)."""
    return next((v for k, v in REMEDY_MECHANISMS.items() if name.startswith(k)), None)


def start_remedies(ctx: Context):
    """The remedies' runs queued (:func:`start_backends`); returns the function that waits for them and gives
    (remedy, its emulated policy, [(family, runs, the policy's SignalNoise)]) on a RoPE decoder, for every remedy."""
    sz = ctx.sizes
    rows = remedies(sz)
    started = {}
    for name, over, sep, pol in rows:
        params = report_model(pe="rope", **over)
        same_model = [p for _, o, _, p in rows if o == over]
        for fam, _ in REMEDY_FAMILIES:
            started[name, fam] = start_backends(ctx, params, fam, sz.remedy_n, [pol], tag=f"remedy {name}, {fam}",
                                                sep=sep, ref=False, share_with=same_model)

    def finish() -> list[tuple[str, str, list[tuple[str, dict[str, CollapseResult], object]]]]:
        out = []
        for name, over, sep, pol in rows:
            runs = []
            for fam, _ in REMEDY_FAMILIES:
                tag = f"remedy {name}, {fam}"
                res = started[name, fam]()
                ctx.findings[("remedy", name, fam)] = res
                runs.append((fam, res, ctx.noise[tag][pol]))
            out.append((name, pol, runs))
        return out

    return finish


# --- kernels ------------------------------------------------------------------------------------
#: The policy that the FlashAttention recipes run under: bf16 tensors, fp32 arithmetic, as the kernels keep them.
BF16_FP32 = "storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32"
KERNEL_BLOCK = 64  # key block of the recipes (FlashAttention-2's B_c for d = 64 on most GPUs is 64 or 128)

#: (name, emulated policy, why it could change collapse): the recipes of docs/semantics.md §8.8, each
#: next to the op-by-op softmax of the same formats.
KERNELS = [
    ("bf16, naive softmax", "bf16", "every op rounded to bf16 in the textbook order: the report's baseline"),
    (f"bf16, online softmax, blocks of {KERNEL_BLOCK}", f"compute=bf16,kernel=online({KERNEL_BLOCK})",
     "a running maximum and sum over key blocks: the sum is rescaled in bf16 at every block whose maximum grows, "
     "and the weights are divided by the sum only at the end"),
    ("bf16 storage, fp32 arithmetic, naive", BF16_FP32,
     "inputs and weights in bf16, every op in fp32: what the kernels' fp32 registers would give op by op"),
    (f"FlashAttention-2 recipe, blocks of {KERNEL_BLOCK}", f"{BF16_FP32},kernel=flash2({KERNEL_BLOCK})",
     "fp32 running max and sum with exp2, but the probability tile is cast to bf16 before it multiplies the values: "
     "the weights the output sees carry bf16's 2^-8 rounding whatever the fp32 state resolves"),
    ("e4m3fn, naive softmax", "e4m3fn", "every op in FP8 e4m3: 4 significand bits, weights at or below 2^-10 vanish (2^-9 is its "
     "smallest subnormal)"),
    (f"FlashAttention-3 FP8 recipe, blocks of {KERNEL_BLOCK}", f"{BF16_FP32},kernel=flash3fp8({KERNEL_BLOCK})",
     "Q, K, V scaled per head to e4m3's range and cast to it, the probabilities (offset to (0, 256]) cast to e4m3 "
     "before P·V, everything else in fp32: the weights carry e4m3's 2^-4 rounding, and a key whose weight is below "
     "2^-18 of the running maximum's reaches the sum but not the output"),
]

#: (name, emulated policy, why it could change collapse): how dot products and sums accumulate
#: (docs/semantics.md §3), each next to the IEEE per-op policy of the same formats.
ACCUMULATORS = [
    ("bf16, every add rounded to bf16", "bf16", "the IEEE per-op baseline: every product and partial sum rounded to bf16"),
    ("bf16, fp32 accumulation", "storage=bf16,compute=bf16,accumulate=fp32",
     "products and partial sums kept in fp32, each reduction rounded once to bf16 at its end"),
    ("fp16, fp32 accumulation", "storage=fp16,compute=fp16,accumulate=fp32",
     "the comparator of the next row: fp16 values, fp32 pairwise partial sums"),
    ("fp16, tensor-core block FMA (V100 model)", "storage=fp16,compute=fp16,accumulate=fp32,order=tcfma-v100",
     "the V100's fp16 tensor-core step as Fasi et al. measured it: blocks of 4 exact products added to the fp32 "
     "accumulator after alignment to the largest exponent, bits below 2^(E-23) truncated, the sum truncated to fp32, "
     "so small terms next to a large one lose bits toward zero; here every sum of the model accumulates so, the "
     "softmax denominators and norms too"),
    ("e4m3fn storage, fp32 arithmetic", "storage=e4m3fn,compute=fp32,accumulate=fp32,softmax=fp32",
     "FP8 inputs and weights, every op and every partial sum in fp32: an FP8 GEMM with a full fp32 accumulator"),
    ("e4m3fn storage, 14-bit accumulator promoted every 128", "storage=e4m3fn,compute=fp32,accumulate=fp32,softmax=fp32,"
     "order=promote-h800", "the H800 FP8 GEMM as the DeepSeek-V3 report describes it: about 14 significand bits "
     "inside chunks of 128 terms (rounding toward zero: this model's choice), each chunk added into fp32; here every "
     "sum of the model accumulates so, the softmax denominators and norms too"),
    ("bf16, MXFP8 (e4m3) weights in blocks of 32", "compute=bf16,weights=mx(e4m3fn,32)",
     "every block of 32 weights (along the contraction axis; d for the token tables) shares a power-of-two scale and "
     "keeps 4 significand bits (docs/semantics.md §5.1, §13); the float64 column is the model with its weights as "
     "drawn, so the noise includes the weights' quantisation, the same for both members of a pair"),
    ("bf16, MXFP4 (e2m1) weights in blocks of 32", "compute=bf16,weights=mx(e2m1fn,32)",
     "as MXFP8 with 2 significand bits: a block's weights take the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 times its "
     "scale, its largest mapped to 4 or 6"),
    ("bf16, MXFP8 (e4m3) dot products, fp32 accumulation", "storage=bf16,compute=bf16,accumulate=fp32,operands=mx(e4m3fn,32)",
     "an MX GEMM: both operands of every dot product (projections, scores, P·V) in blocks of 32 along the contraction "
     "axis, each with a power-of-two scale and 4 significand bits (docs/semantics.md §13.1), the products summed in "
     "fp32; compare the row with fp32 accumulation above"),
    ("bf16, MXFP4 (e2m1) dot products, fp32 accumulation", "storage=bf16,compute=bf16,accumulate=fp32,operands=mx(e2m1fn,32)",
     "as MXFP8 with 2 significand bits: the attention weights of a block of 32 keys take at most 8 magnitudes, "
     "scaled from the block's largest, so the many nearly equal weights of a long row fall on the same few values"),
]

#: (label, model, family): v vs v* on both models, and a counting family whose pair differs in exact arithmetic
#: (``ones`` does not: identical tokens have identical values, so any weights give the same output)
RECIPE_RUNS = [("captions' model, v vs v*", "gaussian", "repeat_last"), ("decoder (RoPE), v vs v*", "decoder", "repeat_last"),
               ("decoder (RoPE), count Bernoulli ones", "decoder", "count_bernoulli")]


def run_policies(ctx: Context, rows, what: str) -> list[tuple[str, str, list[tuple[str, dict[str, CollapseResult], object]]]]:
    """(name, its emulated policy, [(run label, runs, the policy's SignalNoise)]) for every row
    (name, policy, why) of ``rows`` (:data:`KERNELS`, :data:`ACCUMULATORS`): the captions' Gaussian model
    (no positions, seed 0) and the RoPE decoder (:data:`RECIPE_RUNS`), up to ``recipe_n``. ``what``
    ("kernel", "accumulator") begins the stored units' names."""
    sz, out = ctx.sizes, []
    models = {"gaussian": init_params(gaussian_config(d=64, pe="none", seed=0)), "decoder": report_model(pe="rope")}
    started = {(name, label): start_backends(ctx, models[model], fam, sz.recipe_n, [pol], tag=f"{what} {name}, {label}",
                                             ref=False, share_with=[p for _, p, _ in rows])
               for name, pol, _ in rows for label, model, fam in RECIPE_RUNS[:sz.recipe_runs]}
    for name, pol, _ in rows:
        runs = []
        for label, model, fam in RECIPE_RUNS[:sz.recipe_runs]:
            tag = f"{what} {name}, {label}"
            res = started[name, label]()
            ctx.findings[(what, name, label)] = res
            runs.append((label, res, ctx.noise[tag][pol]))
        out.append((name, pol, runs))
    return out
