"""`push`: publish a finished run to the Hugging Face Hub in one commit, or in none.

The run's Hub-layout folder is written to ``RUN_DIR/hub`` (the one ``--dry-run`` leaves for
inspection), compared with the files at the repository's head (sha256 for LFS files, the git
blob id for the others), and whatever differs goes up in a single ``HfApi.create_commit`` with
``parent_commit`` set to that head: a concurrent change makes the commit fail instead of being
overwritten, and a failed upload leaves the repository as it was. When nothing differs, no
commit is made.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdata.errors import KdataError
from kdata.publish.folder import MANAGED, publish_config, read_manifest, write_folder

STAGING = "hub"  # RUN_DIR/hub: the folder a push uploads
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class PushResult:
    """What a push did.

    Attributes:
        repo_id: the dataset repository.
        folder: the folder that was (or, with ``dry_run``, would be) pushed.
        files: its files, relative to it.
        commit: the new commit's id; None when nothing changed, or on a dry run.
        head: the repository's head after the push (None on a dry run).
        uploaded: files added or changed by the commit.
        deleted: stale files the commit removed.
        url: the commit's URL, when one was made.
    """

    repo_id: str
    folder: Path
    files: list[str]
    commit: str | None = None
    head: str | None = None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    url: str | None = None


def push(
    run_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    private: bool | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Publish a finished run as a dataset repository.

    Args:
        run_dir: a run directory whose build is complete.
        repo_id: ``USER/NAME`` (default: the recipe's ``publish.repo_id``).
        private: create the repository private (default: ``publish.private``); an existing
            repository keeps its visibility.
        dry_run: write the folder to ``RUN_DIR/hub`` and stop; no token, no network.
        endpoint: the Hub's URL (default: ``HF_ENDPOINT`` or https://huggingface.co).

    Returns:
        What was pushed.

    Raises:
        KdataError: no repository named, no token or a refused one, an unfinished run, a
            repository that changed during the push, or a failed upload (the repository is
            then unchanged, and running the same push again is safe).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    cfg = publish_config(manifest)
    repo_id = repo_id or cfg.repo_id
    if not repo_id:
        raise KdataError("no repository named: pass --repo USER/NAME or set publish.repo_id")
    if not _REPO_ID.match(repo_id):
        raise KdataError(f"repository '{repo_id}' is not of the form USER/NAME")
    folder = run_dir / STAGING
    files = write_folder(run_dir, folder, cfg=cfg, repo_id=repo_id)
    result = PushResult(repo_id=repo_id, folder=folder, files=files)
    if dry_run:
        return result

    from huggingface_hub import (
        CommitOperationAdd,
        CommitOperationDelete,
        HfApi,
        RepoFile,
        get_token,
        is_offline_mode,
    )

    hub_errors = _hub_errors()
    if is_offline_mode():
        raise KdataError("HF_HUB_OFFLINE is set: unset it to push (or use --dry-run)")
    token = get_token()
    if not token:
        raise KdataError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write "
            "access); it is read from there only and never written anywhere"
        )
    _refuse_secret(folder, files, token)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.whoami()
        # An existing repository is not created again: a token may write to it without the
        # right to create repositories (the Hub answers 403 to create_repo then).
        if not api.repo_exists(repo_id, repo_type="dataset"):
            api.create_repo(
                repo_id,
                repo_type="dataset",
                private=cfg.private if private is None else private,
                exist_ok=True,
            )
        head = api.dataset_info(repo_id).sha
        remote = {
            f.path: f
            for f in api.list_repo_tree(repo_id, repo_type="dataset", revision=head, recursive=True)
            if isinstance(f, RepoFile)
        }
    except hub_errors as e:
        if getattr(getattr(e, "response", None), "status_code", None) == 401:
            raise KdataError(
                "the Hub refused the token (HTTP 401): set HF_TOKEN to a valid token with write "
                "access, or run `hf auth login`"
            ) from e
        raise KdataError(f"cannot push to {repo_id}: {_explain(e)}; nothing was committed") from e
    result.head = head
    result.uploaded = [p for p in files if not _same(folder / p, remote.get(p))]
    result.deleted = sorted(p for p in remote if p.startswith(MANAGED) and p not in files)
    if not result.uploaded and not result.deleted:
        return result
    ops = [CommitOperationAdd(p, str(folder / p)) for p in result.uploaded]
    ops += [CommitOperationDelete(p) for p in result.deleted]
    message = cfg.commit_message or (
        f"kdata: {manifest['recipe']['name']}, {len(result.uploaded)} files updated, "
        f"{len(result.deleted)} removed"
    )
    try:
        info = api.create_commit(
            repo_id, ops, repo_type="dataset", commit_message=message, parent_commit=head
        )
    except (*hub_errors, RuntimeError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 412:
            raise KdataError(
                f"{repo_id} changed while pushing (its head is no longer {head[:12]}): nothing "
                "was committed and nothing was overwritten; look at the new commits, then run "
                "the push again"
            ) from e
        state = _state(api, repo_id, head)
        raise KdataError(f"push to {repo_id} failed: {_explain(e)}; {state}") from e
    result.commit = result.head = info.oid
    result.url = info.commit_url
    return result


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a Hub call can raise for a refused or failed request.

    huggingface_hub's own errors, the transport errors of its HTTP library (httpx in 1.x,
    httpx2 in 2.x: whichever is installed), and the ``ValueError``s and ``OSError``s it raises
    for answers it cannot use (``HfUriError`` from an unexpected repository URL, for one).
    """
    import contextlib
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, ValueError, OSError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(name).HTTPError)
    return tuple(errors)


def _same(local: Path, remote) -> bool:
    """Whether a remote file (a ``RepoFile`` or None) holds the bytes of ``local``."""
    if remote is None or remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        with local.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == remote.lfs.sha256
    from huggingface_hub.utils import sha

    return sha.git_hash(local.read_bytes()) == remote.blob_id


def _refuse_secret(folder: Path, files: list[str], token: str) -> None:
    needle = token.encode()
    for p in files:
        with (folder / p).open("rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                found = m.find(needle) != -1
        if found:
            raise KdataError(
                f"the Hugging Face token appears in {p}: refusing to push it; remove it from "
                "the recipe or data and rebuild"
            )


def _explain(e: BaseException) -> str:
    """An error and its causes, one line (an LFS failure wraps the HTTP error)."""
    parts = []
    while e is not None and len(parts) < 3:
        parts.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        e = e.__cause__
    return ": ".join(parts)


def _state(api, repo_id: str, head: str) -> str:
    try:
        now = api.dataset_info(repo_id).sha
    except Exception:
        return (
            "the Hub could not be asked whether anything changed; run the same push again "
            "(it commits only what differs)"
        )
    if now == head:
        return (
            f"no commit was made and the repository is unchanged (head {head[:12]}); "
            "run the same push again"
        )
    return (
        f"the repository's head moved from {head[:12]} to {now[:12]}; check it, then run the "
        "same push again (it commits only what still differs)"
    )
