"""collapse_sim.elementwise.replay: an elementwise function traced once at shape () and
replayed at any shape gives the bits of the function traced at that shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_sim import rounding as R
from collapse_sim.elementwise import replay
from collapse_sim.backends.emulated.ops import SHARED_CLASS
from collapse_sim.formats import parse
from collapse_sim.rounding import Mode


def _inputs(dtype, shape, seed):
    """Random bit patterns (every exponent, NaN and inf among them) and the format's hard values:
    zeros, ties, the overflow threshold's neighbours."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    u = np.uint64 if dtype == np.float64 else np.uint32
    x = rng.integers(0, np.iinfo(u).max, n, dtype=u, endpoint=True).view(dtype)
    special = np.array([0.0, -0.0, 1 + 2.0**-8, 65520.0, -65519.0, 2.0**-133, 448.0, 464.0, np.inf, -np.inf, np.nan],
                       dtype)
    x[: min(n, special.size)] = special[: min(n, special.size)]
    return x.reshape(shape)


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "e4m3fn", "e4m3fnuz", "e5m2", "p=5,emax=15"])
@pytest.mark.parametrize("mode", [Mode.RNE, Mode.RD, Mode.RO, Mode.RNA])
def test_replayed_rounding_has_the_direct_bits(fmt, mode):
    """Static formats, float64 and float32 inputs, scalar and array shapes: the replayed fast (or
    general) rounding against the same function traced at the input's shape, bit for bit."""
    f = parse(fmt)
    for dtype in (np.float64, np.float32):
        if not R.fast_path_applies(f, dtype) or not R._tiny_fast_ok(f, R._Carrier(dtype)):
            body = lambda v: R._round_general(v, None, f, mode)  # noqa: E731
        else:
            body = lambda v: R._round_fast(v, f, mode)  # noqa: E731
        for shape in [(), (7,), (3, 5, 2)]:
            x = _inputs(dtype, shape, 3)
            _same(jax.jit(lambda v: replay(body, ("t", fmt, mode), v))(x), jax.jit(body)(x))


@pytest.mark.parametrize("mode", [Mode.RNE, Mode.RU])
def test_replayed_traced_format_has_the_direct_bits(mode):
    """A format as data (the shared program's FormatParams leaves, scalar operands of the replay in
    round_to's traced-format path): the same bits as the rounding traced with them at the input's
    shape, for several formats through one compiled program."""
    def direct(x, params):
        return R._round_fast(x, params, mode)

    def replayed(x, params):
        return R._round_traced(x, None, None, params, mode, None)

    x = _inputs(np.float64, (4, 9), 5)
    for fmt in ["bf16", "fp16", "e4m3fn", "p=11,emax=15"]:
        params = SHARED_CLASS.params(fmt)
        _same(jax.jit(replayed)(x, params), jax.jit(direct)(x, params))


def test_replay_inlines_and_falls_back():
    """Replayed, the rounding is bare primitives (no nested jit left to trace per shape); a function
    that is not elementwise (here a reduction) is called as it is, at the input's shape."""
    f = parse("bf16")
    body = lambda v: R._round_fast(v, f, Mode.RNE)  # noqa: E731
    jaxpr = jax.make_jaxpr(lambda v: replay(body, ("inline", Mode.RNE), v))(jnp.zeros((3, 4)))
    names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert "reduce_precision" in names and not names & {"jit", "pjit"}
    centred = lambda v: v - jnp.max(v)  # noqa: E731
    x = np.arange(6.0).reshape(2, 3)
    _same(replay(centred, ("centred",), x), centred(x))


def test_weakly_typed_input_keeps_its_dtype():
    """A weakly typed float32 array under float64 (a Python float's type, kept float32) is rounded
    as float32, with the bits of the rounding traced at its shape (its dtype, not the widened
    default, keys the trace)."""
    from jax._src.lax.lax import _convert_element_type

    x = _convert_element_type(jnp.asarray([0.5, 1.1, 3.0, 465.0], jnp.float32), np.dtype("float32"), weak_type=True)
    f = parse("e4m3fn")
    got = R.round_to(x, f)
    assert got.dtype == np.float32
    _same(got, jax.jit(lambda v: R._round_fast(v, f, Mode.RNE))(np.asarray(x)))
