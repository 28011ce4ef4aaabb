"""A loopback stand-in for the Hugging Face Hub's HTTP API, for tests of `kdata push`.

This is a fake, written to the contract of the installed ``huggingface_hub`` client: the
requests that its ``HfApi`` sends and the response fields it reads (``hf_api.py``,
``_commit_api.py``, ``lfs.py``, ``file_download.py``, ``utils/_http.py``), with Xet disabled on
the client so uploads take the LFS path. It is not a copy of the Hub and knows only dataset
repositories, the ``main`` branch and commit ids as revisions. Served, on 127.0.0.1:

=======================================================  ==============  =====================
request                                                  stage           client method
=======================================================  ==============  =====================
``GET  /api/whoami-v2``                                  ``whoami``      ``whoami``
``POST /api/repos/create``                               ``create_repo`` ``create_repo``
``POST /api/validate-yaml``                              ``validate``    ``create_commit``
``GET  /api/datasets/NS/NAME[/revision/REV]``            ``info``        ``dataset_info``
``GET  /api/datasets/NS/NAME/tree/REV[/PATH]``           ``tree``        ``list_repo_tree``
``POST /api/datasets/NS/NAME/preupload/REV``             ``preupload``   ``create_commit``
``POST /datasets/NS/NAME.git/info/lfs/objects/batch``    ``lfs_batch``   ``create_commit``
``PUT  /lfs-upload/OID`` (the batch answer's href)       ``lfs_upload``  ``create_commit``
``POST /datasets/NS/NAME.git/info/lfs/objects/verify``   ``lfs_verify``  ``create_commit``
``POST /api/datasets/NS/NAME/commit/REV`` (NDJSON)       ``commit``      ``create_commit``
``HEAD|GET /datasets/NS/NAME/resolve/REV/PATH``          ``resolve``     ``hf_hub_download``
=======================================================  ==============  =====================

As on the Hub, a new repository starts with one commit holding a ``.gitattributes`` (a subset
of the Hub's default one), which decides with the file size (10 MiB) whether ``preupload``
answers ``lfs`` or ``regular``; LFS objects are uploaded before the commit that points at them,
and a commit is applied whole or not at all. A commit whose ``parentCommit`` is not the head
is refused with 412, a commit pointing at an LFS object never uploaded with 422.
``validate-yaml`` checks the card's front matter against the vocabularies ``datasets`` ships
(size categories, languages) and ``datasets``' own ``configs`` parser: a subset of the Hub's
checks.

Fault injection: ``fail(stage, status, times)`` answers the next ``times`` requests of a stage
with ``status``; ``on(stage, fn)`` runs ``fn()`` once before the next request of a stage is
handled (to commit "as someone else" between a client's read and its commit, say). Every
request is logged as ``(stage, method, path, status)``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
    for ext in ["arrow", "bin", "gz", "parquet", "pkl", "pt", "safetensors", "zip", "png", "jpg"]
)
_NS = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES: list[tuple[str, str, re.Pattern]] = [
    (m, stage, re.compile(rx))
    for m, stage, rx in [
        ("GET", "whoami", r"^/api/whoami-v2$"),
        ("POST", "create_repo", r"^/api/repos/create$"),
        ("POST", "validate", r"^/api/validate-yaml$"),
        ("GET", "info", rf"^/api/datasets/{_NS}(/revision/(?P<rev>[^/]+))?$"),
        ("GET", "tree", rf"^/api/datasets/{_NS}/tree/(?P<rev>[^/]+)(/(?P<path>.+))?$"),
        ("POST", "preupload", rf"^/api/datasets/{_NS}/preupload/(?P<rev>[^/]+)$"),
        ("POST", "lfs_batch", rf"^/datasets/{_NS}\.git/info/lfs/objects/batch$"),
        ("PUT", "lfs_upload", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"),
        ("POST", "lfs_verify", rf"^/datasets/{_NS}\.git/info/lfs/objects/verify$"),
        ("POST", "commit", rf"^/api/datasets/{_NS}/commit/(?P<rev>[^/]+)$"),
        ("GET", "resolve", rf"^/datasets/{_NS}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
        ("HEAD", "resolve", rf"^/datasets/{_NS}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
    ]
]


def git_blob_id(data: bytes) -> str:
    """Git's object id of a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A file in a commit: its bytes, and whether it is stored through LFS."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {len(self.data)}\n"
        ).encode()

    @property
    def oid(self) -> str:
        """The git blob id (of the LFS pointer, for an LFS file), as the tree API gives it."""
        return git_blob_id(self.pointer if self.lfs else self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, Blob]


