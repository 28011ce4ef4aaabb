"""Blocks: how rows flow through a build, and how a step's parts sit on disk.

A *block* is an Arrow table of at most ``block_rows`` rows. A step's input is the rows of the
step before it, cut into blocks in order: block ``i`` holds the input rows ``i * block_rows``
to ``(i + 1) * block_rows - 1``, so its id follows from row ordinals and is the same on every
run. Sources are read lazily, block by block, and no step holds more than its blocks in flight.

A step folder holds one set of parts per block, each written to a temporary name and renamed::

    steps/<name>/rows/<block>.parquet      the rows the block kept or made
    steps/<name>/dropped/<block>.parquet   row id, reason, detail; the row itself (JSON) only
                                           when it is not a row of the step's input
    steps/<name>/failed/<block>.parquet    row id, error class, error, raw output, the row
    steps/<name>/blocks/<block>.json       the block's counts, written last: the block is done
    steps/<name>/stats.json                the step's stats, written after every block: done

Parts of one step may type a column differently (a column that is all null in one block): the
readers here unify them (`unify`), and a column whose types cannot be reconciled is an error
naming the step and the parts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdata.errors import KdataError
from kdata.steps.base import PROVENANCE

DEFAULT_BLOCK_ROWS = 10_000
KINDS = ("rows", "dropped", "failed")
FAILED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("error_class", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int64()),
        ("raw", pa.string()),
        ("row", pa.string()),
    ]
)
DROPPED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("row", pa.string()),
    ]
)
_SCHEMAS = {"dropped": DROPPED_SCHEMA, "failed": FAILED_SCHEMA}


@dataclass(frozen=True)
class Block:
    """Rows ``start`` to ``start + len(table) - 1`` of a step's input, as one Arrow table; or,
    outside a build, rows ``given`` as dicts (``table`` then empty)."""

    index: int
    start: int
    table: pa.Table
    given: list[dict] | None = None

    @property
    def id(self) -> str:
        """The block's name in its step folder: its index, zero-padded so names sort."""
        return block_id(self.index)

    def __len__(self) -> int:
        return self.table.num_rows if self.given is None else len(self.given)

    def rows(self, columns: list[str] | None = None) -> list[dict]:
        """The block's rows as plain dicts; ``columns`` only (``a``, or ``a.b`` of a struct)."""
        if self.given is not None:
            return self.given
        return (self.table if columns is None else project(self.table, columns)).to_pylist()

    def strings(self, name: str) -> list[str] | None:
        """Column ``name`` as a list, when it is a text column without nulls (else None): a
        step's fast path past the rows' dicts."""
        if self.given is not None or name not in self.table.column_names:
            return None
        col = self.table.column(name)
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            return None
        return col.to_pylist() if col.null_count == 0 else None

    def ids(self) -> pa.Array:
        """The rows' ids (``_kdata.id``)."""
        if self.given is not None:
            return pa.array([r[PROVENANCE]["id"] for r in self.given], pa.string())
        return self.table.column(PROVENANCE).combine_chunks().field("id")


def project(table: pa.Table, columns: list[str]) -> pa.Table:
    """``columns`` of ``table``: ``a``, or ``a.b`` for field ``b`` of struct column ``a``."""
    out: dict[str, Any] = {}
    for c in columns:
        name, _, sub = c.partition(".")
        if name not in table.column_names:
            continue
        if not sub:
            out[name] = table.column(name)
            continue
        col = table.column(name).combine_chunks()
        fields = out[name].field_names if name in out else []  # one struct, several fields
        arrays = [out[name].field(f) for f in fields] if fields else []
        out[name] = pa.StructArray.from_arrays([*arrays, col.field(sub)], [*fields, sub])
    return pa.table(out) if out else pa.table({"_": pa.nulls(table.num_rows)}).drop(["_"])


def block_id(index: int) -> str:
    """The name of block ``index``."""
    return f"{index:06d}"


def to_table(rows: list[dict], schema: pa.Schema | None = None) -> pa.Table:
    """Rows as a table: every key of every row is a column (absent keys are nulls).

    Raises:
        pa.ArrowInvalid, pa.ArrowTypeError: a column holds values of different types.
    """
    if schema is not None:
        return pa.Table.from_pylist(rows, schema=schema)
    keys = dict.fromkeys(k for r in rows for k in r)
    return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})


