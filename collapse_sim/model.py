"""The decoder of PAPER.md §1, written once against a backend.

(One module of ~850 lines on purpose: config, weights and forward pass are one
specification, read top to bottom beside docs/semantics.md.)

    x^(0)_i   = E[t_i] (+ P[i] for absolute encodings)
    h_i       = norm1(x_i)
    z_i       = W_o · concat_h Σ_{j≤i} α^h_ij (W_v h_j)^h + x_i
    x'_i      = ψ(norm2(z_i)) + z_i,      ψ(u) = W_2 relu(W_1 u + b_1) + b_2
    y_i       = norm3(x^(L)_i)
    α^h_ij    = softmax_j( (W_q h_i)^h · (W_k h_j)^h / √d_h  [+ ALiBi] )   (RoPE rotates q, k)

``ape="scores"`` adds absolute encodings to the inputs of W_q and W_k only (at
every layer), the setting of Thm 4.2 where positions enter the score function;
``ape="residual"`` (default) adds them to the embeddings, as GPT-style models do.
With ``value_proj=False`` and ``out_proj=False`` the value is ``norm1(x_j)`` itself,
as in the paper. ``norm="none"`` drops the norms (the paper's Prop. B.9 setting),
``d_ff=0`` drops the MLP.

Because attention is causal, one pass over a stream of length N gives the
last-token representation of every prefix (row i of ``y`` is the output for
the prefix ``t_1..t_i``). A *probe* token after every prefix is handled in the
same pass, using the stream's keys and values (``forward(..., probe=...)``).

``kind="gaussian"`` is the model of the paper's Fig. 8 and Fig. 10 captions: no
embeddings and no weight matrices; token id t stands for its own q, k, v, drawn
i.i.d. N(0, σ²) per entry (σ² = ``qkv_var``, default 1/d) from (seed, t) alone
(:func:`gaussian_draws`). A stream of fresh ids 0, 1, 2, ... is a sequence of
independent Gaussian positions; repeating an id repeats its q, k and v. Positions:
RoPE rotates q and k, the sinusoidal table is added to the keys, to queries and
keys, or to the values (``sin_at``), ALiBi adds ``-m·(i - j)`` (``alibi_slope``,
``alibi_at``). The output is one head of the decoder's attention (the same
:func:`_head` and backend primitive), optionally through an output norm
(``norm``; ``gaussian_config`` defaults to none): ``y_i = norm3(Σ_{j≤i} α_ij v_j)``.
One layer only: a second layer would need q, k, v computed from the first layer's
output, i.e. weight matrices, which is the decoder.

Weights live as float64 numpy arrays (`Params`); a backend rounds them to its
storage format. Save/load: ``save(path)`` writes ``path.json`` (config) and
``path.npz`` with arrays named ``embed``, ``pos`` (learned PE), and per layer
``l{ℓ}.{wq,wk,wv,wo,n1_g,n1_b,n2_g,n2_b,w1,b1,w2,b2}``, plus ``n3_g``, ``n3_b``.
Shapes: ``embed (vocab, d)``, ``wq/wk/wv/wo (d, d)`` acting as ``x @ W``,
``w1 (d, d_ff)``, ``w2 (d_ff, d)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import positional
from .backends.inputs import AttentionInputs
from .errors import CollapseSimError
from .positional import SINUSOIDAL


class ConfigError(CollapseSimError):
    """A model configuration or weight file that cannot be used."""


KINDS = ("decoder", "gaussian")
SIN_AT = ("keys", "qk", "values")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d: int = 64
    n_layers: int = 1
    n_heads: int = 1
    d_ff: int = 0
    vocab: int = 16
    pe: str = "sinusoidal"
    norm: str = "layernorm"  # layernorm | rmsnorm | none
    window: int | None = None
    ape: str = "residual"  # absolute PE: added to the residual stream, or only to the q/k inputs ("scores")
    value_proj: bool = True
    out_proj: bool = False
    max_len: int = 16384  # learned PE table length
    norm_eps: float = 1e-5
    # initialisation
    seed: int = 0
    embed_std: float = 1.0
    qk_std: float | None = None  # default 1/sqrt(d): q, k entries of variance ~1 ... see init
    v_std: float | None = None
    ff_std: float | None = None
    # which model: the decoder above, or the captions' Gaussian model (see the module docstring)
    kind: str = "decoder"  # decoder | gaussian
    qkv_var: float | None = None  # gaussian: variance σ² of every q, k, v entry; default 1/d
    sin_at: str = "keys"  # gaussian with pe="sinusoidal": the table is added to keys | qk (queries and keys) | values
    alibi_slope: float | None = None  # ALiBi: one slope for every head; default Press et al.'s 2^(-8h/H)
    alibi_at: str = "after"  # ALiBi bias added after the 1/√d_h scale, or "before" it (effective slope ÷ √d_h)
    # remedies (docs/semantics.md §8.7)
    rope_fraction: float = 1.0  # p-RoPE: the fraction of RoPE's frequency pairs that rotate (the highest ones)
    ssmax: float | None = None  # Scalable-Softmax: each query times s·ln(number of keys it sees)
    sink: bool = False  # a sink token at position 0 before every sequence
    adaptive_temperature: bool = False  # each row's scores times β(entropy of its softmax), softmax again

    def __post_init__(self) -> None:
        _check_field_types(self)
        for name, lo in _LOWER_BOUNDS.items():
            v = getattr(self, name)
            if v is not None and v < lo:
                raise ConfigError(f"ModelConfig {name} must be >= {lo}, got {v!r}")
        if self.pe not in positional.KINDS:
            raise ConfigError(f"unknown positional encoding {self.pe!r}; use one of {', '.join(positional.KINDS)}")
        if self.norm not in ("layernorm", "rmsnorm", "none"):
            raise ConfigError(f"unknown norm {self.norm!r}; use layernorm, rmsnorm or none")
        if self.d % self.n_heads:
            raise ConfigError(f"d={self.d} is not divisible by n_heads={self.n_heads}")
        if self.pe == "rope" and (self.d // self.n_heads) % 2:
            raise ConfigError("RoPE needs an even head dimension")
        if self.ape not in ("residual", "scores"):
            raise ConfigError(f"ape must be 'residual' or 'scores', got {self.ape!r}")
        if not self.value_proj and self.out_proj is False and self.n_heads != 1:
            raise ConfigError("without value/output projections the model must have one head")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown model kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.sin_at not in SIN_AT:
            raise ConfigError(f"sin_at must be one of {', '.join(SIN_AT)}, got {self.sin_at!r}")
        if self.alibi_at not in ("after", "before"):
            raise ConfigError(f"alibi_at must be 'after' or 'before' (the 1/sqrt(d_h) scale), got {self.alibi_at!r}")
        if self.qkv_var is not None and not (self.qkv_var > 0 and np.isfinite(self.qkv_var)):
            raise ConfigError(f"qkv_var must be a positive finite variance, got {self.qkv_var}")
        if self.alibi_slope is not None and not np.isfinite(self.alibi_slope):
            raise ConfigError(f"alibi_slope must be finite, got {self.alibi_slope}")
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ConfigError(f"rope_fraction must lie in [0, 1] (the share of RoPE's frequencies that rotate), got {self.rope_fraction}")
        if self.rope_fraction != 1.0 and self.pe != "rope":
            raise ConfigError(f"rope_fraction applies to pe='rope' (p-RoPE), got pe={self.pe!r}")
        if self.ssmax is not None and not self.ssmax > 0:
            raise ConfigError(f"ssmax (Scalable-Softmax's s) must be > 0, got {self.ssmax}")
        if self.kind == "gaussian":
            _check_gaussian(self)

    @property
    def dh(self) -> int:
        return self.d // self.n_heads

    def computation(self) -> "ModelConfig":
        """This config with the initialisation-only fields at their defaults: what the
        forward pass depends on (the key of its compiled code)."""
        init_only = ("seed", "embed_std", "qk_std", "v_std", "ff_std", "qkv_var")
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in init_only}
        return dataclasses.replace(self, **defaults)


#: The smallest value of each numeric ModelConfig field (None, where allowed, is always fine).
_LOWER_BOUNDS = {"d": 1, "n_layers": 1, "n_heads": 1, "d_ff": 0, "vocab": 1, "window": 1, "max_len": 1, "seed": 0,
                 "norm_eps": 0.0, "embed_std": 0.0, "qk_std": 0.0, "v_std": 0.0, "ff_std": 0.0}


def _check_field_types(c: "ModelConfig") -> None:
    """Every field holds a value of its annotated type: ints are integers (not bools, not
    strings), floats real and finite, bools bools, strings strings. Integer and float
    values are stored as plain ``int`` and ``float`` (a numpy scalar becomes one)."""
    import math
    import numbers

    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        kinds = [t.strip() for t in str(f.type).split("|")]
        if v is None and "None" in kinds:
            continue
        kind = kinds[0]
        if kind == "int" and isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)):
            object.__setattr__(c, f.name, int(v))
        elif (kind == "float" and isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
              and math.isfinite(v)):
            object.__setattr__(c, f.name, float(v))
        elif kind == "bool" and isinstance(v, (bool, np.bool_)):
            object.__setattr__(c, f.name, bool(v))
        elif kind == "str" and isinstance(v, str):
            pass
        elif kind in ("int", "float", "bool", "str"):
            what = {"int": "an integer", "float": "a finite real number", "bool": "True or False", "str": "a string"}[kind]
            raise ConfigError(f"ModelConfig {f.name} must be {what}{' or None' if 'None' in kinds else ''}, "
                              f"got {v!r} ({type(v).__name__})")


@dataclasses.dataclass
class Params:
    config: ModelConfig
    arrays: dict[str, np.ndarray]

    def __getitem__(self, k: str) -> np.ndarray:
        return self.arrays[k]

    def save(self, path: "str | Path") -> None:
        """Write ``path.json`` (config) and ``path.npz`` (arrays); the weights are checked first,
        and so is the folder, so a refused save writes nothing."""
        from .results import check_output_file

        path = Path(path)
        self.validate()
        for target in (path.with_suffix(".json"), path.with_suffix(".npz")):
            check_output_file(target, what="weights file")
        path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(self.config), indent=1))
        np.savez(path.with_suffix(".npz"), **self.arrays)

    @classmethod
    def load(cls, path: "str | Path") -> "Params":
        """Read what :meth:`save` wrote. Arrays are read with ``allow_pickle=False`` (never unpickled);
        a missing or corrupt file, a missing or extra array, a wrong shape, a non-float dtype or
        a non-finite weight raises ConfigError."""
        import zipfile

        path = Path(path)
        jpath, npath = path.with_suffix(".json"), path.with_suffix(".npz")
        try:
            raw = json.loads(jpath.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read model config {jpath}: {e.strerror}; give the PATH of PATH.json and PATH.npz "
                              "as written by Params.save") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"model config {jpath} is not valid JSON ({e}); write it with Params.save") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"model config {jpath} must hold a JSON object of ModelConfig fields, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        if set(raw) - known:
            raise ConfigError(f"model config {jpath} has unknown field(s) {', '.join(sorted(set(raw) - known))}; "
                              f"use only ModelConfig fields")
        cfg = ModelConfig(**raw)
        try:
            if npath.is_file() and not zipfile.is_zipfile(npath):
                raise ConfigError(f"weights file {npath} is not an .npz archive (corrupt, or another format); "
                                  "write it with Params.save")
            with np.load(npath, allow_pickle=False) as z:  # a zip archive: an NpzFile
                arrays = {}
                for k in z.files:
                    a = z[k]
                    if a.dtype.kind != "f":
                        raise ConfigError(f"array {k!r} in {npath} has dtype {a.dtype}, expected a floating-point dtype; "
                                          "convert it with .astype(np.float64)")
                    arrays[k] = np.asarray(a, dtype=np.float64)
        except ConfigError:
            raise
        except OSError as e:
            raise ConfigError(f"cannot read weights {npath}: {e.strerror or e}; give the PATH of PATH.json and PATH.npz "
                              "as written by Params.save") from None
        except (ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ConfigError(f"weights file {npath} is not a readable .npz archive ({str(e).splitlines()[0][:80]}); "
                              "write it with Params.save") from None
        extra = set(arrays) - set(weight_shapes(cfg))
        if extra:
            raise ConfigError(f"weights file {npath} has array(s) {', '.join(sorted(extra))} that the config {jpath} "
                              "does not use; the two files must come from the same Params.save")
        p = cls(cfg, arrays)
        p.validate()
        return p

    def validate(self) -> None:
        c = self.config
        expected = weight_shapes(c)
        for k, shape in expected.items():
            if k not in self.arrays:
                raise ConfigError(f"weights lack array {k!r} (shape {shape})")
            a = np.asarray(self.arrays[k])
            if a.dtype.kind != "f":
                raise ConfigError(f"array {k!r} has dtype {a.dtype}, expected a floating-point dtype; convert it with .astype(np.float64)")
            if a.shape != shape:
                raise ConfigError(f"array {k!r} has shape {a.shape}, expected {shape} from the config")
            if not np.all(np.isfinite(a)):
                raise ConfigError(f"array {k!r} has non-finite weights (inf or NaN); replace them with finite values")


# --------------------------------------------------------------------------
# The weights as the forward reads them: a typed pytree (the file format is Params.arrays').

Array = Any  # a numpy array (float64 on the host), a JAX array, or a backend's array type


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, each named in files ``l{ℓ}.<field>``; None where the config
    has none. Matrices act as ``x @ W``.

    * ``wq``, ``wk``: (d, d), the queries' and keys' projections;
    * ``wv``: (d, d) with ``value_proj``, ``wo``: (d, d) with ``out_proj``;
    * ``n1_g``, ``n2_g``: (d,) the gains of the attention's and the MLP's input norms (not with
      ``norm="none"``), ``n1_b``, ``n2_b``: (d,) their biases (layernorm only);
    * ``w1``: (d, d_ff), ``b1``: (d_ff,), ``w2``: (d_ff, d), ``b2``: (d,): the MLP (``d_ff > 0``)."""

    wq: Array  # attention
    wk: Array
    wv: Array | None = None
    wo: Array | None = None
    n1_g: Array | None = None; n1_b: Array | None = None  # noqa: E702  (a norm's gain and bias)
    n2_g: Array | None = None; n2_b: Array | None = None  # noqa: E702
    w1: Array | None = None; b1: Array | None = None  # noqa: E702  (the MLP's two layers)
    w2: Array | None = None; b2: Array | None = None  # noqa: E702


