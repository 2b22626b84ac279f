"""OpenAI-compatible backend: OpenAI itself, vLLM, Ollama, llama.cpp's server, …

The SDK's own retries are off: transient failures (timeouts, dropped connections, HTTP 429
and 5xx) are raised as TransientLLMError and retried, with backoff, above the backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlparse

from segrec.errors import ConfigError, LLMError, TransientLLMError
from segrec.llm.base import Completion, GenerationParams, Message

StructuredMode = Literal["auto", "json_schema", "json_object", "none"]


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
            response = self._client.chat.completions.create(**kwargs)
        except (errors.APITimeoutError, errors.APIConnectionError) as exc:
            raise TransientLLMError(f"{self.model_id}: {type(exc).__name__}: {exc}") from None
        except errors.APIStatusError as exc:
            message = f"{self.model_id}: HTTP {exc.status_code}: {_short(exc.message)}"
            if exc.status_code == 429 or exc.status_code >= 500:
                raise TransientLLMError(message) from None
            raise LLMError(message) from None
        latency = time.perf_counter() - start
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=choice.message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_s=latency,
            finish_reason=choice.finish_reason,
        )


def _short(text: str) -> str:
    return " ".join(str(text).split())[:200]