def write_parquet(path: Path, table: pa.Table) -> None:
    """Write ``table`` to ``path`` by way of a temporary file, so a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` by way of a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The JSON object at ``path``; None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_parts(folder: Path, block: str, tables: dict[str, Any], counts: dict) -> list[Path]:
    """Write one block's ``rows``, ``dropped`` and ``failed`` parts (lists of dicts, or Arrow
    tables), then its counts JSON; returns the files written, the counts last.

    Raises:
        KdataError: rows that Arrow cannot store (a column of mixed types), or a write that
            fails (disk full, a read-only folder), naming the step folder and the block.
    """
    written = []
    for kind in KINDS:
        try:
            table = tables[kind]
            if not isinstance(table, pa.Table):
                table = to_table(table, _SCHEMAS.get(kind))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise KdataError(
                f"step {folder.name}, block {block}: cannot store its {kind}: {e}; a column "
                "holds values of different types (make them one type in the step before)"
            ) from None
        try:
            written.append(folder / kind / f"{block}.parquet")
            write_parquet(written[-1], table)
        except OSError as e:
            raise KdataError(
                f"step {folder.name}, block {block}: cannot write its {kind}: {e}; "
                "free space or fix permissions and build again (finished blocks are kept)"
            ) from None
    written.append(folder / "blocks" / f"{block}.json")
    write_json(written[-1], counts)
    return written


def parts(folder: Path, kind: str = "rows") -> list[Path]:
    """A step's parts of one kind, in block order."""
    return sorted((folder / kind).glob("*.parquet"))


def unify(schemas: list[pa.Schema], where: str) -> pa.Schema:
    """One schema for parts typed differently (nulls and narrower numbers are promoted).

    Raises:
        KdataError: a column whose types cannot be reconciled, naming ``where``.
    """
    if not schemas:
        return pa.schema([])
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise KdataError(
            f"{where}: blocks type a column differently: {e}; make the column one type"
        ) from None


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in its order (absent ones null)."""
    if table.schema.equals(schema):
        return table
    empty = schema.empty_table()
    return pa.concat_tables([empty, table], promote_options="permissive").cast(schema)


def schema_of(folder: Path, kind: str = "rows") -> pa.Schema:
    """The unified schema of a step's parts of one kind (read from their footers only)."""
    return unify([pq.read_schema(p) for p in parts(folder, kind)], f"step {folder.name}")


