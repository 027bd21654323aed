"""EmulatedBackend: the model primitives of collapse_sim.model on an :class:`Emulator`:
the mean and norms (docs/semantics.md §4), the rounding of weights and constants to
storage (§5.1-§5.6), linear layers (§7) and the attention (§3.3, §8, §10). Known
departures: docs/semantics.md §12.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np

from ...errors import UsageError
from ...policy import BLOCK_KERNELS, Policy, StochasticRoundingError
from ...rounding import Stochastic
from .._jit import JaxBackendBase, run_jitted
from ..inputs import AttentionInputs
from .attention import _adaptive_attention, _emulated_attention, _linear, exact_path
from .ops import Emulator, shared_class_refusal
from .schedule import _causal_segments, _segments_of, _sharded


#: The longest stream (tokens) the emulated forward runs in the shared program (formats as
#: data, float64 carrier: one compiled program for every format of ops.SHARED_CLASS); longer
#: streams run the program specialised to the policy (formats static, the narrowest carrier:
#: float32 for fp16 and the fp8 formats). Why this length: the shared program costs more
#: than 1.5x the specialised one's run time for float32-carried formats at every length
#: measured (fp16 pairwise, d = 64, L = 1, one run on a loaded 2-core machine: 1.56x at
#: N = 512, 1.64x at 2048, 4.6x at 4096; bf16, float64-carried either way: 0.83-1.11x;
#: benchmarks/bench_formats.py), but up to 2048 tokens the extra is < 1 s per forward while
#: each specialised program it saves costs 5-12 s to compile; at 4096 the extra (~10 s per
#: forward) exceeds a compile.
SHARED_MAX_N = 2048

#: (shared program's static part, model function, config, shape) -> the policies that ran
#: the specialised program there (the automatic choice of :class:`EmulatedBackend`).
_POLICIES_RUN: dict = {}
_POLICIES_LOCK = threading.Lock()


def _compiler_options() -> dict:
    """On CPU, XLA's older loop emitters instead of its MLIR fusion emitters. Measured
    on jax 0.10 (docs/backends.md): the same bits (the arithmetic is explicit), half
    the compile memory (a forward at N = 4096: 1.26 -> 0.57 GiB peak), a pairwise
    forward 1.8x faster, the certified orders as fast or faster."""
    return {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else {}


def shared_groups(policies) -> list[set]:
    """The policies (strings or :class:`Policy`) of ``policies`` that run one shared program
    (formats as data) together, in groups of two or more: a caller that runs every policy of
    a group on one model at one shape compiles one program for the group by building its
    backends with ``shared="first"`` (:class:`EmulatedBackend`). Policies outside the shared
    class, or under stochastic rounding, are in no group."""
    groups: dict = {}
    for p in policies:
        pol = Policy.parse(p)
        if shared_class_refusal(pol) is None and not isinstance(pol.mode, Stochastic):
            groups.setdefault(Emulator(pol, shared=True), set()).add(p)
    return [g for g in groups.values() if len(g) > 1]


class _SharedProgram:
    """The static part of the shared emulated forward (its compiled code's key: every
    policy that differs only in its formats has the same one); :meth:`bind` gives the
    backend the model runs on inside the program, its formats the traced arguments."""

    kind = "emulated"

    def __init__(self, emu: Emulator):
        self.emu = emu

    def __hash__(self) -> int:
        return hash(self.emu)

    def __eq__(self, other) -> bool:
        return isinstance(other, _SharedProgram) and other.emu == self.emu

    def compiler_options(self) -> dict:
        return _compiler_options()

    def program_key(self) -> str:
        return f"shared:{self.emu.host_key()}"

    def bind(self, data) -> "EmulatedBackend":
        return EmulatedBackend(self.emu.bind(data).fresh())


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

    Which compiled program :meth:`run` uses (the bits are the same): ``shared=None``
    (automatic) the specialised one for the first policy run at a shape, and the shared
    one (formats as data) for every later policy of the shared class at that shape, up
    to :data:`SHARED_MAX_N` tokens (a process that runs one format compiles one program
    of the cheaper kind; one that switches formats compiles two in all, never one per
    format); ``"first"`` the same, but the shared one from the first policy at a shape
    (for a caller that knows several policies of one shared program will run there:
    :func:`shared_groups`; one program in all), a policy that already ran its specialised
    program there keeping it; ``True`` always the shared one (an error if the formats do
    not allow it); ``False`` always the specialised one. Sharded backends use the
    specialised one.

    Under stochastic rounding (``mode=sr(r,seed=s)``, docs/semantics.md §2) every trace runs
    on a fresh emulator whose draw scopes follow the layers and row blocks (``draw_scope``,
    ``Emulator.stream``), in the specialised program with the seed as its argument;
    a block kernel, sharding and ``shared=True`` are refused.
    """

    kind = "emulated"
    scans_layers = True  # one compiled layer, not n_layers copies (model._scan_layers): the same bits

    def __init__(self, policy: "Policy | str | Emulator", *, shard: bool = False, shared: "bool | str | None" = None):
        if shared not in (None, True, False, "first"):
            raise UsageError(f"shared must be None (automatic), 'first', True or False, got {shared!r}")
        self.emu = policy if isinstance(policy, Emulator) else Emulator(policy)
        self.policy = self.emu.policy
        self.dtype = self.emu.dtype
        self.shard = shard and jax.device_count() > 1
        if self.emu.stochastic and (self.shard or self.emu.kernel.kind in BLOCK_KERNELS):
            raise StochasticRoundingError(
                f"the emulated forward runs {self.emu.mode} with the naive kernel, unsharded (docs/semantics.md §12), "
                f"not {'sharded' if self.shard else 'with the ' + str(self.emu.kernel) + ' kernel'}; "
                f"use {'an unsharded backend' if self.shard else 'kernel=naive'}")
        self.label = f"emulated:{self.policy}" + (f":sharded{jax.device_count()}" if self.shard else "")
        # the compiled program's identity: under sr the seed is the program's argument (run)
        self._program = (f"emulated:{dataclasses.replace(self.policy, mode=Stochastic(self.emu.mode.bits))}"
                         if self.emu.stochastic else self.label)
        if self.emu.stochastic and shared is True:
            raise StochasticRoundingError(f"the emulated forward runs {self.emu.mode} in the program specialised to "
                                          "the policy's formats (docs/semantics.md §12.1), not the shared one; "
                                          "leave shared unset")
        if self.emu.shared or self.shard or shared is False or self.emu.stochastic:
            self.shared = None
        elif shared is True or shared_class_refusal(self.policy) is None:
            self.shared = Emulator(self.policy, shared=True)  # raises if the formats do not allow it
        else:
            self.shared = None
        self.shared_max_n = np.inf if shared is True else SHARED_MAX_N
        self.share_first = shared == "first"

    def describe(self) -> dict:
        return {"backend": "emulated", "policy": str(self.policy), "carrier": str(self.dtype),
                "compiler_options": self.compiler_options(),
                "shared_program": (None if self.shared is None else "always" if np.isinf(self.shared_max_n) else
                                   f"for the second and later policies run at a shape, up to N = {self.shared_max_n}")}

    def compiler_options(self) -> dict:
        return _compiler_options()

    def run(self, fn, config, arrays, tokens, probe):
        """The model function under jit, in the program the class docstring's rule chooses."""
        if self.shared is not None and len(tokens) <= self.shared_max_n and self._use_shared(fn, config, arrays, tokens, probe):
            out = run_jitted(_SharedProgram(self.shared), fn, config, arrays, tokens, probe, self.shared.data())
            # format values, exact in the policy's carrier; converted on the host, since an
            # eager astype would compile a program per shape and dtype
            return jax.tree.map(lambda y: jax.device_put(np.asarray(y).astype(self.dtype)), out)
        # under stochastic rounding every trace runs on a fresh emulator (bind), its draws from slot 0, and
        # the seed is an argument: one program for every seed
        return run_jitted(self, fn, config, arrays, tokens, probe,
                          np.uint64(self.emu.mode.seed) if self.emu.stochastic else None)

    def __hash__(self) -> int:
        return hash((self.kind, self._program))

    def program_key(self) -> str:
        return f"{type(self).__qualname__}:{self._program}"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._program == self._program

    def bind(self, data) -> "EmulatedBackend":
        """This backend on a fresh emulator (:meth:`Emulator.fresh`) whose seed is ``data`` (a
        traced uint64), for one trace of the specialised program under stochastic rounding."""
        b = copy.copy(self)
        b.emu = self.emu.fresh(data)
        return b

    def draw_scope(self, i):
        return self.emu.stream(i)

    def _use_shared(self, fn, config, arrays, tokens, probe) -> bool:
        """``shared=True``: always. Automatic: once another policy of the shared class has
        run at this shape in this process; ``"first"``: from the first policy. Either way a
        policy that ran specialised at this shape keeps its program."""
        if np.isinf(self.shared_max_n):
            return True
        key = (_SharedProgram(self.shared), fn, config.computation(), len(tokens), probe is None,
               tuple(sorted((k, np.shape(v)) for k, v in arrays.items())))
        with _POLICIES_LOCK:  # two threads at one shape (collapse_sim.lanes): one decides after the other
            seen = _POLICIES_RUN.setdefault(key, set())
            use = self.policy not in seen and (self.share_first or bool(seen))
            if not use:
                seen.add(self.policy)
        return use

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
        s = self.emu.sum(x, path=exact_path(x.size))
        return self.emu.div(s, jnp.full(s.shape, float(n), self.dtype))

    @property
    def needs_stream_rows(self) -> bool:
        """Whether a probe's linear layers and attention take the stream's rows (``stream_rows``):
        under per-tensor scaled operands (docs/semantics.md §13.2.1), also in the shared program."""
        return self.emu.per_tensor

    @property
    def merges_probes(self) -> bool:
        """Whether the model runs a forward's probes as rows of the stream's calls (model._rows; one
        copy of every op in the program, not two): in every deterministic mode (docs/semantics.md §10),
        but not under stochastic rounding (the probes' draws are their own calls', §2), per-tensor
        scaled operands or flash3fp8 (a probe's scales then cover the stream's rows before it and its
        own, §8.8.2, §13.2.1), or sharded (the shards split the stream's rows)."""
        return not (self.emu.stochastic or self.emu.per_tensor or self.shard or self.emu.kernel.kind == "flash3fp8")

    def linear(self, x, w, stream_rows=None):
        return _linear(self.emu, x, w, stream_rows)

    def attention(self, inputs: AttentionInputs, adaptive=None, stream_rows=None):
        # the scores' operands (docs/semantics.md §13.1): each query and key in blocks along d_h; per
        # tensor (§13.2.1) each query with the amax of the queries up to it (after the stream's,
        # ``stream_rows``, for probes), the keys per query row in the attention (attention.py)
        a = dataclasses.replace(inputs, q=self.emu.operand(inputs.q, -1, self.emu.prefix_amax(inputs.q, stream_rows)))
        if not self.emu.per_tensor:
            skv = a.self_kv if a.self_kv is None else (self.emu.operand(a.self_kv[0]), a.self_kv[1])
            a = dataclasses.replace(a, k=self.emu.operand(a.k), self_kv=skv)
        qpos = a.qpos
        if adaptive is not None:  # adaptive temperature (docs/semantics.md §8.7): op by op, unsegmented, unsharded
            return _adaptive_attention(self.emu, dataclasses.replace(a, qpos=jnp.asarray(qpos)), adaptive)
        if self.shard:
            return _sharded(self.emu, a)
        if isinstance(qpos, np.ndarray) and np.all(np.diff(qpos) >= 0):
            segments = _segments_of(self.emu, qpos, a.q.shape[1])
            if segments > 1:
                return _causal_segments(self.emu, a, segments)
        return _emulated_attention(self.emu, dataclasses.replace(a, qpos=jnp.asarray(qpos)))
