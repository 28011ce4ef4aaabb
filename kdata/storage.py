"""A run directory at an fsspec URL (``s3://bucket/runs/x``, ``gs://…``, ``file:///…``).

A build works in a local copy of it, the *stage* (``$KDATA_STAGE``, default
``~/.cache/kdata/stage``, then a folder per URL), so the SQLite cache, the lock and the
write-then-rename parts keep their POSIX guarantees; the URL is kept up to date from it:

- at the start, `Remote.pull` brings the stage to what the URL holds. The responses stay a union:
  the stage's ``cache.sqlite`` is kept, and the URL's (and its segments) are absorbed into it;
  the batch journal and the embedding store of the stage are kept too.
- after each block, its parts go up with a *segment* of the responses stored since the block
  before (``cache/seg-<host>-<pid>-<n>.sqlite``, `Segments`), so a lost machine loses at
  most the blocks in flight, and no paid-for response the blocks before received; the batch
  journal goes up each time it is written (a batch submitted is never submitted again);
- after each step, its folder is mirrored (files gone from the stage go from the URL);
- at the end, everything: the cache whole (its segments then removed), the manifest, the
  dataset, the report.

The URL's ``lock`` names the build writing to it; a second build refuses to start while it is
there (object stores have no ``flock``: a build that died leaves it, to be deleted by hand).
Credentials are fsspec's own (the provider's environment variables or config files); kdata
writes none of them anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kdata.errors import KdataError, RunLocked

STAGE_ENV = "KDATA_STAGE"
LOCK = "lock"
KEPT = ("cache.sqlite", "cache/", "batches/", "embeddings/")  # the stage's own stay: unions
SKIPPED = ("tmp/", LOCK)  # a step's scratch files and the local lock never go up
LIVE = ("cache.sqlite",)  # sent as a `snapshot`, not as the file in use


def is_url(where: str | os.PathLike | None) -> bool:
    """Whether ``where`` names a run directory by URL (``scheme://…``) rather than a path."""
    return isinstance(where, str) and "://" in where


def _under(rel: str, prefixes: tuple[str, ...]) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes)


def _sends(rel: str) -> bool:
    """Whether `Remote.sync` sends a file of the stage: not scratch, not a SQLite journal."""
    return not _under(rel, SKIPPED + LIVE) and not rel.endswith(("-wal", "-shm"))


