"""Source steps: they make rows from seed files, `datasets` folders or Hub datasets."""

from __future__ import annotations

import hashlib
import io
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

    Relative paths resolve against the recipe's folder. A bad record fails as ``bad_seed`` with
    its place (JSONL line, JSON record number) and the other records are read on: a JSONL line
    that is not UTF-8 or not a JSON object, a record holding a lone surrogate (``"\\ud800"``). A
    JSON or CSV file that is not UTF-8 is refused with the line of its first bad byte.

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
        return n_rows + len(records) + len(failed), 0

    def check_inputs(self, base_dir: Path) -> None:
        """Read a seed file through, so that a missing path, an unknown format, a JSON or CSV file
        that is not UTF-8, or a column of mixed types stops a build before it writes anything.

        `datasets` folders and Hub datasets are typed by Arrow; the build reads them.
        """
        p = self.resolve(base_dir)
        if not (p.is_dir() or self.on_hub(base_dir)):
            self.read(base_dir)

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        records, failed = self.read(ctx.base_dir)
        made = []
        for i, rec in records:
            rec = {k: v for k, v in rec.items() if k != PROVENANCE}
            key = row_id("seeds", self.path, str(i), json.dumps(rec, sort_keys=True, default=str))
            made.append({**rec, PROVENANCE: provenance(key, [], ctx.name)})
        ctx.advance(len(made) + len(failed))
        return StepOutput(
            rows=rows + made, expected=len(rows) + len(made) + len(failed), failed=failed
        )

    def read(self, base_dir: Path) -> tuple[list[tuple[int, dict]], list[dict]]:
        """Of the first ``limit`` records (all without a limit), good or bad: (index, record)
        pairs of the good ones and failed-table entries for the bad ones.

        Raises:
            KdataError: no such path, an unknown format, a file that cannot be read, or a column
                whose values Arrow cannot store together (the first such record is named).
        """
        p = self.resolve(base_dir)
        if self.on_hub(base_dir):
            records, failed = self._hub()
        elif self.revision is not None:
            raise KdataError(
                f"seeds: revision '{self.revision}' is set, but {p} is a local path; "
                "revision applies to Hub datasets only"
            )
        else:
            records, failed = _read_path(p, self.split)
        if self.limit is not None:  # the first `limit` records of the file, good or bad
            records = [(i, r) for i, r in records if i < self.limit]
            failed = [f for f in failed if f["_index"] < self.limit]
        for f in failed:
            f.pop("_index")
        _check_types(records, p.name)
        return records, failed

    def _hub(self) -> tuple[list[tuple[int, dict]], list[dict]]:
        import datasets

        commit = self._commit or self.hub_commit()
        ds = datasets.load_dataset(self.path, split=self.split, revision=commit)
        return list(enumerate(ds.to_list())), []


def _read_path(p: Path, split: str) -> tuple[list[tuple[int, dict]], list[dict]]:
    """(index, record) pairs and failed-table entries (with ``_index``) of a local seed path."""
    if not p.exists():
        raise KdataError(f"seeds: no such file or folder: {p}")
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        return list(enumerate(ds.to_list())), []
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise KdataError(
            f"seeds: cannot tell the format of {p.name}; use one of {', '.join(_FORMATS)}"
        )
    if fmt == "jsonl":
        return _read_jsonl(p)
    if fmt == "json":
        return _read_json(p)
    import pandas as pd

    if fmt == "csv":
        df = pd.read_csv(io.StringIO(_text(p)))
        df = df.astype(object).where(df.notna(), None)  # an empty cell is null, not NaN
    else:
        df = pd.read_parquet(p)
    return list(enumerate(df.to_dict(orient="records"))), []


def _check_types(records: list[tuple[int, dict]], source: str) -> None:
    """Refuse a column whose values Arrow cannot store in one Parquet column, naming the first
    record that disagrees with the ones before it (ints and floats mix; ints and strings do not).
    """
    import pyarrow as pa

    for key in dict.fromkeys(k for _, r in records for k in r):
        values = [r.get(key) for _, r in records]
        try:
            pa.array(values)
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
        lo, hi = 1, len(values)  # the shortest prefix Arrow refuses ends at the culprit
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                pa.array(values[:mid])
                lo = mid + 1
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                hi = mid
        n, value = records[lo - 1][0] + 1, values[lo - 1]
        try:
            got = f"{pa.array([value]).type} in record {n}"
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise KdataError(
                f"seeds: {source}: column '{key}' holds a value that mixes types inside it in "
                f"record {n} ({e}); give its parts one type"
            ) from None
        raise KdataError(
            f"seeds: {source}: column '{key}' holds {got} but {pa.array(values[: lo - 1]).type} "
            "in the records before it; give the column one type in every record (e.g. quote "
            "numbers to make them all strings)"
        )


def _read_jsonl(p: Path) -> tuple[list[tuple[int, dict]], list[dict]]:
    """Each non-blank line is a record; a line that is not UTF-8 or not a usable JSON object
    fails as ``bad_seed`` with its line number, and the other lines are read on."""
    good, bad = [], []
    with p.open("rb") as fh:
        lines = ((n, raw) for n, raw in enumerate(fh, 1) if raw.strip())
        for i, (n, raw) in enumerate(lines):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", "backslashreplace")
                problem = f"not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
            else:
                try:
                    rec = json.loads(text)
                except ValueError as e:
                    problem = str(e)
                else:
                    problem = _problem(rec)
            if problem is None:
                good.append((i, rec))
            else:
                f = failure(
                    None,
                    "bad_seed",
                    f"{p.name} line {n}: {problem}",
                    raw=text.rstrip("\r\n")[:2000],
                )
                f["_index"] = i
                bad.append(f)
    return good, bad


def _read_json(p: Path) -> tuple[list[tuple[int, dict]], list[dict]]:
    """A JSON list of records (or an object holding one); a bad record fails as ``bad_seed``."""
    try:
        data = json.loads(_text(p))
    except json.JSONDecodeError as e:
        raise KdataError(f"seeds: {p}:{e.lineno}: not valid JSON: {e.msg}") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    good, bad = [], []
    for i, rec in enumerate(data):
        problem = _problem(rec)
        if problem is None:
            good.append((i, rec))
        else:
            f = failure(
                None, "bad_seed", f"{p.name} record {i + 1}: {problem}", raw=json.dumps(rec)[:2000]
            )
            f["_index"] = i
            bad.append(f)
    return good, bad


def _problem(rec: object) -> str | None:
    """Why a parsed JSON value cannot be a seed row, or None when it can."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 file can store
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ascii(e.object[e.start : e.end])
        return f"{bad} is not valid Unicode (a lone surrogate); remove it or give its pair"
    return None


def _text(p: Path) -> str:
    """The file's text; a file that is not UTF-8 is refused with the line of its first bad byte."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise KdataError(
            f"seeds: {p}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None
