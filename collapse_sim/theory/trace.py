"""Every intermediate quantity of one float64 forward pass, and Jacobians ∂y_n/∂v_i^(0).

The analysis backend runs the model's own forward (``model.forward_tapped``) in float64,
recording what the model taps (layer inputs v^(ℓ), norm scales σ, per-head q/k/v after
RoPE, the attention matrices Λ^(ℓ,h), z^(ℓ)) so that the theorem bounds of this package
can be evaluated from the same numbers the model used. With ``frozen=True`` the norm
scales and attention weights are constants under differentiation: the model of Thm 5.1's
assumptions (i) and (ii).

What compiles: a trace (:func:`trace`) runs in numpy, eagerly (:class:`TraceBackend`),
and compiles nothing: the theorem checks draw a new architecture for every random
instance, so a compiled trace was one XLA program per instance, each costing more to
compile (~0.4 s) or to load from the cache (~0.1 s) than the pass itself. A Jacobian
(:func:`jacobian`) needs JAX's autodiff and is one compiled XLA program (weights and
the zero perturbation as arguments); in another ``dtype`` (bf16, fp16) it is therefore
"what XLA does" with the whole pass in view, which on CPU keeps float32 intermediates
inside fusions (docs/backends.md), not a rounding after every op. :func:`compiled_taps`
compiles the tapped forward of any backend (explain-native).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import positional, require_x64
from ..backends import is_stochastic
from ..backends.inputs import AttentionInputs
from ..backends.native import NativeBackend
from ..model import Params, forward_tapped


def _softmax_np(s):
    """``jax.nn.softmax`` over the last axis in numpy: exp(s − max) ÷ sum."""
    e = np.exp(s - np.max(s, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


class AnalysisBackend(NativeBackend):
    """float64 (or ``dtype``), full attention matrices (kept in ``_attn`` while the model is traced)."""

    _softmax = staticmethod(jax.nn.softmax)

    def __init__(self, frozen: bool = False, dtype: str = "fp64"):
        super().__init__(dtype)
        self.frozen = frozen
        self.label = f"analysis:{self.fmt.name}" + (":frozen" if frozen else "")
        self._attn: list = []

    def freeze(self, x):
        return jax.lax.stop_gradient(x) if self.frozen else x

    def attention(self, inputs: AttentionInputs):
        q, k, v, alibi, window = inputs.q, inputs.k, inputs.v, inputs.alibi, inputs.window
        if inputs.self_kv is not None:
            raise ValueError("the analysis backend does not take probe tokens")
        xp = self.xp
        qpos, kpos = xp.asarray(inputs.qpos), xp.arange(k.shape[0])  # keys at positions 0..n_k - 1
        s = (q @ k.T) * xp.asarray(inputs.scale, q.dtype)
        if alibi is not None:
            s = s - xp.asarray(alibi, s.dtype) * (qpos[:, None] - kpos[None, :]).astype(s.dtype)
        valid = kpos[None, :] <= qpos[:, None]
        if window is not None:
            valid = valid & (kpos[None, :] > qpos[:, None] - window)
        a = self._softmax(xp.where(valid, s, -xp.inf))
        a = self.freeze(xp.where(valid, a, xp.zeros_like(a)))
        self._attn.append(a)
        return a @ v


class TraceBackend(AnalysisBackend):
    """The analysis backend in float64 numpy, run eagerly op by op (nothing compiles): the
    model's ops in the model's order, matrix products through BLAS like XLA's dots. Its values
    differ from the compiled native float64 pass by float64 roundings (fused or reordered ops),
    which the bounds' γ_K(2^-53) widening covers either way (docs/theory.md)."""

    xp = np
    _softmax = staticmethod(_softmax_np)
    add, sub, mul, div, sqrt = (staticmethod(f) for f in (np.add, np.subtract, np.multiply, np.divide, np.sqrt))

    def __init__(self):
        super().__init__(False, "fp64")
        self.label = "analysis:fp64:numpy"

    def freeze(self, x):
        return x

    def store(self, x):
        return np.asarray(x, np.float64)

    def const(self, c, like):
        return np.full(np.shape(like), c, np.float64)

    def to_numpy(self, x):
        return np.asarray(x, np.float64)

    def relu(self, x):
        return np.maximum(x, 0.0)

    def mean(self, x):
        return np.mean(x, axis=-1)

    def linear(self, x, w):
        return x @ w


