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

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

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
