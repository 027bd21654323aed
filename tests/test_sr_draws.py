"""Stochastic rounding's draws in the emulated backend (docs/semantics.md §2): the draws written
again from the text with plain Python integers and compared bit for bit, and statistical checks
of the hash (uniform counts, independent neighbours, distinct words across elements, slots and
scopes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from collapse_sim import enable_x64
from collapse_sim.backends.emulated import Emulator
from collapse_sim.rounding import hash_draws, split_word

enable_x64()

# --- the text of docs/semantics.md §2, in plain Python integers ---------------------------

M64 = 2**64
G = 0x9E3779B97F4A7C15


def mix(z: int) -> int:
    z2 = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z3 = ((z2 ^ (z2 >> 27)) * 0x94D049BB133111EB) % M64
    return z3 ^ (z3 >> 31)


def split(w: int, k: int) -> int:
    return mix((w + (k + 1) * G) % M64)


class Scopes:
    """The draw scopes of §2: a stack of (word, next slot)."""

    def __init__(self, seed: int):
        self.stack = [[split(seed, 0), 0]]

    def _slot(self) -> int:
        top = self.stack[-1]
        w, top[1] = split(top[0], top[1]), top[1] + 1
        return w

    def draws(self, size: int, r: int) -> list[int]:
        w = self._slot()
        return [split(w, j) >> (64 - r) for j in range(size)]

    def open(self, i: int) -> None:
        self.stack.append([split(self._slot(), i), 0])

    def close(self) -> None:
        self.stack.pop()


SIGNIFICANCE = 1e-6  # each statistical check fails a correct uniform generator with this probability


def test_top_word_is_splitmix64s_first_output():
    """splitmix64 from the state 0 gives 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4 (the published
    sequence): the text's mix and G, and the package's split_word, are splitmix64's."""
    assert [split(0, 0), split(0, 1)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert [int(split_word(0, k)) for k in (0, 1)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_hash_draws_equal_the_text_for_every_width():
    """hash_draws skips mix's last step where it cannot reach the top r bits (r <= 31): every
    r around that edge, and 1 and 64, against the text."""
    w = split(5, 2)
    for r in (1, 8, 30, 31, 32, 33, 40, 64):
        want = [split(w, j) >> (64 - r) for j in range(64)]
        assert np.asarray(hash_draws(np.uint64(w), (8, 8), r)).ravel().tolist() == want, r


def test_emulator_draws_equal_the_text():
    """An emulator's draws, compiled and not, equal the text's bit for bit: two roundings in the
    top scope, a loop of three iterations traced once (``lax.map``: the loop's scope takes one
    slot, iteration i is a scope of its own with two roundings, the second of a 2-d shape), then
    a rounding after the loop."""
    r, seed = 8, 3
    emu = Emulator(f"compute=bf16,order=pairwise,mode=sr({r},seed={seed})")

    def program(s):
        e = emu.fresh(s)
        a, b = e.draws((5,)), e.draws((2, 3))

        def body(i):
            with e.stream(i):
                return e.draws((4,)), e.draws((2, 2))

        return a, b, jax.lax.map(body, jnp.arange(3)), e.draws((3,))

    want = Scopes(seed)
    a, b = want.draws(5, r), want.draws(6, r)
    w_loop = want._slot()
    inner = []
    for i in range(3):
        it = Scopes(0)
        it.stack = [[split(w_loop, i), 0]]
        inner.append((it.draws(4, r), it.draws(4, r)))
    last = want.draws(3, r)
    for got in (jax.jit(program)(np.uint64(seed)), program(np.uint64(seed))):
        ga, gb, (g1, g2), glast = got
        assert np.asarray(ga).tolist() == a and np.asarray(gb).ravel().tolist() == b
        assert np.asarray(g1).tolist() == [x for x, _ in inner]
        assert np.asarray(g2).reshape(3, 4).tolist() == [y for _, y in inner]
        assert np.asarray(glast).tolist() == last


def test_scopes_opened_one_by_one_take_a_slot_each():
    """A loop unrolled in Python opens one scope per iteration, each taking a slot of its own,
    and scopes nest: the draws of the text's scope stack, bit for bit."""
    r, seed = 16, 11
    emu = Emulator(f"compute=bf16,order=sequential,mode=sr({r},seed={seed})").fresh()
    want = Scopes(seed)
    got, exp = [], []
    got.append(emu.draws((2,)))
    exp.append(want.draws(2, r))
    with emu.stream(4):
        want.open(4)
        got.append(emu.draws((3,)))
        exp.append(want.draws(3, r))
        with emu.stream(1):
            want.open(1)
            got.append(emu.draws((2,)))
            exp.append(want.draws(2, r))
            want.close()
        got.append(emu.draws((1,)))
        exp.append(want.draws(1, r))
        want.close()
    got.append(emu.draws((2,)))
    exp.append(want.draws(2, r))
    assert [np.asarray(g).tolist() for g in got] == exp


def _chi2_uniform(values: np.ndarray, cells: int) -> tuple[float, float]:
    counts = np.bincount(values.astype(np.int64), minlength=cells)
    assert counts.size == cells
    return stats.chisquare(counts).statistic, stats.chi2.isf(SIGNIFICANCE, cells - 1)


def test_draws_are_uniform_and_neighbours_independent():
    """r = 8 over 65,536 draws: the counts of the 256 values pass a chi-square test at
    significance 1e-6, for the elements of one rounding and for the first element of 65,536
    loop iterations (scopes split(w, i)); the pairs (u_j, u_(j+1)) of neighbouring elements
    (r = 4, 256 cells) and of neighbouring scopes pass it too."""
    n = 65536
    w = split_word(np.uint64(7), 0)
    within = np.asarray(hash_draws(w, (n,), 8))
    scopes = np.asarray(split_word(split_word(split_word(w, jnp.arange(n)), 0), 0) >> jnp.uint64(56))
    for u in (within, scopes):
        stat, crit = _chi2_uniform(u, 256)
        assert stat <= crit, (stat, crit)
    for u4 in (within >> np.uint64(4), scopes >> np.uint64(4)):
        pairs = u4[:-1] * np.uint64(16) + u4[1:]
        stat, crit = _chi2_uniform(pairs, 256)
        assert stat <= crit, (stat, crit)


def test_neighbouring_words_differ():
    """Full 64-bit words (r = 64) of neighbouring elements of a rounding, of neighbouring slots
    and of neighbouring loop iterations are all distinct (mix is a bijection and their sums
    differ; a repeat among these 3 x 4,096 words would have probability below 2^-38 even for
    a random function)."""
    W = split_word(np.uint64(0), 0)  # a scope
    k = jnp.arange(4096)
    slots = np.asarray(split_word(W, k))  # slot n = 0..4095
    elements = np.asarray(hash_draws(split_word(W, 0), (4096,), 64))  # the rounding in slot 0
    iterations = np.asarray(split_word(split_word(W, 1), k))  # a loop in slot 1
    words = np.concatenate([elements, slots, iterations])
    assert np.unique(words).size == words.size


def test_an_emulator_traced_once_still_runs_eagerly():
    """The top scope's word is made where it is used and never kept: an emulator that rounded
    inside a compiled function, in a scope and out of it, keeps no traced word and rounds
    eagerly afterwards, its slots counted on (slots 0 to 2 in the trace, then slot 3)."""
    emu = Emulator("compute=bf16,order=pairwise,mode=sr(8,seed=4)")
    x = jnp.full((4,), 1.0 + 2.0**-9)  # a quarter of the way to the next bf16 value: t = 64

    def traced(v):
        with emu.stream(jnp.int32(1)):
            y = emu.rnd(v)
        return emu.rnd(y), emu.rnd(v)

    jax.jit(traced)(x)
    assert emu._word is None and emu.roundings == 3  # the scope took slot 0, the roundings 1 and 2
    want = Scopes(4)
    for _ in range(3):
        want._slot()
    u = np.array(want.draws(4, 8))
    assert np.asarray(emu.rnd(x)).tolist() == np.where(64 + u >= 256, 1.0 + 2.0**-7, 1.0).tolist()


def test_sums_draw_as_the_text_says():
    """A bf16 sum of m = 5 terms over a batch of 3 rows under sr(8), sequential and pairwise,
    against the text's slots, computed with plain integers and the rounding oracle of
    tests/test_sr.py: the sequential adds draw one stacked (m - 1, 3) array (add k takes row k),
    the pairwise order one array per level (the padded 8 terms: levels of 4, 2 and 1 per row),
    both one more slot for the output rounding; a rounding after the sum takes the next slot."""
    from fractions import Fraction

    from collapse_sim.formats import parse
    from test_sr import sr_parts

    fmt, r, seed = parse("bf16"), 8, 6
    rng = np.random.default_rng(1)
    x = np.asarray(rng.integers(1, 256, (3, 5)) * 2.0 ** rng.integers(-12, 0, (3, 5)))  # bf16 values

    def sr(v, u):  # §1: up iff t + u >= 2^r, for the exact value v (a float64 here: every sum is exact)
        down, up, F, D = sr_parts(float(v), fmt)
        t = F >> (D - r) if D >= r else F << (r - D)
        return up if t + u >= 2**r else down

    for order in ("sequential", "pairwise"):
        emu = Emulator(f"compute=bf16,order={order},mode=sr({r},seed={seed})")

        def run(v, w):
            e = emu.fresh()
            return e.sum(v), e.rnd(w)

        got, after = (np.asarray(a) for a in jax.jit(run)(jnp.asarray(x), jnp.asarray(x[:, 0] / 3)))
        sc = Scopes(seed)
        if order == "sequential":
            u = np.array(sc.draws(4 * 3, r)).reshape(4, 3)
            want = [x[b, 0] for b in range(3)]
            for k in range(4):
                want = [sr(Fraction(want[b]) + Fraction(x[b, k + 1]), u[k, b]) for b in range(3)]
        else:
            level = np.concatenate([x, np.zeros((3, 3))], axis=1).tolist()
            while len(level[0]) > 1:
                half = len(level[0]) // 2
                u = np.array(sc.draws(3 * half, r)).reshape(3, half)
                level = [[sr(Fraction(row[2 * i]) + Fraction(row[2 * i + 1]), u[b, i]) for i in range(half)]
                         for b, row in enumerate(level)]
            want = [row[0] for row in level]
        out = sc.draws(3, r)  # the output rounding's slot (bf16 to bf16: exact, whatever the draw)
        want = [sr(v, ui) for v, ui in zip(want, out)]
        assert got.tolist() == want, (order, got, want)
        u_after = sc.draws(3, r)
        assert after.tolist() == [sr(Fraction(x[b, 0]) / 3, u_after[b]) for b in range(3)], order
