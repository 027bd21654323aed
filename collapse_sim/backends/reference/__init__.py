"""The mpmath reference: the same ops in the same order, at any precision.

Numbers are mpmath ``mpf`` values held in numpy object arrays. Every
elementary op is evaluated exactly (+ − ×) or at ``2p + 64`` bits truncated,
with a sticky bit when the truncation lost something (÷ √ exp: the result is
then round-to-odd, which rounds on to ``p`` bits exactly as the exact value
would), and is then rounded to the format with integer arithmetic, including
its exponent range (gradual underflow, overflow policy). At ``prec=256`` with
a huge range it is ground truth for the emulated and native backends; at the
precision and range of a format it must agree with the emulated backend bit
for bit (tests/test_model.py, tests/test_semantics.py).

mpmath has no negative zero, so signs of zeros are not modelled here.
This path is written for clarity, not speed: Python loops over mpf values.

What it computes is specified in docs/semantics.md: :class:`RefArith` the
elementary ops (§2), :func:`ref_sum` and :meth:`Reference.dot` the reduction
orders and dot products (§3.1, §3.2), :class:`ReferenceBackend` the mean and norms
(§4), the constants (§5; :class:`ExactConstants` for §5.7), linear layers (§7),
attention with masked columns, windows and probes (§3.3, §8, §10); at a precision
in bits it is the ground truth of §11.

Layout: ``arith.py`` (RefArith, ref_sum, Reference: the ops and orders),
``constants.py`` (ExactConstants), ``backend.py`` (ReferenceBackend and the array
plumbing it shares with the interval backends).
"""

from __future__ import annotations

from .arith import RefArith, Reference, ref_sum, to_float, wide_format
from .backend import ObjectArrayBackend, ReferenceBackend
from .constants import ExactConstants

__all__ = ["ExactConstants", "ObjectArrayBackend", "RefArith", "Reference", "ReferenceBackend", "ref_sum",
           "to_float", "wide_format"]
