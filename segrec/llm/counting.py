"""How many LLM calls a command made, counted once for every backend.

:func:`segrec.llm.make_llm` wraps each backend it builds in :class:`CountedLLM`, which bumps
one process-wide, thread-safe counter per completion (retries and re-samples included: each
is a call someone pays for). A command reads the difference over its run with
:func:`count_calls`, so no stage has to thread a count through its results.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from segrec.llm.base import LLM, Completion, GenerationParams, Message

_lock = threading.Lock()
_total = 0


def calls_so_far() -> int:
    """Completions requested from counted backends since the process started."""
    with _lock:
        return _total


class CountedLLM:
    """A backend whose every ``complete`` call is counted (successful or not)."""

    def __init__(self, inner: LLM) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.concurrency = inner.concurrency

    def complete(
        self,
        messages: Sequence[Message],
        *,
        params: GenerationParams,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        global _total
        with _lock:
            _total += 1
        return self.inner.complete(messages, params=params, schema=schema)


def record_calls(n: int) -> None:
    """Add ``n`` calls made on this process's behalf elsewhere (by a Ray actor's counted
    backend, which counts in its own process), so the command's count includes them."""
    global _total
    with _lock:
        _total += n


def counted(llm: LLM) -> LLM:
    """``llm`` wrapped in :class:`CountedLLM` (once: an already counted backend is returned)."""
    return llm if isinstance(llm, CountedLLM) else CountedLLM(llm)


@dataclass
class CallCount:
    """Calls made since this count started; read ``calls`` at any time."""

    start: int

    @property
    def calls(self) -> int:
        return calls_so_far() - self.start


@contextmanager
def count_calls() -> Iterator[CallCount]:
    """Count the LLM calls made inside the block (by counted backends, in any thread)."""
    yield CallCount(calls_so_far())
