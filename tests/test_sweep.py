"""Sweeps: atomic cells, resume after SIGKILL, dask equals in-process, reruns bit-identical."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from collapse_sim import results
from collapse_sim.experiments.sweep import SweepError, SweepSpec, run_cell, run_sweep

SPEC = {"formats": ["bf16", "p=5,emax=15"], "families": ["repeat_last"], "pe": ["sinusoidal"],
        "seeds": [0, 1, 2], "max_len": 24, "model": {"d": 8}}
CELLS = 6


def _table(out):
    return results.load_table(out)


@pytest.fixture(scope="module")
def reference_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = run_sweep(SweepSpec.from_dict(SPEC), out, progress=None)
    assert r == {"run": CELLS, "skipped": 0}
    return _table(out)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path, reference_table):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "collapse_sim.cli", "sweep", str(spec), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(results.done_keys(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(results.done_keys(out))
    assert 0 < done < CELLS, f"the kill landed after {done} of {CELLS} cells"
    # a killed writer leaves at most a temporary file, never a partial cell
    for f in (out / "cells").glob("*.parquet"):
        pd.read_parquet(f)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"skipped {done} already done" in r.stdout
    pd.testing.assert_frame_equal(_table(out), reference_table, check_exact=True)


def test_dask_executor_equals_inprocess(tmp_path, reference_table):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        run_sweep(SweepSpec.from_dict(SPEC), tmp_path, executor="dask", scheduler=cluster.scheduler_address,
                  progress=None)
    pd.testing.assert_frame_equal(_table(tmp_path), reference_table, check_exact=True)
    prov = results.read_provenance(next((tmp_path / "cells").glob("*.parquet")))
    assert {"provenance", "backend", "cell", "config"} <= set(prov)
    assert prov["provenance"]["jax"] and "policy" in prov["backend"]


def test_rerun_is_bit_identical():
    spec = SweepSpec.from_dict(SPEC)
    cell = spec.cells()[5]
    k1, a, _ = run_cell(cell, spec)
    k2, b, _ = run_cell(cell, spec)
    assert k1 == k2
    pd.testing.assert_frame_equal(a, b, check_exact=True)


@pytest.mark.parametrize("change,msg", [
    ({"formats": ["bf16", "bf17"]}, "unknown format"),
    ({"families": ["nope"]}, "unknown family"),
    ({"pe": ["xyz"]}, "unknown positional encoding"),
    ({"max_len": 0}, "max_len must be >= 1"),
    ({"formats": ["p=30,emax=100"]}, "cannot be emulated"),
    ({"model": {"d": 10, "n_heads": 3}}, "divisible"),
    ({"colour": "red"}, "unknown sweep field"),
])
def test_bad_spec_refused_before_work(tmp_path, change, msg):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, **change}))
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "collapse_sim.cli", "sweep", str(spec), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()
    with pytest.raises(SweepError):
        SweepSpec.from_dict({**SPEC, **change})
