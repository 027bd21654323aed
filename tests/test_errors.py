"""Trust at the edges: every bad input is one CollapseSimError sentence, exit status 2 on the
command line, no traceback, nothing written, refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import collapse_sim as cs
from collapse_sim import CollapseSimError
from collapse_sim.cli import main
from collapse_sim.formats import parse, parse_list
from collapse_sim.model import ModelConfig, Params, init_params
from collapse_sim.policy import Order, Policy
from collapse_sim.results import check_output_dir, check_output_file
from oracles import fraction_round

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose package the subprocesses import
#: a message is one sentence: one line, short enough to read at a glance
MAX_MESSAGE = 400
#: a refusal happens before any work: well under a second (the work itself takes seconds to minutes)
REFUSE_S = 1.0


def _listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in ds + fs)


def _refused(argv, tmp_path, capsys, msg: str) -> float:
    """Run the CLI in-process on bad input: exit 2, one short line naming the problem, nothing written."""
    capsys.readouterr()
    before = _listing(tmp_path)
    t0 = time.perf_counter()
    rc = main(argv)
    took = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert rc == 2, (argv, out, err)
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("collapse-sim: error: ") and len(err) < MAX_MESSAGE, err
    assert msg in err, (msg, err)
    assert _listing(tmp_path) == before, "a refused command wrote something"
    return took


def _one_sentence(e: BaseException, msg: str) -> None:
    text = str(e)
    assert isinstance(e, CollapseSimError) and isinstance(e, ValueError)
    assert "\n" not in text and len(text) < MAX_MESSAGE and msg in text, text


# --- the command line: bad arguments --------------------------------------------------

SMALL = ["--family", "ones", "--max-len", "4", "--d", "8"]

CLI_CASES = [
    (["round", "1", "--format", "bf16", "--mode", "xx"], "unknown rounding mode 'xx'"),
    (["round", "abc", "--format", "bf16"], "'abc' is not a number"),
    (["round", "0x1p99999", "--format", "bf16"], "beyond the float64 range"),
    (["round", "1", "--format", "bf17"], "unknown format 'bf17'"),
    (["round", "1", "--format", "bf16", "--seed", "-1"], "--seed must be >= 0"),
    (["round", "1", "--format", "bf16", "--seed", "3"], "mode rne draws none"),
    (["round", "1", "--format", "bf16", "--mode", "sr(4,seed=1)", "--seed", "3"], "names its seed already"),
    (["formats", "p=100000,emax=15"], "use p <= 1074"),
    (["formats", "p=5,emax=100000"], "use emax <= 1023"),
    (["formats", "p=5,emax=15,emin=-2000"], "use emin >= -1070"),
    (["formats", "(p=5,emax=15"], "'(' without its ')'"),
    (["formats", "p=5,emax=15,overflow=wrap"], "overflow must be one of inf, saturate, nan"),
    (["collapse", *SMALL, "--format", ""], "empty format list"),
    (["collapse", *SMALL, "--format", "bf16,p=5,emax=15"], "write 'bf16,(p=5,emax=15)'"),
    (["collapse", *SMALL, "--format", "bf16,,fp16"], "empty item"),
    (["collapse", *SMALL, "--d-ff", "-1"], "d_ff must be >= 0, got -1"),
    (["collapse", "--family", "ones", "--max-len", "4", "--d", "0"], "d must be >= 1, got 0"),
    (["collapse", *SMALL, "--heads", "3"], "not divisible by n_heads=3"),
    (["collapse", *SMALL, "--window", "0"], "window must be >= 1"),
    (["collapse", *SMALL, "--sep", "0"], "separator spacing must be >= 1"),
    (["collapse", *SMALL, "--seed", "-1"], "--seed must be >= 0"),
    (["collapse", "--family", "ones", "--max-len", "0"], "--max-len must be positive"),
    (["collapse", *SMALL, "--mem-limit", "-1"], "--mem-limit must be a positive"),
    (["collapse", *SMALL, "--order", "zigzag"], "unknown reduction order 'zigzag'"),
    (["collapse", *SMALL, "--backend", "native", "--format", "(p=5,emax=15)"], "no native JAX dtype"),
    (["collapse", *SMALL, "--backend", "native", "--format", "e8m0fnu"], "e8m0fnu has no negative values"),
    (["collapse", *SMALL, "--backend", "native", "--order", "tcfma-v100"], "not in the tcfma(4,23,rz) order"),
    (["collapse", *SMALL, "--adaptive-temperature", "--kernel", "online(4)"], "the online kernel never holds"),
    (["collapse", "--family", "ones", "--max-len", "100000000000", "--d", "8"], "exceeds --mem-limit"),
    (["collapse", *SMALL, "--format", "e5m3fnu"], "e5m3fnu"),
    (["collapse", *SMALL, "--format", "(p=30,emax=15)"], "cannot be emulated exactly"),
    (["collapse", "--family", "nope", "--max-len", "4"], "invalid choice: 'nope'"),
    (["collapse", "--family", "ones"], "required: --max-len"),
    (["collapse", *SMALL, "--vocab", "x"], "invalid int value: 'x'"),
    ([], "required: command"),
    (["theorem", "nope"], "unknown statement 'nope'"),
    (["theorem", "thm42", "--instances", "0"], "--instances must be >= 1"),
    (["theorem", "b10", "--format", "(p=30,emax=15)"], "cannot be emulated exactly"),
    (["theorem", "b10", "--max-n", "1000"], "--max-n <= 512"),
    (["oversquash", "--n", "0"], "--n must lie in 1..512"),
    (["oversquash", "--format", "e4m3fn"], "cannot be differentiated natively"),
    (["oversquash", "--format", "fp32,p=5,emax=15"], "write 'fp32,(p=5,emax=15)'"),
    (["scaling", "--p", "4..30"], "carrier"),
    (["scaling", "--p", "x"], "--p must look like 4..16"),
    (["reproduce", "--only", "fig8,nope"], "--only takes section names from rounding, sums, fig8"),
    (["reproduce", "--only", ""], "got ''"),
    (["sweep", "missing-spec.json"], "cannot read sweep spec"),
    (["sweep", "spec.json", "--executor", "dask"], "needs --scheduler"),
    (["collapse", "--family", "repeat_last", "--max-len", "4000", "--time-limit", "10"],
     "is estimated to take"),
    (["collapse", *SMALL, "--time-limit", "0"], "--time-limit must be a positive"),
    (["round", "1", "--format", "bf16", "--compile-cache", "/dev/null/x"], "cannot use '/dev/null/x' as the compilation cache"),
    (["round", "1", "--format", "bf16", "--compile-cache", ""], "--compile-cache needs a folder"),
    (["round", "1", "--format", "bf16", "--compile-cache", "/proc/collapse-sim-test/xla"],
     "as the compilation cache"),  # /proc looks writable to root; the folder cannot be made
]


@pytest.mark.parametrize("argv,msg", CLI_CASES, ids=[" ".join(a)[:60] or "empty" for a, _ in CLI_CASES])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, argv, msg):
    monkeypatch.chdir(tmp_path)  # outputs default to folders in the working directory
    took = _refused(argv, tmp_path, capsys, msg)
    assert took < REFUSE_S


def _bad_weights(tmp_path, kind: str):
    """A weight file pair at tmp_path/w broken in one way; returns its PATH."""
    path = tmp_path / "w"
    p = init_params(ModelConfig(d=4, n_layers=1, vocab=6, pe="none"))
    p.save(path)
    npz = path.with_suffix(".npz")
    if kind == "corrupt":
        npz.write_bytes(b"garbage, not a zip archive")
    elif kind == "truncated":
        npz.write_bytes(npz.read_bytes()[:100])
    elif kind == "missing":
        npz.unlink()
    elif kind == "shape":
        np.savez(npz, **{**p.arrays, "embed": np.zeros((6, 8))})
    elif kind == "dtype":
        np.savez(npz, **{**p.arrays, "embed": np.zeros((6, 4), dtype=np.int64)})
    elif kind == "extra":
        np.savez(npz, **p.arrays, stray=np.zeros(3))
    elif kind == "nonfinite":
        np.savez(npz, **{**p.arrays, "embed": np.full((6, 4), np.inf)})
    elif kind == "config":
        path.with_suffix(".json").write_text('{"d": "4"}')
    elif kind == "json":
        path.with_suffix(".json").write_text("{not json")
    elif kind == "npy":
        npz.unlink()
        with open(npz, "wb") as fh:
            np.save(fh, np.zeros(3))
    return path


class _Unpickled:
    """Creates a folder when unpickled: loading weights must never run it."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


