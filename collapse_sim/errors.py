"""One error model: every error collapse_sim raises on bad input is a :class:`CollapseSimError`.

Its message is one sentence that names the bad value and says how to fix it. It is a
``ValueError``, so ``except ValueError`` keeps working. The command line prints the
sentence on stderr and exits with status 2, without a traceback.

The subclasses say which part of the input was wrong:

=================  ======================================================
``FormatError``    a format name or description (collapse_sim.formats)
``PolicyError``    a precision policy string (collapse_sim.policy)
``RoundingError``  a rounding mode, PRNG key or input array (collapse_sim.rounding)
``ConfigError``    a model configuration or weight file (collapse_sim.model)
``FamilyError``    an input family or its parameters (collapse_sim.families)
``CarrierError``   a format the emulated backend cannot carry (backends.emulated)
``SweepError``     a sweep spec (collapse_sim.experiments.sweep)
``OutputError``    an output location (collapse_sim.results)
``MXError``        an MX format, block size, axis or input (collapse_sim.mx)
``UsageError``     a command-line argument (cli, experiments.collapse)
=================  ======================================================

Also ``CompileCacheError`` (collapse_sim.compilation) and ``TooLongError`` (a run
estimated above its time limit, collapse_sim.experiments.estimate).
"""

from __future__ import annotations


class CollapseSimError(ValueError):
    """Bad input to collapse_sim: one sentence naming the bad value and the fix."""


def require_text(value, error: type[CollapseSimError], what: str, give: str) -> str:
    """``value`` if it is a non-blank string; else ``error`` saying that ``what`` (e.g. "a
    format") is ``give`` (e.g. "a name such as 'bf16'")."""
    if not isinstance(value, str):
        raise error(f"{what} is {give}, got {value!r} ({type(value).__name__})")
    if not value.strip():
        raise error(f"empty {what.split(' ', 1)[-1]} {value!r}; give {give}")
    return value


class UsageError(CollapseSimError):
    """Bad input from the command line, or a command's experiment given the same bad value
    from Python: one sentence, exit status 2 on the command line."""