@dataclasses.dataclass
class Trace:
    """float64 intermediates of one pass over ``tokens`` (row i = prefix of length i+1)."""

    params: Params
    tokens: np.ndarray
    x: list[np.ndarray | None]  # x[ℓ]: input of layer ℓ (ℓ = 0..L-1); x[L]: before the final norm
    #   (gaussian model: x[0] is None, its layer's inputs are the drawn q, k, v; x[1] the attention output)
    z: list[np.ndarray]  # empty for the gaussian model (no residual)
    sigma: dict[str, np.ndarray]  # "l0.n1", ..., "n3": per-row norm scales
    q: dict[tuple[int, int], np.ndarray]  # (layer, head) -> (N, dh), after RoPE
    k: dict[tuple[int, int], np.ndarray]
    v: dict[tuple[int, int], np.ndarray]
    attn: dict[tuple[int, int], np.ndarray]  # (layer, head) -> (N, N) row-stochastic, lower triangular
    y: np.ndarray


class Recorder:
    """A backend that records what the model taps, in the order it taps it, and passes every
    other call to the backend it wraps."""

    def __init__(self, inner):
        self._inner = inner
        self.records: dict = {}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def tap(self, name, x):
        self.records[name] = x
        return x


def compiled_taps(params: Params, tokens: np.ndarray, backend, *, delta0=None, compiler_options: dict | None = None):
    """``forward_tapped`` on ``backend`` compiled as one XLA program (the weights and ``delta0``
    its arguments, ``tokens`` a constant): run eagerly, every op of every new shape compiled its
    own small program (hundreds per theorem check). Returns ``(y, taps in tap order, the
    attention matrices an AnalysisBackend keeps (else []))``. A backend in stochastic rounding is
    refused: this traces it directly, with its draw count and seed fixed at trace time, not on the
    fresh emulator per trace that its forward runs (docs/semantics.md §2)."""
    if is_stochastic(backend):
        from ..policy import StochasticRoundingError

        raise StochasticRoundingError(f"tapped forwards run in a deterministic mode, not {backend.emu.mode}; "
                                      "use the policy with mode=rne (or another deterministic mode)")
    names: list[str] = []

    def run(arrays, delta0):
        R = Recorder(backend)
        if isinstance(backend, AnalysisBackend):
            backend._attn = []
        y = forward_tapped(Params(params.config, arrays), tokens, R, delta0=delta0)
        names[:] = R.records
        # lists: a dict's keys would come back sorted, not in tap order
        return y, list(R.records.values()), list(getattr(backend, "_attn", []))

    opts = {**backend.compiler_options(), **(compiler_options or {})}
    y, values, attn = jax.jit(run, compiler_options=opts or None)(params.arrays, delta0)
    return y, dict(zip(names, values)), attn


def trace(params: Params, tokens) -> Trace:
    """The float64 intermediates of one pass over ``tokens`` (:class:`TraceBackend`: numpy,
    eagerly, nothing compiled)."""
    require_x64("theory traces")
    c = params.config
    tokens = np.asarray(tokens)
    B = TraceBackend()
    rec = Recorder(B)
    y = np.asarray(forward_tapped(params, tokens, rec), np.float64)
    R, A = rec.records, B._attn
    L, H = c.n_layers, c.n_heads
    attn = {(l, h): A[l * H + h] for l in range(L) for h in range(H)}
    sig = {k[: -len("_sigma")]: v for k, v in R.items() if k.endswith("_sigma")}
    if c.kind == "gaussian":  # one layer fed by the draws: no layer-0 input, no residual z
        x, z = [None, R["l1.x"]], []
    else:
        x, z = [R[f"l{l}.x"] for l in range(L + 1)], [R[f"l{l}.z"] for l in range(L)]
    return Trace(params, tokens, x, z,
                 sig, *({(l, h): R[f"l{l}.{w}{h}"] for l in range(L) for h in range(H)} for w in "qkv"), attn, y)


