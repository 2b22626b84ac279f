"""An LLM wrapper for a long-running server: a bound on calls in flight and a deadline.

A request that needs the LLM must answer in bounded time even when the backend hangs. Each
call runs in its own thread and is waited for at most ``timeout_s``; a call that misses it
is abandoned (its thread ends whenever the backend returns) and is reported as a permanent
:class:`LLMError`, so the caller's fallback (template reasons, template questions)
answers at once. While an abandoned call still holds the backend, further calls fail fast
instead of queueing behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from segrec.errors import LLMError
from segrec.llm.base import LLM, Completion, GenerationParams, Message


class BoundedLLM:
    """At most ``slots`` calls at once to ``llm``, each answered within ``timeout_s``."""

    def __init__(self, llm: LLM, *, slots: int, timeout_s: float) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.llm = llm
        self.slots = slots
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._abandoned = 0  # calls past their deadline whose backend has not returned

    @property
    def model_id(self) -> str:
        return self.llm.model_id

    @property
    def concurrency(self) -> int:
        return min(self.slots, max(1, int(getattr(self.llm, "concurrency", 1))))

    @property
    def stuck(self) -> bool:
        with self._lock:
            return self._abandoned > 0

    def complete(
        self,
        messages: Sequence[Message],
        *,
        params: GenerationParams,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        if self.stuck:
            raise LLMError("the LLM is still busy with a call that timed out: answering without")
        if not self._slots.acquire(timeout=self.timeout_s):
            raise LLMError(f"no free LLM slot within {self.timeout_s:g} s: answering without")
        future: Future[Completion] = Future()

        def call() -> None:
            try:
                future.set_result(self.llm.complete(messages, params=params, schema=schema))
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)
            finally:
                self._slots.release()

        thread = threading.Thread(target=call, name="segrec-llm", daemon=True)
        thread.start()
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            with self._lock:
                self._abandoned += 1
            future.add_done_callback(lambda _: self._returned())
            raise LLMError(f"the LLM did not answer within {self.timeout_s:g} s") from None

    def _returned(self) -> None:
        with self._lock:
            self._abandoned -= 1
