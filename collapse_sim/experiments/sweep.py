"""Sweeps: grids of format × family × positional encoding × seed, one collapse run per cell.

A sweep spec is a JSON object (or a dict)::

    {"formats": ["bf16", "fp16", "p=5,emax=15"], "families": ["repeat_last", "ones"],
     "pe": ["none", "sinusoidal"], "seeds": [0, 1], "max_len": 256,
     "model": {"d": 16, "n_layers": 1, "norm": "layernorm"}, "order": "pairwise"}

Fields are strictly typed (:data:`FIELDS`; integers are JSON integers, never
``true``; lists are lists; unknown keys are refused) and every cell is validated
and sized before any work starts (``SweepSpec.validate``). An output directory
records the spec it holds (``OUT/spec.json``: canonical form and fingerprint); a
rerun with another spec is refused unless ``extend=True`` and the change only adds
grid values. Each finished cell is written atomically (``collapse_sim.results``),
so a killed sweep restarted on the same ``--out`` runs only the missing cells. The
executor is in-process by default, or a ``dask.distributed`` cluster, reached
before anything is written: cells run on workers and their tables come back to
the client, which writes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from pathlib import Path

from .. import results
from ..errors import CollapseSimError

SPEC_BYTES = 1 << 20  # a spec file larger than this is refused unread
MEM_LIMIT_GIB = 8.0  # the default of ``collapse --mem-limit`` and ``sweep --mem-limit``
RECORD = "spec.json"

# field: (kind, default); kind "strs"/"ints" are non-empty lists without repeats; a
# default of ... marks a required field. docs/sweeps.md lists the same table.
FIELDS = {
    "formats": ("strs", ...),
    "families": ("strs", ...),
    "pe": ("strs", ("none",)),
    "seeds": ("ints", (0,)),
    "max_len": ("int", 128),
    "model": ("model", ()),
    "order": ("str", "pairwise"),
    "kernel": ("str", "naive"),
    "backend": ("str", "emulated"),
    "sep": ("int?", None),
}
GRID = ("formats", "families", "pe", "seeds")  # the list fields: their product is the grid

# model field: JSON type ("int", "int?", "num", "num?", "str", "bool")
_MODEL_KEYS = {"d": "int", "n_layers": "int", "n_heads": "int", "d_ff": "int", "vocab": "int", "window": "int?",
               "norm": "str", "ape": "str", "value_proj": "bool", "out_proj": "bool", "embed_std": "num",
               "qk_std": "num?", "v_std": "num?", "ff_std": "num?", "norm_eps": "num",
               "kind": "str", "qkv_var": "num?", "sin_at": "str", "alibi_slope": "num?", "alibi_at": "str",
               "rope_fraction": "num", "ssmax": "num?", "sink": "bool", "adaptive_temperature": "bool"}
_MODEL_DEFAULTS = {"d": 16, "n_layers": 1, "vocab": 16}  # over ModelConfig's own defaults


class SweepError(CollapseSimError):
    """A sweep spec that cannot run, or an output directory that holds another sweep."""


def _show(v) -> str:
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _typed(where: str, kind: str, v):
    """``v`` if it has JSON type ``kind``, else SweepError naming ``where``."""
    nullable = kind.endswith("?")
    if nullable:
        if v is None:
            return None
        kind = kind[:-1]
    if kind == "int":
        ok = isinstance(v, int) and not isinstance(v, bool)
        want = "an integer"
    elif kind == "num":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        want = "a finite number"
    elif kind == "str":
        ok, want = isinstance(v, str) and v != "", "a non-empty string"
    else:  # bool
        ok, want = isinstance(v, bool), "true or false"
    if not ok:
        raise SweepError(f"{where} must be {want}{' or null' if nullable else ''}, got {_show(v)}")
    return v


def _parse(d) -> dict:
    """The spec's fields, typed and with defaults filled in (no model or format checks)."""
    if not isinstance(d, dict):
        raise SweepError(f"a sweep spec must be a JSON object of fields ({', '.join(FIELDS)}), "
                         f"got a JSON {type(d).__name__.replace('list', 'array').replace('dict', 'object')}")
    unknown = [str(k) for k in d if k not in FIELDS]
    if unknown:
        raise SweepError(f"unknown sweep field(s) {', '.join(sorted(unknown))}; use {', '.join(FIELDS)}")
    out = {}
    for name, (kind, default) in FIELDS.items():
        if name not in d:
            if default is ...:
                raise SweepError(f"the sweep spec lacks {name!r}; give it as a non-empty JSON list")
            out[name] = default
            continue
        v = d[name]
        if kind in ("strs", "ints"):
            if not isinstance(v, list) or not v:
                raise SweepError(f"{name} must be a non-empty JSON list, got {_show(v)}")
            items = tuple(_typed(f"each of {name}", kind[:-1], x) for x in v)
            dup = next((x for i, x in enumerate(items) if x in items[:i]), None)
            if dup is not None:
                raise SweepError(f"{name} lists {_show(dup)} twice; list each value once")
            out[name] = items
        elif kind == "model":
            if not isinstance(v, dict):
                raise SweepError(f"model must be a JSON object of model fields, got {_show(v)}")
            bad = [str(k) for k in v if k not in _MODEL_KEYS]
            if bad:
                raise SweepError(f"unknown model field(s) {', '.join(sorted(bad))}; use {', '.join(_MODEL_KEYS)}")
            out[name] = tuple(sorted((k, _typed(f"model.{k}", _MODEL_KEYS[k], x)) for k, x in v.items()))
        else:
            out[name] = _typed(name, kind, v)
    return out


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    formats: tuple[str, ...]
    families: tuple[str, ...]
    pe: tuple[str, ...] = ("none",)
    seeds: tuple[int, ...] = (0,)
    max_len: int = 128
    model: tuple[tuple[str, object], ...] = ()
    order: str = "pairwise"
    kernel: str = "naive"
    backend: str = "emulated"
    sep: int | None = None

    @classmethod
    def from_dict(cls, d: dict, *, mem_limit_gib: float = MEM_LIMIT_GIB) -> "SweepSpec":
        spec = cls(**_parse(d))
        spec.validate(mem_limit_gib=mem_limit_gib)
        return spec

    @classmethod
    def from_json(cls, path: "str | Path", *, mem_limit_gib: float = MEM_LIMIT_GIB) -> "SweepSpec":
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > SPEC_BYTES:
                raise SweepError(f"sweep spec {path} is {size:,} bytes; a spec is a small JSON object "
                                 f"(at most {SPEC_BYTES:,} bytes)")
            data = path.read_bytes()
        except OSError as e:
            raise SweepError(f"cannot read sweep spec {path}: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SweepError(f"sweep spec {path} is not UTF-8 text (a binary file?); give a JSON object") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SweepError(f"sweep spec {path} is not valid JSON ({e.msg} at line {e.lineno}, "
                             f"column {e.colno})") from None
        return cls.from_dict(d, mem_limit_gib=mem_limit_gib)

    def canonical(self) -> dict:
        """Every field, defaults filled in, grid lists sorted (their order changes no cell), as
        plain JSON values: what the output directory records."""
        return {"formats": sorted(self.formats), "families": sorted(self.families), "pe": sorted(self.pe),
                "seeds": sorted(self.seeds), "max_len": self.max_len, "model": dict(self.model), "order": self.order,
                "backend": self.backend, "sep": self.sep, **self._kernel_field()}

    def _kernel_field(self) -> dict:
        """``{"kernel": ...}`` unless the kernel is naive: specs and cells without a kernel
        keep the fingerprints and keys they had before kernels existed."""
        from ..policy import Kernel

        k = str(Kernel.parse(self.kernel))  # one spelling per kernel: "ONLINE(64)" and "online:64" are online(64)
        return {} if k == "naive" else {"kernel": k}

    def fingerprint(self) -> str:
        """sha256 of the canonical form as compact JSON with sorted keys."""
        return _fingerprint(self.canonical())

    def validate(self, *, mem_limit_gib: float = MEM_LIMIT_GIB) -> None:
        """Refuse, in one sentence, anything that would fail in some cell or exceed the memory limit."""
        from ..backends.emulated import CarrierError, carrier_for
        from ..families import NAMES, FamilyError, make_pairs
        from ..formats import FormatError, parse
        from ..model import ConfigError, token_bound
        from ..backends import kind_for_format
        from ..policy import Kernel, Order, PolicyError
        from ..positional import KINDS
        from .collapse import memory_estimate

        if self.max_len < 1:
            raise SweepError(f"max_len must be >= 1, got {self.max_len}")
        if self.sep is not None and self.sep < 1:
            raise SweepError(f"sep must be >= 1 or null, got {self.sep}")
        bad_seed = next((s for s in self.seeds if s < 0), None)
        if bad_seed is not None:
            raise SweepError(f"seeds must be >= 0, got {bad_seed}")
        if dict(self.model).get("d_ff", 0) < 0:
            raise SweepError(f"model.d_ff must be >= 0 (0: no MLP), got {dict(self.model)['d_ff']}")
        if self.backend not in ("emulated", "native", "reference"):
            raise SweepError(f"unknown backend {self.backend!r}; use emulated, native or reference")
        if self.backend == "reference" and self.max_len > 128:
            raise SweepError("the reference backend is O(N^2 d) Python arithmetic; use max_len <= 128 with it")
        try:
            order = Order.parse(self.order)
            kernel = Kernel.parse(self.kernel)
        except PolicyError as e:
            raise SweepError(str(e)) from None
        if dict(self.model).get("adaptive_temperature") and (why := kernel.why_not_adaptive()) is not None:
            raise SweepError(why)
        if self.backend == "native" and (why := order.why_not_native()) is not None:
            raise SweepError(why)
        if kernel.kind != "naive":
            native = [f for f in self.formats if kind_for_format(self.backend, f) == "native"]
            if native:
                raise SweepError(f"kernel {kernel} runs on the emulated and reference backends only; "
                                 f"{native[0]} runs natively here: drop it from formats or change the backend")
        for f in self.formats:
            try:
                fmt = parse(f)
            except FormatError as e:
                raise SweepError(str(e)) from None
            if self.backend == "emulated":
                try:
                    carrier_for(fmt)
                except CarrierError as e:
                    raise SweepError(str(e)) from None
        for fam in self.families:
            if fam not in NAMES:
                raise SweepError(f"unknown family {fam!r}; use one of {', '.join(NAMES)}")
        for pe in self.pe:
            if pe not in KINDS:
                raise SweepError(f"unknown positional encoding {pe!r}; use one of {', '.join(KINDS)}")
        cells = self.cells()
        for cell in cells:  # configs first: sizes are checked before any family array is made
            try:
                cfg = self.config(cell)
            except (ConfigError, TypeError) as e:
                raise SweepError(f"cell {_short(cell)}: {e}") from None
            est = memory_estimate(cfg, self.max_len, self.sep)
            if est > mem_limit_gib * 2**30:
                raise SweepError(f"cell {_short(cell)} needs an estimated {est / 2**30:,.1f} GiB, over the "
                                 f"{mem_limit_gib:g} GiB limit; lower max_len or the model size, or raise --mem-limit")
        for cell in cells:
            try:
                make_pairs(cell["family"], self.max_len, token_bound(self.config(cell)), seed=cell["seed"], sep=self.sep)
            except FamilyError as e:
                raise SweepError(f"cell {_short(cell)}: {e}") from None

    def estimate(self, cells: "list[dict] | None" = None):
        """The estimated time of ``cells`` (default: every cell), run one after another
        (:mod:`collapse_sim.experiments.estimate`); compilation counted once per format and shape."""
        from ..backends import kind_for_format
        from ..families import make_pairs
        from ..model import token_bound
        from .estimate import Estimate, seconds

        total, shapes = Estimate(0.0, 0.0, 0), {}
        for cell in self.cells() if cells is None else cells:
            cfg = self.config(cell)
            e = seconds(cfg, make_pairs(cell["family"], self.max_len, token_bound(cfg), seed=cell["seed"], sep=self.sep),
                        kind_for_format(self.backend, cell["format"]), self.order)
            total += Estimate(e.arithmetic, 0.0, 0)
            shapes[(cell["format"], cell["family"], cell["pe"])] = Estimate(0.0, e.compile, e.programs)
        return sum(shapes.values(), total)

    def cells(self) -> list[dict]:
        return [{"format": f, "family": fam, "pe": pe, "seed": s, "max_len": self.max_len, "order": self.order,
                 "backend": self.backend, "sep": self.sep, "model": dict(self.model), **self._kernel_field()}
                for f, fam, pe, s in itertools.product(self.formats, self.families, self.pe, self.seeds)]

    def config(self, cell: dict):
        from ..model import ModelConfig

        m = {**_MODEL_DEFAULTS, **dict(self.model)}
        return ModelConfig(pe=cell["pe"], seed=cell["seed"], max_len=max(16384, 2 * self.max_len + 8), **m)


def _short(cell: dict) -> str:
    return f"{cell['format']} {cell['family']} pe={cell['pe']} seed={cell['seed']}"


def _fingerprint(canonical: dict) -> str:
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(additions, other changes) from the recorded canonical spec ``old`` to ``new``, in words."""
    adds, other = [], []
    for name in FIELDS:
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if name in GRID and isinstance(a, list):
            more, gone = [x for x in b if x not in a], [x for x in a if x not in b]
            if more:
                adds.append(f"{name} + {', '.join(map(_show, more))}")
            if gone:
                other.append(f"{name} drops {', '.join(map(_show, gone))}")
        else:
            other.append(f"{name} {_show(a)} -> {_show(b)}")
    return adds, other


def claim_directory(spec: SweepSpec, out: "str | Path", *, extend: bool = False) -> str | None:
    """Check that ``out`` may receive ``spec``'s cells; writes nothing. Returns None for a
    new directory or the same spec (resume), or a sentence describing an extension.

    Refused (SweepError): a directory recording a different spec, unless ``extend`` and
    the change only adds values to formats, families, pe or seeds (every recorded cell
    stays a cell of the new grid, row for row); a record that is not one; result cells
    with no record, or cells the record does not list."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file; give a directory")
    rec_path = out / RECORD
    done = results.done_keys(out)
    if not rec_path.exists():
        if done:
            raise SweepError(f"{out} holds {len(done)} result cells but no {RECORD} recording their spec; "
                             "use a new --out")
        return None
    try:
        rec = json.loads(rec_path.read_text())
        old, fp = rec["spec"], rec["fingerprint"]
        if not isinstance(old, dict) or _fingerprint(old) != fp:
            raise ValueError
        old_spec = SweepSpec(**_parse(old))
    except (OSError, ValueError, KeyError, TypeError, SweepError):
        raise SweepError(f"{rec_path} is not a sweep record of this version (canonical spec and its fingerprint); "
                         "use a new --out") from None
    stray = done - {results.cell_key(c) for c in old_spec.cells()}
    if stray:
        raise SweepError(f"{out} holds {len(stray)} result cells that its recorded spec does not list; use a new --out")
    if fp == spec.fingerprint():
        return None
    adds, other = _changes(old, spec.canonical())
    if not extend:
        raise SweepError(f"{out} already holds a different sweep ({'; '.join(adds + other)}); rerun the recorded "
                         f"spec to resume, use a new --out, or pass --extend if the change only adds "
                         f"values to {', '.join(GRID[:-1])} or {GRID[-1]}")
    if other:
        raise SweepError(f"--extend only adds grid values, but {'; '.join(other)} would change cells already in "
                         f"{out}; use a new --out")
    new_cells = len(spec.cells()) - len(old_spec.cells())
    return f"extending {out}: {'; '.join(adds)} ({new_cells} new cells)"


