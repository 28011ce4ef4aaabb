"""Source steps: they make rows from seed files, `datasets` folders or Hub datasets."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from kdata.blocks import (
    DEFAULT_BLOCK_ROWS,
    BadRecord,
    batched,
    dataset_records,
    jsonl_records,
    table_records,
)
from kdata.errors import KdataError
from kdata.steps.base import (
    PROVENANCE,
    StepBase,
    StepContext,
    StepOutput,
    failure,
    provenance,
    row_id,
)

_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


class SeedsStep(StepBase):
    """Read seed rows from a file (jsonl, json, csv, parquet), a `datasets` folder, or a Hub id.

    Relative paths resolve against the recipe's folder. A line of a JSONL file that is not a JSON
    object is a failed row with its line number, not a silent skip.

    A source step over blocks: the rows in pass through, then the records read follow, read
    lazily (JSONL line by line, CSV and Parquet in chunks, `datasets` in slices; a ``.json``
    file is one document, parsed whole). CSV and Parquet values are typed by pandas chunk by
    chunk: an integer column with a null in a chunk reads as floats in that chunk only.
    """

    kind: ClassVar[str] = "source"
    type: Literal["seeds"] = "seeds"
    path: str
    limit: int | None = Field(default=None, ge=1)
    split: str = "train"

    def resolve(self, base_dir: Path) -> Path:
        """The seed path on disk."""
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else base_dir / p

    def inputs_digest(self, base_dir: Path) -> str:
        """A hash of the seed data, so editing the file invalidates the step."""
        p = self.resolve(base_dir)
        h = hashlib.sha256()
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(f.read_bytes())
        return h.hexdigest()

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        return n_rows + sum(1 for _ in self.records(base_dir)), 0

    def blocks(self, ctx: StepContext, block_rows: int) -> Iterator[StepOutput]:
        """The rows read, ``block_rows`` records (good or bad) per block, lazily."""
        for chunk in batched(enumerate(self.records(ctx.base_dir)), block_rows):
            out = StepOutput(rows=[], expected=len(chunk))
            for i, rec in chunk:
                if isinstance(rec, BadRecord):
                    out.failed.append(failure(None, "bad_seed", rec.error, raw=rec.raw))
                    continue
                rec = {k: v for k, v in rec.items() if k != PROVENANCE}
                blob = json.dumps(rec, sort_keys=True, default=str)
                key = row_id("seeds", self.path, str(i), blob)
                out.rows.append({**rec, PROVENANCE: provenance(key, [], ctx.name)})
            yield out

    def records(self, base_dir: Path) -> Iterator[dict | BadRecord]:
        """The records of the source, in order, read lazily; the first ``limit`` only."""
        it = self._records(base_dir)
        return itertools.islice(it, self.limit) if self.limit is not None else it

    def _records(self, base_dir: Path) -> Iterator[dict | BadRecord]:
        p = self.resolve(base_dir)
        if not p.exists():
            if "/" in self.path and not self.path.startswith((".", "/")) and p.suffix == "":
                import datasets

                ds = datasets.load_dataset(self.path, split=self.split)
                return dataset_records(ds, DEFAULT_BLOCK_ROWS)
            raise KdataError(f"seeds: no such file or folder: {p}")
        if p.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[self.split]
            return dataset_records(ds, DEFAULT_BLOCK_ROWS)
        fmt = _FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise KdataError(
                f"seeds: cannot tell the format of {p.name}; use one of {', '.join(_FORMATS)}"
            )
        if fmt == "jsonl":
            return jsonl_records(p)
        if fmt == "json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), [data])
            return iter(data)
        return table_records(p, fmt, DEFAULT_BLOCK_ROWS)