def read_table(folder: Path, kind: str = "rows", columns: list[str] | None = None) -> pa.Table:
    """All parts of one kind of a step, as one table (small steps, tests and tools only)."""
    schema = schema_of(folder, kind)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
    tables = []
    for p in parts(folder, kind):
        has = None if columns is None else [c for c in columns if c in pq.read_schema(p).names]
        tables.append(conform(pq.read_table(p, columns=has), schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_dropped(folder: Path) -> list[dict]:
    """The dropped records of step ``folder``, each with its ``row`` as JSON: the record's own,
    else the row of that id in the step's input (the step before, per the run's manifest)."""
    run_dir, step = folder.parent.parent, folder.name
    names = [s["name"] for s in (read_json(run_dir / "manifest.json") or {}).get("steps", [])]
    records = read_table(folder, "dropped").to_pylist()
    want = {d["row_id"] for d in records if d["row"] is None}
    found: dict[str, str] = {}
    if want and step in names and names.index(step) > 0:
        source = run_dir / "steps" / names[names.index(step) - 1]
        for table in tables_of(parts(source)):
            ids = table.column(PROVENANCE).combine_chunks().field("id").to_pylist()
            for k in (k for k, i in enumerate(ids) if i in want):
                row = table.slice(k, 1).to_pylist()[0]
                found[ids[k]] = json.dumps(row, default=str, ensure_ascii=False)
    return [{**d, "row": d["row"] or found.get(d["row_id"])} for d in records]


def count_rows(folder: Path, kind: str = "rows") -> int:
    """How many rows a step's parts of one kind hold (from their footers)."""
    return sum(pq.read_metadata(p).num_rows for p in parts(folder, kind))


def tables_of(paths: Iterable[Path], columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The tables of Parquet files, one row group at a time; ``columns`` (``a`` or, of a
    struct, ``a.b``) only, those a file has."""
    for path in paths:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
        has = None if columns is None else [c for c in columns if c.split(".")[0] in names]
        for g in range(f.num_row_groups):
            yield f.read_row_group(g, columns=has)


def rechunk(tables: Iterable[pa.Table], block_rows: int) -> Iterator[Block]:
    """The rows of ``tables``, in order, cut into blocks of ``block_rows`` rows (the last fewer)."""
    buf: list[pa.Table] = []
    have = index = start = 0
    for t in tables:
        while t.num_rows:
            take = min(block_rows - have, t.num_rows)
            buf.append(t.slice(0, take))
            have, t = have + take, t.slice(take)
            if have == block_rows:
                yield Block(index, start, _concat(buf))
                buf, have, index, start = [], 0, index + 1, start + block_rows
    if have:
        yield Block(index, start, _concat(buf))


def _concat(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise KdataError(f"consecutive blocks type a column differently: {e}") from None


def input_blocks(
    folder: Path | None, block_rows: int, columns: list[str] | None = None
) -> Iterator[Block]:
    """A step's input: the rows parts of the step before (None: no step before), re-cut;
    ``columns`` only (see `tables_of`), when given."""
    if folder is None:
        return iter(())
    return rechunk(tables_of(parts(folder, "rows"), columns), block_rows)


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``n`` (the last shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class BadRecord:
    """A record of a source file that is not a JSON object: why, and its text."""

    error: str
    raw: str


def table_records(path: Path, fmt: str, chunk: int) -> Iterator[dict]:
    """The records of a CSV or Parquet file, ``chunk`` rows at a time, typed as pandas types
    them (a chunk's numbers: an integer column with a null in that chunk reads as floats)."""
    import pandas as pd

    if fmt == "csv":
        frames = pd.read_csv(path, chunksize=chunk)
    else:
        frames = (b.to_pandas() for b in pq.ParquetFile(path).iter_batches(batch_size=chunk))
    for df in frames:
        if fmt == "csv":  # an empty cell is null, not NaN
            df = df.astype(object).where(df.notna(), None)
        yield from df.to_dict(orient="records")


def dataset_records(ds: Any, chunk: int) -> Iterator[dict]:
    """The records of a `datasets.Dataset`, ``chunk`` rows at a time."""
    for start in range(0, len(ds), chunk):
        yield from ds.select(range(start, min(start + chunk, len(ds)))).to_list()


DATA_DIR = "data"
MAX_SHARD_BYTES = 500_000_000  # a shard of the final dataset holds about this much (in Arrow)


def dataset_files(run_dir: Path, split: str = "train") -> list[Path]:
    """The final dataset's shards, ``data/<split>-0000k-of-0000n.parquet``, in order."""
    return sorted((run_dir / DATA_DIR).glob(f"{split}-*-of-*.parquet"))


def read_dataset(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """The final dataset as one table (small runs, tests and tools)."""
    tables = [pq.read_table(p, columns=columns) for p in dataset_files(run_dir)]
    return pa.concat_tables(tables) if tables else pa.table({})


def write_dataset(folder: Path | None, data_dir: Path, split: str = "train") -> list[Path]:
    """Write the rows parts of step ``folder`` as the final dataset, sharded in the Hub's layout.

    Every shard has the parts' unified schema; a shard is closed past `MAX_SHARD_BYTES`. Shards
    of an earlier build that the new ones do not replace are removed.
    """
    schema = schema_of(folder) if folder is not None else pa.schema([])
    data_dir.mkdir(parents=True, exist_ok=True)
    tmps: list[Path] = []
    writer, size = None, 0
    try:
        for table in tables_of(parts(folder) if folder is not None else []):
            if writer is None or size >= MAX_SHARD_BYTES:
                if writer is not None:
                    writer.close()
                tmps.append(data_dir / f".{split}-{len(tmps):05d}.tmp")
                writer, size = pq.ParquetWriter(tmps[-1], schema), 0
            writer.write_table(conform(table, schema))
            size += table.nbytes
        if writer is None:
            tmps.append(data_dir / f".{split}-00000.tmp")
            pq.write_table(schema.empty_table(), tmps[-1])
    finally:
        if writer is not None:
            writer.close()
    n = len(tmps)
    shards = [data_dir / f"{split}-{k:05d}-of-{n:05d}.parquet" for k in range(n)]
    for tmp, shard in zip(tmps, shards, strict=True):
        os.replace(tmp, shard)
    for stale in set(data_dir.glob(f"{split}-*-of-*.parquet")) - set(shards):
        stale.unlink()
    return shards