def jacobian(params: Params, tokens, *, frozen: bool = True, dtype: str = "fp64") -> np.ndarray:
    """``J[i] = ∂y_n/∂v_i^(0)`` (d × d) for the last token n of ``tokens``, i = 1..n.

    ``frozen=True`` holds attention weights and norm scales constant (Thm 5.1's
    assumptions); ``frozen=False`` differentiates the model as it is. ``dtype`` runs
    the forward and its reverse-mode derivative natively in that JAX dtype."""
    require_x64("Jacobians")
    tokens = np.asarray(tokens)
    N, d = tokens.size, params.config.d

    B = AnalysisBackend(frozen, dtype)

    def last(arrays, delta):
        return forward_tapped(Params(params.config, arrays), tokens, B, delta0=delta)[-1]

    def jac(arrays, delta):  # (d_out, N, d_in) -> (N, d_out, d_in), widened to float64 (exactly) in the program
        return jnp.transpose(jax.jacrev(last, argnums=1)(arrays, delta), (1, 0, 2)).astype(jnp.float64)

    # one compiled program (eagerly, every op of the forward and its transpose compiled its own); its
    # arguments are numpy arrays, so no eager op (a cast, a zeros) compiles a program of its own
    return np.asarray(jax.jit(jac)(params.arrays, np.zeros((N, d), B.dtype)))


def spectral_norm(W) -> float:
    """‖W‖₂, the operator norm of ``x ↦ x @ W``."""
    return float(np.linalg.norm(W, 2))


def gain_max(params: Params, name: str) -> float:
    """‖g‖_∞ of norm ``name`` (1 without norms): its Jacobian is ≤ ‖g‖_∞/σ."""
    return float(np.max(np.abs(params[name + "_g"]))) if params.config.norm != "none" else 1.0


@functools.lru_cache(maxsize=8)
def rope_step_factors(N: int, dh: int, start: int = 0, fraction: float = 1.0) -> np.ndarray:
    """(N, dh/2): for positions p = start..start+N−1 and each rotated pair, an upper bound on
    ‖(R̃_{p+1} − R̃_p) u‖ / ‖R̃_p u‖ restricted to that pair, where R̃ are the float64
    cos/sin tables the model multiplies by (``positional.rope_tables``). R̃_{p+1} R̃_p^{-1}
    is [[a, −b], [b, a]] with a = (c₁c₀ + s₁s₀)/D, b = (s₁c₀ − c₁s₀)/D, D = c₀² + s₀²,
    computed exactly from the table entries (rationals); the factor is √((a − 1)² + b²),
    rounded up. (With exact rotations it would be 2|sin(θ/2)| for every p; the float64
    tables compose only to ~p·2^-53, so R̃_{p+1} ≠ R̃_1 R̃_p.)"""
    from fractions import Fraction

    cos, sin = positional.rope_tables(np.arange(start, start + N + 1), dh, fraction=fraction)
    out = np.empty((N, dh // 2))
    for p in range(N):
        for i in range(dh // 2):
            c0, s0, c1, s1 = (Fraction(float(v)) for v in (cos[p, i], sin[p, i], cos[p + 1, i], sin[p + 1, i]))
            D = c0 * c0 + s0 * s0
            a, b = (c1 * c0 + s1 * s0) / D, (s1 * c0 - c1 * s0) / D
            out[p, i] = np.sqrt(float((a - 1) ** 2 + b * b)) * (1 + 2.0**-50)  # float() and √ round: ≤ 2^-52 each
    out.flags.writeable = False
    return out


def rope_shift(x: np.ndarray, fraction: float = 1.0) -> np.ndarray:
    """``‖(R̃_{i+1} − R̃_i) u_i‖`` per row i (position i, 0-based), where ``x`` holds the
    rotated rows ``R̃_i u_i``: how far a RoPE-rotated vector moves when its position grows
    by one, with the model's own float64 tables (``rope_step_factors``; p-RoPE's
    ``fraction``: pairs that do not rotate do not move)."""
    F = rope_step_factors(x.shape[0], x.shape[1], fraction=fraction)
    pair2 = x[:, 0::2] ** 2 + x[:, 1::2] ** 2
    return np.sqrt(np.sum(F * F * pair2, axis=1))
