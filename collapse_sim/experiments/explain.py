"""Native, explained: why a native bf16/fp16 forward differs from the format it names.

The native backend is "what XLA does"; the emulated backend at the uniform policy of the
same format is "what the format does" (docs/semantics.md). :func:`explain_native` runs
both with every intermediate the model taps recorded (layer inputs, norm scales,
per-head q/k/v, residual sums, outputs: :func:`collapse_sim.model.forward_tapped`), finds
the first tap whose values differ, and names the cause from a checked list by applying
each candidate behaviour in turn — to the emulated policy (what XLA computes in a wider
format) or to the native compilation (an XLA behaviour turned off) — and keeping the
fewest that move the first difference furthest (or remove it). It repeats until the two
runs agree or no candidate helps ("unexplained"). What it names is a set of behaviours
under which the taps agree from the first to the named point; a candidate can move the
first difference by coincidence, so the conclusion that counts is the last line: whether,
with everything named accounted for, every tap agrees bit for bit.

The candidates (:data:`CAUSES`):

* ``f32-accumulation`` — XLA:CPU sums and dots of bf16/fp16 values accumulate in float32
  and round once: the emulated policy gets ``accumulate=fp32``.
* ``excess-precision`` — under jit XLA keeps float32 intermediates inside a fusion and
  rounds to the narrow type only at its end: the native forward is compiled with
  ``xla_allow_excess_precision=False``.
* ``reciprocal-rewrite`` — XLA rewrites ``a / broadcast(b)`` as ``a * (1/b)`` (two
  roundings): the native division gets its divisor behind an optimisation barrier.
* ``subnormal-flush`` — XLA:CPU flushes subnormal results: every format of the
  emulated policy loses its subnormals.

Each run is one compiled program with the taps as outputs. Outputs are stored in the
narrow type, which can move XLA's rounding points compared with a forward that returns
``y`` only; the final output is a tap too, so a difference there is still found. The
JAX version, backend and XLA flags are recorded with the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..backends import make_backend
from ..backends.native import NativeBackend
from ..formats import Format
from ..model import Params
from ..policy import Order, Policy
from ..theory.trace import compiled_taps


@dataclasses.dataclass(frozen=True)
class Cause:
    name: str
    what: str  # one sentence: the behaviour
    side: str  # "emulated" (the policy computes what XLA does) or "native" (XLA's behaviour turned off)


CAUSES = (
    Cause("f32-accumulation", "sums and dot products accumulate in float32, left to right, and round once", "emulated"),
    Cause("excess-precision", "float32 intermediates are kept inside a fusion under jit", "native"),
    Cause("reciprocal-rewrite", "a / broadcast(b) is computed as a * (1/b)", "native"),
    Cause("subnormal-flush", "subnormal results are flushed to zero", "emulated"),
)
CAUSE = {c.name: c for c in CAUSES}


class _Barrier(NativeBackend):
    """Native arithmetic with the divisor of every division behind an optimisation barrier,
    so XLA cannot turn ``a / broadcast(b)`` into ``a * (1/b)``."""

    def div(self, a, b):
        return jnp.divide(a, jax.lax.optimization_barrier(jnp.broadcast_to(b, jnp.shape(a))))


def _flushing(f: Format) -> Format:
    return dataclasses.replace(f, subnormals=False, name=f"{f.name}-ftz")


def emulated_policy(fmt: str, applied: frozenset[str]) -> Policy:
    """The uniform policy of ``fmt`` with the emulated-side causes in ``applied``."""
    pol = Policy.uniform(fmt)
    if "f32-accumulation" in applied:
        pol = dataclasses.replace(pol, accumulate=Policy.uniform("fp32").accumulate, order=Order.parse("sequential"))
    if "subnormal-flush" in applied:
        pol = dataclasses.replace(pol, **{r: _flushing(getattr(pol, r)) for r in ("storage", "compute", "accumulate", "softmax")})
    return pol


def native_backend(fmt: str, applied: frozenset[str]):
    """The native backend of ``fmt`` and its compiler options, with the native-side causes in
    ``applied`` turned off."""
    B = _Barrier(fmt) if "reciprocal-rewrite" in applied else NativeBackend(fmt)
    opts = {"xla_allow_excess_precision": False} if "excess-precision" in applied else {}
    return B, opts


def tapped(params: Params, tokens, backend, compiler_options: dict | None = None) -> dict[str, np.ndarray]:
    """Every tap of one forward (and ``"y"``, the output) as float64 arrays, in tap order,
    from one compiled program (:func:`collapse_sim.theory.trace.compiled_taps`)."""
    y, taps, _ = compiled_taps(params, np.asarray(tokens), backend, compiler_options=compiler_options)
    return {k: np.asarray(jnp.asarray(v).astype(jnp.float64)) for k, v in {**taps, "y": y}.items()}


def first_difference(a: dict, b: dict) -> tuple[int, str | None, int]:
    """(index in tap order, tap name, number of differing entries) of the first tap whose
    values differ (NaN equals NaN; +0 equals −0); (len, None, 0) when none does."""
    for i, (k, x) in enumerate(a.items()):
        y = b[k]
        diff = ~((x == y) | (np.isnan(x) & np.isnan(y)))
        if diff.any():
            return i, k, int(diff.sum())
    return len(a), None, 0


@dataclasses.dataclass
class Step:
    tap: str  # first differing tap before this step
    differing: int  # its differing entries
    causes: tuple[str, ...] | None  # the fewest causes that moved the first difference (None: unexplained)
    moved_to: str | None  # the first differing tap after it (None: the runs agree)


@dataclasses.dataclass
class Explanation:
    fmt: str
    steps: list[Step]
    applied: list[str]
    agree: bool  # whether the runs agree bit for bit once ``applied`` are in place
    environment: dict

    def lines(self) -> list[str]:
        out = [f"native {self.fmt} vs emulated {self.fmt} (jax {self.environment['jax']}, "
               f"{self.environment['platform']}, XLA_FLAGS={self.environment['xla_flags'] or '(none)'})"]
        for s in self.steps:
            head = f"  first difference at {s.tap} ({s.differing} entr{'y' if s.differing == 1 else 'ies'}): "
            if s.causes is None:
                out.append(head + "unexplained by " + ", ".join(c.name for c in CAUSES if c.name not in self.applied)
                           + " (alone or together)")
                continue
            what = " and ".join(f"{c} ({CAUSE[c].what})" for c in s.causes)
            out.append(head + what + "; accounted for, " + (f"the first difference moves to {s.moved_to}"
                                                            if s.moved_to else "the runs agree bit for bit"))
        if not self.steps:
            out.append("  the runs agree bit for bit")
        return out


def _fingerprint(params: Params, tokens) -> str:
    """A digest of the model (config and weights) and the tokens."""
    h = hashlib.sha256(repr(params.config).encode())
    for k in sorted(params.arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params.arrays[k], dtype=np.float64).tobytes())
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.hexdigest()


def explain(params: Params, tokens, fmt: str, *, observed=None, candidates=CAUSES, memo: dict | None = None) -> Explanation:
    """Explain why ``observed`` (default: the native backend of ``fmt``; a test can plant any
    ``applied -> taps`` function) differs from the emulated uniform policy of ``fmt``.
    ``memo`` (a dict) keeps the taps of every run made, for further calls with the same
    ``params`` and ``tokens``: each configuration compiles once."""
    memo = {} if memo is None else memo
    model = _fingerprint(params, tokens)  # a memo serves one (params, tokens): keyed by them too

    def native_taps(applied):
        B, opts = native_backend(fmt, applied)
        return tapped(params, tokens, B, opts)

    def emulated_taps(applied):
        return tapped(params, tokens, make_backend("emulated", emulated_policy(fmt, applied)))

    def side(fn, which, keep: bool):  # each side's taps depend only on that side's causes: each set once
        seen: dict = memo if keep else {}

        def get(applied):
            key = (model, which, fmt, frozenset(c for c in applied if CAUSE[c].side == which))
            if key not in seen:
                seen[key] = fn(key[3])
            return seen[key]
        return get

    observed = side(observed or native_taps, "native", observed is None)  # a planted run is not kept
    emulated_taps = side(emulated_taps, "emulated", True)
    applied: frozenset[str] = frozenset()
    steps: list[Step] = []
    obs, emu = observed(applied), emulated_taps(applied)
    at, tap, n = first_difference(obs, emu)
    while tap is not None:
        best = None
        rest = [c for c in candidates if c.name not in applied]
        for size in range(1, len(rest) + 1):  # the fewest causes that move the first difference
            for group in itertools.combinations(rest, size):
                trial = applied | {c.name for c in group}
                o2, e2 = observed(trial), emulated_taps(trial)
                at2 = first_difference(o2, e2)[0]
                if at2 > at and (best is None or at2 > best[0]):
                    best = (at2, group, trial, o2, e2)
            if best is not None:
                break
        if best is None:
            steps.append(Step(tap, n, None, None))
            break
        at2, group, applied, obs, emu = best
        _, tap2, n2 = first_difference(obs, emu)
        steps.append(Step(tap, n, tuple(c.name for c in group), tap2))
        at, tap, n = at2, tap2, n2
    env = {"jax": jax.__version__, "platform": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    return Explanation(fmt, steps, sorted(applied), tap is None, env)