@dataclasses.dataclass(frozen=True)
class Weights:
    """Every array one forward reads (:func:`forward_arrays`), by role; None where the model
    has none.

    * ``layers``: one :class:`LayerWeights` per layer (the decoder; empty for the Gaussian model);
    * ``embed``: (n_tokens, d) the token table (``vocab`` rows; with a sink, the sink's row first);
    * ``pos``: (max_len, d) the learned position table (``pe="learned"``);
    * ``sinusoidal``: (need, d) the sinusoidal table for the positions a forward needs;
    * ``n3_g``, ``n3_b``: (d,) the output norm's gain and (layernorm) bias;
    * ``gauss_q``, ``gauss_k``, ``gauss_v``: (n_ids, d) the Gaussian model's draws per id
      (with a sink, the sink's row first)."""

    layers: tuple[LayerWeights, ...] = ()
    embed: Array | None = None
    pos: Array | None = None; sinusoidal: Array | None = None  # noqa: E702  (the position tables)
    n3_g: Array | None = None; n3_b: Array | None = None  # noqa: E702
    gauss_q: Array | None = None; gauss_k: Array | None = None; gauss_v: Array | None = None  # noqa: E702

    @classmethod
    def from_arrays(cls, c: ModelConfig, arrays: dict) -> "Weights":
        """The arrays of :func:`forward_arrays` (file names: ``embed``, ``l0.wq``, ...) by role;
        an array no role takes raises ConfigError."""
        left = dict(arrays)
        take = lambda name: left.pop(name, None)  # noqa: E731
        layers = tuple(LayerWeights(**{f.name: take(f"l{i}.{f.name}") for f in dataclasses.fields(LayerWeights)})
                       for i in range(c.n_layers if c.kind == "decoder" else 0))
        top = {f.name: take(_FILE_NAMES.get(f.name, f.name)) for f in dataclasses.fields(cls) if f.name != "layers"}
        if left:
            raise ConfigError(f"array(s) {', '.join(sorted(left))} are no weights of this model; "
                              "forward_arrays names every array a forward reads")
        return cls(layers, **top)


