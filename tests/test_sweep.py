"""Sweeps: atomic cells, resume after SIGKILL, dask equals in-process, reruns bit-identical;
a directory keeps one spec (refused or extended), strict spec fields, nothing written on refusal."""

from __future__ import annotations

import hashlib
import json
import socket
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from collapse_sim import results
from collapse_sim.experiments.sweep import FIELDS, SweepError, SweepSpec, run_cell, run_sweep

# The second format flushes subnormals, which keeps it out of the emulated backend's shared program
# (docs/semantics.md §12.1): its cells compile their own program, so the kill below lands while
# they run instead of racing cells that take milliseconds.
SPEC = {"formats": ["bf16", "p=5,emax=15,subnormals=false"], "families": ["repeat_last"], "pe": ["sinusoidal"],
        "seeds": [0, 1, 2], "max_len": 24, "model": {"d": 8}}
CELLS = 6


def _table(out):
    return results.load_table(out)


@pytest.fixture(scope="module")
def reference_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = run_sweep(SweepSpec.from_dict(SPEC), out, progress=None)
    assert r == {"run": CELLS, "skipped": 0, "extended": None}
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
    ({"kernel": "online"}, "key block size"),
    ({"kernel": "online(4)", "model": {"adaptive_temperature": True}}, "the online kernel never holds"),
    ({"backend": "native", "formats": ["bf16"], "order": "kahan"}, "not in the kahan order"),
])
def test_bad_spec_refused_before_work(tmp_path, change, msg, cli):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, **change}))
    out = tmp_path / "never"
    r = cli("sweep", spec, "--out", out)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()
    with pytest.raises(SweepError):
        SweepSpec.from_dict({**SPEC, **change})


SMALL = {"formats": ["bf16"], "families": ["repeat_last"], "pe": ["none"], "seeds": [0], "max_len": 8,
         "model": {"d": 4}}


def _snapshot(out) -> dict:
    """Every file under ``out`` with its sha256: byte-for-byte state of a sweep directory."""
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(out.rglob("*")) if f.is_file()}


@pytest.fixture
def small_out(tmp_path):
    out = tmp_path / "small"
    assert run_sweep(SweepSpec.from_dict(SMALL), out, progress=None)["run"] == 1
    return out


def test_directory_records_canonical_spec_and_fingerprint(small_out):
    rec = json.loads((small_out / "spec.json").read_text())
    spec = SweepSpec.from_dict(SMALL)
    # defaults are filled in: the record says what ran, not what was typed
    assert rec["spec"] == {**SMALL, "order": "pairwise", "backend": "emulated", "sep": None}
    assert set(rec["spec"]) == set(FIELDS) - {"kernel"}  # a naive kernel is left out (older fingerprints hold)
    canon = json.dumps(rec["spec"], sort_keys=True, separators=(",", ":")).encode()
    assert rec["fingerprint"] == hashlib.sha256(canon).hexdigest() == spec.fingerprint()
    # same spec: a resume, nothing rerun
    assert run_sweep(spec, small_out, progress=None) == {"run": 0, "skipped": 1, "extended": None}
    # the grid lists' order changes no cell: the same fingerprint
    two = {**SMALL, "formats": ["bf16", "fp16"], "seeds": [3, 1]}
    assert SweepSpec.from_dict(two).fingerprint() == SweepSpec.from_dict(
        {**two, "formats": ["fp16", "bf16"], "seeds": [1, 3]}).fingerprint()


@pytest.mark.parametrize("change,words", [
    ({"max_len": 9}, "max_len 8 -> 9"),
    ({"model": {"d": 8}}, "model"),
    ({"seeds": [1]}, "seeds drops 0"),
    ({"order": "sequential"}, "order"),
])
def test_changed_spec_refused_and_directory_untouched(small_out, change, words):
    before = _snapshot(small_out)
    for extend in (False, True):  # none of these changes is purely additive
        with pytest.raises(SweepError, match="new --out") as e:
            run_sweep(SweepSpec.from_dict({**SMALL, **change}), small_out, extend=extend, progress=None)
        assert words in str(e.value) and "\n" not in str(e.value)
    assert _snapshot(small_out) == before