WEIGHT_CASES = [("corrupt", "not an .npz archive"), ("truncated", "not an .npz archive"), ("missing", "cannot read weights"),
                ("shape", "has shape (6, 8), expected (6, 4)"), ("dtype", "has dtype int64"),
                ("extra", "array(s) stray"), ("nonfinite", "non-finite"), ("config", "d must be an integer, got '4'"),
                ("json", "not valid JSON"), ("npy", "not an .npz archive")]


@pytest.mark.parametrize("kind,msg", WEIGHT_CASES, ids=[k for k, _ in WEIGHT_CASES])
def test_weights_checked_cli_and_api(tmp_path, capsys, kind, msg):
    path = _bad_weights(tmp_path, kind)
    with pytest.raises(CollapseSimError) as e:
        Params.load(path)
    _one_sentence(e.value, msg)
    _refused(["collapse", "--family", "ones", "--max-len", "4", "--weights", str(path), "--out", str(tmp_path / "o")],
             tmp_path, capsys, msg)


def test_weights_never_unpickled(tmp_path):
    path = _bad_weights(tmp_path, "none")
    marker = tmp_path / "unpickled"
    obj = _Unpickled()
    obj.marker = str(marker)
    np.savez(path.with_suffix(".npz"), embed=np.array([obj], dtype=object))
    with pytest.raises(CollapseSimError) as e:
        Params.load(path)
    _one_sentence(e.value, "not a readable .npz archive")
    assert not marker.exists()


