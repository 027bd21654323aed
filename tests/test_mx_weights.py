"""A policy's weights role (docs/semantics.md §5.1): ``weights=FORMAT`` or ``weights=mx(ELEMENT[,k])``.
The grammar and its refusals; the arrays the forward receives against the exact-rational
reading of the MX specification in tests/test_mx.py, block by block along the axis §5.1
states for each array (and against fraction rounding for a format role); emulated ==
reference bit for bit on a full forward with MXFP4 weights."""

from __future__ import annotations

import types

import numpy as np
import pytest

from collapse_sim.backends import make_backend
from collapse_sim.errors import CollapseSimError
from collapse_sim.formats import format_token, parse as parse_format
from collapse_sim.model import ModelConfig, forward, forward_tapped, gaussian_config, init_params, weight_shapes
from collapse_sim.mx import MX_FORMATS, MXFormat, mx_format, mx_round
from collapse_sim.policy import Policy, PolicyError
from collapse_sim.positional import SINUSOIDAL
from oracles import fraction_round
from test_model import TOKS, assert_emulated_equals_reference
from test_mx import oracle_block

# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("text,element,block", [
    ("compute=bf16,weights=mx(e4m3fn,32)", "mxfp8_e4m3", 32),
    ("compute=bf16,weights=mx(e2m1fn)", "mxfp4_e2m1", 32),  # k defaults to 32
    ("compute=bf16,weights=mx(e5m2,16)", "mxfp8_e5m2", 16),
    ("compute=fp16,weights=mx(e2m3fn,8),order=kahan", "mxfp6_e2m3", 8),
    ("compute=bf16,weights=mx(e3m2fn,1)", "mxfp6_e3m2", 1),
    ("compute=bf16,kernel=online(4),weights= MX( int8 , 64 )", "mxint8", 64),
    ("compute=bf16,weights=mx(fp8_e4m3fn)", "mxfp8_e4m3", 32),  # another name of the element format
])
def test_mx_role_round_trip(text, element, block):
    p = Policy.parse(text)
    assert isinstance(p.weights, MXFormat) and p.weights == mx_format(element, block)
    s = str(p)
    assert s.endswith(f",weights=mx({'int8' if element == 'mxint8' else MX_FORMATS[element].element.name},{block})")
    q = Policy.parse(s)
    assert q == p and hash(q) == hash(p) and str(q) == s
    assert Policy.parse(s.split(",weights=")[0]) != p  # the role counts in equality


@pytest.mark.parametrize("text", ["bf16", "compute=bf16,accumulate=fp32,order=blocked(32)",
                                  "storage=fp32,compute=bf16,kernel=flash2(16)", "compute=(p=5,emax=15),mode=rz"])
def test_default_role_leaves_every_policy_string_as_it_was(text):
    """No weights role: str() has no ``weights=``; naming the storage format is the default."""
    p = Policy.parse(text)
    assert p.weights is None and "weights" not in str(p)
    named = Policy.parse(f"{str(p)},weights={format_token(p.storage)}")
    assert named == p and str(named) == str(p) and hash(named) == hash(p)


def test_format_role_round_trip():
    p = Policy.parse("storage=bf16,compute=bf16,weights=e4m3fn")
    assert p.weights == parse_format("e4m3fn") and str(p).endswith(",weights=e4m3fn")
    q = Policy.parse("compute=bf16,weights=(p=3,emax=4)")
    assert Policy.parse(str(q)) == q and q.weights.p == 3


@pytest.mark.parametrize("text,words", [
    ("compute=bf16,weights=mx(e4m3)", ["'e4m3' is not an MX element format", "e4m3fn, e5m2, e2m3fn, e3m2fn, e2m1fn, int8"]),
    ("compute=bf16,weights=mx(bf16,32)", ["'bf16' is not an MX element format"]),
    ("compute=bf16,weights=mx(e2m1fn,0)", ["at least one element", "block=0"]),
    ("compute=bf16,weights=mx(e2m1fn,-4)", ["at least one element", "block=-4"]),
    ("compute=bf16,weights=mx(e2m1fn,4.5)", ["not an MX spec", "mx(ELEMENT,k)"]),
    ("compute=bf16,weights=mx(e2m1fn,4,4)", ["not an MX spec"]),
    ("compute=mx(e4m3fn)", ["compute=mx(e4m3fn) is not possible", "weights role only", "weights=mx(e4m3fn)"]),
    ("storage=mx(e2m1fn,16),compute=bf16", ["storage=mx(e2m1fn,16) is not possible", "weights=mx(e2m1fn,16)"]),
    ("compute=bf16,softmax=mx(int8)", ["softmax=mx(int8) is not possible"]),
    ("mx(e4m3fn,32)", ["an MX format is a weights role only"]),
    ("compute=bf16,weights=nope", ["weights: unknown format 'nope'"]),
    ("compute=bf16,weights=e5m3fnu", ["e5m3fnu is unsigned", "cannot be a policy's weights format"]),
    ("compute=bf16,weights=e8m0fnu", ["e8m0fnu is unsigned", "cannot be a policy's weights format"]),
])
def test_bad_roles_are_refused_in_one_sentence(text, words):
    with pytest.raises(PolicyError) as e:
        Policy.parse(text)
    msg = str(e.value)
    assert isinstance(e.value, CollapseSimError) and isinstance(e.value, ValueError)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_weights_beyond_e8m0_are_refused():
    """A block whose amax is >= 2^(128 + emax_elem) has no E8M0 scale (docs/semantics.md §13)."""
    p = Policy.parse("compute=bf16,weights=mx(e2m1fn,2)")
    assert np.isfinite(p.weights_values(np.array([2.0**129, 1.0]), 0)).all()  # 2^(128 + 2) - 1 binade: fine
    with pytest.raises(PolicyError, match=r"beyond what weights=mx\(e2m1fn,2\) can scale"):
        p.weights_values(np.array([1.0, 2.0**130]), 0)


