"""LLM backends behind one small interface (:class:`segrec.llm.base.LLM`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segrec.config import Settings
    from segrec.llm.base import LLM


def make_llm(settings: Settings) -> LLM:
    """Build the backend that ``settings.llm`` names ('local' or 'openai:<model>'), counted
    (see :mod:`segrec.llm.counting`)."""
    from segrec.llm.counting import counted

    if settings.llm == "local":
        from segrec.llm.llamacpp import LlamaCppLLM

        return counted(
            LlamaCppLLM(settings.model_path, n_threads=settings.threads, n_ctx=settings.n_ctx)
        )
    from segrec.llm.openai import OpenAILLM

    return counted(
        OpenAILLM(
            settings.llm.removeprefix("openai:"),
            base_url=settings.base_url,
            api_key_env=settings.api_key_env,
            concurrency=settings.concurrency,
            timeout_s=settings.timeout_s,
            structured_output=settings.structured_output,
        )
    )
