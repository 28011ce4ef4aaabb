"""Source steps: they make rows from seed files, `datasets` folders or Hub datasets."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, PrivateAttr

from kdata.blocks import DEFAULT_BLOCK_ROWS, BadRecord, batched, dataset_records, table_records
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
_CHECKED = 10_000  # records whose column types `check_inputs` compares before a build
_BLOB = json.JSONEncoder(sort_keys=True, default=str).encode  # a record as its id hashes it


class SeedsStep(StepBase):
    """Read seed rows from a file (jsonl, json, csv, parquet), a `datasets` folder, or a Hub id.

    Relative paths resolve against the recipe's folder. A bad record fails as ``bad_seed`` with
    its place (JSONL line, JSON record number) and the other records are read on: a JSONL line
    that is not UTF-8 or not a JSON object, a record holding a lone surrogate (``"\\ud800"``). A
    JSON or CSV file that is not UTF-8 is refused with the line of its first bad byte.

    A source step over blocks: the rows in pass through, then the records read follow, read
    lazily (JSONL line by line, CSV and Parquet in chunks, `datasets` in slices; a ``.json``
    file is one document, parsed whole). CSV and Parquet values are typed by pandas chunk by
    chunk: an integer column with a null in a chunk reads as floats in that chunk only.

    A Hub dataset (``path: owner/name``, when no such local path exists) is read at one commit:
    ``revision`` (a branch, tag or commit sha; default the main branch) resolved to its commit sha
    through the Hub's API when the build computes fingerprints. That sha is part of the step's
    fingerprint, so a dataset changed on the Hub is read again, and the rows are read at that very
    commit. A full 40-digit commit sha is used as it is, without asking the Hub. The dataset is
    streamed (``datasets``' ``streaming=True``): records are read as the blocks need them, and
    with ``limit`` no more than that is fetched. ``config`` names its configuration (subset),
    ``split`` its split.
    """

    kind: ClassVar[str] = "source"
    type: Literal["seeds"] = "seeds"
    path: str
    limit: int | None = Field(default=None, ge=1)
    split: str = "train"
    config: str | None = None  # a Hub dataset's configuration (subset)
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
        return n_rows + sum(1 for _ in self.records(base_dir)), 0

    def check_inputs(self, base_dir: Path) -> None:
        """Stop a build before it writes anything when the seed file is missing, of an unknown
        format, a JSON or CSV file that is not UTF-8, or when its first records mix types in a
        column (a later block that does is an error naming the step and block).

        `datasets` folders and Hub datasets are typed by Arrow; the build reads them.
        """
        p = self.resolve(base_dir)
        if p.is_dir() or self.on_hub(base_dir):
            return
        first = itertools.islice(self.records(base_dir), _CHECKED)
        _check_types([(i, r) for i, r in enumerate(first) if not isinstance(r, BadRecord)], p.name)

    def blocks(self, ctx: StepContext, block_rows: int) -> Iterator[StepOutput]:
        """The rows read, ``block_rows`` records (good or bad) per block, lazily."""
        for chunk in batched(enumerate(self.records(ctx.base_dir)), block_rows):
            out = StepOutput(rows=[], expected=len(chunk))
            for i, rec in chunk:
                if isinstance(rec, BadRecord):
                    out.failed.append(failure(None, "bad_seed", rec.error, raw=rec.raw))
                    continue
                rec = {k: v for k, v in rec.items() if k != PROVENANCE}
                blob = _BLOB(rec)
                key = row_id("seeds", self.path, str(i), blob)
                out.rows.append({**rec, PROVENANCE: provenance(key, [], ctx.name)})
            yield out

    def records(self, base_dir: Path) -> Iterator[dict | BadRecord]:
        """The records of the source, in order, read lazily; the first ``limit`` only (good or
        bad)."""
        it = self._records(base_dir)
        return itertools.islice(it, self.limit) if self.limit is not None else it

    def _records(self, base_dir: Path) -> Iterator[dict | BadRecord]:
        p = self.resolve(base_dir)
        if self.on_hub(base_dir):
            import datasets

            commit = self._commit or self.hub_commit()
            ds = datasets.load_dataset(
                self.path, self.config, split=self.split, revision=commit, streaming=True
            )
            return iter(ds)
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
            return dataset_records(ds, DEFAULT_BLOCK_ROWS)
        fmt = _FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise KdataError(
                f"seeds: cannot tell the format of {p.name}; use one of {', '.join(_FORMATS)}"
            )
        if fmt == "jsonl":
            return _jsonl_records(p)
        if fmt == "json":
            return _json_records(p)
        if fmt == "csv":
            _check_utf8(p)
        return table_records(p, fmt, DEFAULT_BLOCK_ROWS)


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


def _jsonl_records(p: Path) -> Iterator[dict | BadRecord]:
    """Each non-blank line is a record; a line that is not UTF-8 or not a usable JSON object
    is a `BadRecord` naming its line, and the other lines are read on."""
    with p.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
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
                    problem = _problem(rec, b"\\u" in raw)
            if problem is None:
                yield rec
            else:
                yield BadRecord(f"{p.name} line {n}: {problem}", text.rstrip("\r\n")[:2000])


def _json_records(p: Path) -> Iterator[dict | BadRecord]:
    """A JSON list of records (or an object holding one), parsed whole; a bad record is a
    `BadRecord` naming its number."""
    try:
        data = json.loads(_utf8(p))
    except json.JSONDecodeError as e:
        raise KdataError(f"seeds: {p}:{e.lineno}: not valid JSON: {e.msg}") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    for i, rec in enumerate(data):
        problem = _problem(rec, True)
        if problem is None:
            yield rec
        else:
            yield BadRecord(f"{p.name} record {i + 1}: {problem}", json.dumps(rec)[:2000])


def _problem(rec: object, escapes: bool) -> str | None:
    """Why a parsed JSON value cannot be a seed row, or None when it can (``escapes``: its text
    holds ``\\u`` escapes, the only way JSON spells a lone surrogate)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not escapes:
        return None
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 file can store
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ascii(e.object[e.start : e.end])
        return f"{bad} is not valid Unicode (a lone surrogate); remove it or give its pair"
    return None


def _utf8(p: Path) -> str:
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


def _check_utf8(p: Path) -> None:
    """Refuse a file that is not UTF-8, naming the line of its first bad byte (read line by
    line, so a large file is not held in memory)."""
    with p.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KdataError(
                    f"seeds: {p}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as "
                    "UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
