"""The same arithmetic three ways.

* ``native``: plain JAX dtypes; XLA decides internal precision (what the stack does).
* ``emulated``: every op rounded to a policy's formats, reduction order explicit (what the format does).
* ``reference``: mpmath, op for op in the same order, at any precision (ground truth).
* ``interval``: interval arithmetic; encloses the exact-arithmetic values, so it
  certifies that two representations differ (``interval.certify_distinct``). ``"128"``
  uses mpmath's interval context, ``"arb128"`` python-flint's arb balls (fast: C matrix
  products; the high-precision reference to use for long inputs).

``make_backend(name, spec)`` builds one from a name and a format/policy/precision string.
"""

from __future__ import annotations

from ..errors import CollapseSimError


def make_backend(kind: str, spec: str):
    """``make_backend("native", "bf16")``, ``("emulated", "compute=bf16,order=pairwise")``,
    ``("reference", "256")`` (precision in bits) or ``("reference", "bf16")`` (a policy)."""
    if kind == "native":
        from .native import NativeBackend

        return NativeBackend(spec)
    if kind == "emulated":
        from .emulated import EmulatedBackend

        return EmulatedBackend(spec)
    if kind == "interval":
        if str(spec).startswith("arb"):
            from .interval import ArbBackend

            return ArbBackend(str(spec)[3:].lstrip(":"))
        from .interval import IntervalBackend

        return IntervalBackend(spec)
    if kind == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend(spec)
    raise CollapseSimError(f"unknown backend {kind!r}; use native, emulated, interval or reference")


def is_stochastic(backend) -> bool:
    """Whether ``backend`` rounds stochastically (an emulated backend under ``mode=sr(r,seed=s)``,
    docs/semantics.md §2): its bits then depend on the draws, so what holds bit for bit in the
    deterministic modes (one program for many runs, a traced tap) may not."""
    return bool(getattr(getattr(backend, "emu", None), "stochastic", False))


def kind_for_format(kind: str, fmt_name: str) -> str:
    """The backend :func:`backend_for_format` runs ``fmt_name`` on: ``kind``, except that
    the emulated backend runs fp64 natively."""
    from ..formats import parse

    return "native" if kind == "emulated" and parse(fmt_name).name == "fp64" else kind


def backend_for_format(kind: str, fmt_name: str, order: str = "pairwise", *, shard: bool = False,
                       kernel: str = "naive", shared: "bool | str | None" = None):
    """The backend of ``kind`` that runs every op in one format: ``reference`` and
    ``emulated`` use the uniform policy of that format, reduction ``order`` and attention
    ``kernel``; ``native`` the format's JAX dtype (naive kernel only). fp64 always runs
    natively (its ops are IEEE binary64 already). ``shard`` splits emulated attention
    over all JAX devices; ``shared``: the emulated backend's program choice
    (:class:`~collapse_sim.backends.emulated.EmulatedBackend`; None: automatic)."""
    from ..formats import parse
    from ..policy import Kernel, Order, Policy

    fmt = parse(fmt_name)
    which = kind_for_format(kind, fmt_name)
    k = Kernel.parse(kernel)
    if which == "native" and k.kind != "naive":
        fix = (f"{fmt_name} runs natively: drop it from the formats" if kind != "native"
               else "the native backend runs what XLA does: use the emulated or reference backend")
        raise CollapseSimError(f"the {k} kernel runs on the emulated and reference backends only; {fix}")
    if kind == "native" and (why := Order.parse(order).why_not_native()) is not None:
        raise CollapseSimError(why)
    if which == "reference":
        return make_backend("reference", Policy.uniform(fmt, order, kernel=k))
    if which == "native":
        return make_backend("native", fmt.name)
    from .emulated import EmulatedBackend

    return EmulatedBackend(Policy.uniform(fmt, order, kernel=k), shard=shard, shared=shared)
