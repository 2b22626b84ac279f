"""The one small interface every LLM backend implements, and what is built once above it.

A backend implements :meth:`LLM.complete` — one chat completion, optionally constrained by a
JSON schema — and says how many calls may run at once. Retries with backoff, validation
retries and fallbacks live here and in the stages, never in a backend.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from segrec.errors import LLMError, TransientLLMError

Message = dict[str, str]
T = TypeVar("T")


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
    """Exponential backoff with jitter for transient failures (timeouts, 429, 5xx)."""

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return base * (0.5 + random.random() / 2)


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
        except TransientLLMError:
            if attempt + 1 >= policy.attempts:
                raise
            sleep(policy.delay(attempt))
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
    "structured_or_why",
]