def _write_record(spec: SweepSpec, out: Path) -> None:
    rec_path = out / RECORD
    history = []
    if rec_path.exists():
        old = json.loads(rec_path.read_text())
        if old["fingerprint"] == spec.fingerprint():
            return  # a resume: the record stands
        history = old.get("extends", []) + [old["fingerprint"]]
    rec = {"fingerprint": spec.fingerprint(), "spec": spec.canonical(), "extends": history}
    tmp = out / f".{RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, rec_path)


def _connect(executor: str, scheduler: str | None, timeout_s: float):
    """The dask client for ``executor="dask"`` (None in-process); SweepError if it cannot be had."""
    if executor == "inprocess":
        return None
    if executor != "dask":
        raise SweepError(f"unknown executor {executor!r}; use inprocess or dask")
    try:
        from dask.distributed import Client
    except ImportError:
        raise SweepError("the dask executor needs dask.distributed; from a checkout of this package run "
                         "pip install '.[dask]'") from None
    if not scheduler:
        raise SweepError("the dask executor needs --scheduler ADDRESS (e.g. tcp://host:8786)")
    try:
        return Client(scheduler, timeout=timeout_s)
    except (OSError, TimeoutError, ValueError, TypeError):
        raise SweepError(f"cannot reach a dask scheduler at {scheduler} within {timeout_s:g} s; start one "
                         "(dask scheduler) or fix --scheduler") from None


