"""LLM backends behind one small interface (:class:`segrec.llm.base.LLM`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from segrec.config import Settings
    from segrec.llm.base import LLM


GEMMA_SHORTCUT = "gemma3-270m"


def resolve_model_path(path: Path | None) -> Path | None:
    """``--model-path gemma3-270m`` names the GGUF of the ``segrec[gemma]`` extra."""
    if path is not None and str(path) == GEMMA_SHORTCUT:
        from segrec.llm.llamacpp import gemma_model_path

        return gemma_model_path()
    return path


def make_llm(settings: Settings) -> LLM:
    """Build the backend that ``settings.llm`` names ('local' or 'openai:<model>'), counted
    (see :mod:`segrec.llm.counting`)."""
    from segrec.llm.counting import counted

    if settings.llm == "local":
        from segrec.llm.llamacpp import LlamaCppLLM

        return counted(
            LlamaCppLLM(
                resolve_model_path(settings.model_path),
                n_threads=settings.threads,
                n_ctx=settings.n_ctx,
            )
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
