"""A loopback stand-in for the OpenAI chat-completions API, for fault injection in tests.

This is a fake written to the protocol's contract (``POST /v1/chat/completions`` with a JSON
body; a ``chat.completion`` object or an ``{"error": {"message", "type", "code"}}`` body with the
matching HTTP status; and ``POST /v1/completions``, raw ``prompt`` text answered by a
``text_completion``), not a copy of any real server. It exists so tests can drive kdata's
teacher pool through real HTTP and inject faults deterministically: rate limits with
``Retry-After``, server errors, connection resets, hangs past the client's timeout, and requests
that always fail (400, 401, context window exceeded).

It is a small HTTP/1.1 server on ``asyncio.Protocol`` (keep-alive, no pipelining needed by the
clients in use), bound to 127.0.0.1 on a free port, running on an event loop of its own in a
background thread (`StandIn`, a context manager) or in a process of its own (``python
tests/openai_standin.py``, which prints ``PORT <n>``). It serves several thousand requests per
second on one core.

Every request is recorded (`Record`): the body hash (sha256 of the canonical JSON of the body,
that is model, messages and parameters), the attempt number (how many requests with that body
hash came before it), arrival and answer times on ``time.monotonic``, the Authorization and
User-Agent headers, and what was answered. Faults are decided from the body hash and the attempt
number only, so a rerun meets the same faults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Fault kinds that hit a fraction of attempts, and fixed-status kinds.
RATE_LIMIT = "429"
SERVER_ERROR = "500"
RESET = "reset"
HANG = "hang"
BAD_REQUEST = "400"
UNAUTHORIZED = "401"
CONTEXT_WINDOW = "context_window"
TRANSIENT_KINDS = (RATE_LIMIT, SERVER_ERROR, RESET, HANG)
FIXED_KINDS = (BAD_REQUEST, UNAUTHORIZED, CONTEXT_WINDOW)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def body_hash(body: dict) -> str:
    """sha256 of the canonical JSON of a request body (model, messages and parameters)."""
    return hashlib.sha256(canonical(body)).hexdigest()


def last_user_message(body: dict) -> str:
    """Text of the last ``user`` message of a request body ('' when there is none)."""
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # content parts
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def expected_answer(user_text: str) -> str:
    """The answer the stand-in gives to a request whose last user message is ``user_text``."""
    return "answer: " + hashlib.sha256(user_text.encode()).hexdigest()[:32]


def count_prompt_tokens(body: dict) -> int:
    """The prompt tokens the stand-in reports: words of every message plus 3 per message.

    A rough count that stays at or below a tiktoken count of the same messages.
    """
    n = len(str(body.get("prompt") or "").split())  # a text completion's raw prompt
    for m in body.get("messages") or []:
        n += 3 + len(str(m.get("content", "")).split())
    return n


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the parts."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass
class Config:
    """What the stand-in does; fields may be changed while it runs.

    Attributes:
        latency: seconds before answering: a number, or ``(low, high)`` for a uniform draw
            (deterministic per body hash and attempt).
        fault_rate: fraction of attempts that fault (attempt ``< faulty_attempts`` only).
        faulty_attempts: how many first attempts of a body hash may fault (1: first ones only).
        fault_kinds: kind -> weight, among `TRANSIENT_KINDS`.
        always: a kind from `FIXED_KINDS` (or `TRANSIENT_KINDS`) answered to every request.
        decide: ``decide(body, attempt) -> kind | None`` overrides everything above when set.
        reply: ``reply(body) -> text``, the assistant's content, when set (scripted teachers for
            the logic of multi-call methods); otherwise `expected_answer` of the last user message.
        reasoning: ``reasoning(body) -> text``: answer as a reasoning server does, the trace in the
            message's ``reasoning_content`` and ``reasoning_tokens`` of the completion tokens in
            the usage's ``completion_tokens_details`` (DeepSeek's and vLLM's shape).
        reasoning_tokens: how many of the completion tokens are reported as reasoning.
        retry_after_s: value of the ``Retry-After`` header of a 429 (seconds, may be fractional).
        retry_after_header: the header's raw text instead (an HTTP-date, or junk), when set.
        hang_s: how long a hang lasts before the connection is closed without an answer.
        completion_tokens: completion tokens reported, capped by the request's ``max_tokens``.
        echo_auth: put the received Authorization header into 401 error messages.
        seed: mixes into every fault decision.
    """

    latency: float | tuple[float, float] = 0.0
    fault_rate: float = 0.0
    faulty_attempts: int = 1
    fault_kinds: dict[str, float] = field(
        default_factory=lambda: {RATE_LIMIT: 1, SERVER_ERROR: 1, RESET: 1, HANG: 1}
    )
    always: str | None = None
    decide: Callable[[dict, int], str | None] | None = None
    reply: Callable[[dict], str] | None = None
    reasoning: Callable[[dict], str] | None = None
    reasoning_tokens: int = 8
    retry_after_s: float = 0.2
    retry_after_header: str | None = None
    hang_s: float = 60.0
    completion_tokens: int = 12
    echo_auth: bool = False
    seed: int = 0

    def kind_for(self, body: dict, h: str, attempt: int) -> str | None:
        """The fault for this attempt, or None to answer normally."""
        if self.decide is not None:
            return self.decide(body, attempt)
        if self.always is not None:
            return self.always
        if attempt < self.faulty_attempts and _unit(self.seed, h, attempt) < self.fault_rate:
            kinds, weights = list(self.fault_kinds), list(self.fault_kinds.values())
            u = _unit(self.seed, h, attempt, "kind") * sum(weights)
            for k, w in zip(kinds, weights, strict=True):
                if u < w:
                    return k
                u -= w
            return kinds[-1]
        return None

    def delay_for(self, h: str, attempt: int) -> float:
        """Seconds to wait before answering."""
        if isinstance(self.latency, tuple | list):
            lo, hi = self.latency
            return lo + (hi - lo) * _unit(self.seed, h, attempt, "latency")
        return float(self.latency)


@dataclass(slots=True)
class Record:
    """One request as the stand-in saw it, and what it did about it."""

    body_hash: str
    attempt: int  # requests with this body hash seen before this one
    arrival: float  # time.monotonic() when the request was complete
    authorization: str | None
    body: dict | None
    kind: str | None = None  # None: answered 200; otherwise the fault kind
    status: int | None = None  # HTTP status answered; None for reset / hang
    answered_at: float | None = None  # when the answer (or the reset) was written
    retry_after: float | None = None  # Retry-After sent with a 429
    user_agent: str | None = None  # which client sent it


class _Server:
    """State shared by every connection: config, records, counters."""

    def __init__(self, config: Config, keep_bodies: bool = True) -> None:
        self.config = config
        self.keep_bodies = keep_bodies
        self.records: list[Record] = []
        self.counts: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.connections: set[_Conn] = set()
        self.created = int(time.time())
        self.in_flight = 0  # chat requests received and not yet answered
        self.max_in_flight = 0

    def stats(self) -> dict:
        return {
            "requests": len(self.records),
            "by_status": dict(self.by_status),
            "connections": len(self.connections),
            "max_in_flight": self.max_in_flight,
        }


class _Conn(asyncio.Protocol):
    """One HTTP/1.1 connection: requests are parsed as bytes arrive and answered in order."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.buf = bytearray()
        self.queue: list[tuple[str, str, dict[str, str], bytes]] = []
        self.worker: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.worker is not None and not self.worker.done():
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self._fail_hard(400)
                return
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._fail_hard(411)
                return
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            headers[":version"] = version
            self.queue.append((method, target, headers, body))
            if self.worker is None or self.worker.done():
                self.worker = asyncio.get_running_loop().create_task(self._work())

    # handling
    def _fail_hard(self, status: int) -> None:
        self._write(status, {"error": {"message": "malformed request", "type": "x", "code": None}})
        self.transport.close()

    def _write(
        self, status: int, payload: dict, extra: dict[str, str] | None = None, close: bool = False
    ) -> None:
        if self.closed:
            return
        body = json.dumps(payload).encode()
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            f"x-request-id: req_{uuid.uuid4().hex[:24]}",
            "openai-processing-ms: 1",
        ]
        for k, v in (extra or {}).items():
            head.append(f"{k}: {v}")
        if close:
            head.append("connection: close")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        if close:
            self.transport.close()

    async def _work(self) -> None:
        while self.queue and not self.closed:
            method, target, headers, body = self.queue.pop(0)
            keep = (
                headers.get("connection", "").lower() != "close"
                and headers[":version"] == "HTTP/1.1"
            )
            await self._handle(method, target, headers, body, close=not keep)

    async def _handle(
        self, method: str, target: str, headers: dict[str, str], raw: bytes, close: bool
    ) -> None:
        srv = self.server
        path = target.split("?", 1)[0]
        if path == "/_standin/stats" and method == "GET":
            self._write(200, srv.stats(), close=close)
            return
        if path not in ("/v1/chat/completions", "/chat/completions", "/v1/completions"):
            self._write(
                404,
                _error(
                    f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"
                ),
                close=close,
            )
            return
        if method != "POST":
            self._write(
                405,
                _error(f"Method {method} not allowed.", "invalid_request_error", None),
                close=close,
            )
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._write(
                400,
                _error(
                    "We could not parse the JSON body of your request.",
                    "invalid_request_error",
                    None,
                ),
                close=close,
            )
            return
        h = body_hash(body)
        attempt = srv.counts[h]
        srv.counts[h] += 1
        rec = Record(
            h,
            attempt,
            time.monotonic(),
            headers.get("authorization"),
            body if srv.keep_bodies else None,
            user_agent=headers.get("user-agent"),
        )
        srv.records.append(rec)
        srv.in_flight += 1
        srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            await self._respond(rec, body, headers, close)
        finally:
            srv.in_flight -= 1

    async def _respond(self, rec: Record, body: dict, headers: dict[str, str], close: bool) -> None:
        srv, cfg, h, attempt = self.server, self.server.config, rec.body_hash, rec.attempt
        kind = cfg.kind_for(body, h, attempt)
        rec.kind = kind
        delay = cfg.delay_for(h, attempt)
        if kind == HANG:
            srv.by_status["hang"] += 1
            await asyncio.sleep(cfg.hang_s)  # cancelled when the client gives up and closes
            rec.answered_at = time.monotonic()
            self.transport.close()
            return
        if delay > 0:
            await asyncio.sleep(delay)
        if self.closed:
            return
        if kind == RESET:
            srv.by_status["reset"] += 1
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # RST instead of FIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            rec.answered_at = time.monotonic()
            self.transport.abort()
            return
        status, payload, extra = self._answer(kind, body, headers, cfg)
        rec.status = status
        if status == 429 and cfg.retry_after_header is None:
            rec.retry_after = cfg.retry_after_s
        srv.by_status[str(status)] += 1
        rec.answered_at = time.monotonic()  # before the write: the client has it no earlier
        self._write(status, payload, extra, close=close)

    def _answer(
        self, kind: str | None, body: dict, headers: dict[str, str], cfg: Config
    ) -> tuple[int, dict, dict[str, str] | None]:
        if kind is None:
            return 200, self._completion(body, cfg), None
        if kind == RATE_LIMIT:
            return (
                429,
                _error(
                    "Rate limit reached for requests. Please try again later.",
                    "requests",
                    "rate_limit_exceeded",
                ),
                {"retry-after": cfg.retry_after_header or f"{cfg.retry_after_s:g}"},
            )
        if kind == SERVER_ERROR:
            return (
                500,
                _error(
                    "The server had an error while processing your request. Sorry about that!",
                    "server_error",
                    None,
                ),
                None,
            )
        if kind == BAD_REQUEST:
            return (
                400,
                _error(
                    "Invalid value for 'temperature': the stand-in refuses this request.",
                    "invalid_request_error",
                    "invalid_value",
                ),
                None,
            )
        if kind == UNAUTHORIZED:
            got = headers.get("authorization", "") if cfg.echo_auth else "sk-...."
            return (
                401,
                _error(
                    f"Incorrect API key provided: {got}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    "invalid_api_key",
                ),
                None,
            )
        if kind == CONTEXT_WINDOW:
            n = count_prompt_tokens(body) + 8192
            return (
                400,
                _error(
                    "This model's maximum context length is 8192 tokens. However, your messages "
                    f"resulted in {n} tokens. Please reduce the length of the messages.",
                    "invalid_request_error",
                    "context_length_exceeded",
                ),
                None,
            )
        raise ValueError(f"unknown fault kind {kind!r}")

    def _completion(self, body: dict, cfg: Config) -> dict:
        p_tok = count_prompt_tokens(body)
        c_tok = cfg.completion_tokens
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(max_tokens, int):
            c_tok = min(c_tok, max_tokens)
        message = {
            "role": "assistant",
            "content": cfg.reply(body) if cfg.reply else expected_answer(last_user_message(body)),
        }
        usage = {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}
        if "prompt" in body:  # POST /v1/completions: raw text in, text out
            return {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": self.server.created,
                "model": body.get("model", "standin-model"),
                "choices": [
                    {
                        "index": 0,
                        "text": message["content"],
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        if cfg.reasoning is not None:
            message["reasoning_content"] = cfg.reasoning(body)
            usage["completion_tokens_details"] = {"reasoning_tokens": cfg.reasoning_tokens}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": self.server.created,
            "model": body.get("model", "standin-model"),
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": usage,
            "system_fingerprint": "fp_standin",
        }


def _error(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class StandIn:
    """The stand-in on a loop of its own in a background thread.

    >>> with StandIn(Config(latency=0.01)) as s:
    ...     s.base_url  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, config: Config | None = None, *, keep_bodies: bool = True) -> None:
        self.config = config or Config()
        self._srv = _Server(self.config, keep_bodies)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    # lifecycle
    def start(self) -> StandIn:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _Conn(self._srv), "127.0.0.1", 0, backlog=4096)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # reported to the starting thread
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="openai-standin", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._srv.connections):
            if conn.transport is not None:
                conn.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what tests read
    @property
    def base_url(self) -> str:
        """The ``api_base`` to give a client: ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def records(self) -> list[Record]:
        """Every request so far, in arrival order (a copy)."""
        return list(self._srv.records)

    def counts(self) -> Counter[str]:
        """Requests seen per body hash."""
        return Counter(self._srv.counts)

    def count(self) -> int:
        """Requests seen in all."""
        return len(self._srv.records)

    @property
    def max_in_flight(self) -> int:
        """The most chat requests that were being handled at once."""
        return self._srv.max_in_flight

    def clear(self) -> None:
        """Forget the records and counts (attempt numbers start again from 0)."""
        self._srv.records.clear()
        self._srv.counts.clear()
        self._srv.by_status.clear()
        self._srv.max_in_flight = self._srv.in_flight

    def by_hash(self) -> dict[str, list[Record]]:
        """Records grouped by body hash, each list in arrival order."""
        out: dict[str, list[Record]] = {}
        for r in self.records:
            out.setdefault(r.body_hash, []).append(r)
        return out


# ---------------------------------------------------------------------------------------------
# As a process of its own: ``python tests/openai_standin.py --latency 0.2 0.5``


async def _serve_forever(config: Config, port: int) -> None:
    srv = _Server(config, keep_bodies=False)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(srv), "127.0.0.1", port, backlog=4096)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    print(json.dumps(srv.stats()), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--latency",
        type=float,
        nargs="+",
        default=[0.0],
        help="fixed seconds, or LOW HIGH for a uniform draw",
    )
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--always", choices=TRANSIENT_KINDS + FIXED_KINDS, default=None)
    args = ap.parse_args(argv)
    latency: float | tuple[float, float] = (
        args.latency[0] if len(args.latency) == 1 else (args.latency[0], args.latency[1])
    )
    config = Config(latency=latency, fault_rate=args.fault_rate, always=args.always)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(config, args.port))


if __name__ == "__main__":
    sys.exit(main())
