"""Result tables: one Parquet file per sweep cell, written atomically, loaded as one table.

A cell's file is ``DIR/cells/<key>.parquet`` where ``key`` is a hash of the cell's
parameters; it is written to a temporary name in the same folder and renamed, so a
killed run leaves either the whole file or none. The cell's provenance (versions,
backend, flags, seed, config) is stored as JSON in the file's schema metadata.
``load_table(DIR)`` concatenates every cell, sorted by cell key and n, into one
pandas DataFrame (tidy: one row per cell × n).

Before any work, a command checks where it will write with :func:`check_output_dir`
(or :func:`check_output_file`): a bad location is refused at once, and nothing is
created by the check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import sys
from pathlib import Path

import numpy as np

from .errors import CollapseSimError


class OutputError(CollapseSimError):
    """An output location that cannot be written."""


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as anything: file or folder)."""
    p = path
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    return p


def _writable_dir(d: Path) -> bool:
    """Whether files can be created in folder ``d``: tried by creating and removing a probe folder
    (``os.access`` says yes to root on read-only places such as /proc)."""
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix=".collapse-sim-probe-", dir=d)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def _as_path(path, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise OutputError(f"{what} must be a path, got {path!r}")
    return Path(path).expanduser()


def check_output_dir(path: "str | Path", *, writes: "tuple[str, ...]" = (), resume_marker: "str | None" = None,
                     what: str = "--out") -> Path:
    """Refuse an output folder that cannot take the results, before any work; create nothing.

    ``path`` may exist (as a folder) or not (it is created later, with its missing parents).
    Refused: an existing file; a path under a file; a folder (or nearest existing ancestor)
    where files cannot be created; one of the files to write (``writes``, relative names)
    existing as a folder or read-only. With ``resume_marker`` (e.g. a sweep's ``spec.json``),
    an existing non-empty folder must hold that file: results are only added to a run
    of the same kind. Returns the path.
    """
    p = _as_path(path, what)
    anc = _nearest_existing(p)
    if anc == p:
        if not p.is_dir():
            raise OutputError(f"{what} {p} is an existing file; give a directory path (new or existing)")
    elif not anc.is_dir():
        raise OutputError(f"{what} {p} lies under {anc}, which is a file; give a directory path outside it")
    if not _writable_dir(anc):
        where = "" if anc == p else f" (its nearest existing folder {anc})"
        raise OutputError(f"{what} {p}{where} is not writable; give a directory you can write to")
    if anc == p:
        for name in writes:
            t = p / name
            if t.is_dir():
                raise OutputError(f"{what} {p} holds a folder {name} where a result file goes; remove it or choose another {what}")
            if t.exists() and not os.access(t, os.W_OK):
                raise OutputError(f"{what} {p} holds a read-only {name}; make it writable or choose another {what}")
        if resume_marker is not None and any(p.iterdir()) and not (p / resume_marker).is_file():
            raise OutputError(f"{what} {p} is not empty and holds no {resume_marker} of an earlier run; "
                              "give a new or empty directory")
    return p


def check_output_file(path: "str | Path", *, what: str = "output file") -> Path:
    """Refuse a file path whose folder is missing or not writable, or that names a folder; create nothing."""
    p = _as_path(path, what)
    if p.is_dir():
        raise OutputError(f"{what} {p} is a directory; give a file path")
    if not p.parent.is_dir():
        raise OutputError(f"{what} {p}: folder {p.parent} does not exist (or is a file); create it first")
    if not _writable_dir(p.parent) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"{what} {p} is not writable; give a path you can write to")
    return p


def cell_key(params: dict) -> str:
    """A stable 16-hex-digit key for a cell's parameters (a JSON-able dict)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_path(out: "str | Path", key: str) -> Path:
    return Path(out) / "cells" / f"{key}.parquet"


def write_atomic(path: "str | Path", write, *, text: bool = False) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary file in the same folder,
    which is flushed to disk and renamed into place, so a killed run leaves either the
    whole file or the one before it, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if text else "wb", **({"newline": ""} if text else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_csv(path: "str | Path", rows: list[dict]) -> Path:
    """``rows`` (dicts with the same keys) as CSV at ``path``, written atomically."""
    import csv

    def write(fh):
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    return write_atomic(path, write, text=True)


def write_cell(out: "str | Path", key: str, frame, provenance: dict) -> Path:
    """Write one cell atomically (:func:`write_atomic`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = cell_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"collapse_sim.provenance"] = json.dumps(provenance, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    return write_atomic(path, lambda fh: pq.write_table(table, fh))


def done_keys(out: "str | Path") -> set[str]:
    d = Path(out) / "cells"
    return {p.stem for p in d.glob("*.parquet")} if d.is_dir() else set()


def read_provenance(path: "str | Path") -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"collapse_sim.provenance", b"{}"))


