"""The attention kernels of a policy (docs/semantics.md §8.8): ``online(b)`` runs the
keys in blocks with a running maximum, denominator and output."""

from __future__ import annotations

import dataclasses

import mpmath
import numpy as np
import pytest

from collapse_sim.backends import make_backend
from collapse_sim.backends.reference import ReferenceBackend
from collapse_sim.model import ModelConfig, forward, init_params
from collapse_sim.policy import Kernel, Policy, PolicyError
from collapse_sim.theory import gamma

TOKS = np.array([1, 2, 3, 0, 1, 1, 2, 3, 3, 1, 0, 2])  # N = 12: no block size below divides it but 2, 3, 4, 6


def _same(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))  # ±0 equal: mpmath has no -0


@pytest.mark.parametrize("cfg, policy", [
    (dict(pe="rope", n_heads=2), "compute=bf16,order=pairwise,kernel=online(5)"),
    (dict(pe="alibi", window=6), "compute=fp16,accumulate=fp32,softmax=fp32,order=kahan,mode=rd,kernel=online(7)"),
    (dict(pe="sinusoidal"), "compute=(p=5,emax=15),accumulate=(p=9,emax=30),order=exact,kernel=online(5)"),
], ids=["bf16-pairwise-b5", "fp16-fp32acc-kahan-rd-window-alibi-b7", "custom-exact-b5"])
def test_online_kernel_emulated_equals_reference(cfg, policy):
    """Full forwards (L = 2, d = 8, N = 12, with probes) under the online kernel: the
    emulated backend gives the mpmath reference's bits, with blocks that do not divide N."""
    c = ModelConfig(d=8, n_layers=2, vocab=4, seed=5, **cfg)
    P = init_params(c)
    probe = np.roll(TOKS, -1)
    e, r = make_backend("emulated", policy), make_backend("reference", policy)
    ye, ype = forward(P, TOKS, e, probe=probe)
    yr, ypr = forward(P, TOKS, r, probe=probe)
    assert _same(e.to_numpy(ye), r.to_numpy(yr))
    assert _same(e.to_numpy(ype), r.to_numpy(ypr))


def test_online_kernel_differs_from_naive_in_low_precision():
    """The kernel is not a relabelling: in bf16 with a block of 2 the running rescales
    move some output bits away from the naive softmax's (and the naive policy's program
    is not reused for the online one)."""
    c = ModelConfig(d=8, n_layers=1, vocab=4, seed=5)
    P = init_params(c)
    naive = make_backend("emulated", "compute=bf16,order=sequential")
    online = make_backend("emulated", "compute=bf16,order=sequential,kernel=online(2)")
    a, b = naive.to_numpy(forward(P, TOKS, naive)), online.to_numpy(forward(P, TOKS, online))
    assert not _same(a, b)


def test_online_kernel_agrees_with_naive_at_256_bits():
    """In 256-bit arithmetic the online kernel and the naive softmax are the same function
    up to rounding: each output is within the two evaluations' error bounds of the exact
    value, γ_k(2^-256)·max|y| each with k an op count of the longest chain (§8.8: per block
    a max, two exps, a sum and a dot of ≤ N terms, a product and an add; N/b + 1 blocks,
    and the model's other ops, generously 64(N + d) per layer as in the theory checks)."""
    c = ModelConfig(d=8, n_layers=2, vocab=4, seed=5, pe="rope")
    P = init_params(c)
    naive = ReferenceBackend("256")
    online = ReferenceBackend(dataclasses.replace(naive.ref.policy, kernel=Kernel("online", 3)))
    a, b = (np.asarray(forward(P, TOKS, be)).ravel() for be in (naive, online))  # mpf values, not float64s
    N, d = TOKS.size, c.d
    k = 64 * (N + d) * c.n_layers
    with mpmath.workprec(600):
        ma, mb = [mpmath.mpf(x) for x in a], [mpmath.mpf(x) for x in b]
        diff = max(abs(x - y) for x, y in zip(ma, mb))
        tol = 2 * gamma(k, mpmath.mpf(2) ** -256) * max(abs(x) for x in ma)
        assert 0 < diff <= tol, (diff, tol)  # 0 < : two different evaluations, each rounded


def test_kernel_grammar():
    p = Policy.parse("compute=bf16,kernel=online(64)")
    assert p.kernel == Kernel("online", 64) and str(p).endswith(",kernel=online(64)")
    assert Policy.parse(str(p)) == p
    assert "kernel" not in str(Policy.parse("bf16"))  # the naive kernel leaves the policy's name as it was
    for bad, says in [("online", "block size"), ("online(0)", ">= 1"), ("flash", "unknown attention kernel")]:
        with pytest.raises(PolicyError, match=says):
            Policy.parse(f"compute=bf16,kernel={bad}")
    with pytest.raises(PolicyError, match="max_subtract=true"):
        Policy.parse("compute=bf16,max_subtract=false,kernel=online(4)")


def test_kernel_refused_where_it_cannot_run(tmp_path):
    """Native formats run what XLA does, so a kernel other than naive is refused for them
    (fp64 always runs natively), in one sentence, before anything is written."""
    from collapse_sim.backends import backend_for_format
    from collapse_sim.cli import main
    from collapse_sim.errors import CollapseSimError

    with pytest.raises(CollapseSimError, match="drop it from the formats"):
        backend_for_format("emulated", "fp64", kernel="online(4)")
    with pytest.raises(CollapseSimError, match="emulated or reference backend"):
        backend_for_format("native", "bf16", kernel="online(4)")
    assert backend_for_format("emulated", "bf16", kernel="online(4)").emu.kernel == Kernel("online", 4)
    out = tmp_path / "never"
    assert main(["collapse", "--family", "repeat_last", "--format", "bf16,fp64", "--kernel", "online(4)",
                 "--max-len", "8", "--out", str(out)]) == 2
    assert not out.exists()