# --------------------------------------------------------------------------- what the forward receives

#: docs/semantics.md §5.1, written again by array name: the axis the blocks run along.
AXIS = {"embed": 1, "pos": 1, "gauss.q": 1, "gauss.k": 1, "gauss.v": 1,
        **{w: 0 for w in ("wq", "wk", "wv", "wo", "w1", "w2")}}


def _axis(name: str) -> int:
    return AXIS.get(name, AXIS.get(name.rsplit(".", 1)[-1], 0))  # 1-d gains and biases: their one axis


def _received(params, backend, monkeypatch, probe=None):
    """The arrays ``forward`` hands to the backend's run (the compiled forward's arguments),
    captured without running it."""
    got = {}

    def run(fn, config, arrays, tokens, probe):
        got.update(arrays)
        raise _Stop

    monkeypatch.setattr(backend, "run", run)
    with pytest.raises(_Stop):
        forward(params, TOKS, backend, probe=probe)
    return got


class _Stop(Exception):
    pass


def _oracle_mx(w: np.ndarray, axis: int, name: str, k: int) -> np.ndarray:
    """``w`` in blocks of ``k`` along ``axis`` through tests/test_mx.py's exact-rational oracle."""
    v = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    out = np.empty_like(v)
    for i in np.ndindex(*v.shape[:-1]):
        for s in range(0, v.shape[-1], k):
            out[i + (slice(s, s + k),)] = oracle_block(list(v[i + (slice(s, s + k),)]), name)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("config", [
    ModelConfig(d=8, n_layers=2, vocab=5, d_ff=12, out_proj=True, pe="learned", max_len=16, sink=True, seed=4),
    ModelConfig(d=8, n_layers=1, vocab=5, norm="rmsnorm", pe="sinusoidal", seed=5),
    gaussian_config(d=8, pe="sinusoidal", norm="layernorm", seed=6),
], ids=["decoder", "decoder-sinusoidal", "gaussian"])
@pytest.mark.parametrize("backend", ["emulated", "reference"])
def test_forward_receives_mx_blocks_along_the_stated_axes(config, backend, monkeypatch):
    """Every weight the forward receives equals the specification's MX quantisation (the
    exact-rational oracle) of the float64 weight in blocks of 4 along the axis §5.1 names
    (blocks of 4 of d = 8: blocking the other axis of a matrix gives other values); the
    sinusoidal table is the float64 table untouched (a storage constant). The arrays are
    concrete float64 numpy arrays before the compiled forward (the emulated backend's jit)."""
    P = init_params(config)
    if config.sink:
        P.arrays["sink"] = P.arrays["sink"] * 3.0  # a row of its own scale
    if "embed" in P.arrays:
        P.arrays["embed"][0] *= 1e-40  # a row of tiny values: its scale clamps at 2^-127
    else:
        P.arrays["n3_g"][:4] *= 1e-40
    be = make_backend(backend, "storage=bf16,compute=bf16,weights=mx(e2m1fn,4)")
    plain = _received(P, make_backend(backend, "bf16"), monkeypatch)
    got = _received(P, be, monkeypatch)
    assert set(got) == set(plain) and (SINUSOIDAL in got) == (config.pe == "sinusoidal")
    changed = 0
    for name, v in got.items():
        assert type(v) is np.ndarray and v.dtype == np.float64, name
        if name == SINUSOIDAL:
            assert np.array_equal(v, plain[name])
            continue
        want = _oracle_mx(plain[name], _axis(name), "mxfp4_e2m1", 4)
        assert np.array_equal(v, want), name
        if backend == "reference":  # bf16 storage holds every such value (docs/semantics.md §5.1): stored exactly
            assert np.array_equal(be.to_numpy(be.store(v)), v), name
        if v.ndim == 2 and min(v.shape) >= 8:
            assert not np.array_equal(v, _oracle_mx(plain[name], 1 - _axis(name), "mxfp4_e2m1", 4)), name
        changed += not np.array_equal(v, plain[name])
    assert changed >= 2
    names = set(weight_shapes(config)) - {"sink"}
    assert names <= set(got)  # every weight (the sink is row 0 of the token table by then)


