"""The one small interface every LLM backend implements, and what is built once above it.

A backend implements :meth:`LLM.complete` — one chat completion, optionally constrained by a
JSON schema — and says how many calls may run at once. Retries with backoff, validation
retries, fallbacks and running calls concurrently (:func:`map_concurrent`) live here and in
the stages, never in a backend.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from segrec.errors import LLMError, TransientLLMError

Message = dict[str, str]
T = TypeVar("T")
A = TypeVar("A")


@dataclass(frozen=True)
class GenerationParams:
    """Per-call sampling settings; part of every cache key that depends on LLM output."""

    temperature: float = 0.2
    max_tokens: int = 256
    repeat_penalty: float = 1.15
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str | None = None


class LLM(Protocol):
    """What the stages rely on. ``model_id`` goes into cache keys and stored results."""

    model_id: str
    concurrency: int

    def complete(
        self,
        messages: Sequence[Message],
        *,
        params: GenerationParams,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        """One completion. Raise TransientLLMError for what a retry may fix, LLMError else."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures (timeouts, 429, 5xx).

    A server's Retry-After is honoured (never waiting less than the backoff), but only up to
    ``max_retry_after_s``: a server asking for an hour must not stall a run for an hour; the
    call then fails for this user and a rerun retries it.
    """

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        jittered = base * (0.5 + random.random() / 2)
        if retry_after is None:
            return jittered
        return max(jittered, min(max(retry_after, 0.0), self.max_retry_after_s))


def complete_with_retry(
    llm: LLM,
    messages: Sequence[Message],
    *,
    params: GenerationParams,
    schema: dict[str, Any] | None = None,
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> Completion:
    """Call ``llm.complete``, retrying transient errors; the last one is re-raised."""
    for attempt in range(policy.attempts):
        try:
            return llm.complete(messages, params=params, schema=schema)
        except TransientLLMError as exc:
            if attempt + 1 >= policy.attempts:
                raise
            sleep(policy.delay(attempt, exc.retry_after))
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class StructuredResult(Generic[T]):
    """Outcome of :func:`generate_structured`: the parsed value, or ``None`` after all tries."""

    value: T | None
    raw_outputs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0

    @property
    def attempts(self) -> int:
        return len(self.raw_outputs)


def generate_structured(
    llm: LLM,
    messages: Sequence[Message],
    *,
    parse: Callable[[str], T],
    params: GenerationParams,
    schema: dict[str, Any] | None = None,
    attempts: int = 3,
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> StructuredResult[T]:
    """Ask for output that ``parse`` accepts, re-sampling (new seed) when it raises ValueError.

    Transport errors are retried by :func:`complete_with_retry`; if they persist they
    propagate (the caller reports that user as failed). Invalid output after ``attempts``
    tries gives ``value=None`` so the caller can fall back.
    """
    result: StructuredResult[T] = StructuredResult(value=None)
    for attempt in range(attempts):
        tried = GenerationParams(
            temperature=params.temperature if attempt == 0 else max(params.temperature, 0.7),
            max_tokens=params.max_tokens,
            repeat_penalty=params.repeat_penalty,
            seed=params.seed + attempt,
        )
        completion = complete_with_retry(
            llm, messages, params=tried, schema=schema, policy=policy, sleep=sleep
        )
        result.raw_outputs.append(completion.text)
        result.prompt_tokens += completion.prompt_tokens
        result.completion_tokens += completion.completion_tokens
        result.latency_s += completion.latency_s
        try:
            result.value = parse(completion.text)
            return result
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            result.errors.append(_one_line(exc))
    return result


def structured_or_why(
    llm: LLM,
    messages: Sequence[Message],
    *,
    parse: Callable[[str], T],
    params: GenerationParams,
    schema: dict[str, Any] | None = None,
    attempts: int = 3,
    policy: RetryPolicy = RetryPolicy(),
) -> tuple[T | None, str | None]:
    """:func:`generate_structured` for callers that fall back: the value, or None and why
    ("LLM error: …" after the transport retries, "invalid after N tries: …")."""
    try:
        result = generate_structured(
            llm,
            messages,
            parse=parse,
            params=params,
            schema=schema,
            attempts=attempts,
            policy=policy,
        )
    except LLMError as exc:
        return None, f"LLM error: {exc}"
    if result.value is not None:
        return result.value, None
    return None, f"invalid after {result.attempts} tries: {result.errors[-1]}"


def map_concurrent(
    llm: LLM, work: Callable[[A], T], inputs: Iterable[A]
) -> Iterator[tuple[A, Callable[[], T]]]:
    """Run ``work`` over ``inputs`` with up to ``llm.concurrency`` calls in flight.

    The one place segrec runs LLM work concurrently. Yields ``(input, outcome)`` as each
    finishes; ``outcome()`` returns the result or raises what ``work`` raised, so the caller
    commits or reports every input on its own thread, as soon as it is done. Inputs are
    read lazily and only ``concurrency`` are in flight; a caller that may stop early (an
    error, an interrupt) wraps this in ``contextlib.closing`` so that the rest is cancelled
    and the in-flight calls are waited for at once. A backend that takes one call at a time
    (in-process llama.cpp) runs them inline, in order, without a thread hop.
    """
    workers = max(1, int(getattr(llm, "concurrency", 1)))
    if workers == 1:
        for item in inputs:
            yield item, functools.partial(work, item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: dict[Future[T], A] = {}
        try:
            for item in inputs:
                pending[pool.submit(work, item)] = item
                while len(pending) >= workers:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        yield pending.pop(future), future.result
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result
        finally:
            for future in pending:
                future.cancel()


def map_ordered(llm: LLM, work: Callable[[A], T], inputs: Sequence[A]) -> list[T]:
    """:func:`map_concurrent` for callers that want every result, in input order."""
    with closing(map_concurrent(llm, lambda i: work(inputs[i]), range(len(inputs)))) as results:
        done = dict(results)
    return [done[index]() for index in range(len(inputs))]


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


__all__ = [
    "LLM",
    "Completion",
    "GenerationParams",
    "LLMError",
    "Message",
    "RetryPolicy",
    "StructuredResult",
    "TransientLLMError",
    "complete_with_retry",
    "generate_structured",
    "map_concurrent",
    "map_ordered",
    "structured_or_why",
]
