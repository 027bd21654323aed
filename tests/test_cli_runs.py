"""The CLI's long-running commands: smoke runs and refusals that write nothing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from collapse_sim.cli import main
from collapse_sim.theory import forward_ops, gamma


def test_quick_sizes_reach_past_the_papers_crossings():
    """Quick mode must not read "not by 600" where the paper crosses at 800-1,000: Figs. 8 and 10 run to n >= 1,500
    in every model (captions' float64 and emulated rows, decoder variants)."""
    from collapse_sim.experiments.paper import QUICK

    assert min(QUICK.fig8_n, QUICK.fig10_n, QUICK.caption_n, QUICK.caption_fmt_n) >= 1500


def test_collapse_small_run(tmp_path):
    out = tmp_path / "c"
    assert main(["collapse", "--family", "ones", "--format", "bf16,fp64", "--max-len", "40", "--d", "8",
                 "--pe", "none", "--out", str(out)]) == 0
    with (out / "collapse.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 80 and {r["format"] for r in rows} == {"bf16", "fp64"}
    # no positions: 1^n and 1^(n+1) are identical in exact arithmetic; float64 keeps them within rounding
    assert (out / "collapse.png").exists() and (out / "collapse.json").exists()


def test_run_collapse_without_argparse(tmp_path, monkeypatch):
    """The collapse command's experiment called from Python: refused in one sentence with nothing
    written when its memory estimate is over the limit; otherwise it writes the three files and
    collapse.csv holds exactly the distances it returns (floats written by repr read back bit for bit).
    Without positions 1^n and 1^(n+1) are equal in exact arithmetic at every n (Prop. B.9)."""
    from collapse_sim.errors import UsageError
    from collapse_sim.experiments.collapse import check_collapse, run_collapse
    from collapse_sim.model import ModelConfig, init_params

    with pytest.raises(UsageError, match="--max-len must be positive"):
        check_collapse(0, 1.0, "bf16", "emulated")
    fmts = check_collapse(20, 1.0, "bf16", "emulated")
    params = init_params(ModelConfig(d=8, n_layers=1, vocab=8, pe="none"))
    with pytest.raises(UsageError, match="exceeds --mem-limit"):
        run_collapse(params, "ones", 20, fmts, tmp_path / "refused", mem_limit_gib=2.0**-30)
    assert not (tmp_path / "refused").exists()
    import collapse_sim.experiments.collapse as collapse

    def stopped(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a run stopped (Ctrl-C) before its results: no folder left behind
        m.setattr(collapse, "collapse_sweep", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_collapse(params, "ones", 20, fmts, tmp_path / "stopped", log=lambda m: None)
    assert not (tmp_path / "stopped").exists()
    said: list[str] = []
    run = run_collapse(params, "ones", 20, fmts, tmp_path / "c", log=said.append)
    assert [f.name for f in run.files] == ["collapse.csv", "collapse.json", "collapse.png"]
    assert all(f.exists() for f in run.files) and said[0].startswith("[collapse] estimated time: ")
    (r,) = run.results
    with run.files[0].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["n"]) for row in rows] == r.ns.tolist() == list(range(1, 21))
    assert [float(row["dist_l1"]) for row in rows] == r.l1.tolist()
    assert all(row["exact_equal"] == "True" for row in rows)


@pytest.mark.parametrize("args,msg", [
    (["--family", "ones", "--max-len", "0"], "--max-len must be positive"),
    (["--family", "ones", "--max-len", "10", "--format", "bf17"], "unknown format"),
    (["--family", "ones", "--max-len", "10", "--format", "bf16,(p=30,emax=100)"], "cannot be emulated"),
    (["--family", "ones", "--max-len", "10000000", "--mem-limit", "1"], "exceeds --mem-limit"),
    (["--family", "repeat_last", "--max-len", "10", "--vocab", "3"], "vocabulary"),
    (["--family", "nope", "--max-len", "10"], "invalid choice"),
])
def test_collapse_bad_input_one_sentence_nothing_written(tmp_path, args, msg, cli):
    out = tmp_path / "never"
    r = cli("collapse", *args, "--out", out)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_theorem_command(capsys):
    assert main(["theorem", "b4", "--instances", "2"]) == 0
    out = capsys.readouterr().out
    assert "every check holds" in out and "2(e−1)/(e+1)" in out
    assert main(["theorem", "thm51", "--instances", "1", "--max-n", "4"]) == 0
    assert main(["theorem", "--list"]) == 0
    assert "thm42" in capsys.readouterr().out


def test_oversquash_and_scaling_commands(tmp_path, capsys):
    o = tmp_path / "os"
    assert main(["oversquash", "--n", "6", "--d", "4", "--format", "fp64,bf16", "--out", str(o)]) == 0
    with (o / "oversquash.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {"path_sum_bound", "fp64 (frozen)", "bf16 (frozen)", "fp64 (full model)"} <= set(rows[0])
    # as Thm 5.1's check (default 2 layers): the bound with float64's γ_k for the forward's op count (the CSV keeps every float64 digit)
    assert all(float(r["fp64 (frozen)"]) <= float(r["path_sum_bound"]) * (1 + gamma(forward_ops(6, 4, 2), 2.0**-53)) for r in rows)
    assert (o / "oversquash.png").exists()
    said = capsys.readouterr().out
    assert "fp64 (frozen): first token" in said and "within the path-sum bound at every i (the bound's own case" in said
    meta = json.loads((o / "oversquash.json").read_text())
    assert meta["seed"] == 0 and meta["config"]["d"] == 4 and len(meta["tokens"]) == 6 and "provenance" in meta
    s = tmp_path / "sc"
    assert main(["scaling", "--p", "4..6", "--max-len", "64", "--out", str(s)]) == 0
    assert "per bit of precision; the fitted slope is" in capsys.readouterr().out
    assert (s / "scaling.png").exists() and (s / "scaling.csv").exists()
    meta = json.loads((s / "scaling.json").read_text())
    assert meta["seed"] == 11 and meta["config"]["d"] == 4 and meta["p"] == [4, 5, 6]


@pytest.mark.parametrize("argv,msg", [
    (["theorem", "nope"], "unknown statement"),
    (["theorem", "b1", "--instances", "0"], "--instances must be >= 1"),
    (["oversquash", "--n", "0"], "--n must lie in"),
    (["oversquash", "--format", "e4m3fn"], "cannot be differentiated natively"),
    (["scaling", "--p", "4-16"], "--p must look like"),
    (["scaling", "--p", "4..30"], "carrier"),
])
def test_theory_commands_bad_input(tmp_path, argv, msg, cli):
    r = cli(*argv, "--out", tmp_path / "x") if argv[0] != "theorem" else cli(*argv)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_collapse_shard_flag_same_table_on_four_fake_devices(tmp_path):
    """`collapse --shard` on 4 fake CPU devices writes the same distances as an unsharded run."""
    import os

    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()}
    args = ["--family", "repeat_last", "--format", "bf16", "--max-len", "30", "--d", "8", "--pe", "rope", "--vocab", "8"]
    tables = []
    for extra, name in (([], "plain"), (["--shard"], "sharded")):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-c", "import sys; from collapse_sim.cli import main; sys.exit(main(sys.argv[1:]))",
                            "collapse", *args, *extra, "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        with (out / "collapse.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert all(("sharded4" in row["backend"]) == (name == "sharded") for row in rows)
        tables.append([{k: v for k, v in row.items() if k != "backend"} for row in rows])
    assert tables[0] == tables[1] and len(tables[0]) == 30


def test_collapse_shard_refused_on_one_device(tmp_path, capsys):
    import jax

    if jax.device_count() > 1:
        pytest.skip("this process has several devices")
    out = tmp_path / "s"
    assert main(["collapse", "--family", "ones", "--max-len", "10", "--shard", "--out", str(out)]) == 2
    assert "more than one JAX device" in capsys.readouterr().err and not out.exists()


def test_reproduce_flags_reach_the_report(tmp_path, monkeypatch):
    """`reproduce --only fig10,fig8 --fresh` calls the report with those sections and fresh=True;
    without the flags, every section and the stored units."""
    import collapse_sim.report as report

    calls = []
    monkeypatch.setattr(report, "reproduce", lambda **kw: calls.append(kw) or 0)
    out = str(tmp_path / "r")
    assert main(["reproduce", "--only", "fig10, fig8", "--fresh", "--out", out]) == 0
    assert main(["reproduce", "--quick", "--out", out]) == 0
    assert calls == [dict(out=out, quick=False, only=["fig10", "fig8"], fresh=True),
                     dict(out=out, quick=True, only=None, fresh=False)]
