"""Prompts are files in ``prompts/``, rendered in a sandboxed Jinja environment.

A prompt file has a ``### system`` and a ``### user`` section. Its version is a hash of the
file's bytes, so editing a prompt changes every cache key that depends on it. User data is
passed through the ``data`` filter, which strips the characters that could close the
delimiters the prompt wraps it in; prompts tell the model that delimited text is data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from segrec.llm.base import Message

_SECTION = re.compile(r"^### (system|user)\s*$", re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def data_filter(value: Any, limit: int = 2000) -> str:
    """Render user-supplied text as inert data: no angle brackets, no control chars, bounded."""
    text = _CONTROL.sub(" ", str(value)).replace("<", "(").replace(">", ")")
    return text if len(text) <= limit else text[: limit - 1] + "…"


_ENV = SandboxedEnvironment(
    undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False
)
_ENV.filters["data"] = data_filter


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    system: str
    user: str

    def render(self, **context: Any) -> list[Message]:
        return [
            {"role": "system", "content": _ENV.from_string(self.system).render(**context).strip()},
            {"role": "user", "content": _ENV.from_string(self.user).render(**context).strip()},
        ]


@cache
def load_prompt(name: str) -> Prompt:
    """Load ``prompts/<name>.jinja`` from the installed package."""
    source = resources.files("segrec.prompts").joinpath(f"{name}.jinja")
    raw = source.read_bytes()
    parts = _SECTION.split(raw.decode("utf-8"))
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    if set(sections) != {"system", "user"}:
        raise ValueError(f"prompt {name!r} needs a '### system' and a '### user' section")
    version = f"{name}@{hashlib.sha256(raw).hexdigest()[:12]}"
    return Prompt(name=name, version=version, system=sections["system"], user=sections["user"])