class Remote:
    """The run directory at ``url`` and its stage on this machine (see the module doc)."""

    def __init__(self, url: str, stage_root: str | os.PathLike | None = None) -> None:
        try:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing
            raise KdataError(f"run directory {url}: {e}") from None
        self.url = url.rstrip("/")
        self.root = root.rstrip("/")
        base = stage_root or os.environ.get(STAGE_ENV) or Path.home() / ".cache/kdata/stage"
        self.local = Path(base) / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self._local_fs = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self._sent = threading.Lock()  # blocks finish in the executor's threads
        self._known: dict[str, tuple[int, int]] = {}  # stage files as the URL has them

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _listing(self, rel: str = "") -> dict[str, int]:
        """Every file under ``rel`` at the URL, relative to the run directory, and its size."""
        top = self._remote(rel) if rel else self.root
        if not self.fs.exists(top):
            return {}
        found = self.fs.find(top, detail=True)
        n = len(self.root) + 1
        return {p[n:]: int(info.get("size") or 0) for p, info in found.items()}

    def _files(self, rel: str = "") -> Iterator[str]:
        top = self.local / rel if rel else self.local
        if top.is_file():
            yield rel
            return
        for p in top.rglob("*") if top.is_dir() else ():
            if p.is_file() and not p.name.startswith("."):  # not a half-written temporary
                yield p.relative_to(self.local).as_posix()

    def pull(self) -> None:
        """Bring the stage to what the URL holds (the responses, batch journal and embeddings
        of the stage are kept: see the module doc). Remote responses land in ``cache/`` as
        stores for the build to absorb; the URL's ``cache.sqlite`` not when the last build at
        the URL was this stage's (its manifest is the stage's): the stage's cache holds it."""
        there = self._listing()
        for rel, size in there.items():
            if _under(rel, SKIPPED):
                continue
            dest = self.local / rel
            if rel == "cache.sqlite" and dest.exists():
                if self._last_build_was_here():
                    continue
                dest = self.local / "cache" / f"pulled-{time.time_ns()}.sqlite"  # absorbed
            elif dest.exists() and (_under(rel, KEPT) or dest.stat().st_size == size):
                self._known[rel] = _stat(dest)
                continue
            self._get(rel, dest)
            self._known[rel] = _stat(dest)
        for rel in list(self._files()):
            if rel not in there and not _under(rel, KEPT + SKIPPED):
                (self.local / rel).unlink()  # finished here but never sent: it is made again

    def _last_build_was_here(self) -> bool:
        mine = self.local / "manifest.json"
        try:
            return mine.read_bytes() == self.fs.cat_file(self._remote("manifest.json"))
        except OSError:  # FileNotFoundError included: no manifest on one side
            return False

    def _get(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.get-{os.getpid()}-{threading.get_ident()}")
        self.fs.get_file(self._remote(rel), str(tmp))
        os.replace(tmp, dest)

    def pull_stores(self, names: Iterable[str] = ()) -> list[Path]:
        """Fetch the URL's response stores (its ``cache.sqlite`` and the segments under
        ``cache/``) that the stage lacks, but for ``names`` and this process's own segments;
        returns the paths fetched."""
        got, mine = [], f"seg-{socket.gethostname()}-{os.getpid()}-"
        for rel, size in self._listing("cache").items():
            dest, name = self.local / rel, Path(rel).name
            if name in names or name.startswith(mine):
                continue
            if dest.exists() and dest.stat().st_size == size:
                continue
            self._get(rel, dest)
            got.append(dest)
        whole = self.local / "cache.sqlite"
        if not whole.exists() and self.fs.exists(self._remote("cache.sqlite")):
            self._get("cache.sqlite", whole)
            got.append(whole)
        return got

    def begin(self, cache_path: Path) -> None:
        """Send the responses stored in ``cache_path`` from now on with each block."""
        self._cache, self._segments = cache_path, Segments(self.local, cache_path)

    def send_new(self, store: Path, segments: Segments) -> None:
        """Send the responses ``store`` got since ``segments`` last took from it, as a segment
        (removed from the stage once sent: its responses are in ``store``)."""
        with self._sent:
            segment = segments.take(store)
            if segment is not None:
                self._put(self.local / segment, segment)
                (self.local / segment).unlink()

    def send_responses(self) -> None:
        """Send the responses the run's cache got since they were last sent."""
        self.send_new(self._cache, self._segments)

    def block(self, paths: list[Path]) -> None:
        """Send the responses stored since the block before, then a block's files (its counts
        last: a block the URL counts finished has its responses there)."""
        self.send_responses()
        with self._sent:
            for p in paths:
                self._put(p, p.relative_to(self.local).as_posix())

    def send(self, path: Path) -> None:
        """Send the folder of a file of the stage now: the batch journal as it is written, with
        the requests files it names."""
        self.sync(path.parent.relative_to(self.local).as_posix())

    def forget(self, names: Iterable[str]) -> None:
        """Delete these segments from the URL's ``cache/`` (their responses are in another)."""
        with self._sent:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._remote(f"cache/{name}"))

    def finish(self, cache_path: Path) -> None:
        """Send everything: the cache whole, then the rest (the segments go once it is there)."""
        if cache_path.exists():
            whole = self.local / ".cache.sqlite.snapshot"
            snapshot(cache_path, whole)
            with self._sent:
                self._put(whole, "cache.sqlite")
            whole.unlink()
        self.sync()

    def _put(self, path: Path, rel: str) -> None:
        dest = self._remote(rel)
        try:
            if self._local_fs:  # a filesystem: by way of a temporary name, as the stage's own
                tmp = f"{dest}.put-{os.getpid()}"
                self.fs.makedirs(self.fs._parent(dest), exist_ok=True)
                self.fs.put_file(str(path), tmp)
                self.fs.mv(tmp, dest)
            else:  # an object store: an upload is whole or absent
                self.fs.put_file(str(path), dest)
            self._known[rel] = _stat(path)
        except OSError as e:
            raise KdataError(
                f"cannot send {rel} to {self.url}: {e}; the stage {self.local} keeps it, and the "
                "next build sends it"
            ) from None

    def sync(self, rel: str = "") -> None:
        """Make the URL's ``rel`` (default: everything) what the stage's is: send the files
        changed since they were last sent or pulled, delete those the stage no longer has."""
        with self._sent:
            there = self._listing(rel)
            here = {r for r in self._files(rel) if _sends(r)}
            for r in sorted(here):
                now = _stat(self.local / r)
                if there.get(r) != now[0] or self._known.get(r) != now:
                    self._put(self.local / r, r)
            for r in sorted(set(there) - here):
                if not _under(r, (LOCK, *LIVE)):  # tmp/ too: what workers sent for a step
                    self.fs.rm_file(self._remote(r))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the URL's ``lock`` for the ``with`` block.

        Raises:
            RunLocked: another build's lock is there.
        """
        lock = self._remote(LOCK)
        if self.fs.exists(lock):
            try:
                held = json.loads(self.fs.cat_file(lock))
            except (OSError, ValueError):
                held = {}
            if not _gone(held):
                raise RunLocked(
                    f"{self.url} is in use by another build (pid {held.get('pid')} on "
                    f"{held.get('host')}, since {held.get('started_at')}); wait for it to "
                    f"finish, or, if that build is gone, delete {self.url}/{LOCK}"
                )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(lock, json.dumps(me).encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                self.fs.rm_file(lock)


def local_copy(where: str | os.PathLike) -> tuple[Path, Remote | None]:
    """The run directory ``where`` on this machine, for the commands that read one (and its
    `Remote`, None for a path): a path as it is, a URL's stage brought to what the URL holds.

    Raises:
        RunLocked: a build on this machine is writing the stage.
    """
    if not is_url(where):
        return Path(where), None
    from kdata.lock import hold

    r = Remote(str(where))
    with hold(r.local, lambda text: None):
        r.pull()
    return r.local, r


@cache
def remote(url: str) -> Remote:
    """The `Remote` of ``url`` in this process, with this machine's stage."""
    return Remote(url)