@dataclass
class Repo:
    id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, rev: str) -> Commit | None:
        rev = unquote(rev)
        if rev == "main":
            return self.head
        return next((c for c in self.commits if c.oid == rev), None)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubStandIn:
    """The fake Hub: ``with HubStandIn(token=..., user=...) as hub: HfApi(endpoint=hub.url)``."""

    def __init__(self, *, token: str, user: str = "alice") -> None:
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS storage, by sha256
        self.log: list[tuple[str, str, str, int]] = []
        self._faults: dict[str, list[int]] = {}
        self._hooks: dict[str, Callable[[], None]] = {}
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # --- test controls -------------------------------------------------------------------

    def fail(self, stage: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests of ``stage`` with ``status``."""
        self._faults.setdefault(stage, []).extend([status] * times)

    def on(self, stage: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` once, before the next request of ``stage`` is handled."""
        self._hooks[stage] = fn

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files at a repository's head."""
        return {p: b.data for p, b in self.repos[repo_id].head.files.items()}

    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits)

    def commit_as_someone_else(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Commit ``files`` on top of the head, as another client would."""
        with self._lock:
            repo = self.repos[repo_id]
            snap = dict(repo.head.files)
            snap.update({p: Blob(d, self._is_lfs(repo, p, len(d))) for p, d in files.items()})
            return self._new_commit(repo, "someone else's change", snap).oid

    def stages(self) -> list[str]:
        return [s for s, *_ in self.log]

    # --- the API -------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers, body: bytes):
        """Route a request; return (status, headers, body bytes)."""
        url = urlsplit(target)
        routes = ((stage, rx.match(url.path)) for m, stage, rx in ROUTES if m == method)
        stage, match = next(((s, mt) for s, mt in routes if mt), (None, None))
        if match is None:
            return 404, {}, _json({"error": f"no route for {method} {url.path}"})
        args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        hook = self._hooks.pop(stage, None)
        if hook:
            hook()
        with self._lock:
            faults = self._faults.get(stage)
            status = faults.pop(0) if faults else None
        try:
            if status is not None:
                raise HubError(status, f"injected fault: {stage} answers {status}")
            if stage != "lfs_upload":  # presigned upload URLs carry no token
                self._auth(headers)
            with self._lock:
                out = getattr(self, f"_{stage}")(method=method, body=body, query=query, **args)
        except HubError as e:
            out = _error(e)
        self.log.append((stage, method, url.path, out[0]))
        return out

    def _auth(self, headers) -> None:
        if headers.get("authorization") != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo: str) -> Repo:
        if repo not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo]

    def _rev(self, repo: Repo, rev: str) -> Commit:
        commit = repo.at(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _is_lfs(self, repo: Repo, path: str, size: int) -> bool:
        attrs = repo.head.files.get(".gitattributes")
        patterns = [
            line.split()[0]
            for line in (attrs.data.decode() if attrs else "").splitlines()
            if "filter=lfs" in line
        ]
        name = path.rsplit("/", 1)[-1]
        return size >= LFS_THRESHOLD or any(fnmatch.fnmatch(name, p) for p in patterns)

    def _new_commit(self, repo: Repo, summary: str, files: dict[str, Blob]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else None
        blob = json.dumps([parent, summary, sorted((p, b.oid) for p, b in files.items())])
        commit = Commit(hashlib.sha1(blob.encode()).hexdigest(), parent, summary, files)
        repo.commits.append(commit)
        return commit

    def _whoami(self, **_) -> tuple:
        return 200, {}, _json({"type": "user", "name": self.user, "orgs": []})

    def _create_repo(self, body: bytes, **_) -> tuple:
        req = json.loads(body)
        if req.get("type") != "dataset":
            raise HubError(400, "this stand-in only knows dataset repositories")
        ns = req.get("organization") or self.user
        if ns != self.user:
            raise HubError(403, f"You don't have the rights to create a dataset under {ns}")
        repo_id = f"{ns}/{req['name']}"
        url = f"{self.url}/datasets/{repo_id}"
        if repo_id in self.repos:
            return 409, {}, _json({"error": "You already created this dataset repo", "url": url})
        repo = self.repos[repo_id] = Repo(repo_id, req.get("visibility") == "private")
        self._new_commit(
            repo, "initial commit", {".gitattributes": Blob(GITATTRIBUTES.encode(), False)}
        )
        return 200, {}, _json({"url": url, "name": repo_id, "id": repo_id})

    def _validate(self, body: bytes, **_) -> tuple:
        content = json.loads(body)["content"]
        errors = [{"message": m} for m in card_metadata_errors(content)]
        return (400 if errors else 200), {}, _json({"errors": errors, "warnings": []})

    def _info(self, repo: str, rev: str = "main", **_) -> tuple:
        r = self._repo(repo)
        c = self._rev(r, rev)
        return (
            200,
            {},
            _json(
                {
                    "id": r.id,
                    "author": r.id.split("/")[0],
                    "sha": c.oid,
                    "private": r.private,
                    "siblings": [{"rfilename": p} for p in sorted(c.files)],
                    "tags": [],
                }
            ),
        )

    def _tree(self, repo: str, rev: str, query: dict, path: str = "", **_) -> tuple:
        c = self._rev(self._repo(repo), rev)
        recursive = query.get("recursive", "false").lower() == "true"
        prefix = f"{path.strip('/')}/" if path else ""
        entries: dict[str, dict] = {}
        for p, b in sorted(c.files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for i in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:i])
                if recursive or i == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": b.oid, "size": len(b.data)}
                if b.lfs:
                    entry["lfs"] = {
                        "oid": b.sha256,
                        "size": len(b.data),
                        "pointerSize": len(b.pointer),
                    }
                entries[p] = entry
        if path and not entries:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        return 200, {}, _json([{**e, "path": p} for p, e in entries.items()])

    def _preupload(self, repo: str, rev: str, body: bytes, **_) -> tuple:
        r = self._repo(repo)
        c = self._rev(r, rev)
        files = []
        for f in json.loads(body)["files"]:
            lfs = self._is_lfs(r, f["path"], f["size"])
            have = c.files.get(f["path"])
            oid = None
            if have is not None:
                oid = have.sha256 if have.lfs else git_blob_id(have.data)
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return 200, {}, _json({"files": files, "commitOid": c.oid})

    def _lfs_batch(self, repo: str, body: bytes, **_) -> tuple:
        self._repo(repo)
        req = json.loads(body)
        if req.get("operation") != "upload" or "basic" not in req.get("transfers", []):
            raise HubError(400, "only basic uploads are served")
        objects = []
        for o in req["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"},
                    "verify": {"href": f"{self.url}/datasets/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return 200, {}, _json({"transfer": "basic", "objects": objects})

    def _lfs_upload(self, oid: str, body: bytes, **_) -> tuple:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded bytes do not match the object id")
        self.objects[oid] = body
        return 200, {}, b""

    def _lfs_verify(self, repo: str, body: bytes, **_) -> tuple:
        self._repo(repo)
        req = json.loads(body)
        data = self.objects.get(req["oid"])
        if data is None or len(data) != req["size"]:
            raise HubError(404, f"object {req['oid']} was not uploaded")
        return 200, {}, _json({"success": True})

    def _commit(self, repo: str, rev: str, body: bytes, **_) -> tuple:
        r = self._repo(repo)
        if unquote(rev) != "main":
            raise HubError(400, "this stand-in commits to main only")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and not r.head.oid.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        snap = dict(r.head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                data = base64.b64decode(value["content"])
                snap[path] = Blob(data, False)
            elif key == "lfsFile":
                if value["oid"] not in self.objects:
                    raise HubError(
                        422,
                        "Your push was rejected because an LFS pointer pointed to a file "
                        f"that does not exist: {path}",
                    )
                snap[path] = Blob(self.objects[value["oid"]], True)
            elif key == "deletedFile":
                if snap.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}")
            elif key == "deletedFolder":
                snap = {p: b for p, b in snap.items() if not p.startswith(path.rstrip("/") + "/")}
            else:
                raise HubError(400, f"unknown commit operation {key}")
        c = self._new_commit(r, header["summary"], snap)
        url = f"{self.url}/datasets/{repo}/commit/{c.oid}"
        return 200, {}, _json({"success": True, "commitOid": c.oid, "commitUrl": url})

    def _resolve(self, repo: str, rev: str, path: str, method: str, **_) -> tuple:
        r = self._repo(repo)
        c = self._rev(r, rev)
        blob = c.files.get(path)
        if blob is None:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        headers = {"X-Repo-Commit": c.oid, "ETag": f'"{blob.oid}"'}
        if blob.lfs:
            headers.update(
                {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))}
            )
        return 200, headers, blob.data


def card_metadata_errors(readme: str) -> list[str]:
    """What is wrong with a README's front matter, by the vocabularies ``datasets`` ships."""
    from importlib.resources import files

    from datasets.utils.metadata import MetadataConfigs

    match = re.match(r"^---\n(.*?)\n---\n", readme, flags=re.S)
    if not match:
        return ["the README has no YAML front matter"]
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        return [f"the front matter is not YAML: {e}"]
    if not isinstance(meta, dict):
        return ["the front matter is not a mapping"]
    resources = files("datasets.utils").joinpath("resources")
    sizes = json.loads(resources.joinpath("size_categories.json").read_text())
    languages = json.loads(resources.joinpath("languages.json").read_text())
    errors = [
        f"unknown size category {s}" for s in meta.get("size_categories", []) if s not in sizes
    ]
    errors += [f"unknown language {x}" for x in meta.get("language", []) if x not in languages]
    if not isinstance(meta.get("license", ""), str):
        errors.append("license must be a string")
    if not all(isinstance(t, str) for t in meta.get("tags", [])):
        errors.append("tags must be strings")
    try:
        MetadataConfigs.from_dataset_card_data(meta)
    except ValueError as e:
        errors.append(f"configs: {e}")
    return errors


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _error(e: HubError) -> tuple:
    headers = {"X-Error-Message": e.message}
    if e.code:
        headers["X-Error-Code"] = e.code
    return e.status, headers, _json({"error": e.message})


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _serve(self) -> None:
            body = b"" if self.command in ("GET", "HEAD") else self._body()
            status, headers, data = hub.handle(self.command, self.path, self.headers, body)
            self.send_response(status)
            headers = {"Content-Type": "application/json", **headers}
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_POST = do_PUT = _serve

    return Handler
