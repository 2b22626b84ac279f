"""Deterministic fakes for fast unit tests: an LLM with queued answers, a hashing encoder.

They never stand in for the real model or encoder in the test that shows a feature works;
each stage also has a test on the bundled model and encoder.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