@dataclass(frozen=True)
class Files:
    """How a process of a Ray cluster reaches the run directory's files: at their path on the
    driver's machine when there is no URL (a path every node sees), else in its own machine's
    stage, where what it reads is fetched from the URL first."""

    stage: str  # the run directory as the driver has it (its stage, when there is a URL)
    url: str | None = None

    def here(self) -> Path:
        """The run directory as this process has it."""
        return Path(self.stage) if self.url is None else remote(self.url).local

    def read(self, path: str) -> Path:
        """The driver's file ``path`` on this machine, fetched from the URL if need be."""
        if self.url is None:
            return Path(path)
        rel = Path(path).relative_to(self.stage).as_posix()
        r = remote(self.url)
        mine = r.local / rel
        if not mine.exists():
            r._get(rel, mine)
        return mine

    def mine(self, path: str | os.PathLike) -> Path:
        """Where this process writes the driver's file ``path``: there, or, with a URL, at
        the same place in its own machine's stage (then `sent`)."""
        if self.url is None:
            return Path(path)
        return remote(self.url).local / Path(path).relative_to(self.stage)

    def sent(self, path: Path) -> None:
        """``path``, written by `mine`, sent to the URL for the driver to `read` when this
        process's stage is not the driver's (and removed here: it was scratch)."""
        if self.url is None or remote(self.url).local == Path(self.stage):
            return
        r = remote(self.url)
        with r._sent:
            r._put(path, path.relative_to(r.local).as_posix())
        path.unlink()

    def send(self, store: Path, segments: Segments) -> None:
        """Send the responses ``store`` got since the last call to the URL (none without one)."""
        if self.url is not None:
            remote(self.url).send_new(store, segments)


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _gone(held: dict) -> bool:
    """Whether the build that left a lock was one of this machine's, and has ended."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return held["pid"] == os.getpid()  # not: another process with that pid runs


class Segments:
    """Responses sent to the URL as they come: `take` writes those a store got since the last
    call into a new store of their own, ``cache/seg-<host>-<pid>-<n>.sqlite`` in ``stage``."""

    def __init__(self, stage: Path, sent: Path | None = None) -> None:
        self.stage = stage
        self.after = {} if sent is None else {sent: _last_rowid(sent)}  # the URL has those
        self.n = 0

    def take(self, store: Path) -> str | None:
        """The new segment's path relative to the stage (None: nothing new)."""
        rel = f"cache/seg-{socket.gethostname()}-{os.getpid()}-{self.n}.sqlite"
        self.after[store], wrote = export_responses(
            store, self.stage / rel, self.after.get(store, 0)
        )
        if not wrote:
            return None
        self.n += 1
        return rel


def _last_rowid(cache_path: Path) -> int:
    if not cache_path.exists():
        return 0
    db = sqlite3.connect(cache_path)
    try:
        return db.execute("SELECT COALESCE(MAX(rowid), 0) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:  # no table yet
        return 0
    finally:
        db.close()


def export_responses(cache_path: Path, dest: Path, after: int) -> tuple[int, int]:
    """Copy the responses of ``cache_path`` with rowid > ``after`` into a new store ``dest``.

    Returns the last rowid copied (``after`` when none) and how many were copied; a store of
    none is not written.
    """
    if _last_rowid(cache_path) <= after:  # the common case of a step asking no teacher
        return after, 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("ATTACH DATABASE ? AS src", (str(cache_path),))
        db.execute("BEGIN")  # one snapshot of the store for what follows
        schema = db.execute(
            "SELECT sql FROM src.sqlite_master WHERE type='table' AND name='responses'"
        ).fetchone()
        if schema is None:
            db.execute("ROLLBACK")
            return after, 0
        last = db.execute("SELECT COALESCE(MAX(rowid), 0) FROM src.responses").fetchone()[0]
        db.execute(schema[0])  # created in main, the first database
        db.execute(
            "INSERT INTO main.responses SELECT * FROM src.responses WHERE rowid > ? AND rowid <= ?",
            (after, last),
        )
        n = db.execute("SELECT COUNT(*) FROM main.responses").fetchone()[0]
        db.execute("COMMIT")
    finally:
        db.close()
    if n:
        os.replace(tmp, dest)
    else:
        tmp.unlink()
    return max(int(last), after), n


def snapshot(cache_path: Path, dest: Path) -> None:
    """A consistent copy of the SQLite store ``cache_path`` at ``dest`` (its WAL folded in)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    src, out = sqlite3.connect(cache_path), sqlite3.connect(dest)
    try:
        src.backup(out)
    finally:
        out.close()
        src.close()
