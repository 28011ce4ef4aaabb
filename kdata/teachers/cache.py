"""The request cache: every teacher response, stored whole and durably the moment it arrives.

A response is stored as the provider sent it (`kdata.teachers.response` reads it, in every
format the cache has held), so a new parser never needs a new request.

Keyed by a hash of what is sent (model, messages, generation parameters, response schema and the
sample index), never the API key or endpoint. SQLite in WAL mode: a response committed here
survives ``kill -9``, so a rerun pays for nothing twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from kdata.errors import CacheError


def request_key(model: str, messages: list[dict], params: dict[str, Any], sample: int) -> str:
    """The cache key of a request: sha256 of its canonical JSON."""
    body = {"model": model, "messages": messages, "params": params, "sample": sample}
    blob = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


SALVAGE_GAP = 10_000  # unreadable rowids in a row after which salvaging a damaged file stops
_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}  # primary result codes
_COLUMNS = "key, teacher, model, request, response, cost_usd, created"


class RequestCache:
    """A SQLite table of responses, one row per request key.

    Opening checks the file (``PRAGMA integrity_check``, and that every stored response is JSON).
    A damaged file is moved aside as ``<name>.damaged-<time>`` with its ``-wal``, the responses
    still readable in it are copied into a new file, and `damage` says so: the runner stops the
    build there, so that nothing lost is bought again unannounced.

    Each `put` checks that the path still names the file opened. When it does not (the file was
    deleted or replaced during the build), the responses held through the open connection are
    written back to the path (beside it when another file is there now), and `check` raises.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.damage: str | None = None  # what opening found and did, when the file was damaged
        self.vanished: str | None = None  # what happened, once the file vanished during the build
        try:
            self._open()
            problem = self._db.execute("PRAGMA integrity_check(1)").fetchone()[0]
            if problem == "ok":
                bad = self._db.execute(
                    "SELECT COUNT(*) FROM responses WHERE NOT json_valid(response)"
                ).fetchone()[0]
                problem = f"{bad} stored responses are not JSON" if bad else "ok"
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF not in _DAMAGED:
                raise CacheError(f"cannot open {self.path}: {e}") from None
            problem = str(e)
        if problem != "ok":
            self.damage = self._quarantine(problem)

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against process death
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY, teacher TEXT, model TEXT, request TEXT, response TEXT,"
            " cost_usd REAL, created REAL)"
        )
        st = os.stat(self.path)
        self._file = (st.st_dev, st.st_ino)

    def _quarantine(self, problem: str) -> str:
        """Move the damaged file aside and copy what is readable in it into a new one."""
        with contextlib.suppress(AttributeError, sqlite3.Error):
            self._db.close()
        aside = self.path.with_name(f"{self.path.name}.damaged-{_stamp()}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        rows = _salvage(aside)
        self._open()
        self._db.execute("BEGIN")
        self._db.executemany(
            f"INSERT OR REPLACE INTO responses ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)", rows
        )
        self._db.execute("COMMIT")
        return (
            f"{self.path} is damaged ({problem}): it was moved to {aside.name}, and the "
            f"{len(rows)} responses still readable in it were copied into a new {self.path.name}"
        )

    def check(self) -> None:
        """Raise `CacheError` if the file vanished during the build (its responses are kept)."""
        self._watch()
        if self.vanished:
            raise CacheError(self.vanished)

    def _watch(self) -> None:
        if self.vanished:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._file:
                return
        self.vanished = self._rescue()

    def _rescue(self) -> str:
        """Write what the open connection holds (the vanished file) back, and reopen it there."""
        gone = self.path
        gone.parent.mkdir(parents=True, exist_ok=True)
        tmp = gone.with_name(f"{gone.name}.rescue-tmp")
        dst = sqlite3.connect(tmp)
        self._db.backup(dst)
        dst.close()
        self._db.close()
        if gone.exists():
            self.path = gone.with_name(f"{gone.name}.rescued-{_stamp()}")
            where = f"saved in {self.path}, since another file is at {gone} now"
            todo = f"move the one to keep to {gone} (with no {gone.name}-wal beside it) and "
        else:
            for suffix in ("-wal", "-shm"):  # the vanished file's: a new file would read them
                Path(f"{gone}{suffix}").unlink(missing_ok=True)
            where, todo = f"written back to {gone}", ""
        os.replace(tmp, self.path)
        self._open()
        return (
            f"{gone} vanished during the build (deleted or replaced); the {len(self)} responses "
            f"it held, every one received until now, were {where}; {todo}run the same command "
            "to resume"
        )

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored response for a key, or None."""
        row = self._db.execute("SELECT response FROM responses WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(
        self, key: str, teacher: str, model: str, request: dict, response: dict, cost_usd: float
    ) -> None:
        """Store a response (committed before this returns), then check the file is still there."""
        self._db.execute(
            f"INSERT OR REPLACE INTO responses ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
            (
                key,
                teacher,
                model,
                json.dumps(request, ensure_ascii=False),
                json.dumps(response, ensure_ascii=False),
                cost_usd,
                time.time(),
            ),
        )
        self._watch()

    def absorb(self, other: Path) -> int:
        """Copy the responses of the store ``other`` that this one lacks, then delete ``other``
        (a Ray worker's store, `kdata.executors.ray_workers`). Returns how many were new."""
        before = len(self)
        self._db.execute("ATTACH DATABASE ? AS other", (str(other),))
        try:
            self._db.execute(
                f"INSERT OR IGNORE INTO responses ({_COLUMNS}) "
                f"SELECT {_COLUMNS} FROM other.responses"
            )
        finally:
            self._db.execute("DETACH DATABASE other")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{other}{suffix}").unlink(missing_ok=True)
        self._watch()
        return len(self) - before

    def total_cost(self) -> float:
        """USD paid for every stored response."""
        return self._db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM responses").fetchone()[0]

    def totals_by_teacher(self) -> dict[str, dict[str, float]]:
        """Responses, tokens and USD per teacher over everything stored, every run included."""
        rows = self._db.execute(
            "SELECT teacher, COUNT(*),"
            " SUM(COALESCE(json_extract(response, '$.response.usage.prompt_tokens'),"
            "  json_extract(response, '$.usage.prompt_tokens'))),"
            " SUM(COALESCE(json_extract(response, '$.response.usage.completion_tokens'),"
            "  json_extract(response, '$.usage.completion_tokens'))), SUM(cost_usd)"
            " FROM responses GROUP BY teacher"
        ).fetchall()
        return {
            t: {
                "responses": n,
                "prompt_tokens": p or 0,
                "completion_tokens": c or 0,
                "cost_usd": cost or 0.0,
            }
            for t, n, p, c, cost in rows
        }

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


def _salvage(path: Path) -> list[tuple]:
    """The rows of a damaged cache file that can still be read and hold JSON, by rowid."""
    rows: list[tuple] = []
    try:
        db = sqlite3.connect(path)
        db.execute("PRAGMA writable_schema=ON")  # read a truncated file up to where it ends
        db.execute("SELECT rootpage FROM sqlite_master WHERE name='responses'").fetchone()
    except sqlite3.DatabaseError:
        return rows  # not even the schema is readable
    last, misses = 0, 0
    while misses < SALVAGE_GAP:
        try:
            for rowid, *row in db.execute(
                f"SELECT rowid, {_COLUMNS} FROM responses WHERE rowid > ? ORDER BY rowid", (last,)
            ):
                if rowid <= last:  # a damaged b-tree can lead back to rows already read
                    raise sqlite3.DatabaseError("rowids out of order")
                last, misses = rowid, 0
                if _is_json(row[3]) and _is_json(row[4]):  # request, response
                    rows.append(tuple(row))
            break
        except sqlite3.DatabaseError:  # the page holding rowid last + 1 is unreadable: skip it
            last, misses = last + 1, misses + 1
    db.close()
    return rows


def _is_json(text: Any) -> bool:
    try:
        json.loads(text)
    except (TypeError, ValueError):
        return False
    return True
