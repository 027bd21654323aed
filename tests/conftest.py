import atexit
import os
import shutil
import tempfile
import types

# The suite compiles several hundred small XLA programs whose run time is negligible: LLVM at
# optimisation level 0 compiles them about a third faster. The emulated and reference backends'
# bits do not depend on the level (they round with integer ops and exact float64 steps);
# tests/test_compilation.py checks emulated forwards compiled in fresh processes at the default
# level against this one bit for bit. Native float32/float64 bits do depend on it (at the
# default level XLA contracts a·b + c into FMAs), so no test compares those bit for bit.
OPT_FLAG = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_FLAG}".strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# The whole test session shares one persistent compilation cache, in a folder of its own (never
# the user's ~/.cache): made by the first process that imports this file (with ``-n 2``, the
# controlling process, before its workers start; they inherit the variable) and removed when
# that process exits. Tests that build the same program (the same HLO, flags and JAX version)
# in either worker then load it instead of compiling it again. CLI commands run in-process
# (tests/test_cli_runs.py) use the same folder.
if "COLLAPSE_SIM_COMPILE_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="collapse-sim-test-xla-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["COLLAPSE_SIM_COMPILE_CACHE"] = _cache
# In-process CLI runs do not store whole forwards (collapse_sim.compilation.stored_dir): those are
# compiled with JAX's cache off and would miss the programs other tests put there.
# tests/test_stored.py turns the store on itself; tests/test_compilation.py's fresh processes run
# the CLI's default.
os.environ.setdefault("COLLAPSE_SIM_STORE_PROGRAMS", "off")
if os.environ.get("COLLAPSE_SIM_TEST_CACHE", "on") != "off":
    from collapse_sim.compilation import use_cache

    use_cache(os.environ["COLLAPSE_SIM_COMPILE_CACHE"])

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile("thorough", max_examples=5000, deadline=None)
settings.register_profile("search", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


#: Tests of a minute or more that share nothing with the rest: collected first, so that with
#: ``-n 2`` (xdist's ``load`` scheduling hands out the first tests round robin) one worker starts
#: on them while the other takes the rest of the suite, instead of one running them at the end.
#: (Scheduling whole modules, ``--dist loadscope`` with the heaviest first, measured slower: 783 s
#: against 743 s on a clean clone, the same CPU seconds but a longer tail.)
FIRST = ("tests/test_report_resume.py::test_toy_report_sections_resume_rerun_and_only",)


def pytest_collection_modifyitems(config, items):
    first = [i for i in items if i.nodeid in FIRST]
    ids = {id(i) for i in first}
    items[:] = first + [i for i in items if id(i) not in ids]


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def certified_everywhere(monkeypatch):
    """The exact and blocked orders take their certified float64 path at every size
    (``CERTIFIED_MIN_TERMS = 0``). The compiled forwards of this process are forgotten
    before and after: their cache key does not hold the threshold, so a program traced
    under the other setting would otherwise be reused."""
    from collapse_sim.backends import _jit, emulated

    _jit._compiled.cache_clear()
    monkeypatch.setattr(emulated.attention, "CERTIFIED_MIN_TERMS", 0)
    yield
    _jit._compiled.cache_clear()


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def cli(capfd):
    """``cli(*argv)`` runs ``collapse-sim ARGV`` in this process (``cli.main``, which turns every
    error into one line and a status) and returns its ``returncode``, ``stdout`` and ``stderr``
    (file descriptors 1 and 2: XLA's own messages too), as ``subprocess.run`` would, without a
    Python start and a JAX import per call. The command turns JAX's persistent compilation cache
    on; the cache settings are put back afterwards. The entry point in a process of its own
    (status 2, no traceback, a fresh interpreter) is checked by tests/test_errors.py."""
    from jax.experimental.compilation_cache import compilation_cache

    from collapse_sim.cli import main

    saved = {k: getattr(jax.config, k) for k in _CACHE_OPTIONS}

    def run(*argv):
        capfd.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's --help and the like
            rc = e.code
        said = capfd.readouterr()
        return types.SimpleNamespace(returncode=rc, stdout=said.out, stderr=said.err)

    yield run
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
