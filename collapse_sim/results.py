"""Result tables: one Parquet file per sweep cell, written atomically, loaded as one table.

A cell's file is ``DIR/cells/<key>.parquet`` where ``key`` is a hash of the cell's
parameters; it is written to a temporary name in the same folder and renamed, so a
killed run leaves either the whole file or none. The cell's provenance (versions,
backend, flags, seed, config) is stored as JSON in the file's schema metadata.
``load_table(DIR)`` concatenates every cell, sorted by cell key and n, into one
pandas DataFrame (tidy: one row per cell × n).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cell_key(params: dict) -> str:
    """A stable 16-hex-digit key for a cell's parameters (a JSON-able dict)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_path(out: "str | Path", key: str) -> Path:
    return Path(out) / "cells" / f"{key}.parquet"


def write_cell(out: "str | Path", key: str, frame, provenance: dict) -> Path:
    """Write one cell atomically (temporary file, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = cell_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"collapse_sim.provenance"] = json.dumps(provenance, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


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
