"""EmulatedBackend: the model primitives of collapse_sim.model on an :class:`Emulator`:
the mean and norms (docs/semantics.md §4), the rounding of weights and constants to
storage (§5.1-§5.6), linear layers (§7) and the attention (§3.3, §8, §10). Known
departures (§12): ``exp`` beyond float64's range under directed modes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ...policy import Policy
from .._jit import JaxBackendBase
from .attention import _emulated_attention, _linear
from .ops import Emulator
from .schedule import _causal_segments, _segment_count, _sharded


class EmulatedBackend(JaxBackendBase):
    """Model primitives of collapse_sim.model, every op rounded per the policy
    (docs/semantics.md §4-§10).

    Attention for query i over key columns 0..qpos_i (causal; a window zeroes
    the columns before ``qpos_i - w + 1``):

        s_ij = round_c(round_c(dot(q_i, k_j)) * scale) [+ alibi bias]  → softmax format
        m_i  = max_j s_ij (if max_subtract)
        e_ij = exp(s_ij - m_i) in the softmax format (masked: exact 0)
        α_ij = e_ij / Σ_j e_ij   (sum in the policy's order, accumulate format)
        out_i = Σ_j α_ij v_j     (α in the compute format; dot in the policy's order)

    Reductions run over all key columns with masked terms as exact zeros,
    which is the same (bit for bit) as running over the prefix only for every
    order (kahan skips masked terms explicitly). Queries are processed in
    blocks, so memory is O(block · N · d_h), never N × N × d_h.
    """

    kind = "emulated"

    def __init__(self, policy: "Policy | str", *, shard: bool = False):
        self.emu = Emulator(policy)
        self.policy = self.emu.policy
        self.dtype = self.emu.dtype
        self.shard = shard and jax.device_count() > 1
        self.label = f"emulated:{self.policy}" + (f":sharded{jax.device_count()}" if self.shard else "")

    def describe(self) -> dict:
        return {"backend": "emulated", "policy": str(self.policy), "carrier": str(self.dtype),
                "compiler_options": self.compiler_options()}

    def compiler_options(self) -> dict:
        """On CPU, XLA's older loop emitters instead of its MLIR fusion emitters. Measured
        on jax 0.10 (docs/backends.md): the same bits (the arithmetic is explicit), half
        the compile memory (a forward at N = 4096: 1.26 -> 0.57 GiB peak), a pairwise
        forward 1.8x faster, the certified orders as fast or faster."""
        return {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else {}

    # data
    def store(self, x):
        return self.emu.store(jnp.asarray(x, jnp.float64))

    def const(self, c, like):
        return jnp.broadcast_to(self.store(jnp.float64(c)), like.shape)

    def to_numpy(self, x):
        return np.asarray(x, dtype=np.float64)

    # arithmetic
    def add(self, a, b):
        a, b = jnp.broadcast_arrays(a, b)
        return self.emu.add(a, b)

    def sub(self, a, b):
        a, b = jnp.broadcast_arrays(a, b)
        return self.emu.sub(a, b)

    def mul(self, a, b):
        a, b = jnp.broadcast_arrays(a, b)
        return self.emu.mul(a, b)

    def div(self, a, b):
        return self.emu.div(a, b)

    def sqrt(self, a):
        return self.emu.sqrt(a)

    def relu(self, x):
        return jnp.maximum(x, jnp.zeros_like(x))  # exact

    def mean(self, x):
        # docs/semantics.md §4.1: ∘(∘(Σ x) ÷ d), d the exact integer (a carrier value)
        n = x.shape[-1]
        s = self.emu.sum(x)
        return self.emu.div(s, jnp.full(s.shape, float(n), self.dtype))

    def linear(self, x, w):
        return _linear(self.emu, x, w)

    def attention(self, q, k, v, qpos, kpos, scale, alibi=None, window=None, self_kv=None):
        del kpos  # keys sit at positions 0..Nk-1
        if self.shard:
            return _sharded(self.emu, q, k, v, np.asarray(qpos), scale, alibi, window, self_kv)
        if isinstance(qpos, np.ndarray) and np.all(np.diff(qpos) >= 0) and _segment_count(self.emu, qpos.size) > 1:
            return _causal_segments(self.emu, q, k, v, qpos, scale, alibi, window, self_kv)
        return _emulated_attention(self.emu, q, k, v, jnp.asarray(qpos), scale, alibi, window, self_kv)
