"""collapse_sim: attention precision collapse, simulated faithfully in any floating-point format."""

from .formats import Format, FormatError, parse
from .rounding import Mode, round_to

__all__ = ["Format", "FormatError", "Mode", "parse", "round_to", "enable_x64"]
__version__ = "0.1.0"


def enable_x64() -> None:
    """Turn on JAX float64 (needed by the f64 carrier). Call once at program start."""
    import jax

    jax.config.update("jax_enable_x64", True)