def load_table(out: "str | Path"):
    """Every cell of a sweep as one DataFrame, sorted by (cell, n)."""
    import pandas as pd

    files = sorted((Path(out) / "cells").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no result cells under {Path(out) / 'cells'}")
    frames = [pd.read_parquet(f) for f in files]
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["cell", "n"], kind="stable").reset_index(drop=True)


def provenance() -> dict:
    """What produced a result: versions, platform, the JAX backend and its flags, the
    compilation cache in use and the XLA programs this process has compiled so far
    (``compilation_process_total``, counted from the first :func:`collapse_sim.compilation.snapshot`,
    which every CLI command takes at its start; a result's own count is recorded beside it)."""
    import jax
    import ml_dtypes
    import mpmath
    import numpy

    from . import __version__
    from .compilation import cache_in_use, snapshot

    return {
        "collapse_sim": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_x64": bool(jax.config.jax_enable_x64),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "numpy": numpy.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "mpmath": mpmath.__version__,
        "mpmath_backend": mpmath.libmp.BACKEND,
        "compile_cache": cache_in_use(),
        "compilation_process_total": snapshot().as_dict(),
    }


#: The fields of :func:`provenance` that can change what a backend computes (native bits follow
#: JAX/XLA, its flags and the device; the reference follows mpmath and python-flint): the
#: environment a stored unit was measured in, part of its key.
ENVIRONMENT_FIELDS = ("collapse_sim", "jax", "jax_backend", "xla_flags", "numpy", "ml_dtypes", "mpmath",
                      "mpmath_backend", "python_flint")


def environment() -> dict:
    """:data:`ENVIRONMENT_FIELDS` of :func:`provenance`, and python-flint's version."""
    try:
        import flint
        flint_version = getattr(flint, "__version__", "unknown")
    except ImportError:
        flint_version = None
    p = {**provenance(), "python_flint": flint_version}
    return {k: p[k] for k in ENVIRONMENT_FIELDS}


# --- stored units of a long run (``collapse-sim reproduce``) ------------------------------------
class NotStored(Exception):
    """A unit that a reuse-only store (:attr:`UnitStore.reuse_only`) does not hold for these inputs."""


