"""The model's linear layers and attention, op by op or from certified float64 matrix
products (docs/semantics.md §3.3, §7, §8, §10).

Where the policy's order is ``exact`` or ``blocked``, dot products come from float64
matrix products certified by certificates.py; every row they leave uncertified is redone
op by op, so the result is the op-by-op result bit for bit. The redo is a program of its
own (:func:`_linear_redo`, :func:`_attention_redo`), run from the forward by a host
call only where some row needs it (:func:`collapse_sim.backends._rows._fill_rows`).
Under the pairwise order a block of query rows visits its keys in aligned chunks, only those
up to its last position (:func:`key_chunk`): the same adds, the same bits.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import mpmath.libmp as mlib
import numpy as np
from jax import lax

from ...mx import P_AMAX, amax_scale, prefix_amax, scale_cast
from ...policy import BLOCK_KERNELS, PolicyError
from ...rounding import Stochastic, round_to
from ..reference.arith import times_log2e
from .._rows import _computed_once, _fill_rows, _map_rows
from ..inputs import AttentionInputs
from .certificates import certified_matmul, matmul_stats, row_norms
from .ops import Emulator, reduce_sum
from .orders import term_bounds, to_tree_width, tree_width

_BLOCK_ELEMS = 1 << 21  # elements of one (queries x keys x head-dim) block


def _blocks(n: int, per_row: int) -> tuple[int, int]:
    b = max(1, min(n, _BLOCK_ELEMS // max(1, per_row)))
    return b, -(-n // b)


#: The exact and blocked orders take a stage's dot products (a linear layer, an attention
#: call) from certified float64 matrix products (:func:`certified_matmul`) only when the
#: stage has at least this many products; a smaller stage runs op by op with every exact
#: sum from the host superaccumulator (exact.py), and so do the norms' sums below it.
#: Same bits either way. Why: the certificates, their conditionals and the op-by-op redo
#: of what they leave open are most of these orders' compiled code (a bf16 exact forward,
#: d = 8, L = 2, with probes: 34,000 lines of HLO and 27 s to compile with them, 3,400
#: lines and 4 s without; measured while the redo was still inlined at every call site,
#: before it became a program of its own, :func:`_fill_rows`), while the host
#: superaccumulator costs ~0.15 us per term: at 2^22 terms a stage spends ~0.6 s there,
#: and larger stages run faster certified.
CERTIFIED_MIN_TERMS = 1 << 22


def _certified(emu: Emulator, terms: int) -> bool:
    """Whether a stage of ``terms`` products comes from float64 matrix products."""
    return emu.order.kind in ("exact", "blocked") and terms >= CERTIFIED_MIN_TERMS


def exact_path(terms: int) -> str:
    """How an op-by-op stage of ``terms`` terms takes the exact sums of the exact and
    blocked orders (:func:`reduce_sum`'s ``path``): float64 certificates first where
    the stage is large, the host superaccumulator alone where it is small."""
    return "certified" if terms >= CERTIFIED_MIN_TERMS else "superacc"


def _linear(emu: Emulator, x, w, stream_rows=None):
    """``x @ w``, each entry an :meth:`Emulator.dot`: from certified float64 matrix
    products in blocks of rows where the policy allows, op by op for the rows they
    leave uncertified (:func:`_fill_rows`); op by op otherwise. Under an operands role
    both operands are quantised along the contraction axis first (§13.1); per tensor
    (§13.2.1) ``x``'s rows with the amax of the rows up to each (after ``stream_rows``,
    the stream's inputs, where ``x`` holds the probes) and ``w`` with its own."""
    x, w = emu.operand(x, -1, emu.prefix_amax(x, stream_rows)), emu.operand(w, 0)
    n, din = x.shape
    dout = w.shape[1]
    if not _certified(emu, n * din * dout):
        path = exact_path(n * din * dout)
        return _map_rows(lambda a: _linear_op_by_op(emu, a[0], w, path), (x,), _blocks(n, din * dout)[0], emu.stream)
    wstats = matmul_stats(emu, w)

    def block(a):
        r, ok = certified_matmul(emu, a[0], w, w_stats=wstats, tighter=False)
        return r, jnp.all(ok, axis=-1)

    r, ok = _map_rows(block, (x,), max(1, min(n, _BLOCK_ELEMS // (4 * dout))))
    b, _ = _blocks(n, din * dout)
    static, roles = _detached(emu)
    # where the certificate failed: the tighter one, then op by op, in programs of their own
    return _fill_rows(r, ok, (x,), _linear_redo, b, static, (roles, w), _linear_recheck)


def _linear_op_by_op(emu: Emulator, x, w, path: str):
    """``x @ w`` op by op: every entry an :meth:`Emulator.dot` (``path``: :func:`reduce_sum`'s)."""
    return emu.dot(x[:, None, :], w.T[None, :, :], path=path)


def _linear_recheck(static: Emulator, data, x):
    """Rows of :func:`_linear` that its first certificate left open, from the certificate
    with its second stage (:func:`certified_matmul`): ``(r, ok)`` per row, a program of its
    own (:func:`_fill_rows`)."""
    roles, w = data
    r, ok = certified_matmul(_attached(static, roles), x, w)
    return r, jnp.all(ok, axis=-1)


def _linear_redo(static: Emulator, data, x):
    """The op-by-op rows of :func:`_linear` that its certificate left open, every exact sum
    from the superaccumulator: a program of its own (:func:`_fill_rows`)."""
    roles, w = data
    return _linear_op_by_op(_attached(static, roles), x, w, "superacc")


def _detached(emu: Emulator):
    """``(static, roles)``: ``emu`` without its formats where they are traced (a shared
    program's, :meth:`Emulator.bind`), and those formats (None where they are static),
    for a program of its own that :func:`_attached` rebinds them in."""
    if not emu.shared:
        return emu, None
    static = copy.copy(emu)
    static.roles = static.storage = static.compute = static.accumulate = static.softmax = None
    return static, emu.roles


def _attached(static: Emulator, roles) -> Emulator:
    """The emulator that :func:`_detached` took apart, with the formats ``roles``."""
    return static if roles is None else static.bind(roles)


def masked_softmax(emu: Emulator, s, valid, path: str = "certified"):
    """Softmax of each row of ``s`` over its ``valid`` entries, as the attention does it:
    scores rounded to the softmax format, the row maximum subtracted (if the policy
    says so), exp, the denominator reduced in the policy's order and accumulate
    format, one division, weights rounded to the compute format. Masked entries are
    exact zeros, which leave every reduction order's result unchanged.

    ``path``: how the denominator's exact sum is taken (:func:`reduce_sum`); with
    ``"float64"`` the result is ``(alpha, ok)``, ``ok`` marking the rows whose
    denominator was certified (the other rows must be redone)."""
    mode = emu.mode
    same = emu.softmax_is_compute  # then both roundings between them are identities
    s = jnp.asarray(s, emu.dtype)
    if not same:
        s = emu.rnd(s, emu.softmax)
    if emu.max_subtract:
        m = jnp.max(jnp.where(valid, s, jnp.asarray(-jnp.inf, emu.dtype)), axis=-1)
        s = emu.sub(s, jnp.broadcast_to(m[:, None], s.shape), emu.softmax)
    e = emu.exp(s, emu.softmax)
    e = jnp.where(valid, e, jnp.zeros_like(e))
    den = reduce_sum(e, emu.order, emu.accumulate, emu.softmax, mode, valid, emu.bounds, nonneg=True,  # exp >= 0
                     path=path, draws=emu.draws)
    with_ok = path == "float64"
    if with_ok:
        den, ok = den
    alpha = emu.div(e, jnp.broadcast_to(den[:, None], e.shape), emu.softmax)
    alpha = alpha if same else emu.rnd(alpha, emu.compute)
    return (alpha, ok) if with_ok else alpha


def _emulated_attention(emu: Emulator, a: AttentionInputs):
    """Attention of queries ``a.q`` at positions ``a.qpos`` over keys ``0..len(a.k)-1``: from
    certified float64 matrix products where the policy allows (exact and blocked
    orders), op by op for every query row they leave uncertified; op by op otherwise."""
    if not _certified_scores(emu, _terms(a.q, a.k)):
        return _uncertified_attention(emu, a)
    o, ok = _certified_attention(emu, a)
    return _fill_uncertified(emu, o, ok, a)


def _terms(q, k) -> int:
    """The products of an attention call's scores (and of its weighted values)."""
    return int(q.shape[0]) * int(k.shape[0] + 1) * int(q.shape[1])


def _certified_scores(emu: Emulator, terms: int) -> bool:
    """Whether an attention call of ``terms`` products comes from certified float64 matrix
    products: the exact and blocked orders under the naive kernel, for large calls
    (:data:`CERTIFIED_MIN_TERMS`; the online kernel runs op by op)."""
    return _certified(emu, terms) and emu.kernel.kind == "naive" and emu.operands is None


def _uncertified_attention(emu: Emulator, a: AttentionInputs):
    """The attention op by op: a block kernel's blocks (online, flash2, flash3fp8), or the naive softmax."""
    path = exact_path(_terms(a.q, a.k))
    if emu.kernel.kind in BLOCK_KERNELS:
        return _online_attention(emu, a, path)
    return _op_by_op_attention(emu, a, path)


def _prepare(emu: Emulator, a: AttentionInputs, fold: bool = False):
    """What the op-by-op and certified attention share: keys and values with a slot for
    a query's own key and value (``a.self_kv``), and ``weights``, which turns raw scores
    (B, nk) of queries at positions pb into attention weights and the key mask.
    ``fold``: the scale and the ALiBi biases are the flash2 kernel's, times log2(e)
    (docs/semantics.md §8.8.1; they must then be concrete numbers). ``weights.scores`` takes
    an optional ``descale`` per query row (flash3fp8, §8.8.2): the scale is then
    ∘_A(scale · descale)."""
    dt = emu.dtype
    k, v, qpos, scale, alibi, window, self_kv = a.k, a.v, a.qpos, a.scale, a.alibi, a.window, a.self_kv
    if self_kv is not None:
        k = jnp.concatenate([k, jnp.zeros((1, k.shape[1]), dt)])
        v = jnp.concatenate([v, jnp.zeros((1, v.shape[1]), dt)])
    nk = k.shape[0]
    cols = jnp.arange(nk)
    sc = emu.store(jnp.float64(_log2e_times(scale) if fold else scale))
    kp, vp = _own_kv(a)
    bias_table = None
    if alibi is not None:  # -slope·distance for every distance, rounded once (a gather per block)
        maxd = max(nk, int(qpos.shape[0])) + 1
        raw = (np.vectorize(_log2e_times)(-float(alibi) * np.arange(maxd, dtype=np.float64)) if fold
               else -alibi * jnp.arange(maxd, dtype=jnp.float64))
        bias_table = emu._round(jnp.asarray(raw, jnp.float64), emu.storage).astype(dt)

    def scores(s, pb, descale=None):
        """Raw scores (B, nk) of queries at positions pb -> scaled (and biased) scores in the
        compute format (§8.1, before the rounding to the softmax format), and the key mask."""
        f = sc if descale is None else emu.mul(jnp.broadcast_to(sc, descale.shape), descale, emu.accumulate)[:, None]
        s = emu.mul(s, jnp.broadcast_to(f, s.shape))
        if alibi is not None:
            dist = jnp.clip(pb[:, None] - cols[None, :], 0, bias_table.shape[0] - 1)  # masked entries: any valid index
            s = emu.add(s, bias_table[dist])
        valid = cols[None, :] <= pb[:, None]
        if window is not None:
            valid = valid & (cols[None, :] > pb[:, None] - window)
        return s, valid

    def weights(s, pb, path="certified"):
        s, valid = scores(s, pb)
        return masked_softmax(emu, s, valid, path), valid

    weights.scores = scores
    return k, v, kp, vp, cols, weights


def _log2e_times(x) -> float:
    """``x·log2(e)`` as a float64 rounded to odd: its rounding to a format of the carrier
    (p <= 51) in any mode is the one of the exact product (:func:`times_log2e`)."""
    return mlib.to_float(times_log2e(float(x), 53))


def _own_kv(a: AttentionInputs):
    """Each query's own key and value (``a.self_kv``), or zeros of ``a.q``'s shape."""
    if a.self_kv is None:
        return jnp.zeros_like(a.q), jnp.zeros_like(a.q)
    return a.self_kv


def _row_keys_values(k, v, cols, self_kv, pb, kpb, vpb):
    """The keys and values (B, nk, dh) each query row of a block sees: ``k`` and ``v``,
    with the row's own key and value (``self_kv``: kpb, vpb) in its own column ``pb``."""
    K = jnp.broadcast_to(k[None], (pb.shape[0], *k.shape))
    V = jnp.broadcast_to(v[None], K.shape)
    if self_kv is not None:
        is_self = (cols[None, :] == pb[:, None])[:, :, None]  # (B, nk, 1)
        K = jnp.where(is_self, kpb[:, None, :], K)
        V = jnp.where(is_self, vpb[:, None, :], V)
    return K, V


def _row_values_keys_last(vT, self_kv, pb, vpb):
    """The values each query row of a block sees, keys last (B, dh, n): ``vT`` (dh, n), the values
    transposed once per attention call (n >= nk: padded as :meth:`Emulator.pads_products` says), with
    the row's own value in its own column ``pb`` (``self_kv``). The same entries as
    :func:`_row_keys_values`' V; in this layout, made outside the loop over query blocks, the
    weighted values' products read them contiguously (:func:`_weighted_values`; with V (B, nk, dh)
    XLA:CPU computed them ~1.6× slower at N = 4,096, benchmarks/README.md)."""
    V = jnp.broadcast_to(vT[None], (pb.shape[0], *vT.shape))
    if self_kv is not None:
        V = jnp.where((jnp.arange(vT.shape[1])[None, :] == pb[:, None])[:, None, :], vpb[:, :, None], V)
    return V


def _tensor_scaled_rows(emu: Emulator, rows, k, v, cols, self_kv, pb, kpb, vpb, running, out):
    """``rows(K, V)`` of a block of query rows at positions ``pb`` with their keys and values
    (B, nk, dh) (:func:`_row_keys_values`) as per-tensor scaled operands (docs/semantics.md
    §13.2.1): each row's with the amax of its columns 0..p_i (:func:`_prefix_amaxes`), in groups of
    rows that share both amaxes (:func:`_amax_groups`). ``out``: zeros shaped as ``rows``' result."""
    q = lambda x, a: emu.operand(x, -1, a)  # noqa: E731
    return _amax_groups(q, lambda K, V, aK, aV: rows(K, V), k, v, cols, self_kv, pb, kpb, vpb, running, out)


def _amax_groups(quantise, rows, k, v, cols, self_kv, pb, kpb, vpb, running, out):
    """``rows(K, V, a_K, a_V)`` of a block of query rows at positions ``pb`` whose keys and values
    (B, nk, dh) (:func:`_row_keys_values`) are quantised with each row's amaxes of its columns
    0..p_i, visible through the window or not (:func:`_prefix_amaxes`; ``running``: the running
    amaxes of ``k``'s and ``v``'s rows), by ``quantise(x, amax)``, a function of each value and
    the amax; ``a_K``, ``a_V``: those amaxes (scalars). ``out``: zeros shaped as ``rows``' result,
    a pytree of arrays of B rows.

    The rows run in groups that share both amaxes (bit for bit): the stream's keys and values are
    quantised once per group (each row's own, a probe's, apart) and broadcast to its rows, every
    row of the block computed and the group's kept. The running maximum is a step function, so
    most blocks are one group; quantising every row's keys and values instead costs a division
    and two roundings per key component and row, as many as the scores' products. The same bits
    either way: the quantisation is a function of each value and its amax."""
    aK, aV = _prefix_amaxes(running, self_kv, pb, kpb, vpb)
    bits = lambda x: lax.bitcast_convert_type(jnp.asarray(x, jnp.float64), jnp.uint64)  # noqa: E731
    key = (bits(aK), bits(aV))

    def group(state):
        out, done = state
        i = jnp.argmin(done)  # the first row not yet computed leads the next group
        same = (key[0] == key[0][i]) & (key[1] == key[1][i])
        tk, tv = (_computed_once(quantise(x, a[i])) for x, a in ((k, aK), (v, aV)))  # once, not per row
        K, V = _row_keys_values(tk, tv, cols, self_kv, pb, quantise(kpb, aK[i]), quantise(vpb, aV[i]))
        keep = lambda o, old: jnp.where(same.reshape((-1,) + (1,) * (o.ndim - 1)), o, old)  # noqa: E731
        return jax.tree.map(keep, rows(K, V, aK[i], aV[i]), out), done | same

    return lax.while_loop(lambda st: ~jnp.all(st[1]), group, (out, jnp.zeros(pb.shape, bool)))[0]


def _prefix_amaxes(running, self_kv, pb, kpb, vpb):
    """The amaxes ((B,), (B,)) of the keys and of the values that query rows at positions ``pb``
    see, columns 0..p_i: from ``running`` (the running amaxes of the keys' and values' rows, (nk, 1)
    each, :func:`collapse_sim.mx.prefix_amax`) at p_i, or for a probe (``self_kv``) at p_i − 1 and
    its own key's or value's (``kpb``, ``vpb``)."""
    def amax(cm, own):
        if self_kv is None:
            return cm[pb, 0]
        return jnp.maximum(cm[pb - 1, 0], jnp.max(jnp.abs(own), axis=-1))  # NaN propagates, as the running max

    return amax(running[0], kpb), amax(running[1], vpb)


def _value_operands(emu: Emulator, vq, v, pb, vpb=None):
    """The values of query rows at positions ``pb`` as the weighted values' operands under an
    operands role (docs/semantics.md §13.1): MX blocks of k columns along the keys. For row i
    every block before its last one, ``[t·k, t·k + k)`` with ``t = pb[i] // k``, is a block of
    the stream's values ``v``, the same for every row that has it (``vq``: ``v`` quantised
    once); the last block holds the row's columns ``t·k..pb[i]`` only (its own value ``vpb[i]``
    at ``pb[i]`` for a probe; later columns absent, zeros, which raise no block maximum), so it
    is quantised per row. Returns ``(V, (start, last))``: ``vq`` for every row (B, nb·k, dh), a
    broadcast, with the zero columns that pad the keys to whole blocks (trailing masked columns
    change no sum, §3.3), and each row's first column ``t·k`` and quantised last block
    (B, k, dh), whose products :func:`_weighted_values` writes over the shared ones (a dynamic
    slice per row: selecting over all columns, or materialising every row's values, costs
    XLA:CPU two to three times as much). Columns past ``pb[i]`` hold ``vq``'s values there (the
    caller masks them)."""
    kb = emu.operands.block
    nk, dh = v.shape
    nb = -(-nk // kb)
    pad = lambda x: jnp.pad(x, ((0, nb * kb - nk), (0, 0)))  # noqa: E731
    t = pb // kb  # (B,): each row's last block
    last = pad(v).reshape(nb, kb, dh)[t]  # (B, kb, dh)
    col = t[:, None] * kb + jnp.arange(kb)[None, :]  # (B, kb): their columns
    if vpb is not None:
        last = jnp.where((col == pb[:, None])[:, :, None], vpb[:, None, :], last)
    last = emu.operand(jnp.where((col <= pb[:, None])[:, :, None], last, jnp.zeros((), v.dtype)), 1)
    return jnp.broadcast_to(pad(vq)[None], (pb.shape[0], nb * kb, dh)), (t * kb, last)


def _weighted_values(emu: Emulator, P, V, valid, out, path: str, last=None, v_src=None, keys_last=False):
    """``Σ_j P_ij V_ij[c]`` for each row i and component c (§8.4): the products exact in the
    carrier, rounded to the accumulate format (except in the orders with exact products),
    reduced over the keys in the policy's order, the masked keys skipped, rounded to ``out``.
    A masked key's product is an exact zero (§3.3) whatever its value holds: 0·inf and 0·NaN
    of a later position must not reach an earlier row. ``last`` (an operands role's
    ``(start, V_last)``, :func:`_value_operands`): each row's values at columns
    ``start..start + k − 1`` are ``V_last``'s, not ``V``'s. ``v_src``: arrays whose entries include
    ``V``'s (:meth:`Emulator.product_terms`). ``keys_last``: V is given as (B, dh, n)
    (:func:`_row_values_keys_last`, n >= nk padded), not (B, nk, dh); not with ``last``."""
    terms = None if v_src is None or last is not None else emu.product_terms(emu.order, (P,), v_src)
    zero = jnp.zeros((), P.dtype)
    if last is None:  # the products as (B, dh, nk), reduced over the keys; padded as Emulator.pads_products says
        V = V if keys_last else jnp.swapaxes(V, 1, 2)
        if emu.pads_products(emu.order):
            P, valid, V = to_tree_width(P), to_tree_width(valid), to_tree_width(V)
        prod = jnp.where(valid[:, None, :], P[:, None, :] * V, zero)
    else:
        prod = jnp.where(valid[:, :, None], P[:, :, None] * V, zero)
        start, Vl = last
        at = lambda x, s: lax.dynamic_slice_in_dim(x, s, Vl.shape[1], axis=0)  # noqa: E731
        Pl, ok = jax.vmap(at)(P, start), jax.vmap(at)(valid, start)
        put = lambda x, y, s: lax.dynamic_update_slice_in_dim(x, y, s, axis=0)  # noqa: E731
        prod = jax.vmap(put)(prod, jnp.where(ok[:, :, None], Pl[:, :, None] * Vl, zero), start)
        prod = jnp.swapaxes(prod, 1, 2)  # (B, dh, nk): reduce over keys
    if not emu.order.exact_products:
        prod = emu.rnd(prod, emu.accumulate)
    vmask = jnp.broadcast_to(valid[:, None, :], prod.shape)
    return reduce_sum(prod, emu.order, emu.accumulate, out, emu.mode, vmask, emu.bounds, path=path, draws=emu.draws,
                      terms=terms)


def _op_by_op_attention(emu: Emulator, a: AttentionInputs, path: str = "certified", adaptive=None):
    """Attention with every dot product and sum an :class:`Emulator` reduction, in
    blocks of query rows over all keys. ``path``: how the exact and blocked orders
    take their exact sums (:func:`reduce_sum`; ``"superacc"`` where the certificate
    already failed). ``adaptive`` (adaptive temperature's polynomial and threshold): its
    weights (:func:`_adaptive_weights`) instead of the softmax."""
    k, v, kp, vp, cols, weights = _prepare(emu, a)
    self_kv = a.self_kv
    nk, dh = k.shape
    tiled = emu.operands is not None and not emu.per_tensor
    vq = emu.operand(v, 0) if tiled else v  # the values' full key blocks: the same for every row
    running = (emu.prefix_amax(k), emu.prefix_amax(v))  # per tensor: the keys' and values' running amaxes
    kb, vb = (term_bounds(k), term_bounds(v)) if emu.bounds_products(emu.order) else (k, v)  # once, not per block
    vT = jnp.swapaxes(v, 0, 1)  # once per call, not per block (_row_values_keys_last)
    vT = to_tree_width(vT) if emu.pads_products(emu.order) else vT
    chunk = key_chunk(emu, nk) if adaptive is None else 0
    if chunk:  # keys and values padded with zero columns to the tree's width (whole chunks)
        kc = jnp.pad(k, ((0, tree_width(nk) - nk), (0, 0)))
        vTc = to_tree_width(vT)

    def block(args):
        qb, pb, kpb, vpb = args  # (B, dh), (B,), (B, dh), (B, dh)

        def rows(K, V, src=None, keys_last=False):
            """The block's outputs (B, dh) over its keys and values K, V (B, nk, dh; V (B, dh, nk) with
            ``keys_last``); ``src``: arrays whose entries include K's and V's (:meth:`Emulator.product_terms`)."""
            raw = emu.dot(qb[:, None, :], K, path=path, factors=None if src is None else ((qb,), src[0]))
            if adaptive is None:
                alpha, valid = weights(raw, pb, path)
            else:
                alpha, valid = _adaptive_weights(emu, weights.scores, raw, pb, path, *adaptive)
            if emu.per_tensor:  # §13.2.1: the weights with the static amax 1 of their range
                return _weighted_values(emu, emu.operand(alpha, -1, P_AMAX), V, valid, emu.compute, path)
            if tiled:  # §13.1: P and V in key blocks, V's last block the row's own
                V, last = _value_operands(emu, vq, v, pb, None if self_kv is None else vpb)
                pad = ((0, 0), (0, V.shape[1] - nk))  # the keys padded to whole blocks, masked
                alpha, valid = emu.operand(jnp.pad(alpha, pad), -1), jnp.pad(valid, pad)
                return _weighted_values(emu, alpha, V, valid, emu.compute, path, last)
            return _weighted_values(emu, alpha, V, valid, emu.compute, path,  # alpha: (B, nk), compute format
                                    v_src=None if src is None else src[1], keys_last=keys_last)

        if chunk:  # the keys in chunks, those past the block's last position skipped (_key_chunk_rows)
            return _key_chunk_rows(emu, weights, qb, pb, kpb, vpb, kc, vTc, nk, chunk, self_kv, a.window, path)
        if emu.per_tensor:  # §13.2.1: each row's keys and values with the amax of its columns 0..p_i
            return _tensor_scaled_rows(emu, rows, k, v, cols, self_kv, pb, kpb, vpb, running,
                                       jnp.zeros(qb.shape, emu.dtype))
        src = ((kb,), (vb,)) if self_kv is None else ((kb, kpb), (vb, vpb))
        K, _ = _row_keys_values(k, v, cols, self_kv, pb, kpb, vpb)
        return rows(K, _row_values_keys_last(vT, self_kv, pb, vpb), src=src, keys_last=True)

    b = max(1, min(a.q.shape[0], KEY_CHUNK_ROWS)) if chunk else _blocks(a.q.shape[0], nk * dh)[0]
    return _map_rows(block, (a.q, a.qpos, kp, vp), b, emu.stream)


#: The op-by-op attention of the pairwise order takes its keys in aligned chunks of this many
#: (a power of two) where a call has at least twice as many keys (:func:`key_chunk`), and a block
#: of query rows visits only the chunks up to its last position (:func:`_key_chunk_rows`).
KEY_CHUNK = 256
#: ... in blocks of this many query rows. Measured (2 cores, d = 64, L = 1, N = 4,096, bf16, CPU s of one
#: forward, benchmarks/README.md): chunks of 256 in blocks of 8, 16, 32 rows 2.16, 2.17, 2.21 s; chunks of 128
#: and 512 (16 rows) 2.66 and 2.61 s; unchunked (two causal segments, blocks of 8 rows) 3.25 s.
KEY_CHUNK_ROWS = 16


def key_chunk(emu: Emulator, nk: int) -> int:
    """The size of the key chunks of an op-by-op attention call over ``nk`` key columns (0: none).
    Only the pairwise order in a deterministic mode, the naive kernel and no operands role: a pairwise
    sum over aligned chunks of a power-of-two size is the tree of the chunks' subtrees (§3.1), a chunk
    of masked zeros sums to +0 exactly as a subtree of them does, so the chunks past a row's position
    need not be computed; the other orders carry state from chunk to chunk, stochastic rounding draws
    per rounded array (its count would change), the block kernels and operands roles have blocks of
    their own."""
    if (emu.order.kind != "pairwise" or isinstance(emu.mode, Stochastic) or emu.kernel.kind != "naive"
            or emu.operands is not None or nk < 2 * KEY_CHUNK):
        return 0
    return KEY_CHUNK


def _key_chunk_rows(emu: Emulator, weights, qb, pb, kpb, vpb, kc, vTc, nk: int, chunk: int, self_kv, window, path):
    """The outputs (B, dh) of a block of query rows ``qb`` at positions ``pb``, the keys in aligned
    chunks of ``chunk`` columns (:func:`key_chunk`): ``kc`` (W, dh) and ``vTc`` (dh, W), the keys and
    values zero-padded to the pairwise tree's width W. Only the chunks that hold a column some row
    sees are computed (a loop with a traced trip count): the scores of the others stay zeros (masked),
    the weighted values' chunk sums +0, as computing them would give. The weighted values' sum is the
    pairwise tree over the chunk sums of the subtrees of each chunk, the same adds as the tree over
    all W columns (§3.1), rounded once to the compute format; the softmax runs over all ``nk``
    columns, as the unchunked rows do. The same bits as :func:`_op_by_op_attention`'s rows."""
    B, dh = qb.shape
    W = kc.shape[0]
    first = 0 if window is None else jnp.maximum(jnp.min(pb) - window + 1, 0) // chunk
    last = jnp.max(pb) // chunk + 1  # the chunk of the last column a row sees, and one past it
    own = lambda j0, width: jnp.arange(width)[None, :] + j0 == pb[:, None]  # noqa: E731  (B, width)

    def scores(c, s):
        j0 = c * chunk
        K = jnp.broadcast_to(lax.dynamic_slice_in_dim(kc, j0, chunk)[None], (B, chunk, dh))
        if self_kv is not None:
            K = jnp.where(own(j0, chunk)[:, :, None], kpb[:, None, :], K)
        return lax.dynamic_update_slice_in_dim(s, emu.dot(qb[:, None, :], K, path=path), j0, axis=1)

    raw = lax.fori_loop(first, last, scores, jnp.zeros((B, W), emu.dtype))
    alpha, valid = weights(raw[:, :nk], pb, path)
    alpha, valid = to_tree_width(alpha), to_tree_width(valid)

    def weighted(c, sums):
        j0 = c * chunk
        V = _row_values_keys_last(lax.dynamic_slice_in_dim(vTc, j0, chunk, axis=1), self_kv, pb - j0, vpb)
        at = lambda x: lax.dynamic_slice_in_dim(x, j0, chunk, axis=1)  # noqa: E731
        part = _weighted_values(emu, at(alpha), V, at(valid), emu.accumulate, path, keys_last=True)
        return lax.dynamic_update_index_in_dim(sums, part, c, axis=0)

    sums = lax.fori_loop(first, last, weighted, jnp.zeros((W // chunk, B, dh), emu.dtype))
    return reduce_sum(jnp.moveaxis(sums, 0, -1), emu.order, emu.accumulate, emu.compute, emu.mode, path=path)


def _adaptive_attention(emu: Emulator, a: AttentionInputs, adaptive):
    """Attention with adaptive temperature (docs/semantics.md §8.7; ``adaptive``: its
    polynomial and threshold): the naive kernel op by op over whole rows, for every order
    (the certified float64 path does not define it)."""
    if (why := emu.kernel.why_not_adaptive()) is not None:
        raise PolicyError(why)
    return _op_by_op_attention(emu, a, exact_path(_terms(a.q, a.k)), adaptive)


def _adaptive_weights(emu: Emulator, scores, raw, pb, path: str, poly, threshold):
    """Adaptive temperature's weights and key mask (docs/semantics.md §8.7) from raw scores
    (B, nk) of queries at positions pb: the softmax of the scores, the entropy H of those
    weights (in the compute format), β = max(poly(H), 1) where H > ``threshold`` (else 1;
    ``poly``: float64 coefficients, highest power first, rounded to storage), and the softmax
    of the scores times β (rounded to the softmax format)."""
    C, M = emu.compute, emu.softmax
    s, valid = scores(raw, pb)
    s = s if emu.softmax_is_compute else emu.rnd(s, M)  # §8.1's s_ij
    alpha = masked_softmax(emu, s, valid, path)
    lam = emu.ln(jnp.where(valid & (alpha > 0), alpha, jnp.ones_like(alpha)), C)  # ln 1 = 0: the 0·ln 0 = 0 terms
    H = -_weighted_values(emu, alpha, lam[:, :, None], valid, C, path)[:, 0]
    coef = [emu.store(jnp.float64(c)) for c in poly]  # constants, rounded to storage (§5)
    P = jnp.broadcast_to(coef[0], H.shape)
    for c in coef[1:]:
        P = emu.add(emu.mul(P, H, C), jnp.broadcast_to(c, H.shape), C)
    one = jnp.ones_like(H)
    beta = jnp.where(H > threshold, jnp.maximum(P, one), one)  # exact; NaN P stays NaN
    return masked_softmax(emu, emu.mul(s, jnp.broadcast_to(beta[:, None], s.shape), M), valid, path), valid


def _online_attention(emu: Emulator, a: AttentionInputs, path: str = "certified"):
    """The block kernels ``online(b)``, ``flash2(b)`` and ``flash3fp8(b)`` (docs/semantics.md
    §8.8): per query, the key columns in blocks of b with a running maximum m, denominator l
    and output o, rescaled by r = exp(m_old - m_new) whenever the maximum grows, and one
    division o / l at the end. ``flash2`` folds log2(e) into the scale (and the ALiBi biases),
    takes exp2 for exp and rounds the probability tile to storage instead of compute (§8.8.1);
    ``flash3fp8`` quantises q, k, v to e4m3fn per head, folds their descales in, offsets the
    exponentials by 2^8, rounds the tile to e4m3fn, visits the blocks last first and ends with
    o · (1/l · s_V) (§8.8.2). Blocks a query does not see are run too: they change nothing
    (r = 1 and every added term is zero; before any visible block l = o = 0 stay), so the bits
    equal those of skipping them, as a kernel does."""
    mode, dt = emu.mode, emu.dtype
    kern = emu.kernel
    k, v, kp, vp, cols, weights = _prepare(emu, a, fold=kern.base2)
    self_kv = a.self_kv
    nk, dh = k.shape
    bc = min(kern.block, nk)  # a block wider than the keys is one block: the same bits, no padding
    nb = -(-nk // bc)
    M, A, C = emu.softmax, emu.accumulate, emu.compute
    exp = emu.exp2 if kern.base2 else emu.exp
    tile = kern.fp8 or (emu.storage if kern.base2 else (None if emu.softmax_is_compute else C))  # None: e as it is
    neg_inf = jnp.asarray(-jnp.inf, dt)
    if kern.fp8 is not None:  # the running amaxes of the keys' and values' rows (§8.8.2 1)
        running = tuple(prefix_amax(jnp.asarray(x, jnp.float64), None, jnp) for x in (k, v))

    def block(args):
        qb, pb, kpb, vpb = args  # (B, dh), (B,), (B, dh), (B, dh)
        if kern.fp8 is None:
            return rows(qb, pb, *_row_keys_values(k, v, cols, self_kv, pb, kpb, vpb))
        # §8.8.2 1: each row's query, and the keys and values of its prefix
        return _fp8_rows(emu, kern.fp8, rows, qb, k, v, cols, self_kv, pb, kpb, vpb, running)

    def rows(qb, pb, K, V, descale=None, v_descale=None):
        """The outputs (B, dh) of query rows ``qb`` at positions ``pb`` over keys and values K, V
        (B, nk, dh); for flash3fp8 all quantised, with their descales."""
        B = qb.shape[0]
        s, valid = weights.scores(emu.dot(jnp.broadcast_to(qb[:, None, :], K.shape), K, path=path), pb, descale)
        if not emu.softmax_is_compute:
            s = round_to(s, M, mode)
        pad = nb * bc - nk  # columns past the last key: masked
        s = jnp.pad(s, ((0, 0), (0, pad))).reshape(B, nb, bc)
        valid = jnp.pad(valid, ((0, 0), (0, pad))).reshape(B, nb, bc)
        V = jnp.pad(V, ((0, 0), (0, pad), (0, 0))).reshape(B * nb, bc, dh)
        # Every block's state is a function of the running maximum before and after it, and the
        # running maximum is the cumulative one of the blocks' maxima (exact): the blocks' exps,
        # sums and products run at once, and only l and o go block by block.
        m_new = lax.cummax(jnp.max(jnp.where(valid, s, neg_inf), axis=-1), axis=1, reverse=kern.reverse)
        before = jnp.full((B, 1), -jnp.inf, dt)
        m = (jnp.concatenate([m_new[:, 1:], before], axis=1) if kern.reverse
             else jnp.concatenate([before, m_new[:, :-1]], axis=1))  # the maximum before each block
        seen = m_new > neg_inf  # some column seen so far (else l = o = 0 stay)
        m_safe = jnp.where(seen, m_new, jnp.zeros_like(m_new))
        r = jnp.where(m > neg_inf, exp(emu.sub(jnp.where(m > neg_inf, m, m_safe), m_safe, M), M), jnp.zeros_like(m))
        shift = emu.sub(m_safe, jnp.full_like(m_safe, kern.max_offset), M) if kern.max_offset else m_safe
        e = exp(emu.sub(s, jnp.broadcast_to(shift[:, :, None], s.shape), M), M)
        e = jnp.where(valid, e, jnp.zeros_like(e))
        den = reduce_sum(e, emu.order, A, A, mode, valid, emu.bounds, nonneg=True, path=path)  # (B, nb)
        P = _computed_once(e if tile is None else round_to(e, tile, mode))  # the probability tiles
        pv = _weighted_values(emu, P.reshape(B * nb, bc), V, valid.reshape(B * nb, bc), A, path).reshape(B, nb, dh)

        def step(carry, blk):
            l, o = carry
            rb, db, ub = blk  # (B,), (B,), (B, dh)
            l = emu.add(emu.mul(l, rb, A), db, A)
            o = emu.add(emu.mul(o, jnp.broadcast_to(rb[:, None], o.shape), A), ub, A)
            return (l, o), None

        (l, o), _ = lax.scan(step, (jnp.zeros((B,), dt), jnp.zeros((B, dh), dt)),
                             (r.T, den.T, jnp.moveaxis(pv, 1, 0)), reverse=kern.reverse)
        if v_descale is None:
            out = emu.div(o, jnp.broadcast_to(l[:, None], o.shape), A)
        else:  # §8.8.2 6: o · (1/l · s_V)
            f = emu.mul(emu.div(jnp.ones_like(l), l, A), v_descale, A)
            out = emu.mul(o, jnp.broadcast_to(f[:, None], o.shape), A)
        return round_to(out, C, mode)

    b, _ = _blocks(a.q.shape[0], nk * dh)
    return _map_rows(block, (a.q, a.qpos, kp, vp), b)


def _fp8_rows(emu: Emulator, E, rows, qb, k, v, cols, self_kv, pb, kpb, vpb, running):
    """flash3fp8's outputs (B, dh) of a block of query rows at positions ``pb``: ``rows(q̂, pb, K̂,
    V̂, descale, s_V)`` with its quantised inputs (docs/semantics.md §8.8.2 1-2), each row's query,
    keys and values (B, nk, dh) (:func:`_row_keys_values`) divided by their scale ∘_A(amax / 448)
    (1 where amax = 0) in A and rounded to ``E``, and ``descale`` = ∘_A(s_Q · s_K), which the scores
    fold into their scale. The scales of K and V come from the columns the row sees up to its
    position, visible through the window or not (:func:`_prefix_amaxes`; ``running``: the running
    amaxes of ``k``'s and ``v``'s rows); the rows run in groups that share both
    (:func:`_amax_groups`)."""
    A, dt = emu.accumulate, emu.dtype
    scale = lambda amax: amax_scale(amax, E, A, emu.mode).astype(dt)  # noqa: E731  (§8.8.2 1, §13.2: collapse_sim.mx)
    quantise = lambda x, amax: scale_cast(x, scale(amax), E, A, emu.mode).astype(dt)  # noqa: E731
    aq = jnp.max(jnp.abs(qb), axis=-1)
    qh, s_q = quantise(qb, aq[:, None]), scale(aq)

    def group(K, V, aK, aV):
        return rows(qh, pb, K, V, emu.mul(s_q, jnp.broadcast_to(scale(aK), s_q.shape), A),
                    jnp.broadcast_to(scale(aV), s_q.shape))

    return _amax_groups(quantise, group, k, v, cols, self_kv, pb, kpb, vpb, running, jnp.zeros(qb.shape, dt))


def _certified_attention(emu: Emulator, a: AttentionInputs, tighter: bool = False):
    """``(o, ok)``: attention from float64 matrix products (:func:`certified_matmul`),
    whole rows of scores at a time; ``ok`` (nq,) marks the query rows whose every dot
    product was certified. The others must be recomputed (:func:`_fill_uncertified`).
    ``tighter``: with the matrix products' second certificate stage (the forward leaves
    it to :func:`_fill_uncertified`, for the open rows only)."""
    k, v, kp, vp, cols, weights = _prepare(emu, a)
    q, self_kv = a.q, a.self_kv
    nk = k.shape[0]
    bf = max(1, min(q.shape[0], _BLOCK_ELEMS // (4 * nk)))
    kstats, vstats = matmul_stats(emu, k.T), matmul_stats(emu, v)  # once for every block

    def block(args):
        qb, pb, kpb, vpb, qn1, qn2 = args
        is_self = cols[None, :] == pb[:, None]
        s, ok_s = certified_matmul(emu, qb, k.T, w_stats=kstats, x_norms=(qn1, qn2), tighter=tighter)
        if self_kv is not None:
            s = jnp.where(is_self, emu.dot(qb, kpb)[:, None], s)
            ok_s = ok_s | is_self
        (alpha, ok_den), _ = weights(s, pb, "float64")
        extra = None
        if self_kv is not None:
            a_self = jnp.sum(jnp.where(is_self, alpha, jnp.zeros_like(alpha)), axis=-1)  # one nonzero term
            extra = (pb, a_self[:, None] * vpb)
            alpha = jnp.where(is_self, jnp.zeros_like(alpha), alpha)
        # the weights' lowest bits, too: with them the exact sums that fall on a rounding boundary
        # (rows over few keys, blocked's short blocks: products of few bits) are certified here
        o, ok_o = certified_matmul(emu, alpha, v, extra, w_stats=vstats, two_norm=False, tighter=tighter)
        return o, jnp.all(ok_s, axis=-1) & ok_den & jnp.all(ok_o, axis=-1)

    args = (q, a.qpos, kp, vp, *row_norms(emu, q))  # the query norms, too, once for every block
    return _map_rows(block, args, bf)


def _fill_uncertified(emu: Emulator, o, ok, a: AttentionInputs):
    """``o`` with every row that ``ok`` leaves uncertified recomputed over all keys (masked
    keys are exact zeros, which change no reduction order's result): from the certificates
    with their second stage (:func:`_attention_recheck`), then op by op for the rows still
    open (:func:`_attention_redo`). Both are programs of their own (:func:`_fill_rows`),
    compiled when a row first needs them, once per (policy, shapes), never part of the
    forward's code."""
    nk = a.k.shape[0] + (a.self_kv is not None)
    b, _ = _blocks(o.shape[0], nk * o.shape[1])
    static, roles = _detached(emu)
    spec = (static, a.scale, a.alibi, a.window, a.self_kv is not None)
    return _fill_rows(o, ok, (a.q, jnp.asarray(a.qpos), *_own_kv(a)), _attention_redo, b, spec, (roles, a.k, a.v),
                      _attention_recheck)


def _redo_inputs(spec, data, qb, pb, kpb, vpb):
    """The emulator and the attention inputs of a block of rows of :func:`_fill_uncertified`."""
    static, scale, alibi, window, has_self = spec
    roles, k, v = data
    a = AttentionInputs(q=qb, k=k, v=v, qpos=pb, scale=scale, alibi=alibi, window=window,
                        self_kv=(kpb, vpb) if has_self else None)
    return _attached(static, roles), a


def _attention_recheck(spec, data, qb, pb, kpb, vpb):
    """Rows of :func:`_fill_uncertified` from the certified attention with the second
    certificate stage: ``(o, ok)``, a program of its own (:func:`_fill_rows`)."""
    return _certified_attention(*_redo_inputs(spec, data, qb, pb, kpb, vpb), tighter=True)


def _attention_redo(spec, data, qb, pb, kpb, vpb):
    """Rows of :func:`_fill_uncertified`, op by op with every exact sum from the
    superaccumulator: a program of its own (:func:`_fill_rows`)."""
    return _op_by_op_attention(*_redo_inputs(spec, data, qb, pb, kpb, vpb), "superacc")