def test_changed_spec_refused_by_the_cli_in_one_line(small_out, tmp_path, cli):
    before = _snapshot(small_out)
    spec = tmp_path / "spec30.json"
    spec.write_text(json.dumps({**SMALL, "max_len": 30}))
    r = cli("sweep", spec, "--out", small_out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "already holds a different sweep (max_len 8 -> 30)" in r.stderr
    assert _snapshot(small_out) == before


def test_extend_adds_cells_and_keeps_the_old_ones(small_out):
    old_cell = {k: v for k, v in _snapshot(small_out).items() if k.startswith("cells/")}
    bigger = SweepSpec.from_dict({**SMALL, "seeds": [0, 1]})
    with pytest.raises(SweepError, match="--extend"):
        run_sweep(bigger, small_out, progress=None)
    said = []
    r = run_sweep(bigger, small_out, extend=True, progress=said.append)
    assert r["run"] == 1 and r["skipped"] == 1 and "seeds + 1" in r["extended"] and "1 new cells" in r["extended"]
    assert any("extending" in m and "seeds + 1" in m for m in said)
    after = _snapshot(small_out)
    assert all(after[k] == h for k, h in old_cell.items())  # the old cell file is the same bytes
    df = results.load_table(small_out)
    assert len(df) == 2 * SMALL["max_len"] and not df.duplicated(["format", "family", "pe", "seed", "n"]).any()
    rec = json.loads((small_out / "spec.json").read_text())
    assert rec["fingerprint"] == bigger.fingerprint() and rec["extends"] == [SweepSpec.from_dict(SMALL).fingerprint()]
    # the extended directory now resumes the bigger spec (record unchanged) and refuses the smaller one
    record = (small_out / "spec.json").read_bytes()
    assert run_sweep(bigger, small_out, progress=None)["run"] == 0
    assert (small_out / "spec.json").read_bytes() == record
    with pytest.raises(SweepError, match="seeds drops 1"):
        run_sweep(SweepSpec.from_dict(SMALL), small_out, extend=True, progress=None)


def test_cells_without_a_record_are_refused(small_out):
    (small_out / "spec.json").unlink()
    with pytest.raises(SweepError, match="no spec.json"):
        run_sweep(SweepSpec.from_dict(SMALL), small_out, progress=None)
    (small_out / "spec.json").write_text(json.dumps({"formats": ["bf16"]}))  # an older, unfingerprinted record
    with pytest.raises(SweepError, match="not a sweep record"):
        run_sweep(SweepSpec.from_dict(SMALL), small_out, progress=None)


@pytest.mark.parametrize("change,msg", [
    ({"max_len": 20.5}, "max_len must be an integer, got 20.5"),
    ({"max_len": True}, "max_len must be an integer, got true"),
    ({"max_len": "20"}, "max_len must be an integer"),
    ({"seeds": [True]}, "each of seeds must be an integer, got true"),
    ({"seeds": 1}, "seeds must be a non-empty JSON list, got 1"),
    ({"seeds": [-1]}, "seeds must be >= 0"),
    ({"formats": "bf16"}, "formats must be a non-empty JSON list"),
    ({"formats": []}, "formats must be a non-empty JSON list"),
    ({"formats": ["bf16", "bf16"]}, "twice"),
    ({"pe": [None]}, "each of pe must be a non-empty string, got null"),
    ({"model": {"d": True}}, "model.d must be an integer, got true"),
    ({"model": {"qk_std": "x"}}, "model.qk_std must be a finite number or null"),
    ({"model": {"value_proj": 1}}, "model.value_proj must be true or false, got 1"),
    ({"model": [["d", 4]]}, "model must be a JSON object"),
    ({"model": {"d_ff": -1}}, "model.d_ff must be >= 0"),
    ({"sep": 0}, "sep must be >= 1 or null"),
    ({"max_len": 10**12}, "GiB limit"),
    ({"model": {"d": 100_000}}, "GiB limit"),
])
def test_spec_fields_strictly_typed_and_sized(change, msg):
    with pytest.raises(SweepError, match=None) as e:
        SweepSpec.from_dict({**SMALL, **change})
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_missing_fields_take_documented_defaults():
    spec = SweepSpec.from_dict({"formats": ["bf16"], "families": ["ones"]})
    assert spec.canonical() == {"formats": ["bf16"], "families": ["ones"], "pe": ["none"], "seeds": [0],
                                "max_len": 128, "model": {}, "order": "pairwise", "backend": "emulated", "sep": None}
    for name in ("formats", "families"):
        with pytest.raises(SweepError, match=f"lacks '{name}'"):
            SweepSpec.from_dict({k: v for k, v in SMALL.items() if k != name})


def test_mem_limit_is_the_collapse_estimate():
    from collapse_sim.experiments.collapse import memory_estimate

    spec = SweepSpec.from_dict(SMALL)
    est = memory_estimate(spec.config(spec.cells()[0]), SMALL["max_len"], None)
    SweepSpec.from_dict(SMALL, mem_limit_gib=est / 2**30)  # at the estimate: accepted
    with pytest.raises(SweepError, match="GiB limit"):
        SweepSpec.from_dict(SMALL, mem_limit_gib=est / 2**30 * (1 - 2**-20))


@pytest.mark.parametrize("content,msg", [
    (b"[1, 2]", "must be a JSON object"),
    (bytes(range(256)), "not UTF-8 text"),
    (json.dumps({**SMALL, "max_len": 10**12}).encode(), "GiB limit"),
    (b"{\"formats\": [", "not valid JSON"),
])
def test_unusable_spec_file_refused_in_one_line_nothing_written(tmp_path, content, msg, cli):
    spec = tmp_path / "spec.json"
    spec.write_bytes(content)
    out = tmp_path / "never"
    r = cli("sweep", spec, "--out", out)
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_unreachable_scheduler_refused_before_anything_is_written(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: bound, then released
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "never"
    t0 = time.time()
    with pytest.raises(SweepError, match=f"cannot reach a dask scheduler at tcp://127.0.0.1:{port} within 1 s"):
        run_sweep(SweepSpec.from_dict(SMALL), out, executor="dask", scheduler=f"tcp://127.0.0.1:{port}",
                  connect_timeout=1.0, progress=None)
    assert time.time() - t0 < 20 and not out.exists()


def test_missing_dask_names_the_real_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails as when dask is not installed
    out = tmp_path / "never"
    with pytest.raises(SweepError, match=r"pip install '\.\[dask\]'"):
        run_sweep(SweepSpec.from_dict(SMALL), out, executor="dask", scheduler="tcp://127.0.0.1:8786", progress=None)
    assert not out.exists()


def test_kernel_reaches_the_cell_and_naive_keys_stay_as_they_were():
    """A kernel other than naive is part of the canonical form, the cells and their keys,
    and reaches the backend; a naive spec's canonical form and keys have no kernel field
    (so sweeps written before kernels existed keep their fingerprints)."""
    from collapse_sim import results
    from collapse_sim.experiments.sweep import run_cell

    naive, online = SweepSpec.from_dict(SMALL), SweepSpec.from_dict({**SMALL, "kernel": "online(3)"})
    assert "kernel" not in naive.canonical() and "kernel" not in naive.cells()[0]
    assert online.fingerprint() != naive.fingerprint()
    assert results.cell_key(online.cells()[0]) != results.cell_key(naive.cells()[0])
    _, _, prov = run_cell(online.cells()[0], online)
    assert prov["backend"]["policy"].endswith(",kernel=online(3)")