def test_format_role_rounds_weights_once_to_it_then_storage(monkeypatch):
    """``weights=e4m3fn``: each weight is ∘_e4m3fn(w) (fraction oracle, the policy's mode),
    which storage bf16 holds exactly; ``weights=(p=10,emax=15)`` with storage bf16 is
    ∘_bf16(∘_W(w)), rounded twice (the reference's storage step shows it)."""
    c = ModelConfig(d=4, n_layers=1, vocab=4, pe="none", seed=2)
    P = init_params(c)
    e4 = parse_format("e4m3fn")
    got = _received(P, make_backend("reference", "compute=bf16,mode=rz,weights=e4m3fn"), monkeypatch)
    for name, v in got.items():
        want = np.vectorize(lambda x: fraction_round(float(x), e4, "rz"))(P.arrays[name])
        assert np.array_equal(v, want), name
    ref = make_backend("reference", "compute=bf16,weights=(p=10,emax=15)")
    wide = _received(P, ref, monkeypatch)["l0.wq"]
    stored = ref.to_numpy(ref.store(wide))
    bf16 = parse_format("bf16")
    w10 = np.vectorize(lambda x: fraction_round(float(x), parse_format("p=10,emax=15"), "rne"))(P.arrays["l0.wq"])
    assert np.array_equal(stored, np.vectorize(lambda x: fraction_round(float(x), bf16, "rne"))(w10))


def test_tapped_forward_applies_the_role_too():
    """forward_tapped (the analysis entry, no backend.run) quantises the weights as forward does."""
    c = ModelConfig(d=4, n_layers=1, vocab=4, pe="none", norm="rmsnorm", seed=1)
    P, toks = init_params(c), np.array([1, 2, 3, 0, 1])
    mx, plain = (make_backend("reference", f"compute=bf16{w}") for w in (",weights=mx(e2m1fn,2)", ""))
    y = mx.to_numpy(forward_tapped(P, toks, mx))
    assert np.array_equal(y, mx.to_numpy(forward(P, toks, mx)))
    assert not np.array_equal(y, plain.to_numpy(forward_tapped(P, toks, plain)))


def test_report_native_runs_take_the_weights_role():
    """The report's toy native runs (a JAX dtype) take a policy's weights role: it is applied
    on the host before the forward (docs/semantics.md §5.1); a plain native backend has none."""
    from collapse_sim.experiments.paper import format_backend

    sizes = types.SimpleNamespace(backend="native")
    w = np.linspace(-1, 1, 64).reshape(8, 8)
    assert format_backend(sizes, "compute=bf16,accumulate=fp32").kind == "native"
    be = format_backend(sizes, "compute=bf16,weights=mx(e2m1fn)")
    assert be.kind == "native" and np.array_equal(be.quantize_weights(w, 0), mx_round(w, "mxfp4_e2m1", axis=0))
    assert not np.array_equal(be.quantize_weights(w, 0), w)
    assert np.array_equal(make_backend("native", "bf16").quantize_weights(w, 0), w)


# --------------------------------------------------------------------------- full forwards


def test_emulated_equals_reference_with_mxfp4_weights():
    """L = 2, d = 8, N = 12 with a probe after every prefix: MXFP4 weights (blocks of 32, so
    one block per column of a matrix, one per table row), bf16 everywhere else; the two
    backends agree bit for bit."""
    assert_emulated_equals_reference(ModelConfig(d=8, n_layers=2, vocab=4, seed=3, pe="rope", d_ff=16, out_proj=True),
                                     "compute=bf16,weights=mx(e2m1fn)")


def test_traced_forwards_refuse_a_weights_role_and_run_without_one():
    """The weights role works on concrete weights before a forward; a forward traced with its
    weights as arguments (theory's compiled taps, explain-native) refuses it in one sentence,
    and runs as before without one (the role must not touch traced arrays)."""
    from collapse_sim.model import ConfigError
    from collapse_sim.theory.trace import compiled_taps

    P = init_params(ModelConfig(d=8, vocab=4, seed=3))
    toks = np.array([1, 2, 3])
    y, taps, _ = compiled_taps(P, toks, make_backend("emulated", "bf16"))
    assert np.isfinite(np.asarray(y)).all() and taps
    with pytest.raises(ConfigError, match="quantises the weights on the host"):
        compiled_taps(P, toks, make_backend("emulated", "compute=bf16,weights=mx(e2m1fn)"))
