"""What a statement check is made of: a random instance (:class:`Case`), the rows it
returns (:class:`Check`, an observed quantity beside its bound), the :class:`Statement`
itself, and γ_k, the error factor every float64 slack is written with."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from ..errors import CollapseSimError


EDGES = ("n=1", "equal", "dominant", "maxnorm")


@dataclasses.dataclass(frozen=True)
class Case:
    """One random instance: ``seed`` drives every draw, ``n`` is the length, ``edge``
    forces an edge case: ``"equal"`` (all logits equal / zero query-key weights),
    ``"dominant"`` (one logit far above the rest / large query-key weights),
    ``"maxnorm"`` (every weight at the strategy's maximum magnitude); ``"n=1"`` is n = 1."""

    seed: int
    n: int
    edge: str | None = None

    def __post_init__(self):
        if self.edge is not None and self.edge not in EDGES:
            raise CollapseSimError(f"unknown edge case {self.edge!r}; use one of {', '.join(EDGES)}")

    @property
    def length(self) -> int:
        return 1 if self.edge == "n=1" else max(1, self.n)


@dataclasses.dataclass
class Check:
    statement: str
    quantity: str
    observed: float
    bound: float
    slack: float = 0.0
    hypothesis: str | None = None  # None: the instance meets the statement's hypothesis; else why not

    @property
    def holds(self) -> bool:
        return bool(self.observed <= self.bound + self.slack)

    @property
    def verdict(self) -> str:
        """"NO" when the bound fails; "hypothesis not met" when it holds on an instance outside
        the statement's hypothesis (the bound is valid there but need not be small); "yes"."""
        return "NO" if not self.holds else ("yes" if self.hypothesis is None else "hypothesis not met")

    @property
    def tightness(self) -> float:
        """observed / bound (1 = the bound is attained; nan when the bound is 0)."""
        return self.observed / self.bound if self.bound > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class Statement:
    name: str
    title: str
    check: Callable[[Case], list[Check]]
    cost: str = "cheap"  # "cheap" (pure numbers) or "model" (forward passes)


#: Rounded ops per term along a forward's longest dependency chain, per layer (:func:`forward_ops`).
OPS_PER_TERM = 64


def forward_ops(n: int, d: int, layers: int = 1) -> int:
    """k = 64·(n + d)·L: the op count whose γ_k the package uses as the relative error of a forward
    (or of a bound evaluated along one) at n tokens, width d, L layers. Per layer a value depends on
    reductions over at most n + d terms (the softmax sum and weighted values over n keys; dots, norms
    and MLP rows over d), and each term reaches the output through fewer than 64 rounded ops
    (docs/semantics.md: projection dot and its rounding, scale, max subtraction, exp, sum, division,
    weighted sum, residual add, a norm's mean, variance, sqrt, division and gain, two MLP dots and
    the activation: under 32, doubled for the probe row that shares the keys). It is a count of error
    terms, each of relative size u against the largest |output|, not a proof for ill-conditioned
    inputs: the models here have activations of order 1 (LayerNorm, 1/√d weights)."""
    return OPS_PER_TERM * (n + d) * layers


def gamma(k: int, u: float) -> float:
    """γ_k = k·u / (1 − k·u): the relative error of k correctly rounded ops."""
    return k * u / (1 - k * u)