def test_save_refused_before_writing(tmp_path):
    p = init_params(ModelConfig(d=4, n_layers=1, vocab=6, pe="none"))
    with pytest.raises(CollapseSimError) as e:
        p.save(tmp_path / "no-such-folder" / "w")
    _one_sentence(e.value, "does not exist")
    bad = Params(p.config, {**p.arrays, "embed": np.zeros((2, 2))})
    with pytest.raises(CollapseSimError):
        bad.save(tmp_path / "w")
    assert _listing(tmp_path) == []
    p.save(tmp_path / "w")
    assert Params.load(tmp_path / "w").arrays.keys() == p.arrays.keys()


# --- output locations: refused at once, for every command that writes ----------------

def _spec(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"formats": ["bf16"], "families": ["ones"], "max_len": 8, "model": {"d": 4}}))
    return str(spec)


WRITERS = {
    "collapse": lambda t: ["collapse", *SMALL],
    "oversquash": lambda t: ["oversquash", "--n", "4", "--d", "4"],
    "scaling": lambda t: ["scaling", "--p", "4..5", "--max-len", "8"],
    "sweep": lambda t: ["sweep", _spec(t)],
    "reproduce": lambda t: ["reproduce", "--quick"],
}


@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("where,msg", [("file", "is an existing file"), ("under-file", "which is a file"),
                                        ("proc", "is not writable"), ("chmod", "is not writable")])
def test_bad_out_refused_before_any_work(tmp_path, capsys, command, where, msg):
    argv = WRITERS[command](tmp_path)
    (tmp_path / "afile").write_text("x")
    if where == "file":
        out = tmp_path / "afile"
    elif where == "under-file":
        out = tmp_path / "afile" / "sub" / "out"
    elif where == "proc":
        out = "/proc/collapse-sim-test/out"  # not writable, even for root
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes through permission bits")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        out = ro / "out"
    try:
        took = _refused([*argv, "--out", str(out)], tmp_path, capsys, msg)
    finally:
        if where == "chmod":
            (tmp_path / "ro").chmod(0o755)
    assert took < REFUSE_S, f"{command} took {took:.2f} s to refuse --out"


def test_sweep_out_must_be_empty_or_a_sweep(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(["sweep", _spec(tmp_path), "--out", str(out)], tmp_path, capsys, "holds no spec.json")


def test_sweep_over_its_time_limit_refused(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"formats": ["bf16", "fp16"], "families": ["repeat_last"], "max_len": 20000,
                                "model": {"d": 64}}))
    _refused(["sweep", str(spec), "--out", str(tmp_path / "o"), "--time-limit", "30"], tmp_path, capsys,
             "this sweep's 2 cells to run is estimated to take")


def test_collapse_out_with_a_folder_where_a_result_goes(tmp_path, capsys):
    (tmp_path / "o" / "collapse.csv").mkdir(parents=True)
    _refused(["collapse", *SMALL, "--out", str(tmp_path / "o")], tmp_path, capsys, "holds a folder collapse.csv")


