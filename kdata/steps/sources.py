"""Source steps: they make rows from seed files, `datasets` folders or Hub datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

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
    """

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
        records, failed = self.read(base_dir)
        n = len(records) + len(failed)
        return n_rows + (min(n, self.limit) if self.limit else n), 0

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        records, failed = self.read(ctx.base_dir)
        if self.limit is not None:  # the first `limit` records of the file, good or bad
            records = [(i, r) for i, r in records if i < self.limit]
            failed = [f for f in failed if f["_index"] < self.limit]
        made = []
        for i, rec in records:
            rec = {k: v for k, v in rec.items() if k != PROVENANCE}
            key = row_id("seeds", self.path, str(i), json.dumps(rec, sort_keys=True, default=str))
            made.append({**rec, PROVENANCE: provenance(key, [], ctx.name)})
        for f in failed:
            f.pop("_index", None)
        ctx.advance(len(made) + len(failed))
        return StepOutput(
            rows=rows + made, expected=len(rows) + len(made) + len(failed), failed=failed
        )

    def read(self, base_dir: Path) -> tuple[list[tuple[int, dict]], list[dict]]:
        """(index, record) pairs of the good records, and failed-table entries for bad ones."""
        p = self.resolve(base_dir)
        if not p.exists():
            if "/" in self.path and not self.path.startswith((".", "/")) and p.suffix == "":
                return self._hub(), []
            raise KdataError(f"seeds: no such file or folder: {p}")
        if p.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[self.split]
            return list(enumerate(ds.to_list())), []
        fmt = _FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise KdataError(
                f"seeds: cannot tell the format of {p.name}; use one of {', '.join(_FORMATS)}"
            )
        if fmt == "jsonl":
            return _read_jsonl(p)
        if fmt == "json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), [data])
            return list(enumerate(data)), []
        import pandas as pd

        df = pd.read_csv(p) if fmt == "csv" else pd.read_parquet(p)
        return list(enumerate(df.to_dict(orient="records"))), []

    def _hub(self) -> list[tuple[int, dict]]:
        import datasets

        ds = datasets.load_dataset(self.path, split=self.split)
        return list(enumerate(ds.to_list()))


def _read_jsonl(p: Path) -> tuple[list[tuple[int, dict]], list[dict]]:
    good, bad = [], []
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(text for text in fh if text.strip()):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                good.append((i, rec))
            except ValueError as e:
                f = failure(None, "bad_seed", f"{p.name}: record {i + 1}: {e}", raw=line[:2000])
                f["_index"] = i
                bad.append(f)
    return good, bad
