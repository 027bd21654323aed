"""Formats as traced data: one compiled program rounds to (and emulates) every format of
a class, with the same bits as the program specialised to each format."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_sim.compilation import snapshot
from collapse_sim.formats import parse
from collapse_sim.rounding import FormatClass, RoundingError, round_to
from test_rounding import DET_MODES, _same, _test_points

SHARED = ["bf16", "fp16", "e4m3fn", "e5m2", "e3m4", "e2m1fn", "e4m3", "e2m3fn",
          "p=9,emin=-14,emax=15", "p=6,emin=-4,emax=5,overflow=saturate"]


@pytest.mark.parametrize("name", SHARED)
def test_traced_rounding_equals_static(name):
    """Every value, midpoint and neighbour of the format (both signs, ±inf, NaN), from
    float64 and float32, in every deterministic mode: the traced format gives the bits of
    the static one (which tests/test_rounding.py checks against MPFR)."""
    fmt = parse(name)
    fp = FormatClass().params(fmt)
    p64, p32 = _test_points(fmt)
    for pts, dt in ((p64, jnp.float64), (p32, jnp.float32)):
        x = jnp.asarray(np.concatenate([pts, [np.inf, -np.inf, np.nan]]), dt)
        if dt == jnp.float32:
            fp = FormatClass("float32", pmax=11, qmin=-24, emax=15).params(fmt) if fmt.p <= 11 and \
                fmt.min_exponent_of_quantum >= -24 and fmt.emax <= 15 else None
            if fp is None:
                continue
        for mode in DET_MODES:
            got, want = round_to(x, fp, mode), round_to(x, fmt, mode)
            assert got.dtype == want.dtype
            ok = _same(got, want)
            assert ok.all(), f"{name} {mode} {dt.__name__}: {np.asarray(x)[~ok][:4]} -> {np.asarray(got)[~ok][:4]}, " \
                             f"static {np.asarray(want)[~ok][:4]}"


@pytest.mark.parametrize("name", ["fp32", "tf32"])
def test_traced_rounding_equals_static_wide_formats(name):
    """fp32 and tf32 have too many values to list: random values over their whole range
    (and a few binades beyond), midpoints between neighbours, and the extremes."""
    fmt = parse(name)
    rng = np.random.default_rng(3)
    e = rng.integers(fmt.min_exponent_of_quantum - 4, fmt.emax + 3, 50_000)
    x = rng.standard_normal(e.size) * 2.0 ** e
    y = np.asarray(round_to(jnp.asarray(x), fmt))
    y = y[np.isfinite(y) & (np.abs(y) >= fmt.min_normal)]
    mid = y + np.ldexp(np.sign(y), np.frexp(y)[1] - fmt.p - 1)  # halfway to the next value away from zero
    x = jnp.asarray(np.concatenate([x, -x, mid, [fmt.max, fmt.min_subnormal, fmt.min_subnormal / 2, fmt.min_normal,
                                                 np.inf, np.nan]]))
    fp = FormatClass().params(fmt)
    for mode in DET_MODES:
        assert _same(round_to(x, fp, mode), round_to(x, fmt, mode)).all(), mode


def test_traced_stochastic_rounding_equals_static():
    x = jnp.asarray(np.random.default_rng(1).standard_normal(4096) * 2.0 ** (np.arange(4096) % 280 - 140))
    key = jax.random.key(7)
    for name in ("bf16", "e4m3fn"):
        assert _same(round_to(x, FormatClass().params(name), "sr", key=key), round_to(x, name, "sr", key=key)).all()


def test_one_rounding_program_for_every_format_of_the_class():
    """A count of XLA compilations, not a timing: after the first format, rounding the same
    array to other formats of the class compiles nothing new."""
    x = jnp.linspace(-3.0, 3.0, 257)
    fc = FormatClass()
    round_to(x, fc.params("bf16")).block_until_ready()
    before = snapshot()
    for name in ("fp16", "e4m3fn", "p=9,emin=-14,emax=15", "e5m2"):
        round_to(x, fc.params(name)).block_until_ready()
    new = snapshot().since(before)
    assert new.compiled + new.cache_hits == 0, new


@pytest.mark.parametrize("name, match", [("fp64", "p=53 > 25"), ("p=5,emax=200", "exponent range"),
                                         ("e4m3fnuz", "signed_zero"), ("p=3,emax=3,subnormals=false", "subnormals")])
def test_formats_outside_the_class_are_refused(name, match):
    with pytest.raises(RoundingError, match=match):
        FormatClass().params(name)


def test_narrower_input_than_the_class_is_refused():
    with pytest.raises(RoundingError, match="float64 or wider"):
        round_to(jnp.ones(3, jnp.float32), FormatClass().params("bf16"))


# --- the emulated forward: one program for every format of the class ---------------------

FORWARD_FORMATS = ["bf16", "fp16", "e4m3fn", "(p=9,emin=-14,emax=15)"]


def _model():
    from collapse_sim.model import ModelConfig, init_params

    params = init_params(ModelConfig(d=4, n_layers=1, vocab=6, pe="sinusoidal", seed=1))
    return params, np.random.default_rng(2).integers(0, 6, 12)


def _forward(policy, shared, probe=False):
    from collapse_sim.backends.emulated import EmulatedBackend
    from collapse_sim.model import forward

    params, tokens = _model()
    out = forward(params, tokens, EmulatedBackend(policy, shared=shared), probe=(tokens + 1) % 6 if probe else None)
    return np.concatenate([np.asarray(a, np.float64) for a in (out if probe else (out,))])


@pytest.mark.parametrize("template, formats", [
    ("compute={f},order=pairwise", FORWARD_FORMATS),
    ("compute={f},order=exact", ["fp16"]),
    ("storage=fp32,compute={f},accumulate=bf16,softmax=fp16,order=kahan,mode=rd", ["e4m3fn"]),
], ids=["pairwise", "exact", "mixed-roles-rd"])
def test_shared_forward_equals_specialised(template, formats, certified_everywhere):
    """The shared program (formats traced, float64 carrier) gives the specialised
    program's bits (formats static; float32 carrier for fp16, fp8 and the custom format):
    op by op for four formats (bf16 with probes), certified (the exact order), and mixed roles in
    a directed mode. (Each specialised format compiles its own program, and the exact order's
    compiles are slow: the cases are kept few. A directed mode with probes compiled for ~20 s
    per program, three times either alone, so the two are checked apart.)"""
    # certified_everywhere: the exact order runs its certified path
    for f in formats:
        policy, probe = template.format(f=f), f == "bf16"
        shared, special = _forward(policy, True, probe), _forward(policy, False, probe)
        assert _same(shared, special).all(), policy


def _compiles_per_format(shared):
    """New compilations (or cache loads) for each of FORWARD_FORMATS in turn, at one
    shape and order, on backends built with ``shared``."""
    from collapse_sim.backends.emulated import SHARED_MAX_N, EmulatedBackend
    from collapse_sim.model import ModelConfig, forward, init_params

    params = init_params(ModelConfig(d=4, n_layers=1, vocab=6, pe="sinusoidal", seed=1, n_heads=1 if shared else 2))
    tokens = np.random.default_rng(2).integers(0, 6, 12)  # (a config of its own per test: no program seen before)
    assert tokens.size <= SHARED_MAX_N
    counts = []
    for f in FORWARD_FORMATS:
        before = snapshot()
        forward(params, tokens, EmulatedBackend(f"compute={f},order=sequential", shared=shared)).block_until_ready()
        new = snapshot().since(before)
        counts.append(new.compiled + new.cache_hits)
    return counts


def test_switching_format_compiles_nothing():
    """bf16, then fp16, e4m3fn and a custom format at the same shape and order: with
    ``shared=True`` nothing compiles after the first format; with the automatic choice
    the first format runs its specialised program, the second compiles the shared one,
    and nothing compiles after that."""
    always = _compiles_per_format(True)
    assert always[0] >= 1 and always[1:] == [0, 0, 0], always
    auto = _compiles_per_format(None)
    assert auto[0] >= 1 and auto[1] >= 1 and auto[2:] == [0, 0], auto


def test_specialised_beyond_the_threshold(monkeypatch):
    """Past SHARED_MAX_N tokens the specialised program runs (a new compilation for a new
    format), and a policy outside the shared class always runs specialised."""
    from collapse_sim.backends.emulated import EmulatedBackend, backend as emulated_backend
    from collapse_sim.model import forward

    params, tokens = _model()
    monkeypatch.setattr(emulated_backend, "SHARED_MAX_N", tokens.size - 1)
    be = EmulatedBackend("compute=(p=7,emin=-9,emax=9),order=sequential")
    before = snapshot()
    forward(params, tokens, be).block_until_ready()
    new = snapshot().since(before)
    assert new.compiled + new.cache_hits >= 1
    assert EmulatedBackend("compute=e4m3fnuz").shared is None
    with pytest.raises(ValueError, match="no shared program"):
        EmulatedBackend("compute=e4m3fnuz", shared=True)
