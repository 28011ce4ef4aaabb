"""Source steps: they make rows from seed files, `datasets` folders or Hub datasets."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr

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

    A Hub dataset (``path: owner/name``, when no such local path exists) is read at one commit:
    ``revision`` (a branch, tag or commit sha; default the main branch) resolved to its commit sha
    through the Hub's API when the build computes fingerprints. That sha is part of the step's
    fingerprint, so a dataset changed on the Hub is read again, and the rows are read at that very
    commit. A full 40-digit commit sha is used as it is, without asking the Hub: with it, a
    dataset in the local cache builds offline.
    """

    type: Literal["seeds"] = "seeds"
    path: str
    limit: int | None = Field(default=None, ge=1)
    split: str = "train"
    revision: str | None = Field(default=None, min_length=1)

    _commit: str | None = PrivateAttr(default=None)  # the Hub commit the fingerprint names

    def resolve(self, base_dir: Path) -> Path:
        """The seed path on disk."""
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else base_dir / p

    def on_hub(self, base_dir: Path) -> bool:
        """Whether ``path`` names a Hub dataset: ``owner/name`` and no such local path."""
        p = self.resolve(base_dir)
        hub_like = "/" in self.path and not self.path.startswith((".", "/")) and p.suffix == ""
        return hub_like and not p.exists()

    def hub_commit(self) -> str:
        """The commit sha of ``revision`` of the Hub dataset, asked of the Hub's API.

        Raises:
            KdataError: the Hub cannot be reached or does not know the dataset or revision.
        """
        if self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision):
            return self.revision
        from huggingface_hub import HfApi

        try:
            return HfApi().dataset_info(self.path, revision=self.revision).sha
        except Exception as e:  # offline, unreachable, unknown repository or revision, no access
            at = f" at revision '{self.revision}'" if self.revision else ""
            raise KdataError(
                f"seeds: cannot find the current commit of Hub dataset '{self.path}'{at}: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; check the id, the "
                "network and HF_TOKEN, or set revision: to a commit sha to build from the "
                "local cache without the Hub"
            ) from None

    def inputs_digest(self, base_dir: Path) -> str:
        """A hash of the seed data, so editing the file invalidates the step; a Hub dataset's
        commit sha, resolved here and read by `run`."""
        if self.on_hub(base_dir):
            self._commit = self.hub_commit()
            return f"hub:{self._commit}"
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
        if self.on_hub(base_dir):
            return self._hub(), []
        if not p.exists():
            raise KdataError(f"seeds: no such file or folder: {p}")
        if self.revision is not None:
            raise KdataError(
                f"seeds: revision '{self.revision}' is set, but {p} is a local path; "
                "revision applies to Hub datasets only"
            )
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

        commit = self._commit or self.hub_commit()
        ds = datasets.load_dataset(self.path, split=self.split, revision=commit)
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