def test_output_helpers_create_nothing(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    assert check_output_file(tmp_path / "f.json") == tmp_path / "f.json"
    for bad, msg in [("", "must be a path"), (None, "must be a path")]:
        with pytest.raises(CollapseSimError) as e:
            check_output_dir(bad)
        _one_sentence(e.value, msg)
    with pytest.raises(CollapseSimError) as e:
        check_output_file(tmp_path)
    _one_sentence(e.value, "is a directory")
    assert _listing(tmp_path) == []


# --- the Python API --------------------------------------------------------------------

API_CASES = [
    (lambda: ModelConfig(d="64"), "d must be an integer, got '64' (str)"),
    (lambda: ModelConfig(d=True), "d must be an integer, got True (bool)"),
    (lambda: ModelConfig(d=8.0), "d must be an integer, got 8.0"),
    (lambda: ModelConfig(d_ff=-1), "d_ff must be >= 0, got -1"),
    (lambda: ModelConfig(seed=-3), "seed must be >= 0"),
    (lambda: ModelConfig(norm_eps=float("nan")), "norm_eps must be a finite real number"),
    (lambda: ModelConfig(value_proj="yes"), "value_proj must be True or False"),
    (lambda: ModelConfig(pe=3), "pe must be a string"),
    (lambda: Policy.parse(42), "got 42 (int)"),
    (lambda: Policy.parse("compute=(p=5,emax=15"), "'(' without its ')'"),
    (lambda: Policy.parse("compute=p=5,emax=15"), "compute=(p=5,emax=15)"),
    (lambda: Order.parse(3), "got 3"),
    (lambda: cs.round_to(np.float32(1), "bf16", "sr", key=42), "jax.random key such as jax.random.key(42), got 42"),
    (lambda: cs.round_to(np.float32(1), "bf16", "sr"), "needs an explicit PRNG key"),
    (lambda: cs.round_to(np.float32(1), "bf16", "xx"), "unknown rounding mode 'xx'"),
    (lambda: cs.round_to(np.arange(3), "bf16"), "got dtype int64"),
    (lambda: Params.load("/nonexistent/weights"), "cannot read model config"),
    (lambda: parse(42), "got 42 (int)"),
    (lambda: parse("p=100000,emax=15"), "p <= 1074"),
    (lambda: parse("p=5,emax=100000"), "emax <= 1023"),
    (lambda: parse("p=60,emax=1023,emin=-900"), "emax <= 1022"),
    (lambda: parse("p=5,emax=15,maxsig=99"), "[16, 31], got 99"),
    (lambda: parse_list("p=5,emax=15,bf16"), "write '(p=5,emax=15),bf16'"),
    (lambda: parse_list(""), "empty format list"),
]


@pytest.mark.parametrize("call,msg", API_CASES, ids=[m[:40] for _, m in API_CASES])
def test_api_bad_input_raises_collapse_sim_error(call, msg):
    with pytest.raises(CollapseSimError) as e:
        call()
    _one_sentence(e.value, msg)


def test_every_error_class_is_a_collapse_sim_error():
    from collapse_sim.backends.emulated import CarrierError
    from collapse_sim.cli import UsageError
    from collapse_sim.experiments.sweep import SweepError
    from collapse_sim.families import FamilyError
    from collapse_sim.formats import FormatError
    from collapse_sim.model import ConfigError
    from collapse_sim.policy import PolicyError
    from collapse_sim.results import OutputError
    from collapse_sim.rounding import RoundingError

    for cls in (CarrierError, UsageError, SweepError, FamilyError, FormatError, ConfigError, PolicyError, OutputError,
                RoundingError):
        assert issubclass(cls, CollapseSimError) and issubclass(cls, ValueError)
    assert cs.CollapseSimError is CollapseSimError


# --- formats: one syntax, float64 limits, hex input ------------------------------------

def test_one_custom_format_syntax_everywhere(capsys):
    f = parse("p=5,emax=15")
    assert parse("(p=5,emax=15)") == f and parse_list("p=5,emax=15") == [f] and parse_list("(p=5,emax=15)") == [f]
    assert parse_list("bf16,(p=5,emax=15)") == [parse("bf16"), f]
    assert Policy.parse("(p=5,emax=15)") == Policy.parse("p=5,emax=15") == Policy.parse("compute=(p=5,emax=15)")
    assert main(["formats", "p=5,emax=15"]) == 0
    alone = capsys.readouterr().out
    assert main(["formats", "(p=5,emax=15)"]) == 0
    assert capsys.readouterr().out == alone


def test_format_limits_are_float64s():
    """At the limits every property in the formats table is a nonzero finite float64; one step beyond is refused."""
    edge = [parse("p=1074,emin=0,emax=15"), parse("p=5,emax=1023,emin=-1070"), parse("p=53,emax=1023")]
    for f in edge:
        for v in (f.unit_roundoff, f.eps, f.max, f.min_normal, f.min_subnormal):
            assert 0 < v < float("inf")
    assert edge[0].unit_roundoff == 2.0**-1074 and edge[2].max == np.finfo(np.float64).max
    for beyond in ["p=1075,emin=0,emax=15", "p=5,emax=1024", "p=5,emax=15,emin=-1071"]:
        with pytest.raises(CollapseSimError):
            parse(beyond)


def test_round_accepts_hex_floats(capsys):
    assert main(["round", "0x1p-30", "0x1.01p0", "--format", "bf16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"0x1p-30 -> {2.0**-30!r}", f"0x1.01p0 -> {1.0!r}"]  # 1 + 2^-8 is a tie: to even


def test_round_stochastic_takes_the_modes_seed_and_draws_per_value(capsys):
    """``--mode sr(r,seed=s)`` is ``--mode sr(r) --seed s``; every value draws its own bits, so
    64 copies of a value a quarter of the way between two bf16 neighbours do not all round
    the same way (each rounds up with probability 1/4: all alike has probability < 2^-26)."""
    x = "1.001953125"  # 1 + 2^-9: a quarter of bf16's quantum 2^-7 above 1
    assert main(["round", x, "--format", "bf16", "--mode", "sr(8,seed=5)"]) == 0
    named = capsys.readouterr().out
    assert main(["round", x, "--format", "bf16", "--mode", "sr(8)", "--seed", "5"]) == 0
    assert capsys.readouterr().out == named
    assert main(["round", *[x] * 64, "--format", "bf16", "--mode", "sr(8)"]) == 0
    got = {ln.split(" -> ")[1] for ln in capsys.readouterr().out.splitlines()}
    assert got == {repr(1.0), repr(1.0078125)}, got


# --- no silent precision loss --------------------------------------------------------------

def test_float64_input_rounded_as_float64_with_x64_off():
    """With JAX float64 off, float64 input is still rounded from its own value (not its float32 cut)."""
    rng = np.random.default_rng(0)
    bf16 = parse("bf16")
    # values just above bf16 midpoints, by less than float32 can hold: the float32 cut lands on the tie
    x = (1 + 2.0**-8 + 2.0 ** -rng.integers(30, 52, 64)) * 2.0 ** rng.integers(-20, 20, 64)
    with jax.enable_x64(False):
        got = cs.round_to(x, bf16)
        one = cs.round_to(np.float64(1 + 2**-8 + 2**-40), "bf16")
        assert not jax.config.jax_enable_x64
    assert got.dtype == jnp.float64 and float(one) == 1.0078125
    want = [fraction_round(Fraction(v), bf16, "rne") for v in x]
    assert np.asarray(got).tolist() == want


def test_fresh_interpreter_round_to_float64():
    code = ("import numpy as np, jax, collapse_sim as cs; "
            "r = cs.round_to(np.float64(1 + 2**-8 + 2**-40), 'bf16'); "
            "print(float(r), r.dtype, jax.config.jax_enable_x64)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1.0078125", "float64", "False"]


# --- a few runs as a user would: a real process, no traceback --------------------------------

@pytest.mark.parametrize("argv,msg", [
    (["round", "1", "--format", "bf16", "--mode", "xx"], "unknown rounding mode"),
    (["collapse", "--family", "ones", "--max-len", "4", "--out", "afile"], "is an existing file"),
    (["formats", "p=5,emax=100000"], "use emax <= 1023"),
])
def test_subprocess_no_traceback(tmp_path, argv, msg):
    (tmp_path / "afile").write_text("x")
    before = _listing(tmp_path)
    r = subprocess.run([sys.executable, "-m", "collapse_sim.cli", *argv], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stdout == ""
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr
    assert _listing(tmp_path) == before
