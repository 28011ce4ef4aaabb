"""The request cache: every teacher response, stored whole and durably the moment it arrives.

A response is stored as the provider sent it (`kdata.teachers.response` reads it, in every
format the cache has held), so a new parser never needs a new request.

Keyed by a hash of what is sent (model, messages, generation parameters, response schema and the
sample index), never the API key or endpoint. SQLite in WAL mode: a response committed here
survives ``kill -9``, so a rerun pays for nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any


def request_key(model: str, messages: list[dict], params: dict[str, Any], sample: int) -> str:
    """The cache key of a request: sha256 of its canonical JSON."""
    body = {"model": model, "messages": messages, "params": params, "sample": sample}
    blob = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class RequestCache:
    """A SQLite table of responses, one row per request key."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against process death
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY, teacher TEXT, model TEXT, request TEXT, response TEXT,"
            " cost_usd REAL, created REAL)"
        )

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored response for a key, or None."""
        row = self._db.execute("SELECT response FROM responses WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(
        self, key: str, teacher: str, model: str, request: dict, response: dict, cost_usd: float
    ) -> None:
        """Store a response (committed before this returns)."""
        self._db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?)",
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
