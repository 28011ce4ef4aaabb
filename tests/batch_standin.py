"""A loopback stand-in for OpenAI's Batch API and Anthropic's Message Batches API, for tests.

A fake written to the two protocols' contracts, not a copy of any server:

- OpenAI: ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}/content``,
  ``POST /v1/batches``, ``GET /v1/batches`` (a page, newest first), ``GET /v1/batches/{id}``,
  ``POST /v1/batches/{id}/cancel``; statuses ``validating``, ``in_progress``, ``finalizing``,
  then ``completed``, ``expired``, ``failed`` or ``cancelled`` (``cancelling`` between), with
  ``request_counts``, an output file of the answered requests and an error file of the others.
- OpenAI online: ``POST /v1/chat/completions`` answered at once, for the fallback of the
  requests a batch did not answer (bodies kept in `BatchStandIn.online`).
- Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``,
  ``POST /v1/messages/batches/{id}/cancel``, ``GET /v1/messages/batches/{id}/results`` (JSON
  lines, results of type ``succeeded``, ``errored``, ``canceled`` or ``expired``), with
  ``processing_status`` ``in_progress``, ``canceling`` and ``ended``.

A batch's state follows its age on ``time.monotonic`` (`Config`): validating for the first fifth
of ``complete_after_s``, in progress until it, finalizing at the first check after, and then it
ends. The answers are those of tests/openai_standin.py (`expected_answer` of the last user
message, its prompt-token count), so the rows are the same as online. Every create is counted
(`BatchStandIn.creates`), with the custom ids it held, so tests can tell whether a batch was
submitted twice. It runs in a thread of its own (`BatchStandIn`, a context manager) on
127.0.0.1, on a free port, or in a process of its own (``python tests/batch_standin.py``, which
prints ``PORT <n>``, and on SIGTERM a JSON line of what it served).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from openai_standin import count_prompt_tokens, expected_answer, last_user_message


@dataclass
class Config:
    """What the stand-in does; fields may be changed while it runs.

    Attributes:
        complete_after_s: age at which a batch has run every request.
        expire: ``expire(ordinal) -> bool``: the batch created ``ordinal``-th (from 0) expires
            instead, having answered the first ``expire_answered`` of its requests.
        expire_answered: fraction of an expiring batch's requests answered before it expired.
        fail: ``fail(ordinal) -> bool``: the batch fails validation (no request is run).
        cancel: ``cancel(ordinal) -> bool``: its owner cancels the batch (from the provider's
            console) once it is created; no request is run.
        error: ``error(custom_id, body) -> HTTP status | None``: a request answered with an
            error of that status (partial errors).
        completion_tokens: completion tokens of each answer, capped by ``max_tokens``.
        api_key: the key a request must carry (``Authorization: Bearer`` or ``x-api-key``).
        lost_creates: how many creates make their batch and then answer 500, as when the
            answer to a create is lost on its way.
        after_create: ``after_create(config)``, called after each create (to revoke the key...).
        answer_create_after_s: seconds between making a batch and answering its create (a
            client killed in between made a batch it never heard of).
        throttled: how many of the next requests are answered 429 with ``Retry-After:
            retry_after_s``.
    """

    complete_after_s: float = 0.2
    expire: Callable[[int], bool] = lambda ordinal: False
    expire_answered: float = 0.5
    fail: Callable[[int], bool] = lambda ordinal: False
    cancel: Callable[[int], bool] = lambda ordinal: False
    error: Callable[[str, dict], int | None] = lambda custom_id, body: None
    completion_tokens: int = 12
    api_key: str | None = None
    lost_creates: int = 0
    after_create: Callable[[Config], None] | None = None
    answer_create_after_s: float = 0.0
    throttled: int = 0
    retry_after_s: float = 1.0


@dataclass
class Batch:
    """One batch as the stand-in holds it."""

    id: str
    kind: str  # openai | anthropic
    ordinal: int
    requests: list[dict]  # OpenAI: lines of the input file; Anthropic: {custom_id, params}
    created: float
    input_file_id: str | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))
    cancelled_at: float | None = None
    finalizing: bool = False
    ended: str | None = None  # OpenAI's final status, or "ended"
    ended_at: float | None = None  # time.monotonic() when it ended
    output: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None


def _answer(body: dict, cfg: Config, anthropic: bool) -> dict:
    """A chat completion (or an Anthropic message) for a request body."""
    text = expected_answer(last_user_message(body))
    prompt = count_prompt_tokens(body) + (
        len(str(body.get("system", "")).split()) if anthropic else 0
    )
    completion = min(cfg.completion_tokens, body.get("max_tokens") or cfg.completion_tokens)
    if anthropic:
        return {
            "id": "msg_" + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": completion},
        }
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


class _State:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, Batch] = {}
        self.creates: list[Batch] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.arrivals: list[float] = []  # time.monotonic() of each, in the same order
        self.online: list[dict] = []  # bodies of POST /v1/chat/completions (online calls)

    def advance(self, b: Batch) -> None:
        """Bring a batch to the state its age says (under the lock)."""
        if b.ended:
            return
        cfg, age = self.config, time.monotonic() - b.created
        if b.cancelled_at is not None:
            self._end(b, "cancelled", answered=0)
        elif cfg.fail(b.ordinal) and age >= cfg.complete_after_s * 0.2:
            b.ended, b.ended_at = "failed", time.monotonic()
        elif age >= cfg.complete_after_s:
            if not b.finalizing:  # one check sees it finalizing
                b.finalizing = True
            elif cfg.expire(b.ordinal):
                self._end(b, "expired", answered=int(len(b.requests) * cfg.expire_answered))
            else:
                self._end(b, "completed", answered=len(b.requests))

    def _end(self, b: Batch, status: str, answered: int) -> None:
        anthropic = b.kind == "anthropic"
        for i, req in enumerate(b.requests):
            cid = req["custom_id"]
            body = req["params"] if anthropic else req["body"]
            code = self.config.error(cid, body) if i < answered else None
            if i >= answered:
                b.errors.append({"custom_id": cid, "why": status})
            elif code is not None:
                b.errors.append({"custom_id": cid, "status": code})
            else:
                b.output.append({"custom_id": cid, "answer": _answer(body, self.config, anthropic)})
        b.ended, b.ended_at = ("ended" if anthropic else status), time.monotonic()
        if not anthropic:
            b.output_file_id = self._file(
                [
                    {
                        "id": "batch_req_" + uuid.uuid4().hex[:12],
                        "custom_id": o["custom_id"],
                        "response": {"status_code": 200, "request_id": "r", "body": o["answer"]},
                        "error": None,
                    }
                    for o in b.output
                ]
            )
            b.error_file_id = self._file([_openai_error(e) for e in b.errors])

    def _file(self, lines: list[dict]) -> str | None:
        if not lines:
            return None
        fid = "file-" + uuid.uuid4().hex[:24]
        self.files[fid] = "".join(json.dumps(x) + "\n" for x in lines).encode()
        return fid

    def openai_batch(self, b: Batch) -> dict:
        self.advance(b)
        age = time.monotonic() - b.created
        if b.ended:
            status = b.ended
        elif b.cancelled_at is not None:
            status = "cancelling"
        elif b.finalizing:
            status = "finalizing"
        else:
            status = "validating" if age < self.config.complete_after_s * 0.2 else "in_progress"
        n = len(b.requests)
        done = len(b.output) if b.ended else 0
        failed = len(b.errors) if b.ended else 0
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": (
                {"object": "list", "data": [{"code": "invalid", "message": "validation failed"}]}
                if status == "failed"
                else None
            ),
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": b.created_at,
            "request_counts": {"total": n, "completed": done, "failed": failed},
            "metadata": None,
        }

    def anthropic_batch(self, b: Batch) -> dict:
        self.advance(b)
        kinds = {"succeeded": len(b.output), "errored": 0, "canceled": 0, "expired": 0}
        for e in b.errors:
            kinds[{"cancelled": "canceled", "expired": "expired"}.get(e.get("why"), "errored")] += 1
        processing = 0 if b.ended else len(b.requests)
        if not b.ended:
            kinds = dict.fromkeys(kinds, 0)
        status = "ended" if b.ended else ("canceling" if b.cancelled_at else "in_progress")
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": {"processing": processing, **kinds},
            "ended_at": None,
            "created_at": "2026-01-01T00:00:00Z",
            "expires_at": "2026-01-02T00:00:00Z",
            "cancel_initiated_at": None,
            "results_url": f"/v1/messages/batches/{b.id}/results" if b.ended else None,
        }

    def anthropic_results(self, b: Batch) -> bytes:
        lines = [
            {"custom_id": o["custom_id"], "result": {"type": "succeeded", "message": o["answer"]}}
            for o in b.output
        ]
        for e in b.errors:
            why = e.get("why")
            if why in ("expired", "cancelled"):
                result = {"type": "expired" if why == "expired" else "canceled"}
            else:
                etype = "invalid_request_error" if e["status"] < 500 else "api_error"
                err = {"type": etype, "message": f"stand-in error {e['status']}"}
                result = {"type": "errored", "error": {"type": "error", "error": err}}
            lines.append({"custom_id": e["custom_id"], "result": result})
        return "".join(json.dumps(x) + "\n" for x in lines).encode()


def _openai_error(e: dict) -> dict:
    if "why" in e:
        code = "batch_expired" if e["why"] == "expired" else "batch_cancelled"
        return {
            "id": "batch_req_" + uuid.uuid4().hex[:12],
            "custom_id": e["custom_id"],
            "response": None,
            "error": {"code": code, "message": f"This request could not be executed: {e['why']}"},
        }
    body = {"error": {"message": f"stand-in error {e['status']}", "type": "invalid_request_error"}}
    return {
        "id": "batch_req_" + uuid.uuid4().hex[:12],
        "custom_id": e["custom_id"],
        "response": {"status_code": e["status"], "request_id": "r", "body": body},
        "error": None,
    }


class _Handler(BaseHTTPRequestHandler):
    state: _State  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(
        self, status: int, payload: Any, raw: bytes | None = None, headers: dict | None = None
    ) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        key = self.state.config.api_key
        got = self.headers.get("x-api-key") or (self.headers.get("Authorization") or "")[7:]
        if key is not None and got != key:
            self._error(401, "invalid api key")
            return False
        return True

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        parts = path.strip("/").split("/")
        st = self.state
        body = self._body() if method == "POST" else b""
        with st.lock:
            st.requests.append((method, path))
            st.arrivals.append(time.monotonic())
            throttled = st.config.throttled > 0
            st.config.throttled -= throttled
        if not self._authorized():
            return
        if throttled:
            return self._send(
                429,
                {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                headers={"Retry-After": str(st.config.retry_after_s)},
            )
        with st.lock:
            if parts[:3] == ["v1", "messages", "batches"]:
                return self._anthropic(method, parts[3:], body)
            if parts[:2] == ["v1", "files"]:
                return self._files(method, parts[2:], body)
            if parts[:2] == ["v1", "batches"]:
                return self._batches(method, parts[2:], body)
            if parts == ["v1", "chat", "completions"] and method == "POST":
                req = json.loads(body)
                st.online.append(req)
                return self._send(200, _answer(req, st.config, anthropic=False))
        self._error(404, f"no route {method} {path}")

    def _files(self, method: str, rest: list[str], body: bytes) -> None:
        st = self.state
        if method == "POST" and not rest:
            head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
            fields = {
                p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()
            }
            if fields.get("purpose") is None or fields["purpose"].get_content() != "batch":
                return self._error(400, "purpose must be batch")
            fid = "file-" + uuid.uuid4().hex[:24]
            st.files[fid] = fields["file"].get_payload(decode=True)
            return self._send(
                200, {"id": fid, "object": "file", "purpose": "batch", "bytes": len(st.files[fid])}
            )
        if method == "GET" and len(rest) == 2 and rest[1] == "content" and rest[0] in st.files:
            return self._send(200, None, raw=st.files[rest[0]])
        self._error(404, "no such file")

    def _batches(self, method: str, rest: list[str], body: bytes) -> None:
        st = self.state
        if method == "POST" and not rest:
            req = json.loads(body)
            data = st.files.get(req.get("input_file_id"))
            if data is None:
                return self._error(400, "no such input file")
            lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
            b = self._create("openai", lines)
            b.input_file_id = req["input_file_id"]
            if st.config.answer_create_after_s:
                st.lock.release()  # let other requests in while this answer waits
                time.sleep(st.config.answer_create_after_s)
                st.lock.acquire()
            if st.config.lost_creates > 0:
                st.config.lost_creates -= 1
                return self._error(500, "the answer to this create was lost")
            return self._send(200, st.openai_batch(b))
        if method == "GET" and not rest:
            mine = [b for b in st.batches.values() if b.kind == "openai"][::-1]
            return self._send(
                200,
                {"object": "list", "data": [st.openai_batch(b) for b in mine], "has_more": False},
            )
        b = st.batches.get(rest[0]) if rest else None
        if b is None or b.kind != "openai":
            return self._error(404, "no such batch")
        if method == "POST" and rest[1:] == ["cancel"]:
            b.cancelled_at = b.cancelled_at or time.monotonic()
            return self._send(200, st.openai_batch(b))
        if method == "GET" and len(rest) == 1:
            return self._send(200, st.openai_batch(b))
        self._error(404, "no route")

    def _anthropic(self, method: str, rest: list[str], body: bytes) -> None:
        st = self.state
        if method == "POST" and not rest:
            b = self._create("anthropic", json.loads(body)["requests"])
            if st.config.lost_creates > 0:
                st.config.lost_creates -= 1
                return self._error(500, "the answer to this create was lost")
            return self._send(200, st.anthropic_batch(b))
        b = st.batches.get(rest[0]) if rest else None
        if b is None or b.kind != "anthropic":
            return self._error(404, "no such batch")
        if method == "POST" and rest[1:] == ["cancel"]:
            b.cancelled_at = b.cancelled_at or time.monotonic()
            return self._send(200, st.anthropic_batch(b))
        if method == "GET" and rest[1:] == ["results"]:
            st.advance(b)
            if not b.ended:
                return self._error(400, "batch has not ended")
            return self._send(200, None, raw=st.anthropic_results(b))
        if method == "GET" and len(rest) == 1:
            return self._send(200, st.anthropic_batch(b))
        self._error(404, "no route")

    def _create(self, kind: str, requests: list[dict]) -> Batch:
        st = self.state
        prefix = "batch_" if kind == "openai" else "msgbatch_"
        b = Batch(prefix + uuid.uuid4().hex[:24], kind, len(st.creates), requests, time.monotonic())
        if st.config.cancel(b.ordinal):
            b.cancelled_at = time.monotonic()
        st.batches[b.id] = b
        st.creates.append(b)
        if st.config.after_create is not None:
            st.config.after_create(st.config)
        return b


class BatchStandIn:
    """The stand-in in a background thread.

    >>> with BatchStandIn(Config(complete_after_s=0.1)) as s:
    ...     s.openai_base  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.state = _State(self.config)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> BatchStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def openai_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def creates(self) -> list[Batch]:
        """Every batch created, in order."""
        with self.state.lock:
            return list(self.state.creates)

    def custom_ids(self) -> list[str]:
        """The custom id of every request of every batch created (one per submission)."""
        return [r["custom_id"] for b in self.creates for r in b.requests]

    @property
    def online(self) -> list[dict]:
        """Bodies of the online chat-completion requests, in order."""
        with self.state.lock:
            return list(self.state.online)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--complete-after", type=float, default=0.2, help="seconds a batch runs")
    args = ap.parse_args(argv)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with BatchStandIn(Config(complete_after_s=args.complete_after)) as s:
        print(f"PORT {s.port}", flush=True)
        done.wait()
        served = {
            "creates": len(s.creates),
            "requests": len(s.custom_ids()),
            "online": len(s.online),
        }
        print(json.dumps(served), flush=True)


if __name__ == "__main__":
    sys.exit(main())
