"""The signal-below-noise criterion: its arithmetic on hand-made pairs, and its meaning on a real run."""

from __future__ import annotations

import numpy as np

from collapse_sim.experiments.noise import signal_noise


def test_signal_noise_on_hand_made_pairs():
    ns = np.arange(1, 7)
    xa = np.zeros((6, 2))
    xb = np.array([[0, 0], [1, 0], [0.5, 0], [0.1, 0], [0.2, 0], [0.05, 0]])  # signal 0, 1, .5, .1, .2, .05
    err = np.array([0.0, 0.1, 0.3, 0.06, 0.0, 0.1])  # format error, split over both members
    fa, fb = xa + (err / 2)[:, None] * [1, 0], xb - (err / 2)[:, None] * [0, 1]
    fb[5, 0] = np.nan  # a non-finite output: no signal survives it
    sn = signal_noise("fmt", ns, (xa, xb), (fa, fb), "exact")
    assert sn.signal.tolist() == [0, 1, 0.5, 0.1, 0.2, 0.05]
    assert np.allclose(sn.noise[:5], err[:5]) and sn.noise[5] == np.inf
    # n = 1 has no signal (never counted); n = 2..5 have signal above their error; n = 6 is non-finite
    assert sn.below.tolist() == [False, False, False, False, False, True]
    assert sn.first_below() == 6 and sn.below_from() == 6 and sn.share_below() == 1 / 5
    more = np.array([[0, 0]] * 3 + [[0.1, 0]] * 3)
    sn2 = signal_noise("fmt", ns, (xa, xb), (fa + more, fb), "exact")
    # extra error 0.1 on members a of n = 4..6: n = 4 now below (0.1 <= 0.16), n = 5 (0.2 > 0.1) not
    assert sn2.below.tolist() == [False, False, False, True, False, True]
    assert sn2.first_below() == 4 and sn2.below_from() == 6 and sn2.first_below(n_min=5) == 6


def test_signal_above_noise_means_distinct_outputs():
    """On a real run (v vs v*, d = 8, n <= 48, bf16 and e5m2 emulated against 256-bit arb balls):
    wherever the format's two outputs are bitwise identical the signal is at or below the noise, and
    wherever the signal exceeds the noise they differ (the triangle inequality of the module's docs)."""
    from collapse_sim.backends import make_backend
    from collapse_sim.experiments.collapse import collapse_sweep
    from collapse_sim.model import ModelConfig, init_params

    params = init_params(ModelConfig(d=8, n_layers=1, vocab=6, pe="none", seed=3))
    exact = collapse_sweep(params, "repeat_last", 48, make_backend("interval", "arb256"), "arb256", keep_outputs=True)
    seen_below = 0
    for fmt in ("bf16", "e5m2"):
        r = collapse_sweep(params, "repeat_last", 48, make_backend("emulated", fmt), fmt, keep_outputs=True)
        sn = signal_noise(fmt, r.ns, exact.outputs, r.outputs, "arb256")
        same = r.identical & ~r.nonfinite
        assert np.all(sn.signal[same] <= sn.noise[same]), r.ns[same & (sn.signal > sn.noise)]
        seen_below += int(sn.below.sum())
    assert seen_below > 0  # e5m2 (p = 3) loses the signal somewhere in this range: the check is not empty
