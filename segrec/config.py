"""All of segrec's settings in one pydantic model.

Precedence, highest first: CLI flag > environment (``SEGREC_<FIELD>``) > ``segrec.toml``
(``--config PATH``, ``SEGREC_CONFIG``, or ``./segrec.toml`` when present) > default.
:meth:`Settings.to_toml` writes a file that :func:`load_settings` reads back unchanged.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from segrec.errors import ConfigError

ENV_PREFIX = "SEGREC_"
DEFAULT_CONFIG_FILE = "segrec.toml"


class Settings(BaseModel):
    """Every knob segrec has. Field docs double as the README's configuration reference."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    workspace: Path = Field(Path(".segrec"), description="Workspace directory (SQLite inside).")
    llm: str = Field(
        "local",
        description="'local' (llama.cpp, bundled SmolLM2-135M) or 'openai:<model>'.",
    )
    model_path: Path | None = Field(None, description="A GGUF file for the local backend.")
    threads: int | None = Field(None, ge=1, description="llama.cpp threads (default: all cores).")
    n_ctx: int = Field(2048, ge=512, description="llama.cpp context window in tokens.")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint URL.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with the key.")
    concurrency: int = Field(4, ge=1, le=256, description="OpenAI requests in flight.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout (OpenAI backend).")
    retries: int = Field(3, ge=1, le=10, description="Tries per LLM call on transient errors.")
    structured_output: Literal["auto", "json_schema", "json_object", "none"] = Field(
        "auto",
        description="How the OpenAI backend asks for JSON (auto: json_schema for api.openai.com,"
        " json_object+schema elsewhere, as llama.cpp's server wants).",
    )
    temperature: float = Field(0.2, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(256, ge=16, le=4096, description="Completion token cap per call.")
    repeat_penalty: float = Field(1.15, ge=1, le=2, description="llama.cpp repeat penalty.")
    seed: int = Field(0, description="Sampling seed (and clustering seed).")
    max_history_items: int = Field(15, ge=1, description="History items shown to the LLM.")
    max_history_tokens: int = Field(500, ge=50, description="Approximate token cap of history.")
    domain: str = Field("item", description="What the items are, for prompts: movie, product…")
    encoder: Path | None = Field(
        None, description="A local sentence-transformers model folder (default: bundled MiniLM)."
    )
    represent: Literal["profile", "items", "mix", "collab"] = Field(
        "items",
        description="What is clustered: profile text, recent items, a mix, or collab "
        "(who did what: SVD of the recent-items TF-IDF matrix).",
    )
    min_segment_size: int = Field(10, ge=1, description="Privacy threshold for describing.")
    validation_attempts: int = Field(3, ge=1, le=10, description="Tries before the fallback.")
    executor: Literal["local", "ray"] = Field(
        "local", description="Where per-user LLM and encoder work runs: this process, or Ray."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to attach to (default: $RAY_ADDRESS, else start one)."
    )
    ray_workers: int | None = Field(
        None, ge=1, description="Ray actors, each with its own backend (default: one per CPU)."
    )

    @field_validator("llm")
    @classmethod
    def _check_llm(cls, value: str) -> str:
        if value == "local" or (value.startswith("openai:") and len(value) > len("openai:")):
            return value
        raise ValueError("must be 'local' or 'openai:<model>', e.g. openai:gpt-4o-mini")

    def to_toml(self) -> str:
        lines = []
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            lines.append(f"{name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _config_file(config_path: Path | None, environ: Mapping[str, str]) -> Path | None:
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"{config_path}: config file not found — check the --config path")
        return config_path
    if env_path := environ.get(ENV_PREFIX + "CONFIG"):
        path = Path(env_path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file named by SEGREC_CONFIG not found")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults, the TOML file, ``SEGREC_*`` variables and CLI overrides (None = unset)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    if (path := _config_file(config_path, environ)) is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}) — fix the file") from None
        for key, value in data.items():
            merged[key] = value
            source[key] = f"{path}"
    for name in Settings.model_fields:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            merged[name] = environ[env_name]
            source[name] = f"environment variable {env_name}"
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
            source[key] = "--" + key.replace("_", "-")
    try:
        return Settings(**merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        where = source.get(field, field)
        if error["type"] == "extra_forbidden":
            known = ", ".join(Settings.model_fields)
            raise ConfigError(
                f"{where}: unknown setting '{field}' — known settings: {known}"
            ) from None
        raise ConfigError(f"{where}: invalid {field}: {error['msg']}") from None
