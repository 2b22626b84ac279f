"""Deterministic fakes for fast unit tests: an LLM with queued answers, a hashing encoder.

They never stand in for the real model or encoder in the test that shows a feature works;
each stage also has a test on the bundled model and encoder.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segrec.llm.base import Completion, GenerationParams, Message

Response = str | Exception | Callable[[Sequence[Message], dict[str, Any] | None], str]


@dataclass
class FakeLLM:
    """Answers from a queue (strings, exceptions to raise, or callables); records every call.

    When the queue is empty, ``default`` answers (a callable gets the messages and schema).
    """

    responses: list[Response] = field(default_factory=list)
    default: Response | None = None
    model_id: str = "fake-llm"
    concurrency: int = 1
    calls: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def complete(
        self,
        messages: Sequence[Message],
        *,
        params: GenerationParams,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        with self._lock:
            self.calls.append({"messages": list(messages), "params": params, "schema": schema})
            response = self.responses.pop(0) if self.responses else self.default
        if response is None:
            raise AssertionError("FakeLLM has no response queued and no default")
        if isinstance(response, Exception):
            raise response
        text = response(messages, schema) if callable(response) else response
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(text.split()),
            latency_s=0.0,
            finish_reason="stop",
        )


class FakeEncoder:
    """Hashing bag-of-words vectors, L2-normalised: texts sharing words are close."""

    def __init__(self, dim: int = 64, encoder_id: str = "fake-encoder") -> None:
        self.dim = dim
        self.encoder_id = encoder_id
        self.calls: list[list[str]] = []

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                digest = hashlib.sha256(word.encode()).digest()
                out[row, int.from_bytes(digest[:4], "little") % self.dim] += 1.0
            if not out[row].any():
                out[row, 0] = 1.0
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


@contextmanager
def llama_server(*, threads: int = 2, log: Path | None = None) -> Iterator[str]:
    """A real ``python -m llama_cpp.server`` with the bundled model on a free loopback port.

    Yields its OpenAI-compatible base URL; the server is stopped on exit. For tests and
    benchmarks of the OpenAI backend.
    """
    from segrec.llm.llamacpp import bundled_model_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
        "--n_threads", str(threads),
    ]  # fmt: skip
    with open(log or os.devnull, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                tail = log.read_text()[-2000:] if log else ""
                raise RuntimeError(f"llama_cpp.server exited: {tail}")
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("llama_cpp.server did not start in 120 s") from None
                time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _unescape(literal: str) -> str:
    return literal.replace("[.]", ".").replace("\\", "")


def _first_reason(pattern: str) -> str:
    """The first reason a reason grammar allows: its first liked title and that title's
    first clause (a fact grammar), or its first anchor and a few words (a free one)."""
    body = pattern.removeprefix("^Because you liked (")
    title, sep, rest = body.partition(", (")
    if sep and not title.count("|"):
        shared = re.match(r"another \(([^|)]*)(?:\|[^)]*)?\) ([a-z]+)", rest)
        if rest.startswith("another") and shared:
            clause = f"another {_unescape(shared.group(1))} {shared.group(2)}"
        else:
            clause = "and people who liked it also liked this"
        return f"Because you liked {_unescape(title)}, {clause}."
    anchor = re.match(r"((?:\\.|[^|)\\])*)", body)
    if anchor is None:
        raise ValueError("reason schema without anchors")
    return f"Because you liked {_unescape(anchor.group(1))}, this fits your taste."


def schema_answer(messages: Sequence[Message], schema: dict[str, Any] | None) -> str:
    """A valid answer to any schema segrec sends, for `FakeLLM(default=schema_answer)`.

    Profiles take the first two like options; segment labels a fixed name; reasons take the
    first liked title and clause their grammar offers.
    """
    import json

    if schema is None:
        raise ValueError("schema_answer answers structured requests only")
    props = schema["properties"]
    if "summary" in props:
        likes = props["likes"]["items"].get("enum", [])[:2]
        return json.dumps(
            {
                "likes": likes,
                "dislikes": [],
                "favourite_items": [],
                "themes": [],
                "summary": "This user mostly enjoys " + " and ".join(likes or ["films"]) + ".",
            }
        )
    if "reason" in props:
        return json.dumps({"reason": _first_reason(props["reason"]["pattern"])})
    return json.dumps({"name": "Fans", "description": "Members like films."})
