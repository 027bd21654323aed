"""The emulated backend: every op rounded to a policy's formats, reduction order explicit.

What it computes is specified in docs/semantics.md; each module cites its sections.
The specification and its fast paths live apart, lowest first:

* ``carrier.py``: the carrier float and :func:`carrier_add` (correct + and − in every mode);
* ``orders.py``: the reduction orders, the specification of every sum;
* ``exact.py``: the exact order, an int64 superaccumulator (the specification of exact sums);
* ``certificates.py``: float64 certificates, fast paths each bit-equal to ``orders.py`` / ``exact.py``;
* ``ops.py``: :class:`Emulator` (correctly rounded ops, sums, dots; formats static, or as data
  for the shared program of :data:`SHARED_CLASS`) and :func:`reduce_sum`;
* ``attention.py``: linear layers, masked softmax, op-by-op and certified attention;
* ``schedule.py``: causal segments and sharding of the attention's queries;
* ``backend.py``: :class:`EmulatedBackend`, the model primitives.

The emulated backend needs JAX float64 (``collapse_sim.enable_x64()``).
"""

from __future__ import annotations

from .attention import _certified, _certified_attention, _emulated_attention, _linear, masked_softmax
from .backend import SHARED_MAX_N, EmulatedBackend
from .carrier import CarrierError, carrier_add, carrier_for
from .certificates import _inside_cell, certified_matmul, certified_sum, certify, matmul_stats, row_norms
from .exact import exact_sum, lsb_exponent
from .ops import SHARED_CLASS, Emulator, reduce_sum
from .schedule import _causal_segments

__all__ = ["SHARED_CLASS", "SHARED_MAX_N", "CarrierError", "EmulatedBackend", "Emulator", "carrier_add", "carrier_for", "certified_matmul",
           "certified_sum", "certify", "exact_sum", "lsb_exponent", "masked_softmax", "matmul_stats", "reduce_sum",
           "row_norms"]