_FILE_NAMES = {"sinusoidal": SINUSOIDAL, "gauss_q": "gauss.q", "gauss_k": "gauss.k", "gauss_v": "gauss.v"}
for _cls in (LayerWeights, Weights):
    jax.tree_util.register_dataclass(_cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[])


def weight_shapes(c: ModelConfig) -> dict[str, tuple]:
    """The name and shape of every weight array of a model of config ``c``."""
    if c.kind == "gaussian":  # no weights: only the optional output norm's gain and bias
        return {} if c.norm == "none" else {"n3_g": (c.d,), **({"n3_b": (c.d,)} if c.norm == "layernorm" else {})}
    s: dict[str, tuple] = {"embed": (c.vocab, c.d)}
    if c.pe == "learned":
        s["pos"] = (c.max_len, c.d)
    for layer in range(c.n_layers):
        p = f"l{layer}."
        s[p + "wq"] = s[p + "wk"] = (c.d, c.d)
        if c.value_proj:
            s[p + "wv"] = (c.d, c.d)
        if c.out_proj:
            s[p + "wo"] = (c.d, c.d)
        if c.norm != "none":
            s[p + "n1_g"] = s[p + "n2_g"] = (c.d,)
            if c.norm == "layernorm":
                s[p + "n1_b"] = s[p + "n2_b"] = (c.d,)
        if c.d_ff:
            s[p + "w1"], s[p + "b1"], s[p + "w2"], s[p + "b2"] = (c.d, c.d_ff), (c.d_ff,), (c.d_ff, c.d), (c.d,)
    if c.norm != "none":
        s["n3_g"] = (c.d,)
        if c.norm == "layernorm":
            s["n3_b"] = (c.d,)
    if c.sink:  # last, so that a sink leaves every other weight's draw as it was
        s["sink"] = (c.d,)
    return s


