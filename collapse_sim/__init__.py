"""collapse_sim: attention precision collapse, simulated faithfully in any floating-point format.

Every error raised on bad input is a :class:`CollapseSimError` (a ``ValueError``) whose
message names the bad value and the fix.
"""

from .errors import CollapseSimError
from .formats import Format, FormatError, parse

__all__ = ["CollapseSimError", "Format", "FormatError", "Mode", "parse", "round_to", "enable_x64", "require_x64"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``Mode`` and ``round_to`` import JAX, so on first use: a command refusing bad input starts fast."""
    if name in ("Mode", "round_to"):
        from . import rounding

        value = getattr(rounding, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'collapse_sim' has no attribute {name!r}")


def enable_x64() -> None:
    """Turn on JAX float64 for the whole process (JAX's global ``jax_enable_x64``).

    The backends, the model and the theory checks need it; call it once at program
    start. ``round_to`` does not: it rounds float64 input as float64 either way."""
    import jax

    jax.config.update("jax_enable_x64", True)


def require_x64(what: str) -> None:
    """Refuse to go on without JAX float64, which ``what`` (e.g. "the emulated backend") needs."""
    import jax

    if not jax.config.jax_enable_x64:
        raise RuntimeError(f"{what} needs JAX float64: call collapse_sim.enable_x64() at program start")
