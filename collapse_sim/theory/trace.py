"""Every intermediate quantity of one float64 forward pass, and Jacobians ∂y_n/∂v_i^(0).

The analysis backend is the native float64 backend run eagerly, recording what the
model taps (layer inputs v^(ℓ), norm scales σ, per-head q/k/v after RoPE, the
attention matrices Λ^(ℓ,h), z^(ℓ)) so that the theorem bounds of this package can be
evaluated from the same numbers the model used. With ``frozen=True`` the norm scales
and attention weights are constants under differentiation: the model of Thm 5.1's
assumptions (i) and (ii).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import positional
from ..backends.native import NativeBackend
from ..model import Params, _forward_impl, forward_arrays


class AnalysisBackend(NativeBackend):
    """float64, eager, full attention matrices; records taps."""

    def __init__(self, frozen: bool = False, dtype: str = "fp64"):
        super().__init__(dtype)
        self.frozen = frozen
        self.label = f"analysis:{self.fmt.name}" + (":frozen" if frozen else "")
        self.records: dict = {}
        self._attn: list = []

    def tap(self, name, x):
        self.records[name] = x
        return x

    def freeze(self, x):
        return jax.lax.stop_gradient(x) if self.frozen else x

    def attention(self, q, k, v, qpos, kpos, scale, alibi=None, window=None, self_kv=None):
        if self_kv is not None:
            raise ValueError("the analysis backend does not take probe tokens")
        qpos, kpos = jnp.asarray(qpos), jnp.asarray(kpos)
        s = (q @ k.T) * jnp.asarray(scale, q.dtype)
        if alibi is not None:
            s = s - jnp.asarray(alibi, s.dtype) * (qpos[:, None] - kpos[None, :]).astype(s.dtype)
        valid = kpos[None, :] <= qpos[:, None]
        if window is not None:
            valid = valid & (kpos[None, :] > qpos[:, None] - window)
        a = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1)
        a = self.freeze(jnp.where(valid, a, jnp.zeros_like(a)))
        self._attn.append(a)
        return a @ v


@dataclasses.dataclass
class Trace:
    """float64 intermediates of one pass over ``tokens`` (row i = prefix of length i+1)."""

    params: Params
    tokens: np.ndarray
    x: list[np.ndarray]  # x[ℓ]: input of layer ℓ (ℓ = 0..L-1); x[L]: before the final norm
    z: list[np.ndarray]
    sigma: dict[str, np.ndarray]  # "l0.n1", ..., "n3": per-row norm scales
    q: dict[tuple[int, int], np.ndarray]  # (layer, head) -> (N, dh), after RoPE
    k: dict[tuple[int, int], np.ndarray]
    v: dict[tuple[int, int], np.ndarray]
    attn: dict[tuple[int, int], np.ndarray]  # (layer, head) -> (N, N) row-stochastic, lower triangular
    y: np.ndarray


def _run(params: Params, tokens, backend, delta0=None):
    c = params.config
    arrays = forward_arrays(params, len(tokens))
    W = {k: jnp.asarray(v, jnp.float64) for k, v in arrays.items()}  # rounded to the dtype by B.store
    return _forward_impl(c, W, np.asarray(tokens), None, backend, delta0=delta0)


def trace(params: Params, tokens) -> Trace:
    if not jax.config.jax_enable_x64:
        raise RuntimeError("theory traces need JAX x64: call collapse_sim.enable_x64() at program start")
    c = params.config
    B = AnalysisBackend()
    y = np.asarray(_run(params, tokens, B))
    R = {k: np.asarray(v) for k, v in B.records.items()}
    L, H = c.n_layers, c.n_heads
    attn = {(l, h): np.asarray(B._attn[l * H + h]) for l in range(L) for h in range(H)}
    sig = {k[: -len("_sigma")]: v for k, v in R.items() if k.endswith("_sigma")}
    return Trace(params, np.asarray(tokens), [R[f"l{l}.x"] for l in range(L + 1)], [R[f"l{l}.z"] for l in range(L)],
                 sig, *({(l, h): R[f"l{l}.{w}{h}"] for l in range(L) for h in range(H)} for w in "qkv"), attn, y)


def jacobian(params: Params, tokens, *, frozen: bool = True, dtype: str = "fp64") -> np.ndarray:
    """``J[i] = ∂y_n/∂v_i^(0)`` (d × d) for the last token n of ``tokens``, i = 1..n.

    ``frozen=True`` holds attention weights and norm scales constant (Thm 5.1's
    assumptions); ``frozen=False`` differentiates the model as it is. ``dtype`` runs
    the forward and its reverse-mode derivative natively in that JAX dtype."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError("Jacobians need JAX x64: call collapse_sim.enable_x64() at program start")
    tokens = np.asarray(tokens)
    N, d = tokens.size, params.config.d

    B = AnalysisBackend(frozen, dtype)

    def last(delta):
        return _run(params, tokens, B, delta0=delta)[-1]

    J = jax.jacrev(last)(jnp.zeros((N, d), B.dtype))  # (d_out, N, d_in)
    return np.transpose(np.asarray(J, np.float64), (1, 0, 2))


def spectral_norm(W) -> float:
    """‖W‖₂, the operator norm of ``x ↦ x @ W``."""
    return float(np.linalg.norm(W, 2))


def gain_max(params: Params, name: str) -> float:
    """‖g‖_∞ of norm ``name`` (1 without norms): its Jacobian is ≤ ‖g‖_∞/σ."""
    return float(np.max(np.abs(params[name + "_g"]))) if params.config.norm != "none" else 1.0


def rope_shift(x: np.ndarray) -> np.ndarray:
    """``‖(R_1 − I) x_i‖`` per row: how far a RoPE-rotated vector moves when its
    position grows by one (R_{i+1} R_i^{-1} = R_1)."""
    cos, sin = positional.rope_tables(np.array([1]), x.shape[1])
    x0, x1 = x[:, 0::2], x[:, 1::2]
    r0 = x0 * cos - x1 * sin
    r1 = x0 * sin + x1 * cos
    return np.sqrt(np.sum((r0 - x0) ** 2 + (r1 - x1) ** 2, axis=1))