def gaussian_config(d: int = 64, pe: str = "none", *, seed: int = 0, norm: str = "none", **kw) -> ModelConfig:
    """The captions' Gaussian model (``kind="gaussian"``); its primary reading has no output norm."""
    return ModelConfig(kind="gaussian", d=d, pe=pe, seed=seed, norm=norm, **kw)


def init_params(config: ModelConfig) -> Params:
    """Seeded Gaussian initialisation.

    Embeddings ~ N(0, embed_std²). W_q, W_k ~ N(0, qk_std²) with default
    ``1/√d`` so that (for unit-variance inputs) queries and keys have unit
    variance; W_v likewise; norm gains 1, biases 0; MLP weights ``1/√fan_in``.
    """
    c = config
    rng = np.random.default_rng(c.seed)
    qk = c.qk_std if c.qk_std is not None else 1 / np.sqrt(c.d)
    vs = c.v_std if c.v_std is not None else 1 / np.sqrt(c.d)
    arrays: dict[str, np.ndarray] = {}
    for k, shape in weight_shapes(c).items():
        name = k.split(".")[-1]
        if k in ("embed", "sink"):
            a = rng.standard_normal(shape) * c.embed_std
        elif k == "pos":
            a = rng.standard_normal(shape) * c.embed_std
        elif name in ("wq", "wk"):
            a = rng.standard_normal(shape) * qk
        elif name in ("wv", "wo"):
            a = rng.standard_normal(shape) * vs
        elif name.endswith("_g"):
            a = np.ones(shape)
        elif name.endswith("_b") or name in ("b1", "b2"):
            a = np.zeros(shape)
        else:  # w1, w2
            std = c.ff_std if c.ff_std is not None else 1 / np.sqrt(shape[0])
            a = rng.standard_normal(shape) * std
        arrays[k] = a
    return Params(c, arrays)


# --------------------------------------------------------------------------
# The forward pass, against a backend (see collapse_sim.backends).


def forward(params: Params, tokens, backend, probe=None):
    """Run the decoder.

    Args:
      params: weights.
      tokens: int array (N,): the stream.
      backend: a backend object (native / emulated / reference).
      probe: optional int array (N,): ``probe[n]`` is appended after the prefix
        ``tokens[:n+1]`` (at position n+1).

    Returns ``y`` (N, d) and, with a probe, ``y_probe`` (N, d), in the
    backend's array type; ``y[n]`` is the last-token output for the prefix of
    length n+1, ``y_probe[n]`` that for ``tokens[:n+1] + [probe[n]]``.
    """
    c = params.config
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ConfigError("tokens must be a non-empty 1-d array")
    bound = token_bound(c)
    if tokens.min() < 0 or (bound is not None and tokens.max() >= bound):
        raise ConfigError(f"token ids must lie in [0, {bound})" if bound else "token ids must be >= 0")
    N = tokens.size
    need = N + (1 if probe is not None else 0) + int(c.sink)  # positions: the sink's, the stream's, a probe's
    if c.pe == "learned" and need > c.max_len:
        raise ConfigError(f"learned positional table has {c.max_len} rows, the input needs {need}")
    if probe is not None:
        probe = np.asarray(probe)
        if probe.shape != tokens.shape:
            raise ConfigError("probe must have one token per prefix (same length as tokens)")
        if probe.min() < 0 or (bound is not None and probe.max() >= bound):
            raise ConfigError(f"probe token ids must lie in [0, {bound})" if bound else "probe token ids must be >= 0")
    check_backend(c, backend)
    n_ids = int(max(tokens.max(), -1 if probe is None else probe.max())) + 1
    fn = _gaussian_impl if c.kind == "gaussian" else _forward_scanned
    arrays = weights_role(forward_arrays(params, need, n_ids), backend)
    if not c.sink:
        return backend.run(fn, c, arrays, tokens, probe)
    out = backend.run(fn, c, arrays, *_with_sink(tokens, probe))
    return out[1:] if probe is None else (out[0][1:], out[1][1:])


def _with_sink(tokens: np.ndarray, probe: np.ndarray | None):
    """The stream and probes with the sink in front (docs/semantics.md §8.7): the sink is row 0
    of the token table ``forward_arrays`` builds, so every id moves up by one; the sink-only
    prefix gets a probe too (the first one, repeated), whose output row the caller drops with
    the sink's."""
    tokens = np.concatenate([[0], tokens + 1])
    return tokens, (None if probe is None else np.concatenate([probe[:1] + 1, probe + 1]))


def forward_tapped(params: Params, tokens, backend, *, delta0=None):
    """The forward pass called directly (not through ``backend.run``, so not under jit),
    for analysis backends: every intermediate the model taps goes through
    ``backend.tap(name, x)`` (``l{ℓ}.x`` the input of layer ℓ and ``l{L}.x`` the final
    norm's, ``l{ℓ}.z``, ``l{ℓ}.{q,k,v}{h}`` per head after RoPE, ``{norm}_sigma``), and norm
    scales and attention weights through ``backend.freeze``. ``delta0`` (N, d), if given, is
    added to the layer-0 representations v^(0): the handle for Jacobians ∂y/∂v^(0)
    (collapse_sim.theory.trace). Returns ``y`` (N, d) in the backend's array type."""
    c = params.config
    tokens = np.asarray(tokens)
    if c.sink:
        raise ConfigError("theory traces take models without a sink token (their rows would not be the "
                          "prefixes'); use sink=False")
    if c.adaptive_temperature:
        raise ConfigError("theory traces read the attention as one softmax of the scores, which adaptive temperature "
                          "(a second softmax at an entropy-dependent temperature) is not; use adaptive_temperature=False")
    if c.kind == "gaussian":
        if delta0 is not None:
            raise ConfigError("the gaussian model has no layer-0 representations to perturb; use kind='decoder' "
                              "for Jacobians")
        arrays = forward_arrays(params, len(tokens), int(tokens.max()) + 1 if tokens.size else 0)
        return _gaussian_impl(c, weights_role(arrays, backend), tokens, None, backend)
    return _forward_impl(c, weights_role(forward_arrays(params, len(tokens)), backend), tokens, None, backend,
                         delta0=delta0)


