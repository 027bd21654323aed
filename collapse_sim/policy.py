"""Where rounding happens: precision policies.

A :class:`Policy` names the format of each role and the order of reductions:

* ``storage``: weights and activations between ops (inputs are rounded to it).
* ``compute``: results of elementary ops (+ − × ÷ √ exp max).
* ``accumulate``: running sums inside reductions (softmax denominators, dots).
* ``softmax``: the format the softmax is evaluated in (scores are rounded to
  it, exp/sum/divide happen in it, probabilities go back to ``compute``).
* ``order``: ``sequential``, ``pairwise``, ``blocked(b)``, ``kahan``, ``exact``, or an
  accumulator model: ``tcfma(k,t,r)`` (a tensor core's block FMA) or ``promote(b,Nc,r)`` (a
  short accumulator promoted every ``Nc`` terms); presets ``tcfma-v100``, ``promote-h800``.
* ``mode``: the rounding mode of every op: ``rne`` (default), ``rna``, ``rnz`` (round to
  nearest, ties to even, away from zero, toward zero), ``rz``, ``ru``, ``rd`` (directed),
  ``ro`` (round to odd), or ``sr(r,seed=s)`` (stochastic with ``r`` random bits per rounding,
  the draws seeded by ``s``, default 0; the emulated ops, sums and forward run it, docs/semantics.md
  §2 and §12 say where); docs/semantics.md §1 defines each.
* ``max_subtract``: whether softmax subtracts the row maximum first.
* ``weights``: what the parameter arrays are quantised to before they are stored
  (docs/semantics.md §5.1): a format (default: ``storage``), or OCP MX blocks
  ``mx(ELEMENT[,k])`` (``e4m3fn``, ``e5m2``, ``e2m3fn``, ``e3m2fn``, ``e2m1fn`` or ``int8``
  elements, ``k = 32`` by default) along each array's stated axis; then rounded to ``storage``.
* ``operands``: OCP MX blocks ``mx(ELEMENT[,k])`` that both operands of every dot product of
  the projections, the MLP, the scores and the weighted values are quantised to, along the
  contraction axis, immediately before the dot (docs/semantics.md §13.1; naive kernel only), or
  ``scaled(ELEMENT,k[,margin])``: tiles of ``k`` with a float32 scale each (§13.2);
  ``scaled(ELEMENT,tensor[,margin])``: one float32 scale per operand tensor (§13.2.1).
* ``kernel``: how the attention is evaluated: ``naive`` (the softmax of whole score
  rows, then the weighted values) or ``online(b)`` (key blocks of ``b`` with a running
  maximum, sum and output, as FlashAttention-style kernels do; docs/semantics.md §8.8) or
  ``flash2(b)`` (the same loop in FlashAttention-2's recipe: scores in base 2, ``exp2``, the
  probability tile cast to the storage format before it multiplies the values; §8.8.1) or
  ``flash3fp8(b)`` (FlashAttention-3's FP8 recipe of it: Q, K, V and the tile in e4m3fn with one
  scale per head, exponentials offset by 2^8, the blocks last first; §8.8.2).

A policy is a frozen, hashable dataclass (so it is static under ``jax.jit``)
and reads from a jmp-like string:

>>> str(Policy.parse("bf16"))
'storage=bf16,compute=bf16,accumulate=bf16,softmax=bf16,order=pairwise,mode=rne,max_subtract=true'
>>> Policy.parse("compute=bf16,accumulate=fp32,order=blocked(32)").order
Order(kind='blocked', block=32)

Roles not named take the ``compute`` format (``storage`` too); a single
format name (or description) sets every role. A custom format inside a
policy string goes in parentheses: ``compute=(p=5,emax=15),accumulate=fp32``.

(One module of ~510 lines on purpose: the policy grammar, every key's parser and their
refusals are one definition, docs/policies.md, read and changed together.)
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .errors import CollapseSimError, require_text
from .formats import DESCRIPTION_KEYS, Format, FormatError, format_token, parse as parse_format, split_top_level
from .mx import SCALED_MAX_P, MXError, MXFormat, ScaledFormat, mx_element_name, mx_for_element, mx_round, scaled_for_element
from .rounding import Mode, RoundingError, Stochastic, parse_mode, round_to

ORDER_KINDS = ("sequential", "pairwise", "blocked", "kahan", "exact")
#: The accumulator models (docs/semantics.md §3.4): orders with a block size, a bit count and
#: a rounding of their own.
ACCUMULATOR_KINDS = ("tcfma", "promote")
#: The rounding of an accumulator model's own steps (docs/semantics.md §3.4).
ACCUMULATOR_ROUNDINGS = (Mode.RZ, Mode.RNE)
#: Named accumulator models, each a behaviour measured in a cited source (docs/semantics.md §3.4).
ORDER_PRESETS = {
    "tcfma-v100": ("tcfma", 4, 23, Mode.RZ),  # Fasi, Higham, Mikaitis & Pranesh (2021)
    "promote-h800": ("promote", 128, 14, Mode.RZ),  # DeepSeek-V3 technical report, §3.3.2
}
_ORDER_HELP = ("use one of sequential, pairwise, blocked(b), kahan, exact, tcfma(k,t,rz|rne), promote(b,Nc[,rz|rne]), "
               "or a preset: " + ", ".join(ORDER_PRESETS))


class PolicyError(CollapseSimError):
    """A policy string or combination that cannot be used."""


class StochasticRoundingError(PolicyError):
    """A policy in stochastic rounding (``mode=sr(r)``) given to a backend or an order that
    does not run it."""


@dataclasses.dataclass(frozen=True, repr=False)
class Order:
    """How a reduction visits its terms.

    * ``sequential``: left to right, rounding after every add (a naive loop).
    * ``pairwise``: pad to a power of two with zeros, add neighbours
      ``x[2i] + x[2i+1]`` level by level, rounding every add.
    * ``blocked(b)``: consecutive blocks of ``b`` terms, each summed exactly
      and rounded once to the accumulate format (a tensor-core step), the block
      sums added left to right in the accumulate format.
    * ``kahan``: compensated summation, all ops in the accumulate format.
    * ``exact``: the exact sum, rounded once.
    * ``tcfma(k,t,r)``: a tensor core's block FMA (docs/semantics.md §3.4.1): each step
      aligns the running sum and the next ``k`` terms to the largest exponent among them,
      truncates every bit below ``2^(E - t)``, adds exactly and rounds to the accumulate
      format in ``r`` (``rz`` or ``rne``). ``block`` is k, ``bits`` is t.
    * ``promote(b,Nc,r)``: a short accumulator of ``b`` significand bits (rounding ``r``,
      default ``rz``) over chunks of ``Nc`` terms, each chunk's sum added into the
      accumulate format (§3.4.2). ``block`` is Nc, ``bits`` is b.

    Every order ends with one rounding of the accumulated value to ``compute``.
    """

    kind: str
    block: int | None = None
    bits: int | None = None
    rounding: Mode | None = None

    def __post_init__(self) -> None:
        if self.kind not in ORDER_KINDS + ACCUMULATOR_KINDS:
            raise PolicyError(f"unknown reduction order {self.kind!r}; {_ORDER_HELP}")
        if self.kind == "promote" and self.rounding is None:
            object.__setattr__(self, "rounding", Mode.RZ)  # the model's default (§3.4.2)
        if isinstance(self.rounding, str) and not isinstance(self.rounding, Mode) and self.rounding in set(Mode):
            object.__setattr__(self, "rounding", Mode(self.rounding))  # 'rz' given to the constructor
        if self.kind in ACCUMULATOR_KINDS:
            _check_accumulator(self)
            return
        _check_block(self.block, self.kind == "blocked", f"the {self.kind} order", "block size")
        if self.bits is not None or self.rounding is not None:
            raise PolicyError(f"the {self.kind} order takes no bit count or rounding; those are tcfma's and promote's")

    @property
    def exact_products(self) -> bool:
        """Whether a dot product's products enter this order exact (docs/semantics.md §3.2);
        the other orders round each to the accumulate format first."""
        return self.kind in ("exact", "blocked") + ACCUMULATOR_KINDS

    @classmethod
    def parse(cls, text: "str | Order") -> "Order":
        if isinstance(text, Order):
            return text
        t = require_text(text, PolicyError, "a reduction order", "a string such as 'pairwise' or 'blocked(32)'").strip().lower()
        if t in ORDER_PRESETS:
            return cls(*ORDER_PRESETS[t])
        m = re.fullmatch(rf"({'|'.join(ACCUMULATOR_KINDS)})(?:\((.*)\))?", t)
        if m:
            return cls(m.group(1), *_accumulator_args(m.group(1), m.group(2), text))
        return cls(*_kind_and_block(text, ("blocked",), "order", "block size", 32))

    def why_not_native(self) -> str | None:
        """Why the native backend (XLA's own sums) cannot run this order, or None for pairwise, the
        default it stands in for."""
        if self.kind == "pairwise":
            return None
        return f"the native backend sums as XLA does, not in the {self} order; use the emulated or reference backend for it"

    def __str__(self) -> str:
        if self.kind == "tcfma":
            return f"tcfma({self.block},{self.bits},{self.rounding.value})"
        if self.kind == "promote":
            return f"promote({self.bits},{self.block},{self.rounding.value})"
        return f"blocked({self.block})" if self.kind == "blocked" else self.kind

    def chunk_format(self, acc: Format) -> Format:
        """``promote``'s short accumulator format (docs/semantics.md §3.4.2): ``bits``
        significand bits with ``acc``'s exponent range, subnormals, signed zeros and overflow
        rule; its largest finite value is the largest such number not above ``acc``'s."""
        b = self.bits
        top = (acc.top_significand << b) >> acc.p  # floor(top_acc * 2^(b - p_acc))
        return Format(f"p={b}", b, acc.emin, acc.emax, subnormals=acc.subnormals, overflow=acc.overflow,
                      max_significand=None if top == 2**b - 1 else top, signed_zero=acc.signed_zero)

    def __repr__(self) -> str:
        fields = [f"kind={self.kind!r}"] + [f"{f}={getattr(self, f)!r}" for f in ("block", "bits", "rounding")
                                            if getattr(self, f) is not None]
        return f"Order({', '.join(fields)})"


def _accumulator_args(kind: str, inner: "str | None", text: str) -> tuple:
    """``(block, bits, rounding)`` of ``tcfma(k,t,r)`` or ``promote(b,Nc[,r])``, in one
    sentence per bad argument list (the values are checked by :class:`Order`)."""
    form = "tcfma(k,t,rz|rne), e.g. tcfma(4,23,rz)" if kind == "tcfma" else "promote(b,Nc[,rz|rne]), e.g. promote(14,128)"
    args = [a.strip() for a in inner.split(",")] if inner is not None else []
    need = (3,) if kind == "tcfma" else (2, 3)
    if len(args) not in need or not all(re.fullmatch(r"-?\d+", a) for a in args[:2]):
        raise PolicyError(f"order {text!r}: write {form}")
    a, b = int(args[0]), int(args[1])
    rounding = args[2] if len(args) == 3 else None
    if rounding is not None:
        try:
            rounding = Mode.parse(rounding)
        except ValueError:
            rounding = args[2]  # refused by _check_accumulator in one sentence
    return (a, b, rounding) if kind == "tcfma" else (b, a, rounding)


def _check_accumulator(order: Order) -> None:
    """One sentence for a bad parameter of an accumulator model."""
    tc = order.kind == "tcfma"
    limits = (("k", order.block, 1), ("t", order.bits, 1)) if tc else (("b", order.bits, 2), ("Nc", order.block, 1))
    for name, v, lo in limits:
        _check_at_least(v, lo, f"the {order.kind} order needs {name} >= {lo}")
    if order.rounding not in ACCUMULATOR_ROUNDINGS:
        r = order.rounding.value if isinstance(order.rounding, Mode) else order.rounding
        raise PolicyError(f"the {order.kind} order's rounding must be rz or rne, got {r!r}")


KERNEL_KINDS = ("naive", "online", "flash2", "flash3fp8")
BLOCK_KERNELS = ("online", "flash2", "flash3fp8")  # the kernels that run the keys in blocks with a running softmax

#: The format of flash3fp8's matrix-product inputs and probability tile (docs/semantics.md §8.8.2):
#: e4m3fn, saturating at 448 as the hardware conversion ``cvt.rn.satfinite`` does.
FP8_TILE = dataclasses.replace(parse_format("e4m3fn"), name="e4m3fn_satfinite", overflow="saturate",
                               description="e4m3fn saturating at 448 (flash3fp8's inputs and tile)")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """How the attention is evaluated (docs/semantics.md §8.3-§8.4 and §8.8).

    * ``naive``: every score of a query row, its softmax, then the weighted values.
    * ``online(b)``: key blocks of ``b`` columns in order, with a running maximum, a
      running denominator and a running output, each rescaled when the maximum grows,
      and one division at the end.
    * ``flash2(b)``: ``online(b)`` in FlashAttention-2's recipe (Dao, 2023): the scale folds
      in log2(e), every exp is an exp2, and the probability tile is rounded to the storage
      format before it multiplies the values.
    * ``flash3fp8(b)``: ``flash2(b)`` in FlashAttention-3's FP8 recipe (Shah et al., 2024): Q, K
      and V quantised to e4m3fn with one scale per head (their descales folded into the scale
      and the final normalisation), exponentials offset by 2^8, the tile in e4m3fn, the key
      blocks visited last first.

    The properties say what a block kernel's recipe changes in §8.8's loop.
    """

    kind: str = "naive"
    block: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KERNEL_KINDS:
            raise PolicyError(f"unknown attention kernel {self.kind!r}; use naive, online(b), flash2(b) or flash3fp8(b), e.g. online(64)")
        _check_block(self.block, self.kind in BLOCK_KERNELS, f"the {self.kind} kernel", "key block size")

    @classmethod
    def parse(cls, text: "str | Kernel") -> "Kernel":
        if isinstance(text, Kernel):
            return text
        require_text(text, PolicyError, "an attention kernel", "a string such as 'naive', 'online(64)', 'flash2(64)' or 'flash3fp8(64)'")
        return cls(*_kind_and_block(text, BLOCK_KERNELS, "kernel", "key block size", 64))

    def why_not_adaptive(self) -> str | None:
        """Why adaptive temperature (docs/semantics.md §8.7) cannot run under this kernel, or None."""
        if self.kind == "naive":
            return None
        return (f"adaptive temperature needs each row's weights at once, which the {self.kind} kernel never holds "
                "(docs/semantics.md §8.7); use kernel=naive")

    def __str__(self) -> str:
        return f"{self.kind}({self.block})" if self.kind in BLOCK_KERNELS else self.kind

    @property
    def base2(self) -> bool:
        """Scores in base 2 (log2 e folded into the scale and the ALiBi biases) and exp2 for exp."""
        return self.kind in ("flash2", "flash3fp8")

    @property
    def fp8(self) -> "Format | None":
        """The format Q, K, V (scaled per head) and the probability tile are cast to, if any."""
        return FP8_TILE if self.kind == "flash3fp8" else None

    @property
    def max_offset(self) -> int:
        """What the exponentials' argument gains: ``e = exp2(s - (m - max_offset))`` (§8.8.2)."""
        return 8 if self.kind == "flash3fp8" else 0

    @property
    def reverse(self) -> bool:
        """Whether the key blocks are visited from the last to the first."""
        return self.kind == "flash3fp8"


def _kind_and_block(text: str, blocked: tuple[str, ...], what: str, noun: str, example: int) -> tuple:
    """``("blocked", 32)`` from ``"blocked(32)"`` (or ``"blocked:32"``), ``("pairwise",)`` from
    ``"pairwise"``; a kind of ``blocked`` without its size is refused in one sentence."""
    t = text.strip().lower()
    m = re.fullmatch(rf"({'|'.join(blocked)})(?:\((\d+)\)|:(\d+))", t)
    if m:
        return m.group(1), int(m.group(2) or m.group(3))
    if t in blocked:
        raise PolicyError(f"the {t} {what} needs a {noun}: {t}(b), e.g. {t}({example})")
    return (t,)


def _check_block(block, needed: bool, what: str, noun: str) -> None:
    """One sentence for a block size that ``what`` needs (an int >= 1) or must not have."""
    if needed:
        _check_at_least(block, 1, f"{what} needs a {noun} >= 1")
    elif block is not None:
        raise PolicyError(f"{what} takes no {noun}")


def _check_at_least(v, lo: int, need: str) -> None:
    """``need`` (a sentence without its end), then what was given, unless ``v`` is an int >= ``lo``."""
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise PolicyError(f"{need}, got {v!r}")


_ROLES = ("storage", "compute", "accumulate", "softmax")


@dataclasses.dataclass(frozen=True)
class Policy:
    storage: Format
    compute: Format
    accumulate: Format
    softmax: Format
    order: Order = Order("pairwise")
    mode: "Mode | Stochastic" = Mode.RNE
    max_subtract: bool = True
    kernel: Kernel = Kernel()
    #: The weights role (docs/semantics.md §5.1): None (the storage format), another format,
    #: or an MX format (:func:`weights_role` reads one from its policy-string spelling).
    weights: "Format | MXFormat | None" = None
    #: The operands role (docs/semantics.md §13.1, §13.2): None, or the MX or scaled format both
    #: operands of the model's dot products are quantised to along the contraction axis
    #: (:func:`operands_role`).
    operands: "MXFormat | ScaledFormat | None" = None

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, (Format, MXFormat)):
            raise PolicyError(f"the weights role is a format or an MX format such as mx(e4m3fn,32), got {self.weights!r}")
        if self.operands is not None and not isinstance(self.operands, (MXFormat, ScaledFormat)):
            raise PolicyError(f"the operands role is an MX or scaled format such as mx(e4m3fn,32) or scaled(e4m3fn,128), "
                              f"got {self.operands!r}")
        long = [f for f in (self.compute, self.storage) if f.p > SCALED_MAX_P]
        if isinstance(self.operands, ScaledFormat) and long:
            raise PolicyError(f"operands={weights_token(self.operands)} divides compute and stored values by float32 "
                              f"scales in float64, one correct rounding for formats of at most {SCALED_MAX_P} bits "
                              f"(docs/semantics.md §13.2), not {long[0].name}'s {long[0].p}; use such formats")
        if self.operands is not None and self.kernel.kind != "naive":
            raise PolicyError(f"operands={weights_token(self.operands)} is defined under the naive kernel only (the "
                              f"{self.kernel} kernel's probability tiles have no "
                              f"{'scaled operands' if isinstance(self.operands, ScaledFormat) else 'MX blocking'} along "
                              f"the keys here, docs/semantics.md "
                              f"{'§13.2' if isinstance(self.operands, ScaledFormat) else '§13.1'}); use kernel=naive")
        if self.weights == self.storage:
            object.__setattr__(self, "weights", None)  # the default, written as such (str, equality, hash)
        if self.mode is Mode.SR:
            raise PolicyError("a policy's stochastic rounding names its random bits and seed: mode=sr(r) or "
                              "mode=sr(r,seed=s), e.g. sr(8,seed=1)")
        if self.kernel.kind in BLOCK_KERNELS and not self.max_subtract:
            raise PolicyError(f"the {self.kernel.kind} kernel rescales by its running maximum, so it needs max_subtract=true")
        for role in _ROLES + (("weights",) if isinstance(self.weights, Format) else ()):
            why = getattr(self, role).why_not_arithmetic()
            if why is not None:
                raise PolicyError(f"{why}, so it cannot be a policy's {role} format: the model's values need both "
                                  "signs and zero; use it with round_to")

    @classmethod
    def uniform(cls, fmt: "Format | str", order: "Order | str" = "pairwise", **kw) -> "Policy":
        f = parse_format(fmt)
        return cls(f, f, f, f, Order.parse(order), **kw)

    @classmethod
    def parse(cls, text: "str | Policy") -> "Policy":
        if isinstance(text, Policy):
            return text
        require_text(text, PolicyError, "a policy",
                     "a format such as 'bf16', roles such as 'compute=bf16,accumulate=fp32', or a Policy")
        parts = split_top_level(text, "policy", PolicyError)
        first_key = parts[0].split("=", 1)[0].strip().lower()
        if _is_mx(parts[0]):
            raise PolicyError(f"policy {text!r}: an MX format is a weights role only (or an operands role, the dot "
                              "products' inputs); write e.g. compute=bf16,weights=mx(e4m3fn,32)")
        if "=" not in text or first_key in DESCRIPTION_KEYS or text.strip().startswith("("):
            try:  # one format for every role: a name, a description, or a description in parentheses
                return cls.uniform(text)
            except FormatError as e:
                raise PolicyError(str(e)) from None
        fields: dict[str, str] = {}
        for part in parts:
            if "=" not in part:
                raise PolicyError(f"policy {text!r}: expected role=value, got {part!r}; a format among other keys is "
                                  f"a role, e.g. compute={part.strip()} (alone, {part.strip()!r} is a policy by itself)")
            k, v = (s.strip() for s in part.split("=", 1))
            k = k.lower()
            if k in DESCRIPTION_KEYS:
                raise PolicyError(f"policy {text!r}: {k!r} is a key of a custom format, which goes in parentheses "
                                  "in a policy: compute=(p=5,emax=15)")
            if k not in (*_ROLES, "order", "mode", "max_subtract", "kernel", "weights", "operands"):
                raise PolicyError(f"policy {text!r}: unknown key {k!r} (keys: {', '.join(_ROLES)}, order, mode, "
                                  "max_subtract, kernel, weights, operands)")
            if k in _ROLES and _is_mx(v):
                raise PolicyError(f"policy {text!r}: {k}={v} is not possible, an MX format is a weights role only "
                                  f"(or an operands role, the dot products' inputs); write weights={v} or operands={v}")
            if k in fields:
                raise PolicyError(f"policy {text!r} gives {k} twice ({fields[k]} and {v}); keep one")
            fields[k] = v
        if "compute" not in fields:
            raise PolicyError(f"policy {text!r} needs compute=FORMAT")
        try:
            compute = parse_format(fields["compute"])
            fmts = {r: parse_format(fields[r]) if r in fields else compute for r in _ROLES}
        except FormatError as e:
            raise PolicyError(f"policy {text!r}: {e}") from None
        ms = fields.get("max_subtract", "true").lower()
        if ms not in ("true", "false"):
            raise PolicyError(f"policy {text!r}: max_subtract must be true or false, got {fields['max_subtract']!r}")
        try:
            mode = parse_mode(fields.get("mode", "rne"))
        except RoundingError as e:
            raise PolicyError(f"policy {text!r}: {e}") from None
        weights = weights_role(fields["weights"], text) if "weights" in fields else None
        operands = operands_role(fields["operands"], text) if "operands" in fields else None
        return cls(order=Order.parse(fields.get("order", "pairwise")), mode=mode, max_subtract=ms == "true",
                   kernel=Kernel.parse(fields.get("kernel", "naive")), weights=weights, operands=operands, **fmts)

    def formats(self) -> tuple[Format, ...]:
        return (self.storage, self.compute, self.accumulate, self.softmax)

    def __str__(self) -> str:
        roles = ",".join(f"{r}={format_token(getattr(self, r))}" for r in _ROLES)
        kernel = "" if self.kernel.kind == "naive" else f",kernel={self.kernel}"  # naive: the names runs are stored under
        weights = "" if self.weights is None else f",weights={weights_token(self.weights)}"  # likewise the default
        operands = "" if self.operands is None else f",operands={weights_token(self.operands)}"
        return (f"{roles},order={self.order},mode={self.mode.value},max_subtract={str(self.max_subtract).lower()}"
                f"{kernel}{weights}{operands}")

    def weights_values(self, w, axis: int) -> np.ndarray:
        """What the weights role makes of the float64 parameter array ``w`` (docs/semantics.md
        §5.1), before the forward rounds it to storage: ``w`` itself by default, ``∘_W(w)`` in the
        policy's mode for a format ``W``, or its MX blocks along ``axis`` dequantised (exact in
        float64). An MX block whose scale would exceed E8M0's 2^127 is refused."""
        w = np.asarray(w, dtype=np.float64)
        if self.weights is None:
            return w
        if isinstance(self.weights, Format):
            if isinstance(self.mode, Stochastic):
                raise PolicyError(f"weights={format_token(self.weights)} rounds the weights in the policy's mode, and "
                                  f"{self.mode} has no draws for them; give the weights role with a deterministic mode")
            return np.asarray(round_to(w, self.weights, self.mode), dtype=np.float64)
        out = mx_round(w, self.weights, axis=axis)
        if np.isnan(out).any() and not np.isnan(w).any():
            raise PolicyError(f"a weight of magnitude {np.max(np.abs(w)):.3g} is beyond what weights="
                              f"{weights_token(self.weights)} can scale (E8M0 scales stop at 2^127); scale the weights down")
        return out


