"""Sweeps: grids of format × family × positional encoding × seed, one collapse run per cell.

A sweep spec is JSON (or a dict)::

    {"formats": ["bf16", "fp16", "p=5,emax=15"], "families": ["repeat_last", "ones"],
     "pe": ["none", "sinusoidal"], "seeds": [0, 1], "max_len": 256,
     "model": {"d": 16, "n_layers": 1, "norm": "layernorm"}, "order": "pairwise"}

Every cell is validated before any work starts (``SweepSpec.validate``); each
finished cell is written atomically (``collapse_sim.results``), so a killed sweep
restarted on the same ``--out`` runs only the missing cells. The executor is
in-process by default, or a ``dask.distributed`` cluster: cells run on workers and
their tables come back to the client, which writes them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

from .. import results

_MODEL_KEYS = {"d", "n_layers", "n_heads", "d_ff", "vocab", "norm", "window", "ape", "value_proj", "out_proj",
               "embed_std", "qk_std", "v_std", "ff_std", "norm_eps",
               "kind", "qkv_var", "sin_at", "alibi_slope", "alibi_at"}


class SweepError(ValueError):
    """A sweep spec that cannot run."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    formats: tuple[str, ...]
    families: tuple[str, ...]
    pe: tuple[str, ...] = ("none",)
    seeds: tuple[int, ...] = (0,)
    max_len: int = 128
    model: tuple[tuple[str, object], ...] = ()
    order: str = "pairwise"
    backend: str = "emulated"
    sep: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SweepSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SweepError(f"unknown sweep field(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(known))}")

        def tup(v):
            return tuple(v) if isinstance(v, (list, tuple)) else (v,)

        try:
            spec = cls(formats=tup(d.get("formats", ())), families=tup(d.get("families", ())), pe=tup(d.get("pe", ("none",))),
                       seeds=tuple(int(s) for s in tup(d.get("seeds", (0,)))), max_len=int(d.get("max_len", 128)),
                       model=tuple(sorted(dict(d.get("model", {})).items())), order=str(d.get("order", "pairwise")),
                       backend=str(d.get("backend", "emulated")), sep=d.get("sep"))
        except (TypeError, ValueError) as e:
            raise SweepError(f"malformed sweep spec: {e}") from None
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, path: "str | Path") -> "SweepSpec":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SweepError(f"cannot read sweep spec {path}: {e}") from None

    def validate(self) -> None:
        """Refuse, in one sentence, anything that would fail in some cell."""
        from ..backends.emulated import CarrierError, carrier_for
        from ..families import NAMES, FamilyError, make_pairs
        from ..formats import FormatError, parse
        from ..model import ConfigError, token_bound
        from ..policy import Order, PolicyError
        from ..positional import KINDS

        if not self.formats or not self.families:
            raise SweepError("a sweep needs at least one format and one family")
        if self.max_len < 1:
            raise SweepError(f"max_len must be >= 1, got {self.max_len}")
        if self.backend not in ("emulated", "native", "reference"):
            raise SweepError(f"unknown backend {self.backend!r}; use emulated, native or reference")
        if self.backend == "reference" and self.max_len > 128:
            raise SweepError("the reference backend is O(N^2 d) Python arithmetic; use max_len <= 128 with it")
        try:
            Order.parse(self.order)
        except PolicyError as e:
            raise SweepError(str(e)) from None
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
        bad = set(dict(self.model)) - _MODEL_KEYS
        if bad:
            raise SweepError(f"unknown model field(s) {', '.join(sorted(bad))}")
        for cell in self.cells():
            try:
                cfg = self.config(cell)
                make_pairs(cell["family"], self.max_len, token_bound(cfg), seed=cell["seed"], sep=self.sep)
            except (ConfigError, FamilyError, TypeError) as e:
                raise SweepError(f"cell {cell}: {e}") from None

    def cells(self) -> list[dict]:
        return [{"format": f, "family": fam, "pe": pe, "seed": s, "max_len": self.max_len, "order": self.order,
                 "backend": self.backend, "sep": self.sep, "model": dict(self.model)}
                for f, fam, pe, s in itertools.product(self.formats, self.families, self.pe, self.seeds)]

    def config(self, cell: dict):
        from ..model import ModelConfig

        m = {"d": 16, "n_layers": 1, "vocab": 16, **dict(self.model)}
        return ModelConfig(pe=cell["pe"], seed=cell["seed"], max_len=max(16384, 2 * self.max_len + 8), **m)


def run_cell(cell: dict, spec: SweepSpec):
    """One cell's tidy table (pandas) and provenance. Deterministic: same cell, same bits."""
    import collapse_sim

    collapse_sim.enable_x64()
    import pandas as pd

    from ..backends import backend_for_format
    from ..model import init_params
    from ..report import provenance
    from .collapse import collapse_sweep

    params = init_params(spec.config(cell))
    be = backend_for_format(cell["backend"], cell["format"], cell["order"])
    t0 = time.time()
    res = collapse_sweep(params, cell["family"], cell["max_len"], be, cell["format"], seed=cell["seed"], sep=cell["sep"])
    df = pd.DataFrame(res.rows())
    key = results.cell_key(cell)
    df.insert(0, "cell", key)
    for col in ("family", "pe", "seed"):
        df[col] = cell[col]
    prov = {"provenance": provenance(), "backend": be.describe(), "cell": cell,
            "config": dataclasses.asdict(params.config), "seconds": time.time() - t0}
    return key, df, prov


def run_sweep(spec: SweepSpec, out: "str | Path", *, executor: str = "inprocess", scheduler: str | None = None,
              progress=print) -> dict:
    """Run every cell not yet in ``out``; returns counts of run and skipped cells."""
    out = Path(out)
    cells = spec.cells()
    done = results.done_keys(out)
    todo = [c for c in cells if results.cell_key(c) not in done]
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1, default=str))
    if progress:
        progress(f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run ({executor})")
    t0 = time.time()
    if executor == "inprocess":
        for i, cell in enumerate(todo):
            key, df, prov = run_cell(cell, spec)
            results.write_cell(out, key, df, prov)
            if progress:
                progress(f"[sweep] {i + 1}/{len(todo)} {cell['format']} {cell['family']} pe={cell['pe']} "
                         f"seed={cell['seed']} done ({time.time() - t0:.0f}s)")
    elif executor == "dask":
        try:
            from dask.distributed import Client, as_completed
        except ImportError:
            raise SweepError("the dask executor needs dask.distributed: pip install 'collapse-sim[dask]'") from None
        if scheduler is None:
            raise SweepError("the dask executor needs --scheduler ADDRESS (e.g. tcp://host:8786)")
        with Client(scheduler) as client:
            futs = [client.submit(run_cell, c, spec, pure=False) for c in todo]
            for i, fut in enumerate(as_completed(futs)):
                key, df, prov = fut.result()
                results.write_cell(out, key, df, prov)
                if progress:
                    progress(f"[sweep] {i + 1}/{len(todo)} cells done ({time.time() - t0:.0f}s)")
    else:
        raise SweepError(f"unknown executor {executor!r}; use inprocess or dask")
    return {"run": len(todo), "skipped": len(cells) - len(todo)}
