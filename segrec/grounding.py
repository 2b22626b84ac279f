"""Text checks shared by every stage that grounds LLM output in the data (profiles, labels).

A grammar fixes the form of an answer, not its content: these helpers find what free text
names that the data does not contain, and the small model's repetition loops.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

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


def degenerate(text: str) -> bool:
    """True for the small model's loops: a 4-word run repeated three times or more."""
    words = norm(text).split()
    grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return bool(grams) and grams.most_common(1)[0][1] >= 3


def join_words(values: Sequence[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]