def _is_mx(value: str) -> bool:
    return re.match(r"\s*mx\s*\(", value, flags=re.IGNORECASE) is not None


def weights_role(value: str, text: str = "") -> "Format | MXFormat":
    """The weights role ``value`` of policy ``text``: ``mx(ELEMENT[,k])`` or a format, refused
    in one sentence."""
    where = f"policy {text!r}: " if text else ""
    if not _is_mx(value):
        try:
            return parse_format(value)
        except FormatError as e:
            raise PolicyError(f"{where}weights: {e}") from None
    return _mx_spec("weights", value, where)


def _mx_spec(role: str, value: str, where: str) -> MXFormat:
    """The MX format ``mx(ELEMENT[,k])`` that ``role=value`` names, refused in one sentence."""
    m = re.fullmatch(r"\s*mx\s*\(([^,()]*)(?:,\s*(-?\d+)\s*)?\)\s*", value, flags=re.IGNORECASE)
    if m is None:
        raise PolicyError(f"{where}{role}={value} is not an MX spec; write mx(ELEMENT) or mx(ELEMENT,k), "
                          "e.g. mx(e4m3fn,32)")
    try:
        return mx_for_element(m.group(1), 32 if m.group(2) is None else int(m.group(2)))
    except MXError as e:
        raise PolicyError(f"{where}{role}={value}: {e}") from None


