"""Text checks shared by every stage that grounds LLM output in the data (profiles, labels).

A grammar fixes the form of an answer, not its content: these helpers find what free text
names that the data does not contain, and the small model's repetition loops.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

SENTENCE = re.compile(r"(?<=[.!?])\s+")


def norm(text: str) -> str:
    """Lower-case words separated by single spaces, for matching names in free text."""
    return " ".join(re.findall(r"\w+", text.lower()))


def absent_categories(text: str, present: Iterable[str], vocabulary: Iterable[str]) -> list[str]:
    """Catalogue categories named in ``text`` that are not among ``present``."""
    lowered = f" {norm(text)} "
    allowed = set(present)
    return sorted(
        category
        for category in set(vocabulary) - allowed
        if len(category) > 2 and f" {norm(category)} " in lowered
    )


# Names with these would need escapes llama.cpp's pattern converter does not read.
PATTERN_UNSAFE = re.compile(r'["\\^${}<>\[\]]')


def pattern_literal(text: str) -> str:
    """``text`` as a regex literal that llama.cpp's pattern converter also reads verbatim."""
    return "".join("[.]" if c == "." else "\\" + c if c in "()|*+?" else c for c in text)


def one_or_two(names: Sequence[str]) -> list[str]:
    """Each of ``names``, and two different ones joined by "and" (a name with its own
    "and" stands alone: never "X and Y and Z")."""
    single = [n for n in names if " and " not in n.lower()]
    return [*names, *(f"{a} and {b}" for a in single for b in single if a != b)]


def pattern_group(options: Sequence[str]) -> str:
    """A pattern group matching exactly one of ``options``, verbatim."""
    return "(" + "|".join(pattern_literal(o) for o in options) + ")"


def degenerate(text: str) -> bool:
    """True for the small model's loops: a 4-word run repeated three times or more."""
    words = norm(text).split()
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return bool(grams) and grams.most_common(1)[0][1] >= 3


def join_words(values: Sequence[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


MARKUP = re.compile(r"[{}<>\[\]]")


def decode_json(text: str) -> Any:
    """Parse an LLM's JSON answer; ValueError (so callers retry) when it is not JSON.

    ``strict=False``: llama.cpp's JSON-schema grammar lets raw newlines into strings.
    """
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None


def check_prose(
    text: str, *, what: str, min_chars: int, max_chars: int, max_sentences: int
) -> list[str]:
    """The form checks every free-text field shares; returns its sentences.

    Raises ValueError for a length outside the bounds, too many sentences, markup or JSON
    debris, or a repetition loop.
    """
    if not min_chars <= len(text) <= max_chars:
        raise ValueError(f"{what} must be {min_chars}-{max_chars} characters, not {len(text)}")
    sentences = [s for s in SENTENCE.split(text) if s.strip()]
    if len(sentences) > max_sentences:
        raise ValueError(f"{what} has {len(sentences)} sentences, at most {max_sentences} allowed")
    if MARKUP.search(text):
        raise ValueError(f"{what} contains markup or JSON fragments")
    if degenerate(text):
        raise ValueError(f"{what} repeats itself")
    return sentences
