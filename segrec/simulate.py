"""Simulated new users for the chat track (PROTOCOL track 3).

A simulated user answers `segrec chat`'s questions from their own train history only: they
never see their test items, and they can pick an item choice only if the item is in their
train history (a test item is never in it: the split drops test items the user already has
in train), so no answer names a test item.

* `RuleBasedUser` picks every offered category among their most liked categories and every
  offered item they liked; asked to name favourites, it names its three most liked items.
* `LLMUser` shows the model their liked history and the choices it may pick (every
  category, and the items from its history) and takes the numbers it picks, under a schema
  whose enum holds only those numbers; asked to name favourites, it picks titles from its
  shown history the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from segrec.grounding import decode_json
from segrec.llm.base import LLM, GenerationParams, RetryPolicy, structured_or_why
from segrec.profile import Event, compact_history
from segrec.templates import Prompt, load_prompt

TOP_CATEGORIES = 3
MAX_CHOICES = 3
PROMPT_HISTORY = 12


def _liked(history: Sequence[Event]) -> list[Event]:
    return [e for e in history if e.strength > 0] or list(history)


def favourites(history: Sequence[Event], n: int = MAX_CHOICES) -> list[Event]:
    """The user's most liked items, most recent first among equals."""
    liked = sorted(_liked(history), key=lambda e: (-e.strength, -(e.timestamp or 0), -e.seq))
    return liked[:n]


def _favourite_categories(history: Sequence[Event], n: int = TOP_CATEGORIES) -> list[str]:
    weight: Counter[str] = Counter()
    for event in _liked(history):
        for category in event.categories:
            weight[category] += max(event.strength, 0.1)
    return [c for c, _ in weight.most_common(n)]


@dataclass
class RuleBasedUser:
    """Answers with the numbers of the offered categories among their favourite ones and of
    the offered items they liked; an empty answer when nothing matches."""

    history: Sequence[Event]

    def __post_init__(self) -> None:
        self.categories = set(_favourite_categories(self.history))
        self.items = {e.item_id for e in _liked(self.history)}

    def answer(self, question: Any) -> str:
        if not question.options:  # an open question: name favourites from the history
            return ", ".join(e.title for e in favourites(self.history))
        picks = [
            str(number)
            for number, option in enumerate(question.options, start=1)
            if (option.kind == "category" and option.value in self.categories)
            or (option.kind == "item" and option.value in self.items)
        ]
        return ", ".join(picks)


@dataclass
class LLMUser:
    """The model plays the user: it sees their liked history and picks choice numbers."""

    history: Sequence[Event]
    llm: LLM
    params: GenerationParams
    domain: str = "item"
    attempts: int = 2
    prompt: Prompt | None = None
    failures: int = 0

    def __post_init__(self) -> None:
        self.shown = compact_history(_liked(self.history), max_items=PROMPT_HISTORY, max_tokens=400)
        self.known = {e.item_id for e in self.history}
        self._prompt = self.prompt or load_prompt("simulated_user")

    def allowed(self, question: Any) -> list[tuple[int, Any]]:
        """Every category choice, and the item choices from the user's own history."""
        return [
            (number, option)
            for number, option in enumerate(question.options, start=1)
            if option.kind == "category" or option.value in self.known
        ]

    def answer(self, question: Any) -> str:
        if not question.options:
            return self._name_favourites(question)
        allowed = self.allowed(question)
        if not allowed:
            return ""
        numbers = [number for number, _ in allowed]
        messages = self._prompt.render(
            domain=self.domain,
            history=self.shown,
            question=question.text,
            options=[{"number": n, "label": o.label} for n, o in allowed],
        )
        value, _ = structured_or_why(
            self.llm,
            messages,
            parse=partial(_parse_choices, allowed=set(numbers)),
            params=self.params,
            schema=_choices_schema(numbers),
            attempts=self.attempts,
            policy=RetryPolicy(attempts=2),
        )
        if value is None:
            self.failures += 1
            return ""
        return ", ".join(str(n) for n in value)

    def _name_favourites(self, question: Any) -> str:
        """An open question: the model picks, by number, titles from its shown history."""
        titles = [e.title for e in self.shown]
        if not titles:
            return ""
        messages = self._prompt.render(
            domain=self.domain,
            history=self.shown,
            question=question.text,
            options=[{"number": i, "label": t} for i, t in enumerate(titles, start=1)],
        )
        value, _ = structured_or_why(
            self.llm,
            messages,
            parse=partial(_parse_choices, allowed=set(range(1, len(titles) + 1))),
            params=self.params,
            schema=_choices_schema(list(range(1, len(titles) + 1))),
            attempts=self.attempts,
            policy=RetryPolicy(attempts=2),
        )
        if value is None or not value:
            self.failures += 1
            return ""
        return ", ".join(titles[n - 1] for n in value)


def _choices_schema(numbers: Sequence[int]) -> dict[str, Any]:
    """At most three of the given choice numbers."""
    return {
        "type": "object",
        "properties": {
            "choices": {
                "type": "array",
                "items": {"type": "integer", "enum": list(numbers)},
                "maxItems": MAX_CHOICES,
            }
        },
        "required": ["choices"],
    }


def _parse_choices(text: str, *, allowed: set[int]) -> list[int]:
    data = decode_json(text)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, int) for c in choices):
        raise ValueError("choices must be a list of numbers")
    picked = list(dict.fromkeys(c for c in choices if c in allowed))
    if len(picked) != len(set(choices)):
        raise ValueError("a choice outside the allowed numbers")
    return picked[:MAX_CHOICES]
