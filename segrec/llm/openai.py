"""OpenAI-compatible backend: OpenAI itself, vLLM, Ollama, llama.cpp's server, …

The SDK's own retries are off: transient failures are raised as TransientLLMError and
retried, with backoff, above the backend; the rest as LLMError. Either is a per-call error
with a one-line description: nothing a server answers may escape as anything else.

Every reply is validated here, at the boundary, from the raw HTTP response
(``with_raw_response``): the SDK builds its models without validating them, returns the
body as a ``str`` when it is not JSON, and lets ``JSONDecodeError`` through, so a proxy's
HTML page or ``"choices": []`` would otherwise surface as AttributeError or IndexError deep
in a stage. What counts as what:

- transient (retried): timeouts, dropped connections, HTTP 408/409/429/5xx (Retry-After
  passed on), a 200 whose body is not JSON, is not a chat-completion envelope, has no
  choices, or has null or empty content;
- permanent (not retried, the call fails): other 4xx, a refusal (``message.refusal`` or
  finish reason ``content_filter``), content longer than ``max_tokens`` can produce (the
  server ignored the limit).
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from segrec.errors import ConfigError, LLMError, TransientLLMError
from segrec.llm.base import Completion, GenerationParams, Message

StructuredMode = Literal["auto", "json_schema", "json_object", "none"]
RETRIED_STATUS = frozenset({408, 409, 429})
# A token is a few characters; this many per requested token means the limit was ignored.
MAX_CHARS_PER_TOKEN, MIN_CONTENT_BOUND = 32, 4096


def resolve_structured_mode(mode: StructuredMode, base_url: str | None) -> str:
    """``auto``: OpenAI's ``json_schema`` on api.openai.com, else ``json_object`` + schema.

    llama.cpp's server enforces ``{"type": "json_object", "schema": …}`` and rejects
    ``json_schema`` with HTTP 500; set the mode explicitly for servers that want otherwise.
    """
    if mode != "auto":
        return mode
    host = urlparse(base_url).hostname if base_url else "api.openai.com"
    return "json_schema" if host and host.endswith("openai.com") else "json_object"


class OpenAILLM:
    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        timeout_s: float = 60.0,
        structured_output: StructuredMode = "auto",
    ) -> None:
        try:
            import openai
        except ImportError:  # pragma: no cover - depends on the environment
            raise LLMError("the openai SDK is not installed — pip install openai") from None
        api_key = os.environ.get(api_key_env)
        if not api_key:
            if base_url is None:
                raise ConfigError(
                    f"{api_key_env} is not set — export it, or pass --base-url for a local server"
                )
            api_key = "not-needed"  # local servers accept any key
        self._openai = openai
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )
        self.model = model
        self.base_url = base_url
        self.concurrency = concurrency
        self.structured_mode = resolve_structured_mode(structured_output, base_url)
        host = urlparse(base_url).netloc if base_url else "api.openai.com"
        self.model_id = f"openai:{model}@{host}"

    def _response_format(self, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None or self.structured_mode == "none":
            return None
        if self.structured_mode == "json_schema":
            return {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema, "strict": False},
            }
        return {"type": "json_object", "schema": schema}

    def complete(
        self,
        messages: Sequence[Message],
        *,
        params: GenerationParams,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "temperature": params.temperature,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
        }
        if (response_format := self._response_format(schema)) is not None:
            kwargs["response_format"] = response_format
        errors = self._openai
        start = time.perf_counter()
        try:
            raw = self._client.chat.completions.with_raw_response.create(**kwargs)
            body = raw.http_response.content
        except (errors.APITimeoutError, errors.APIConnectionError) as exc:
            raise TransientLLMError(f"{self.model_id}: {type(exc).__name__}: {exc}") from None
        except errors.APIStatusError as exc:
            message = f"{self.model_id}: HTTP {exc.status_code}: {_short(exc.message)}"
            if exc.status_code in RETRIED_STATUS or exc.status_code >= 500:
                raise TransientLLMError(
                    message, retry_after=retry_after(exc.response.headers)
                ) from None
            raise LLMError(message) from None
        except errors.OpenAIError as exc:  # anything else the SDK raises: this call failed
            raise LLMError(f"{self.model_id}: {type(exc).__name__}: {_short(str(exc))}") from None
        latency = time.perf_counter() - start
        reply = parse_reply(
            body,
            content_type=raw.headers.get("content-type", ""),
            max_chars=max(MIN_CONTENT_BOUND, MAX_CHARS_PER_TOKEN * params.max_tokens),
            where=f"{self.model_id}: HTTP {raw.status_code}",
        )
        return Completion(
            text=reply.text,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            latency_s=latency,
            finish_reason=reply.finish_reason,
        )


@dataclass(frozen=True)
class Reply:
    """The parts of a chat-completion body segrec uses, once validated."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def parse_reply(body: bytes, *, content_type: str, max_chars: int, where: str) -> Reply:
    """Validate a 2xx chat-completion body; raise a per-call (Transient)LLMError otherwise.

    ``where`` starts every message (model and status), so the one line names the call.
    """
    if "json" not in content_type.lower():
        raise TransientLLMError(
            f"{where} with Content-Type {content_type or 'none'!r}, not JSON: {_peek(body)}"
        )
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransientLLMError(f"{where}: malformed JSON ({exc}): {_peek(body)}") from None
    if not isinstance(data, dict):
        raise TransientLLMError(f"{where}: JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        error = data.get("error")
        detail = f"; error: {_short(json.dumps(error))}" if error else ""
        raise TransientLLMError(f"{where}: no choices in the reply{detail}")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise TransientLLMError(f"{where}: choices[0] has no message object")
    finish = choice.get("finish_reason")
    finish_reason = finish if isinstance(finish, str) else None
    refusal = message.get("refusal")
    if (isinstance(refusal, str) and refusal.strip()) or finish_reason == "content_filter":
        raise LLMError(f"{where}: the model refused: {_short(refusal or finish_reason)}")
    content = message.get("content")
    if not isinstance(content, str):
        kind = "null" if content is None else type(content).__name__
        raise TransientLLMError(
            f"{where}: message.content is {kind}, not text (finish_reason {finish_reason})"
        )
    if not content.strip():
        raise TransientLLMError(f"{where}: empty content (finish_reason {finish_reason})")
    if len(content) > max_chars:
        raise LLMError(
            f"{where}: {len(content)} characters of content, more than max_tokens allows "
            f"({max_chars}) — the server ignored max_tokens"
        )
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Reply(
        text=content,
        finish_reason=finish_reason,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms``, or ``Retry-After`` in seconds
    or as an HTTP date; None when absent or unreadable."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return _finite(float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return _finite(float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _finite(seconds: float) -> float | None:
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _peek(body: bytes) -> str:
    return _short(body[:120].decode("utf-8", errors="replace")) or "(empty body)"


def _short(text: str) -> str:
    return " ".join(str(text).split())[:200]