def run_cell(cell: dict, spec: SweepSpec):
    """One cell's tidy table (pandas) and provenance. Deterministic: same cell, same bits."""
    import collapse_sim

    collapse_sim.enable_x64()
    import pandas as pd

    from ..backends import backend_for_format
    from ..model import init_params
    from .collapse import collapse_sweep

    from ..compilation import snapshot

    params = init_params(spec.config(cell))
    be = backend_for_format(cell["backend"], cell["format"], cell["order"], kernel=cell.get("kernel", "naive"))
    t0 = time.time()
    before = snapshot()
    res = collapse_sweep(params, cell["family"], cell["max_len"], be, cell["format"], seed=cell["seed"], sep=cell["sep"])
    df = pd.DataFrame(res.rows())
    key = results.cell_key(cell)
    df.insert(0, "cell", key)
    for col in ("family", "pe", "seed"):
        df[col] = cell[col]
    prov = {"provenance": results.provenance(), "backend": be.describe(), "cell": cell,
            "config": dataclasses.asdict(params.config), "seconds": time.time() - t0,
            "compilation": snapshot().since(before).as_dict()}
    return key, df, prov


def run_sweep(spec: SweepSpec, out: "str | Path", *, executor: str = "inprocess", scheduler: str | None = None,
              extend: bool = False, progress=print, connect_timeout: float = 5.0,
              time_limit: "float | None" = None) -> dict:
    """Run every cell not yet in ``out``; returns counts of run and skipped cells.

    Nothing is written until the directory is claimed (:func:`claim_directory`), the cells
    still to run are estimated to take no longer than ``time_limit`` seconds of arithmetic
    (:mod:`collapse_sim.experiments.estimate`) and, for dask, the scheduler answered within
    ``connect_timeout`` seconds."""
    out = Path(out)
    note = claim_directory(spec, out, extend=extend)
    cells = spec.cells()
    done = results.done_keys(out)
    todo = [c for c in cells if results.cell_key(c) not in done]
    est = spec.estimate(todo)
    if time_limit is not None:
        from .estimate import check

        check(est, time_limit, f"this sweep's {len(todo)} cells to run")
    client = _connect(executor, scheduler, connect_timeout)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_record(spec, out)
        if progress:
            if note:
                progress(f"[sweep] {note}")
            progress(f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run "
                     f"({executor}); estimated time of those: {est.describe()}")
        t0 = time.time()
        if client is None:
            for i, cell in enumerate(todo):
                key, df, prov = run_cell(cell, spec)
                results.write_cell(out, key, df, prov)
                if progress:
                    progress(f"[sweep] {i + 1}/{len(todo)} {_short(cell)} done ({time.time() - t0:.0f}s)")
        else:
            from dask.distributed import as_completed

            futs = [client.submit(run_cell, c, spec, pure=False) for c in todo]
            for i, fut in enumerate(as_completed(futs)):
                key, df, prov = fut.result()
                results.write_cell(out, key, df, prov)
                if progress:
                    progress(f"[sweep] {i + 1}/{len(todo)} cells done ({time.time() - t0:.0f}s)")
    finally:
        if client is not None:
            client.close()
    return {"run": len(todo), "skipped": len(cells) - len(todo), "extended": note}


def sweep_summary(df) -> str:
    """Per cell of a sweep table, its first collapse n (see ``collapse.first_collapse``),
    or ``never (n <= N)``, or ``none: exactly equal at every n <= N``: every cell is listed."""
    from .collapse import describe_first_collapse

    keys = ["format", "family", "pe", "seed"]
    first = df.groupby(keys, sort=True).apply(
        lambda g: describe_first_collapse(g["n"], g["bitwise_identical"], g["nonfinite"], g["exact_equal"]),
        include_groups=False).rename("first collapse n")
    return ("first collapse per cell (smallest n with a bitwise-identical pair that differs in exact arithmetic):\n"
            + first.reset_index().to_string(index=False))