def _slug(unit: str) -> str:
    """A unit's name as a file name: runs of other characters than letters, digits and ``.+=-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", unit).strip("_")


class UnitStore:
    """The measured data of a long run, one file per unit under ``folder``, keyed by its inputs.

    :meth:`get` returns the stored data of a unit when the file holds the same inputs (its
    *key*: a JSON-able dict of everything that determines the data), else computes it and
    writes it atomically (:func:`write_atomic`) before returning it. A file that cannot be
    read, or holds other inputs, is never used: one progress line says so and the unit is
    computed again. The key holds the inputs and the ``environment`` the store is given
    (:func:`environment`: versions, JAX backend, XLA flags), so a unit measured under another
    JAX, device or flag set is measured again; it does not hold the code: after changing the
    code that measures a unit, ``fresh=True`` ignores what is stored.

    A unit file is ``<name>.npz`` (no pickles): the key and the data as JSON, the data's
    arrays (and numpy scalars, as 0-d arrays) beside them. Data may nest dicts (any JSON-able
    keys, tuples included), lists, tuples, str, int, float, bool, None, numpy arrays and
    scalars, and dataclasses of the ``types`` given.
    """

    def __init__(self, folder: "str | Path", types=(), *, fresh: bool = False, log=None,
                 environment: dict | None = None):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"{self.folder} (where a long run keeps its measured units) is an existing file; "
                              "remove it or choose another output folder")
        self.environment = environment or {}
        self.types = {t.__name__: t for t in types}
        self.fresh = fresh
        self.reuse_only = False  # True: a unit not stored raises NotStored instead of being computed
        self.log = log or (lambda m: print(m, flush=True))
        self._keys: dict[str, str] = {}  # file name -> key, in this process
        self.reused = self.computed = 0  # units served from their files / measured, in this process

    def path(self, unit: str) -> Path:
        return self.folder / f"{_slug(unit)}.npz"

    def _canon(self, key: dict) -> str:
        return json.dumps({**key, "environment": self.environment} if self.environment else key, sort_keys=True,
                          default=str)

    def will_measure(self, unit: str, key: dict) -> bool:
        """Whether :meth:`get` of ``unit`` with inputs ``key`` would call its ``compute``: not with
        :attr:`reuse_only` (it raises :class:`NotStored` instead), nor where the unit's file holds
        ``key`` and :attr:`fresh` does not ask for a new measurement. Reads the stored key only: a
        file whose data are damaged behind an intact key counts as stored here, and :meth:`get` then
        measures it again after all."""
        if self.reuse_only:
            return False
        path = self.path(unit)
        if self.fresh or not path.exists():
            return True
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                return str(z["key"][()]) != self._canon(key)
        except Exception:  # damaged: get measures it again
            return True

    def get(self, unit: str, key: dict, compute):
        canon = self._canon(key)
        path = self.path(unit)
        if self._keys.setdefault(path.name, canon) != canon:
            raise RuntimeError(f"two units of one run share the file {path.name}; name them apart")
        if path.exists() and not (self.fresh and not self.reuse_only):
            try:
                stored, data = self._read(path)
            except Exception as e:  # any damage: the unit is measured again, never half-read
                why = f"unreadable ({type(e).__name__})"
            else:
                if stored == canon:
                    self.log(f"{unit}: reused")
                    self.reused += 1
                    return data
                why = "stored for other inputs"
            self.log(f"{unit}: {path.name} is {why}; " + ("not used" if self.reuse_only else "recomputing"))
        if self.reuse_only:
            raise NotStored(unit)
        data = compute()
        self.computed += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays: list = []
        tree = json.dumps(self._encode(data, arrays), allow_nan=True)
        named = {f"a{i}": a for i, a in enumerate(arrays)}
        write_atomic(path, lambda fh: np.savez(fh, key=np.array(canon), data=np.array(tree), **named))
        return data

    def _read(self, path: Path):
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # closed even when np.load fails
            return str(z["key"][()]), self._decode(json.loads(str(z["data"][()])), z)

    def _encode(self, x, arrays: list):
        if isinstance(x, (np.ndarray, np.generic)):
            if x.dtype.hasobject:
                raise TypeError(f"cannot store an object array of shape {np.shape(x)}")
            arrays.append(np.asarray(x))
            return {"__a__": len(arrays) - 1, "scalar": isinstance(x, np.generic)}
        if x is None or type(x) in (bool, int, float, str):
            return x
        if isinstance(x, list):
            return [self._encode(v, arrays) for v in x]
        if isinstance(x, tuple):
            return {"__t__": [self._encode(v, arrays) for v in x]}
        if isinstance(x, dict):
            return {"__d__": [[self._encode(k, arrays), self._encode(v, arrays)] for k, v in x.items()]}
        name = type(x).__name__
        if dataclasses.is_dataclass(x) and self.types.get(name) is type(x):
            return {"__c__": name, "fields": {f.name: self._encode(getattr(x, f.name), arrays)
                                              for f in dataclasses.fields(x)}}
        raise TypeError(f"cannot store a {type(x).__qualname__}; give its class in UnitStore(types=...)")

    def _decode(self, t, z):
        if isinstance(t, list):
            return [self._decode(v, z) for v in t]
        if not isinstance(t, dict):
            return t
        if "__a__" in t:
            a = z[f"a{t['__a__']}"]
            return a[()] if t["scalar"] else a
        if "__t__" in t:
            return tuple(self._decode(v, z) for v in t["__t__"])
        if "__d__" in t:
            return {self._decode(k, z): self._decode(v, z) for k, v in t["__d__"]}
        cls = self.types[t["__c__"]]  # KeyError for a class this run does not store: unreadable
        return cls(**{k: self._decode(v, z) for k, v in t["fields"].items()})