def token_bound(c: ModelConfig) -> int | None:
    """Token ids a model takes lie in [0, bound): the decoder's vocabulary; None for the
    Gaussian model, whose tokens are draw ids (any id >= 0 names its own q, k, v)."""
    return None if c.kind == "gaussian" else c.vocab


#: The Gaussian model's draws for ids 0..n_ids-1, passed with the weights (Weights.gauss_q, _k, _v).
GAUSS = tuple(_FILE_NAMES[n] for n in ("gauss_q", "gauss_k", "gauss_v"))


def forward_arrays(params: Params, need: int, n_ids: int = 0) -> dict:
    """The weights and, for sinusoidal positions, the table for ``need`` positions
    (under jit an argument, not a constant: a 65,536-row table embedded in the
    compiled program cost 0.27 GiB of compile memory); for the Gaussian model, its
    q, k, v draws for token ids ``0..n_ids-1`` (:func:`gaussian_draws`)."""
    c = params.config
    out = dict(params.arrays)
    if c.pe == "sinusoidal":
        out[SINUSOIDAL] = positional.sinusoidal(need, c.d)
    if c.kind == "gaussian":  # whole blocks of ids: runs of nearby lengths share one compiled forward
        out.update(zip(GAUSS, gaussian_draws(c, -(-n_ids // _DRAW_BLOCK) * _DRAW_BLOCK)))
    if c.sink:  # row 0 of the token table is the sink (forward moves every id up by one)
        if c.kind == "gaussian":
            out.update((k, np.concatenate([s[None], out[k]])) for k, s in zip(GAUSS, sink_draws(c)))
        else:
            out["embed"] = np.concatenate([out.pop("sink")[None], out["embed"]])
    return out


MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2")  # (d_in, d_out), used as x @ W
TABLES = ("embed", "pos", *GAUSS)  # one row of d per token id or position


def weight_axis(name: str) -> int | None:
    """The axis a policy's weights role blocks the array ``name`` of :func:`forward_arrays` along
    (docs/semantics.md §5.1): 0 (the contraction axis) for the matrices, 1 (along d) for the
    token and position tables (the sink is row 0 of the token table by then), 0 for the one-axis
    gains and biases; None for the sinusoidal table, a constant that stays in storage (§5.4)."""
    if name == SINUSOIDAL:
        return None
    if name.rsplit(".", 1)[-1] in MATRICES:
        return 0
    if name in TABLES:
        return 1
    if name.endswith(("_g", "_b")) or name.rsplit(".", 1)[-1] in ("b1", "b2"):
        return 0
    raise ConfigError(f"array {name!r} is not a weight of the model; forward_arrays names every array it passes")


#: The backends that quantise the dot products' operands under a policy's operands role
#: (docs/semantics.md §13.1).
OPERAND_BACKENDS = ("emulated", "reference")


def check_backend(c: ModelConfig, backend) -> None:
    """Refuse, in one sentence and before any work, a backend that cannot run the model: adaptive
    temperature needs a backend that defines it and the naive kernel (docs/semantics.md §8.7);
    an operands role needs the emulated or reference backend (§13.1)."""
    policy = getattr(backend, "policy", None)
    if getattr(policy, "operands", None) is not None and backend.kind not in OPERAND_BACKENDS:
        from .policy import PolicyError, weights_token

        raise PolicyError(f"the {backend.kind} backend does not quantise the dot products' operands "
                          f"(operands={weights_token(policy.operands)}, docs/semantics.md §13.1); run the policy on the "
                          "emulated or reference backend")
    if not c.adaptive_temperature:
        return
    if "adaptive" not in inspect.signature(backend.attention).parameters:
        raise ConfigError(f"backend {getattr(backend, 'label', backend.kind)} does not define adaptive temperature "
                          "(docs/semantics.md §8.7); run it on the emulated, reference or native backend")
    if policy is not None and (why := policy.kernel.why_not_adaptive()) is not None:
        raise ConfigError(why)


def weights_role(arrays: dict, backend) -> dict:
    """``arrays`` (:func:`forward_arrays`) with every weight through the backend's weights role,
    on the host before the forward (``backend.quantize_weights``, along :func:`weight_axis`):
    the forward then rounds them to storage like any array (docs/semantics.md §5.1). Without a
    weights role the arrays pass as they are (they may be traced: theory's Jacobians)."""
    policy = getattr(backend, "policy", None)
    if policy is None or policy.weights is None:
        return arrays
    if any(isinstance(v, jax.core.Tracer) for v in arrays.values()):
        raise ConfigError(f"the weights role {policy.weights} quantises the weights on the host, before a forward, "
                          "so a traced forward (theory traces, explain-native) cannot take it; use a policy without one")
    return {k: v if weight_axis(k) is None else backend.quantize_weights(v, weight_axis(k)) for k, v in arrays.items()}


def sink_draws(c: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Gaussian model's sink token: q, k, v (each ``(d,)``) drawn like an id's (N(0, σ²) per
    entry) from its own stream, ``numpy.random.default_rng([seed, 0, 1])``, apart from every id's."""
    sigma = np.sqrt(c.qkv_var if c.qkv_var is not None else 1.0 / c.d)
    z = np.random.default_rng([c.seed, 0, 1]).standard_normal((3, c.d)) * sigma
    return z[0], z[1], z[2]


def _forward_scanned(c: ModelConfig, arrays, tokens, probe, B):
    """:func:`_forward_impl` with its layers as one loop body where ``B`` compiles (below)."""
    return _forward_impl(c, arrays, tokens, probe, B, scan=True)


def _forward_impl(c: ModelConfig, arrays, tokens, probe, B, delta0=None, scan=False):
    """The forward pass proper (traceable: the native and emulated backends jit it).

    ``delta0`` (N, d), if given, is added to the layer-0 representations v^(0): the
    handle for Jacobians ∂y/∂v^(0) (collapse_sim.theory.trace). Intermediate values
    pass through ``B.tap(name, x)``; norm scales and attention weights through
    ``B.freeze`` (identity except on analysis backends).

    ``scan``: on a backend that says so (``B.scans_layers``: the emulated one), the layers
    run as one ``lax.scan`` over their stacked weights, so XLA compiles one layer, not
    ``n_layers`` copies (its compile time grows faster than the program: two unrolled
    layers took three times one). The same ops in the same order, so the same bits; the
    taps then name every layer ``l0.`` (analysis backends call this without ``scan``).
    The native backend keeps the layers unrolled: XLA's bf16 bits there depend on the
    program's shape (float32 excess precision inside it, none across a loop's carry)."""
    N = tokens.shape[0]
    need = N + (1 if probe is not None else 0)
    W = Weights.from_arrays(c, {k: B.store(v) for k, v in arrays.items()})
    merged = _merges_probes(B, probe)
    ids, pos = _rows(tokens, probe if merged else None)
    x = B.take(W.embed, ids)
    xp = None
    if probe is not None and not merged:
        xp = B.take(W.embed, probe)
    pe = pe_p = None
    if c.pe in ("sinusoidal", "learned"):
        table = W.sinusoidal if c.pe == "sinusoidal" else B.take(W.pos, np.arange(need))
        pe = B.take(table, pos)
        pe_p = B.take(table, pos + 1) if xp is not None else None
        if c.ape == "residual":
            x = B.add(x, pe)
            if xp is not None:
                xp = B.add(xp, pe_p)
            pe = pe_p = None
    if delta0 is not None:
        x = B.add(x, delta0)
    if scan and c.n_layers > 1 and getattr(B, "scans_layers", False):
        x, xp = _scan_layers(c, W, x, xp, pos, B, pe, pe_p, merged)
    else:
        for layer in range(c.n_layers):
            with B.draw_scope(layer):
                x, xp = _layer(c, W.layers[layer], f"l{layer}.", x, xp, pos, B, pe, pe_p, merged)
    x = B.tap(f"l{c.n_layers}.x", x)
    y = _norm(c, W.n3_g, W.n3_b, "n3", x, B)
    if merged:
        return _split_rows(y)
    if xp is None:
        return y
    return y, _norm(c, W.n3_g, W.n3_b, "n3", xp, B)


def _merges_probes(B, probe) -> bool:
    """Whether the stream and its probes run as one set of rows (:func:`_rows`): where the backend
    says so (``B.merges_probes``: the emulated one in a deterministic mode, docs/semantics.md §10),
    the program then holds one copy of every op instead of one for the stream and one for the
    probes (about half the compile time, docs/backends.md)."""
    return probe is not None and getattr(B, "merges_probes", False)


def _rows(tokens, probe):
    """The ids and positions of the rows a forward computes: the stream's (``probe`` None), or the
    stream's and the probes' interleaved, ``t_0, π_0, t_1, π_1, ...`` at positions ``0, 1, 1, 2,
    2, 3, ...`` (sorted, so causal segments still split them, docs/semantics.md §3.3)."""
    pos = np.arange(tokens.shape[0])
    if probe is None:
        return tokens, pos
    return _interleave(tokens, probe), _interleave(pos, pos + 1)


def _split_rows(y):
    """The stream's rows and the probes' of an output over :func:`_rows`' interleaved rows."""
    return y[0::2], y[1::2]


def _interleave(a, b):
    """Rows ``a_0, b_0, a_1, b_1, ...`` of two arrays of one shape (numpy or traced)."""
    mod = np if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jax.numpy
    return mod.stack([a, b], axis=1).reshape((-1, *a.shape[1:]))


def _scan_layers(c: ModelConfig, W: Weights, x, xp, pos, B, pe, pe_p, merged=False):
    """Every layer of :func:`_layer` as one ``lax.scan`` step over the layers' stacked weights
    (one :class:`LayerWeights` whose arrays have a leading layer axis), each in its backend's
    draw scope (``B.draw_scope(layer)``, the layer index traced)."""
    stacked = jax.tree.map(lambda *ws: B.xp.stack(ws), *W.layers)

    def step(carry, lw):
        layer, Wl = lw
        with B.draw_scope(layer):
            return _layer(c, Wl, "l0.", *carry, pos, B, pe, pe_p, merged), None

    (x, xp), _ = jax.lax.scan(step, (x, xp), (B.xp.arange(c.n_layers), stacked))
    return x, xp


def _norm(c: ModelConfig, g, b, name: str, x, B):
    """The norm of the config (gain ``g``, layernorm bias ``b``: (d,)) of each row of ``x``;
    ``name`` names its tap (``{name}_sigma``)."""
    if c.norm == "none":
        return x
    if c.norm == "layernorm":
        mu = B.mean(x)
        xc = B.sub(x, B.col(mu, like=x))
        var = B.mean(B.mul(xc, xc))
    else:
        xc = x
        var = B.mean(B.mul(x, x))
    den = B.freeze(B.tap(name + "_sigma", B.sqrt(B.add(var, B.const(c.norm_eps, like=var)))))
    y = B.mul(B.div(xc, B.col(den, like=xc)), B.row(g, like=x))
    if c.norm == "layernorm":
        y = B.add(y, B.row(b, like=x))
    return y


def _layer(c: ModelConfig, W: LayerWeights, p: str, x, xp, pos, B, pe=None, pe_p=None, merged=False):
    """One decoder layer with weights ``W`` (``p``: its taps' prefix, ``l{ℓ}.``), over the
    stream ``x`` and the probes ``xp`` (or None); ``merged``: ``x`` holds the stream's rows and
    the probes' interleaved (:func:`_rows`)."""
    x = B.tap(p + "x", x)
    h = _norm(c, W.n1_g, W.n1_b, p + "n1", x, B)
    hp = _norm(c, W.n1_g, W.n1_b, p + "n1", xp, B) if xp is not None else None

    def proj(u, w, stream=None):  # stream: the stream's inputs, where u holds the probes'
        return B.linear(u, w, **_stream_rows(B, stream)) if w is not None else u

    hqk = B.add(h, pe) if pe is not None else h  # ape="scores": positions enter q and k only
    q, k, v = proj(hqk, W.wq), proj(hqk, W.wk), proj(h, W.wv)
    qp = kp = vp = None
    if hp is not None:
        hqkp = B.add(hp, pe_p) if pe_p is not None else hp
        qp, kp, vp = proj(hqkp, W.wq, hqk), proj(hqkp, W.wk, hqk), proj(hp, W.wv, h)
    heads, heads_p = [], []
    dh = c.dh
    slopes = alibi_slopes(c)
    for hd in range(c.n_heads):
        sl = slice(hd * dh, (hd + 1) * dh)
        qkv_p = None if hp is None else (B.cols(qp, sl), B.cols(kp, sl), B.cols(vp, sl))
        o, op = _head(c, B, f"{p}", hd, (B.cols(q, sl), B.cols(k, sl), B.cols(v, sl)), qkv_p, pos,
                      None if slopes is None else slopes[hd], merged)
        heads.append(o)
        heads_p.append(op)
    o = B.concat_cols(heads)
    a = proj(o, W.wo)
    z = B.tap(p + "z", B.add(a, x))
    ap = zp = None
    if hp is not None:
        ap = proj(B.concat_cols(heads_p), W.wo, o)
        zp = B.add(ap, xp)

    def mlp(u, stream=None):  # stream: the stream's MLP inputs (h2, f), where u is the probes' z
        if not c.d_ff:
            return u, None
        h2 = _norm(c, W.n2_g, W.n2_b, p + "n2", u, B)
        f1 = proj(h2, W.w1, None if stream is None else stream[0])
        f = B.relu(B.add(f1, B.row(W.b1, like=f1)))
        f2 = proj(f, W.w2, None if stream is None else stream[1])
        return B.add(B.add(f2, B.row(W.b2, like=f2)), u), (h2, f)

    y, inputs = mlp(z)
    return y, (mlp(zp, inputs)[0] if zp is not None else None)


def _stream_rows(B, stream) -> dict:
    """The keyword that hands a probe's linear layer or attention the stream's rows of the same
    operand (``stream_rows``), where the backend says it needs them (``B.needs_stream_rows``: its
    operands are scaled per tensor, and a probe's scale covers the stream's rows before it,
    docs/semantics.md §13.2.1); nothing otherwise."""
    return {"stream_rows": stream} if stream is not None and getattr(B, "needs_stream_rows", False) else {}


def alibi_slopes(c: ModelConfig) -> list[float] | None:
    """The slope each head's attention primitive adds as ``-slope·(i - j)`` to the scaled
    score (None without ALiBi): ``alibi_slope`` or Press et al.'s 2^(-8h/H); with
    ``alibi_at="before"`` the bias is read as added before the 1/√d_h scale,
    ``(q·k - m·(i - j))/√d_h``, so the effective slope is m/√d_h."""
    if c.pe != "alibi":
        return None
    m = np.full(c.n_heads, c.alibi_slope, dtype=np.float64) if c.alibi_slope is not None \
        else positional.alibi_slopes(c.n_heads)
    if c.alibi_at == "before":
        m = m / np.sqrt(c.dh)
    return [float(x) for x in m]


def _head(c: ModelConfig, B, p: str, hd: int, qkv, qkv_p, pos, slope, merged=False):
    """One head's causal attention, for the decoder and the Gaussian model alike: RoPE on
    q and k (at the query's position), Scalable-Softmax's factor on q, then the backend's
    attention primitive over the stream (with adaptive temperature's constants where it is
    on, docs/semantics.md §8.7); with a probe (``qkv_p``: its q, k, v, one per prefix), each
    probe at position n + 1 over the stream's keys 0..n and its own key. ``merged``: the rows
    of ``qkv`` are the stream's and the probes' interleaved (:func:`_rows`, ``qkv_p`` None), in one
    call over the stream's keys, every row's own key and value in its own column (a stream row's
    are the stream's there: the same entries, so the same bits, ±0 aside, docs/semantics.md §10).
    Returns (out, out_probe or None)."""
    qh, kh, vh = _queries_keys(c, B, *qkv, pos)
    qh, kh, vh = B.tap(f"{p}q{hd}", qh), B.tap(f"{p}k{hd}", kh), B.tap(f"{p}v{hd}", vh)
    # adaptive temperature is passed only when on: backends that do not define it never see it
    kw = {"adaptive": ADAPTIVE_TEMPERATURE} if c.adaptive_temperature else {}
    inputs = AttentionInputs(qh, kh, vh, pos, scale=1 / np.sqrt(c.dh), alibi=slope, window=c.window)
    if merged:
        keys, values = _split_rows(kh)[0], _split_rows(vh)[0]  # the stream's
        return B.attention(dataclasses.replace(inputs, k=keys, v=values, self_kv=(kh, vh)), **kw), None
    out = B.attention(inputs, **kw)
    if qkv_p is None:
        return out, None
    qph, kph, vph = _queries_keys(c, B, *qkv_p, pos + 1)
    probes = dataclasses.replace(inputs, q=qph, qpos=pos + 1, self_kv=(kph, vph))
    return out, B.attention(probes, **kw, **_stream_rows(B, qh))


def _queries_keys(c: ModelConfig, B, q, k, v, pos):
    """q, k, v of tokens at positions ``pos`` as the scores take them (docs/semantics.md §8.5,
    §8.7): RoPE (p-RoPE) rotates q and k; Scalable-Softmax multiplies each query by its factor."""
    if c.pe == "rope":
        q, k = _rope(q, pos, B, c.rope_fraction), _rope(k, pos, B, c.rope_fraction)
    if c.ssmax is not None:
        q = B.mul(q, B.col(B.store(ssmax_factors(c, pos)), like=q))
    return q, k, v


#: Adaptive temperature's constants (docs/semantics.md §8.7), as the backends' attention takes
#: them: the polynomial β(H), float64 coefficients highest power first (np.polyval order), and
#: the entropy threshold above which it applies. From the printed listing of Veličković,
#: Perivolaropoulos, Barbero, Pascanu, "softmax is not enough (for sharp out-of-distribution)",
#: arXiv 2410.01104: poly_fit = [-0.037, 0.481, -2.3, 4.917, -1.791], entropy > 0.5.
ADAPTIVE_TEMPERATURE = ((-0.037, 0.481, -2.3, 4.917, -1.791), 0.5)


def ssmax_factors(c: ModelConfig, pos) -> np.ndarray:
    """Scalable-Softmax (Nakanishi 2025, arXiv 2501.19399): the query at position p sees
    n = p + 1 keys (min(p + 1, window) with a window) and is multiplied by ``s·ln n``,
    evaluated in float64 (numpy's ``log``, then the product) and rounded to the storage
    format like every constant: the scores become ``s·ln n · q·k`` (docs/semantics.md §8.7)."""
    n = np.asarray(pos, dtype=np.float64) + 1
    if c.window is not None:
        n = np.minimum(n, c.window)
    return c.ssmax * np.log(n)


def _rope(x, positions, B, fraction: float = 1.0):
    cos, sin = positional.rope_tables(positions, B.ncols(x), fraction=fraction)
    C, S = B.store(cos), B.store(sin)
    x0, x1 = B.cols(x, slice(0, None, 2)), B.cols(x, slice(1, None, 2))
    r0 = B.sub(B.mul(x0, C), B.mul(x1, S))
    r1 = B.add(B.mul(x0, S), B.mul(x1, C))
    return B.interleave_cols(r0, r1)


# --------------------------------------------------------------------------
# The captions' Gaussian model (kind="gaussian").

_DRAW_BLOCK = 256  # ids per seeded block of draws


def _check_gaussian(c: ModelConfig) -> None:
    """What the Gaussian model supports: one layer, one head, no MLP, every position kind
    but the learned table, sinusoidal placement by ``sin_at`` (not ``ape``)."""
    if c.n_layers != 1:
        raise ConfigError(f"the gaussian model has one attention layer (its q, k, v are drawn, not computed), got n_layers={c.n_layers}")
    if c.n_heads != 1:
        raise ConfigError(f"the gaussian model has one head, got n_heads={c.n_heads}")
    if c.d_ff:
        raise ConfigError(f"the gaussian model has no MLP; use d_ff=0, got {c.d_ff}")
    if c.pe == "learned":
        raise ConfigError("the gaussian model has no learned positional table; use none, sinusoidal, rope or alibi")
    if c.ape != "residual":
        raise ConfigError("the gaussian model places sinusoidal positions with sin_at (keys, qk or values), not ape")


def gaussian_draws(c: ModelConfig, n_ids: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v (each ``(n_ids, d)``, float64) of token ids ``0..n_ids-1``: entries i.i.d.
    N(0, σ²), σ² = ``qkv_var`` (default 1/d). Id t's draws depend only on (seed, d, σ², t):
    ids come in blocks of 256, block b drawn from ``numpy.random.default_rng([seed, b])``
    as a (256, 3, d) standard normal array (q, k, v of each id in turn) times σ. So a
    longer stream extends a shorter one, and a repeated id repeats its q, k and v."""
    sigma = np.sqrt(c.qkv_var if c.qkv_var is not None else 1.0 / c.d)
    nb = -(-max(n_ids, 0) // _DRAW_BLOCK)
    z = np.concatenate([np.random.default_rng([c.seed, b]).standard_normal((_DRAW_BLOCK, 3, c.d)) for b in range(nb)]
                       or [np.zeros((0, 3, c.d))])[:n_ids] * sigma
    return z[:, 0], z[:, 1], z[:, 2]


def _gaussian_impl(c: ModelConfig, arrays, tokens, probe, B):
    """The Gaussian model's forward (traceable). Row i of the stream is token id
    ``tokens[i]`` at position i: its drawn q, k, v (rounded once to the storage format),
    the sinusoidal table at position i added where ``sin_at`` says, then one head of the
    decoder's attention (:func:`_head`: RoPE, ALiBi, window, probes) and the output norm
    ``norm3`` (none by default for this model's readings). A probe after prefix n is
    id ``probe[n]`` at position n + 1."""
    W = Weights.from_arrays(c, {k: B.store(v) for k, v in arrays.items()})
    merged = _merges_probes(B, probe)
    ids, pos = _rows(tokens, probe if merged else None)
    draws = (W.gauss_q, W.gauss_k, W.gauss_v)
    qkv = [B.take(w, ids) for w in draws]
    qkv_p = None if probe is None or merged else [B.take(w, probe) for w in draws]
    if c.pe == "sinusoidal":
        placed = {"keys": (1,), "qk": (0, 1), "values": (2,)}[c.sin_at]

        def place(xs, at):
            pe = B.take(W.sinusoidal, at)
            return [B.add(x, pe) if i in placed else x for i, x in enumerate(xs)]

        qkv = place(qkv, pos)
        qkv_p = None if qkv_p is None else place(qkv_p, pos + 1)
    slopes = alibi_slopes(c)
    out, out_p = _head(c, B, "l0.", 0, qkv, qkv_p, pos, None if slopes is None else slopes[0], merged)
    y = _norm(c, W.n3_g, W.n3_b, "n3", B.tap("l1.x", out), B)
    if merged:
        return _split_rows(y)
    return y if out_p is None else (y, _norm(c, W.n3_g, W.n3_b, "n3", out_p, B))