def operands_role(value: str, text: str = "") -> "MXFormat | ScaledFormat":
    """The operands role ``value`` of policy ``text``: ``mx(ELEMENT[,k])`` (docs/semantics.md
    §13.1), ``scaled(ELEMENT,k[,margin])`` (§13.2) or ``scaled(ELEMENT,tensor[,margin])``
    (§13.2.1), refused in one sentence. Plain formats are not operand quantisations."""
    where = f"policy {text!r}: " if text else ""
    if re.match(r"\s*scaled\s*\(", value, flags=re.IGNORECASE):
        return _scaled_spec(value, where)
    if not _is_mx(value):
        raise PolicyError(f"{where}operands={value} is not an operand quantisation; the operands role takes OCP MX "
                          "blocks, mx(ELEMENT[,k]), or float32-scaled tiles or tensors, scaled(ELEMENT,k|tensor[,margin]), e.g. "
                          "operands=mx(e4m3fn,32)")
    return _mx_spec("operands", value, where)


def _scaled_spec(value: str, where: str) -> ScaledFormat:
    """The scaled format ``scaled(ELEMENT,k[,margin])`` (§13.2) or ``scaled(ELEMENT,tensor[,margin])``
    (§13.2.1) that ``operands=value`` names."""
    m = re.fullmatch(r"\s*scaled\s*\(([^,()]*),\s*([^,()]*?)\s*(?:,\s*([^,()]*?)\s*)?\)\s*", value,
                     flags=re.IGNORECASE)
    if m is None:
        raise PolicyError(f"{where}operands={value} is not a scaled spec; write scaled(ELEMENT,k) or "
                          "scaled(ELEMENT,k,margin) (k a tile length or tensor), e.g. scaled(e4m3fn,128)")
    element, k, margin = m.group(1), m.group(2), m.group(3)
    tensor = k.lower() == "tensor"  # one scale per tensor (§13.2.1)
    if not tensor and re.fullmatch(r"-?\d+", k) is None:
        raise PolicyError(f"{where}operands={value}: the tile length k must be an integer, or tensor for one scale "
                          f"per tensor, got {k!r}")
    if margin is not None and re.fullmatch(r"-?\d+", margin) is None:
        raise PolicyError(f"{where}operands={value}: the margin must be an integer, got {margin!r}")
    try:
        return scaled_for_element(element, None if tensor else int(k), 0 if margin is None else int(margin))
    except MXError as e:
        raise PolicyError(f"{where}operands={value}: {e}") from None


def weights_token(w: "Format | MXFormat | ScaledFormat") -> str:
    """How a policy string writes the weights or operands role ``w``: ``mx(ELEMENT,k)``,
    ``scaled(ELEMENT,k|tensor[,margin])`` or the format's token."""
    if isinstance(w, ScaledFormat):
        return w.token()
    return f"mx({mx_element_name(w)},{w.block})" if isinstance(w, MXFormat) else format_token(w)
