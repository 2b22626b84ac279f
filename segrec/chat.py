"""Cold-start preference elicitation: a few questions place a new user in a segment.

Each question tells apart the segments nearest the user's draft vector (all of them at
first): it offers, as numbered choices, each contender's most distinctive category not
asked yet and its most distinctive items. The code fixes the choices; the LLM only words
the question, under a grammar that lets it name nothing but the offered categories (a
pattern, as the reasons use), and the answer is checked again against the same pattern.
An invalid answer after the retries, or an LLM failure, gives a template question from the
same facts, marked as a fallback. Without an active clustering run the choices are the
catalogue's most popular categories and items.

Answers are data: numbered choices ("1", "1,3", "1 and 3") pick options; other text is
matched against the catalogue's categories and titles, case-insensitively; nothing in an
answer is ever followed as an instruction. Each answer updates a draft profile; its vector
(liked items' mean embedding mixed with the embedding of the liked categories, in the
run's ``represent`` space) gives the nearest segment and the margin to the second. The
session stops early once the margin reaches ``ChatContext.sure_margin``.

The session never touches the workspace itself: a
:meth:`segrec.serving.Recommender.chat_context` reads one, :meth:`ChatSession.save_as` writes
the new user into a store it is given, and :meth:`ChatSession.state` /
:meth:`ChatSession.restore` let a server keep an open session across restarts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel

from segrec.embed import Encoder, embed_texts, mix_vectors
from segrec.errors import InputError
from segrec.gates import Lexicon, check_fluent, check_question_consistent, tally_chat
from segrec.grounding import decode_json, degenerate, join_words, norm
from segrec.llm.base import LLM, GenerationParams, Message, RetryPolicy, structured_or_why
from segrec.profile import SUMMARY_MAX, Event, Profile, Vocabulary, user_events
from segrec.ranker import chat_group
from segrec.reasons import ReasonCache
from segrec.segments import MIX_WEIGHT, assign_users
from segrec.serving import ReasonWriter, Served, explained_items
from segrec.store import Assignment, ProfileRecord
from segrec.templates import Prompt, load_prompt

if TYPE_CHECKING:
    from segrec.segments import CollabSpace
    from segrec.store import Store

# Used when the run's members' margins are unknown. The example run's median member margin
# is about 0.09 (MiniLM, --represent items, k=3).
SURE_MARGIN = 0.1
# One pick of a category lands next to that category's segment by construction: never stop
# on a single answer.
MIN_QUESTIONS = 2
# The question (1-based) that asks the user to name favourites in their own words: a named
# item is what the collaborative signals need, and no list of choices can guess it.
FAVOURITES_AT = 2
CONTENDERS = 3  # segments one question tells apart
MAX_OPTIONS = 3  # the segments' own: a distinctive category each (items where they have none)
# Then the top of what the chat would recommend now, not yet offered: each one the user
# picks is known (never recommended again) and feeds the collaborative signals.
RANKED_OPTIONS = 12
RECOMMENDED_HEADING = "or any of these you have enjoyed:"
DISTINCT_POOL = 500  # popular items searched for a segment's distinctive examples
MAX_ANSWER_CHARS = 500
PROMPT_ANSWERS = 3  # latest answers shown (quoted) to the model
QUESTION_MAX = 200
CHAT_BEHAVIOR = "chat_like"
QUIT_WORDS = frozenset({"quit", "exit", "q", ":q"})
SKIP_WORDS = frozenset({"", "skip", "pass", "none", "nothing", "no", "dunno", "idk", "-"})
# Words (as `norm` splits them: "don't" → "don t") that negate a name soon after them.
NEGATIONS = frozenset({"not", "no", "don", "dont", "doesn", "hate", "dislike", "never", "except"})
TURNS = frozenset({"but", "though", "however", "yet"})  # "not Horror but Comedy"
NEGATION_WINDOW = 3  # words before a name that can negate it ("not really into Horror")
MAX_USER_ID = 64

_OPENERS = "(Which|What|Do you|Would you)"
_WORDS = "( [a-z][a-z',-]{{0,14}}){{{low},{high}}}"
_ASKS = (
    "(Which do you (like|enjoy|prefer)( more| most)?,"
    "|Which of these do you (like|enjoy|prefer)( more| most)?:"
    "|Do you (like|enjoy))"
)
# Categories safe to put in a pattern verbatim (no escapes llama.cpp's converter misreads).
_SAFE_ANCHOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 &'-]{0,39}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CHOICES = re.compile(r"^\s*\d+(\s*(,|;|/|&|\+|and|\s)\s*\d+)*\s*[.!]?\s*$", re.IGNORECASE)
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


# ------------------------------------------------------------------------------ context


@dataclass(frozen=True)
class SegmentCandidate:
    """What the chat knows about one segment: its centroid and what sets it apart."""

    segment_id: int
    name: str
    description: str
    centroid: np.ndarray
    categories: tuple[str, ...]  # by lift over the population, most distinctive first
    items: tuple[str, ...]  # item ids by lift, most distinctive first
    size: int = 0

    @classmethod
    def from_facts(
        cls,
        segment_id: int,
        name: str,
        description: str,
        centroid: np.ndarray,
        facts: Mapping[str, Any],
        size: int = 0,
    ) -> SegmentCandidate:
        """From a segment's facts (a stored run's, or ``SegmentFacts.as_dict()``)."""
        return cls(
            segment_id=segment_id,
            name=name,
            description=description,
            centroid=np.asarray(centroid, dtype=np.float32),
            categories=tuple(str(c["category"]) for c in facts.get("top_categories", [])),
            items=tuple(str(i["item_id"]) for i in facts.get("top_items", [])),
            size=size,
        )


@dataclass
class ChatContext:
    """Everything a chat session reads: ranker and catalogue, segments, encoder, LLM.

    ``represent`` is the space the centroids live in (the run's ``represent`` param); a
    ``collab`` run also needs its fitted ``space`` (a newcomer's liked items are summed in
    it, liked categories count as their items weighted by popularity; the content signal
    still gets the content draft, as on an ``items`` run).
    ``llm=None`` asks template questions and writes template reasons (no model at all,
    e.g. for a rule-based simulated user). Build it from a workspace with
    :meth:`segrec.serving.Recommender.chat_context`, or directly (an evaluation split has
    no workspace).
    """

    served: Served
    segments: list[SegmentCandidate]
    encoder: Encoder
    llm: LLM | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    domain: str = "item"
    represent: str = "items"
    space: CollabSpace | None = None
    run_id: int | None = None
    sure_margin: float = SURE_MARGIN
    attempts: int = 3
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    prompt: Prompt = field(default_factory=lambda: load_prompt("chat_question"))
    cache: ReasonCache | None = None  # reasons already written, by content key

    def __post_init__(self) -> None:
        items = self.served.items
        self.item_ids = [str(item) for item in items["item_id"]]
        self.item_pos = {item: c for c, item in enumerate(self.item_ids)}
        self.titles = [str(t) for t in items["title"]]
        counts = self.served.ranker.counts
        self.popularity = (
            np.asarray(counts, dtype=np.float64)
            if counts is not None
            else np.asarray(self.served.X.sum(axis=0), dtype=np.float64).ravel()
        )
        self.popular_items = [int(c) for c in np.argsort(-self.popularity, kind="stable")]
        weight: Counter[str] = Counter()
        for cats, count in zip(items["categories"], self.popularity, strict=True):
            for category in cats:
                weight[category] += float(count)
        self.popular_categories = [c for c, _ in sorted(weight.items(), key=lambda kv: -kv[1])]
        self.vocabulary = Vocabulary.from_items(items).categories
        self.category_names = {norm(c): c for c in self.vocabulary if norm(c)}
        self.title_names = _title_index(self.titles)
        if self.represent == "collab" and self.space is None:
            raise InputError("a collab run's chat needs the run's fitted space (space=None)")
        # The item vectors in the segments' space: centroids are compared with these.
        self.space_items = (
            self.space.aligned(self.item_ids)
            if self.represent == "collab" and self.space is not None
            else self.served.item_vectors
        )
        self.segment_items = {s.segment_id: self._distinct_items(s) for s in self.segments}

    def _distinct_items(self, segment: SegmentCandidate) -> list[int]:
        """The segment's top items, then popular items nearer its centroid than any other's."""
        known = [self.item_pos[i] for i in segment.items if i in self.item_pos]
        if len(self.segments) < 2:
            return known
        pool = np.array(self.popular_items[:DISTINCT_POOL], dtype=np.int64)
        vectors = self.space_items[pool]  # unit rows: a collab space's are not
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        centroids = np.stack([s.centroid for s in self.segments]).astype(np.float32)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        sims = vectors @ centroids.T
        own = [s.segment_id for s in self.segments].index(segment.segment_id)
        others = np.delete(sims, own, axis=1).max(axis=1)
        order = np.argsort(-(sims[:, own] - others), kind="stable")
        extra = [int(pool[i]) for i in order if sims[i, own] > others[i]]
        return list(dict.fromkeys(known + extra))


def _title_index(titles: Sequence[str]) -> dict[str, int]:
    """Normalised title (year dropped) → first catalogue column; too-short names left out.

    A one-word title under five letters ("Heat", "Up") would match ordinary words in free
    text; such titles are picked by number instead.
    """
    index: dict[str, int] = {}
    for col, title in enumerate(titles):
        key = norm(_YEAR.sub("", title))
        if key and (" " in key or len(key) >= 5):
            index.setdefault(key, col)
    return index


# ------------------------------------------------------------------------------ questions


@dataclass(frozen=True)
class Option:
    """One numbered choice: a catalogue category or item, and the segment it stands for."""

    kind: Literal["category", "item"]
    value: str  # the category, or the item id
    label: str  # what is shown: the category, or the item's title
    segment_id: int | None = None
    recommended: bool = False  # one of the chat's current recommendations (`RANKED_OPTIONS`)


@dataclass(frozen=True)
class Question:
    text: str
    options: tuple[Option, ...]
    segments: tuple[int, ...]  # the segments it tells apart (empty without a run)
    fallback: bool = False
    fallback_reason: str | None = None
    open: bool = False  # no choices: the user names things in their own words

    def render(self) -> str:
        """The question (marked when it is the template) and its numbered choices."""
        lines = [self.text + (" [template]" if self.fallback else "")]
        first = self.recommended_from
        for i, option in enumerate(self.options, start=1):
            if i == first and i > 1:
                lines.append(f"  {RECOMMENDED_HEADING}")
            lines.append(f"  {i}. {option.label}")
        return "\n".join(lines)

    def state(self) -> dict[str, Any]:
        """Everything about the question, as JSON (:meth:`from_state` reads it back)."""
        return {
            "text": self.text,
            "options": [
                [o.kind, o.value, o.label, o.segment_id, o.recommended] for o in self.options
            ],
            "segments": list(self.segments),
            "fallback": self.fallback,
            "fallback_reason": self.fallback_reason,
            "open": self.open,
        }

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> Question:
        return cls(
            text=str(data["text"]),
            # A session saved before `recommended` existed has 4 fields per option.
            options=tuple(
                Option(o[0], str(o[1]), str(o[2]), o[3], bool(o[4]) if len(o) > 4 else False)
                for o in data["options"]
            ),
            segments=tuple(int(s) for s in data["segments"]),
            fallback=bool(data["fallback"]),
            fallback_reason=data.get("fallback_reason"),
            open=bool(data["open"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "options": [o.label for o in self.options],
            "recommended_from": self.recommended_from,
            "segments": list(self.segments),
            "fallback": self.fallback,
            "fallback_why": self.fallback_reason,
            "open": self.open,
        }

    @property
    def recommended_from(self) -> int | None:
        """The number (1-based) of the first option that is a current recommendation."""
        return next((i for i, o in enumerate(self.options, start=1) if o.recommended), None)


class _Answer(BaseModel):
    question: str


def question_pattern(kinds: Sequence[str]) -> str:
    """A question to the user about the offered categories (``kinds``): "Which do you like
    more, Horror or Comedy?", "Do you enjoy Horror?"; with no category that fits a
    pattern, an opener, lower-case words and "?"."""
    anchors = [k for k in kinds if _SAFE_ANCHOR.match(k)]
    if not anchors:
        return f"^{_OPENERS}{_WORDS.format(low=2, high=16)}[?]$"
    # Free words around the categories were where the small model garbled ("your favorite,
    # based on a Western or children-arcade?"): it picks an opener and the categories, one
    # or up to three different ones ("Pet supplies, Skin care or Pet supplies?" was a
    # blind read's repeat).
    lists = [
        *anchors,
        *(f"{a} or {b}" for a in anchors for b in anchors if a != b),
        *(
            f"{a}, {b} or {c}"
            for a in anchors
            for b in anchors
            for c in anchors
            if len({a, b, c}) == 3
        ),
    ]
    return f"^{_ASKS} ({'|'.join(lists)})[?]$"


def question_schema(kinds: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"question": {"type": "string", "pattern": question_pattern(kinds)}},
        "required": ["question"],
    }


def parse_question(
    text: str, *, kinds: Sequence[str], system: str, choices: Sequence[str] = ()
) -> str:
    """Decode and check one LLM answer; raise ValueError when it is unusable.

    The pattern is checked again here (a backend may ignore it), a question that repeats
    six words of the system prompt is refused (the prompt never leaks), and the quality
    gates (:mod:`segrec.gates`) want fluent words and a question to the user about the
    offered ``choices`` (their labels; ``kinds`` when not given).
    """
    question = " ".join(_Answer.model_validate(decode_json(text)).question.split())
    if len(question) > QUESTION_MAX:
        raise ValueError(f"question is {len(question)} characters, at most {QUESTION_MAX}")
    if not re.fullmatch(question_pattern(kinds), question):
        raise ValueError("question does not open with Which/Do you, name a choice, end '?'")
    if degenerate(question):
        raise ValueError("question repeats itself")
    if _shares_run(question, system, 6):
        raise ValueError("question repeats the instructions")
    names = list(choices or kinds)
    check_fluent(question, Lexicon.from_names(names), names=names)
    check_question_consistent(question, names)
    return question


def _shares_run(text: str, source: str, n: int) -> bool:
    words, known = norm(text).split(), norm(source).split()
    grams = {tuple(known[i : i + n]) for i in range(len(known) - n + 1)}
    return any(tuple(words[i : i + n]) in grams for i in range(len(words) - n + 1))


def template_question(options: Sequence[Option], domain: str) -> str:
    kinds = [o.label for o in options if o.kind == "category"]
    if kinds:
        return f"Which of these kinds of {domain} do you enjoy: {join_words(kinds[:3])}?"
    return f"Which of these {domain}s do you enjoy most?"


# ------------------------------------------------------------------------------ answers


@dataclass(frozen=True)
class ParsedAnswer:
    """What one answer said, in catalogue terms (categories, item columns)."""

    text: str  # the answer as kept: decoded, cleaned, truncated
    liked_categories: tuple[str, ...] = ()
    disliked_categories: tuple[str, ...] = ()
    liked_items: tuple[int, ...] = ()
    disliked_items: tuple[int, ...] = ()
    truncated: bool = False
    quit: bool = False

    @property
    def learned(self) -> bool:
        return bool(
            self.liked_categories
            or self.disliked_categories
            or self.liked_items
            or self.disliked_items
        )


def clean_answer(raw: str | bytes) -> tuple[str, bool]:
    """An answer as data: decoded (bad UTF-8 replaced), one line, at most 500 characters."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = " ".join(_CONTROL.sub(" ", text).split())
    if len(text) <= MAX_ANSWER_CHARS:
        return text, False
    return text[: MAX_ANSWER_CHARS - 1] + "…", True


def parse_answer(raw: str | bytes, options: Sequence[Option], context: ChatContext) -> ParsedAnswer:
    """Map an answer to options (numbers) or catalogue names (free text); never raises."""
    text, truncated = clean_answer(raw)
    lowered = text.strip().lower()
    if lowered in QUIT_WORDS:
        return ParsedAnswer(text=text, quit=True)
    if lowered.strip(".!") in SKIP_WORDS:
        return ParsedAnswer(text=text, truncated=truncated)
    liked_c: list[str] = []
    liked_i: list[int] = []
    disliked_c: list[str] = []
    disliked_i: list[int] = []
    if _CHOICES.match(text):
        for number in re.findall(r"\d+", text):
            index = int(number) - 1
            if 0 <= index < len(options):
                option = options[index]
                if option.kind == "category":
                    liked_c.append(option.value)
                elif option.value in context.item_pos:
                    liked_i.append(context.item_pos[option.value])
    else:
        words = norm(text).split()
        for name, negated in _find_names(words, context.category_names):
            (disliked_c if negated else liked_c).append(context.category_names[name])
        titles = _find_names(words, context.title_names)
        names = [name for name, _ in titles]
        for name, negated in titles:  # "Toy Story 2" is not also "Toy Story"
            if any(name != other and f" {name} " in f" {other} " for other in names):
                continue
            (disliked_i if negated else liked_i).append(context.title_names[name])
    return ParsedAnswer(
        text=text,
        liked_categories=tuple(dict.fromkeys(liked_c)),
        disliked_categories=tuple(dict.fromkeys(c for c in disliked_c if c not in liked_c)),
        liked_items=tuple(dict.fromkeys(liked_i)),
        disliked_items=tuple(dict.fromkeys(i for i in disliked_i if i not in liked_i)),
        truncated=truncated,
    )


def _find_names(words: Sequence[str], names: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """Names (normalised, whole words) in the answer, each with whether a negation precedes."""
    found: dict[str, bool] = {}
    longest = max((len(n.split()) for n in names), default=0)
    for start in range(len(words)):
        for size in range(min(longest, len(words) - start), 0, -1):
            name = " ".join(words[start : start + size])
            if name in names and name not in found:
                window = words[max(0, start - NEGATION_WINDOW) : start]
                turns = [i for i, w in enumerate(window) if w in TURNS]
                if turns:
                    window = window[turns[-1] + 1 :]
                found[name] = any(w in NEGATIONS for w in window)
    return list(found.items())


# ------------------------------------------------------------------------------ session


@dataclass(frozen=True)
class Placement:
    """The draft's nearest segment, and how much nearer it is than the second."""

    segment_id: int
    name: str
    distance: float
    margin: float
    sure: bool

    def as_dict(self, description: str = "", run_id: int | None = None) -> dict[str, Any]:
        return {
            "id": self.segment_id,
            "name": self.name,
            "description": description,
            "run": run_id,
            "distance": round(self.distance, 4),
            "margin": round(self.margin, 4),
            "sure": self.sure,
        }


@dataclass(frozen=True)
class Turn:
    question: Question
    answer: ParsedAnswer
    placement: Placement | None

    @property
    def sure(self) -> bool:
        return self.placement is not None and self.placement.sure

    @property
    def quit(self) -> bool:
        return self.answer.quit


@dataclass
class ChatResult:
    questions: list[Question]
    answers: list[str]
    profile: Profile
    segment: dict[str, Any] | None
    items: list[dict[str, Any]]
    notes: list[str]
    quit: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "questions": [q.as_dict() for q in self.questions],
            "answers": self.answers,
            "profile": self.profile.model_dump(),
            "segment": self.segment,
            "items": self.items,
            "notes": self.notes,
            "quit": self.quit,
            "text": tally_chat(self.questions, self.items).as_json(),
        }


class ChatSession:
    """One new user's chat. Drive it with :meth:`next_question` / :meth:`answer` until
    :meth:`next_question` returns None, then :meth:`finish` (or :func:`run_chat`)."""

    def __init__(
        self,
        context: ChatContext,
        *,
        max_questions: int = 5,
        n: int = 10,
        favourites_at: int | None = FAVOURITES_AT,
    ) -> None:
        if max_questions < 1:
            raise InputError(f"--max-questions {max_questions}: must be at least 1")
        if not 1 <= n <= 1000:
            raise InputError(f"--n {n}: must be between 1 and 1000")
        self.context = context
        self.max_questions = max_questions
        self.n = n
        self.favourites_at = favourites_at
        self.turns: list[Turn] = []
        self.liked_categories: list[str] = []
        self.disliked_categories: list[str] = []
        self.liked_items: list[int] = []  # catalogue columns, in the order they were named
        self.quit = False
        self._pending: Question | None = None
        self._offered: set[tuple[str, str]] = set()
        self._asked: Counter[int] = Counter()
        self._vector: np.ndarray | None = None
        self._content: np.ndarray | None = None  # the content signal's draft vector
        self._placement: Placement | None = None

    # ---------------------------------------------------------------- asking

    def next_question(self) -> Question | None:
        """The next question, or None when done (quit, sure, or ``max_questions`` asked)."""
        if self._pending is not None:
            return self._pending
        if self.quit or len(self.turns) >= self.max_questions:
            return None
        if len(self.turns) >= MIN_QUESTIONS and self._placement and self._placement.sure:
            return None
        contenders = self._contenders()
        if self.favourites_at is not None and len(self.turns) + 1 == self.favourites_at:
            self._pending = Question(
                f"Name a few {self.context.domain}s you loved (titles, separated by commas).",
                (),
                tuple(s.segment_id for s in contenders),
                open=True,
            )
            return self._pending
        options = self._options(contenders)
        ranked = self._ranked_options(options)
        if not options and not ranked:
            return None
        self._offered.update((o.kind, o.value) for o in options + ranked)
        self._asked.update(s.segment_id for s in contenders)
        self._pending = self._word(options, contenders, ranked)
        return self._pending

    def _contenders(self) -> list[SegmentCandidate]:
        segments = self.context.segments
        if self._vector is None:  # nothing known: the least asked, largest segments first
            ranked = sorted(segments, key=lambda s: (self._asked[s.segment_id], -s.size))
        else:
            distances = [float(np.linalg.norm(self._vector - s.centroid)) for s in segments]
            ranked = [segments[i] for i in np.argsort(distances, kind="stable")]
        return ranked[:CONTENDERS]

    def _fresh(self, kind: str, value: str) -> bool:
        return (kind, value) not in self._offered

    def _options(self, contenders: Sequence[SegmentCandidate]) -> list[Option]:
        context = self.context
        taken = set(self.liked_categories) | set(self.disliked_categories)
        options: list[Option] = []
        for segment in contenders:
            rivals = {c for s in contenders if s is not segment for c in s.categories[:3]}
            fresh = [c for c in segment.categories if self._fresh("category", c) and c not in taken]
            distinct = [c for c in fresh if c not in rivals] or fresh
            chosen = {o.value for o in options}
            distinct = [c for c in distinct if c not in chosen]
            if distinct:
                options.append(Option("category", distinct[0], distinct[0], segment.segment_id))
        queues = [
            (s.segment_id, iter(context.segment_items.get(s.segment_id, []))) for s in contenders
        ]
        if not contenders:  # no run: the most popular categories, then items
            popular = [c for c in context.popular_categories if self._fresh("category", c)]
            options += [Option("category", c, c) for c in popular if c not in taken][:CONTENDERS]
            queues = [(None, iter(context.popular_items))]
        ids = context.item_ids
        while len(options) < MAX_OPTIONS and queues:
            for segment_id, queue in list(queues):
                chosen = {o.value for o in options}
                col = next(
                    (
                        c
                        for c in queue
                        if c not in self.liked_items
                        and self._fresh("item", ids[c])
                        and ids[c] not in chosen
                    ),
                    None,
                )
                if col is None:
                    queues.remove((segment_id, queue))
                    continue
                options.append(Option("item", ids[col], context.titles[col], segment_id))
                if len(options) >= MAX_OPTIONS:
                    break
        return options

    def _ranked_options(self, options: Sequence[Option]) -> list[Option]:
        """Up to `RANKED_OPTIONS` of the current recommendations not offered before."""
        if RANKED_OPTIONS <= 0:
            return []
        ids = self.context.item_ids
        chosen = {o.value for o in options if o.kind == "item"}
        offered = sum(kind == "item" for kind, _ in self._offered)
        cols, _, _ = self.recommend(RANKED_OPTIONS + offered + len(chosen))
        fresh = [c for c in cols if self._fresh("item", ids[c]) and ids[c] not in chosen]
        return [
            Option("item", ids[c], self.context.titles[c], recommended=True)
            for c in fresh[:RANKED_OPTIONS]
        ]

    def _word(
        self,
        options: list[Option],
        contenders: Sequence[SegmentCandidate],
        ranked: Sequence[Option] = (),
    ) -> Question:
        """The question about ``options`` (the LLM's wording, or the template); ``ranked``
        (the current recommendations) are shown after them but not put to the model: the
        question is about the segments' choices, and a dozen titles would only lengthen
        the prompt."""
        context = self.context
        shown = (*options, *ranked)
        segments = tuple(s.segment_id for s in contenders)
        kinds = [o.label for o in options if o.kind == "category"]
        if context.llm is None:
            why = "no LLM: template question"
        else:
            messages = self.question_messages(options, contenders)
            parse = partial(
                parse_question,
                kinds=kinds,
                system=messages[0]["content"],
                choices=[o.label for o in options],
            )
            value, why = structured_or_why(
                context.llm,
                messages,
                parse=parse,
                params=context.params,
                schema=question_schema(kinds),
                attempts=context.attempts,
                policy=context.retry,
            )
            if value is not None:
                return Question(value, shown, segments)
        text = template_question(options, context.domain)
        return Question(text, shown, segments, fallback=True, fallback_reason=why)

    def question_messages(
        self, options: Sequence[Option], contenders: Sequence[SegmentCandidate]
    ) -> list[Message]:
        """The prompt: earlier answers as quoted data, the contenders, the choices."""
        answers = [t.answer.text.replace('"', "'") for t in self.turns if t.answer.text]
        return self.context.prompt.render(
            domain=self.context.domain,
            answers=answers[-PROMPT_ANSWERS:],
            groups=[{"name": s.name, "description": s.description} for s in contenders],
            options=options,
            kinds=[o.label for o in options if o.kind == "category"][:3],
        )

    # ---------------------------------------------------------------- answering

    def answer(self, raw: str | bytes) -> Turn:
        """Take the answer to the pending question and update the draft profile."""
        question = self._pending
        if question is None:
            raise RuntimeError("no question is pending: call next_question() first")
        parsed = parse_answer(raw, question.options, self.context)
        self._pending = None
        if parsed.quit:
            self.quit = True
        else:
            for category in parsed.liked_categories:
                if category not in self.liked_categories:
                    self.liked_categories.append(category)
                if category in self.disliked_categories:
                    self.disliked_categories.remove(category)
            for category in parsed.disliked_categories:
                if category not in self.disliked_categories + self.liked_categories:
                    self.disliked_categories.append(category)
            for col in parsed.liked_items:
                if col not in self.liked_items:
                    self.liked_items.append(col)
            for col in parsed.disliked_items:
                if col in self.liked_items:
                    self.liked_items.remove(col)
            if parsed.learned:
                self._update()
        turn = Turn(question, parsed, self._placement)
        self.turns.append(turn)
        return turn

    def profile(self) -> Profile:
        """The draft profile: only what the user said (and the categories of what they liked)."""
        items = self.context.served.items
        from_items: Counter[str] = Counter(
            c for col in self.liked_items for c in items["categories"].iat[col]
        )
        likes = list(
            dict.fromkeys(
                [*self.liked_categories]
                + [c for c, _ in from_items.most_common() if c not in self.disliked_categories]
            )
        )[:5]
        titles = [self.context.titles[col] for col in self.liked_items]
        parts = []
        if self.liked_categories:
            parts.append(f"enjoys {join_words(self.liked_categories)}")
        if titles:
            parts.append(f"liked {join_words(titles[:3])}")
        if self.disliked_categories:
            parts.append(f"is less keen on {join_words(self.disliked_categories)}")
        summary = (
            "This user " + ", ".join(parts) + "."
            if parts
            else "This user has not said what they like yet."
        )
        if len(summary) > SUMMARY_MAX:
            summary = summary[: SUMMARY_MAX - 1].rsplit(" ", 1)[0] + "…"
        return Profile(
            summary=summary,
            likes=likes,
            dislikes=list(self.disliked_categories),
            favourite_items=titles[:5],
        )

    def vector(self) -> np.ndarray | None:
        """The draft's vector in the segments' space (None while nothing is liked)."""
        return self._vector

    def _update(self) -> None:
        context = self.context
        items_vec = None
        if self.liked_items:
            mean = context.served.item_vectors[self.liked_items].mean(axis=0)
            items_vec = mean / max(float(np.linalg.norm(mean)), 1e-12)
        texts = []
        represent = "items" if context.represent == "collab" else context.represent
        if represent in ("profile", "mix") and (self.liked_categories or items_vec is not None):
            texts.append(self.profile().embedding_text())
        if represent != "profile" and self.liked_categories:
            texts.append("Categories: " + ", ".join(self.liked_categories) + ".")
        embedded = embed_texts(texts, context.encoder) if texts else None
        if represent == "profile":
            vector = embedded[0] if embedded is not None else None
        else:
            categories = embedded[-1] if embedded is not None and self.liked_categories else None
            parts = [v for v in (items_vec, categories) if v is not None]
            vector = (
                mix_vectors(parts[1][None], parts[0][None], MIX_WEIGHT)[0]
                if len(parts) == 2
                else parts[0]
                if parts
                else None
            )
            if represent == "mix" and vector is not None and embedded is not None:
                vector = mix_vectors(embedded[0][None], vector[None], MIX_WEIGHT)[0]
        self._content = None if vector is None else np.asarray(vector, dtype=np.float32)
        self._vector = self._content
        if context.represent == "collab" and context.space is not None:
            self._vector = self._collab_vector(context.space)
        self._placement = self._place()

    def _collab_vector(self, space: CollabSpace) -> np.ndarray | None:
        """The draft in a collab run's space: the liked items' sum, mixed (as on an items
        run) with the liked categories' items weighted by popularity; None while neither
        reaches an item the space knows."""
        context = self.context
        items_vec = space.of_items([context.item_ids[c] for c in self.liked_items])
        categories = (
            space.of_categories(context.served.items, self.liked_categories)
            if self.liked_categories
            else np.zeros(space.dim, dtype=np.float32)
        )
        parts = [v for v in (items_vec, categories) if float(np.linalg.norm(v)) > 0]
        if not parts:
            return None
        if len(parts) == 2:
            return mix_vectors(parts[1][None], parts[0][None], MIX_WEIGHT)[0]
        return parts[0]

    def _place(self) -> Placement | None:
        if self._vector is None or not self.context.segments:
            return None
        centroids = np.stack([s.centroid for s in self.context.segments])
        labels, distances, margins = assign_users(self._vector[None], centroids)
        segment = self.context.segments[int(labels[0])]
        margin = float(margins[0])
        return Placement(
            segment.segment_id,
            segment.name,
            float(distances[0]),
            margin,
            sure=len(self.context.segments) > 1 and margin >= self.context.sure_margin,
        )

    @property
    def placement(self) -> Placement | None:
        return self._placement

    @property
    def group(self) -> str:
        """The ranker's weight set for this user (`segrec.ranker.chat_group`): "chat" once
        they named or picked `CHAT_ITEMS` items, "chat_start" once they told anything less
        (an item, a category); before that, what any short history gets."""
        spec = self.context.served.ranker.spec
        told = bool(self.liked_items or self.liked_categories or self.disliked_categories)
        return chat_group(len(self.liked_items), told, spec.weights, spec.short_history)

    # ---------------------------------------------------------------- result

    def history(self) -> list[Event]:
        """The liked items as history events (what reasons may cite), in naming order."""
        items = self.context.served.items
        frame = pd.DataFrame(
            {
                "user_id": "chat",
                "item_id": [self.context.item_ids[c] for c in self.liked_items],
                "behavior": CHAT_BEHAVIOR,
                "value": np.nan,
                "timestamp": pd.array([None] * len(self.liked_items), dtype="Int64"),
                "seq": range(len(self.liked_items)),
            }
        )
        return user_events(frame, items, {}).get("chat", [])

    def recommend(
        self, n: int | None = None
    ) -> tuple[list[int], list[float], dict[str, np.ndarray]]:
        """Top-n catalogue columns, scores and signal parts for the draft (no reasons)."""
        context = self.context
        size = context.served.item_vectors.shape[0]
        row = sp.csr_matrix(
            (
                np.ones(len(self.liked_items), dtype=np.float32),
                (np.zeros(len(self.liked_items), dtype=np.int64), self.liked_items),
            ),
            shape=(1, size),
        )
        label = self._placement.segment_id if self._placement else -1
        vectors = None if self._content is None else self._content[None]
        ranker = context.served.ranker
        recs = ranker.recommend(
            row,
            n or self.n,
            labels=np.array([label], dtype=np.int64),
            user_vectors=vectors,
            groups=np.array([self.group]),
            user_categories=ranker.category_row(self.liked_categories, self.disliked_categories),
        )
        valid = recs.indices[0] >= 0
        cols = [int(c) for c in recs.indices[0][valid]]
        scores = [float(s) for s in recs.scores[0][valid]]
        parts = {k: v[0][valid] for k, v in recs.contributions.items()}
        return cols, scores, parts

    def finish(self, *, reasons: bool = True) -> ChatResult:
        """Profile, segment and top-n items with reasons (``reasons=False``: templates only)."""
        context = self.context
        served = context.served
        notes: list[str] = []
        segment = None
        if not context.segments:
            notes.append("no segment exists yet: no clustering run (run `segrec cluster`)")
        elif self._placement is None:
            notes.append("nothing liked yet: no segment chosen")
        else:
            description = next(
                s.description
                for s in context.segments
                if s.segment_id == self._placement.segment_id
            )
            segment = self._placement.as_dict(description, context.run_id)
        if self.quit:
            return ChatResult(
                self._questions(), self._answers(), self.profile(), segment, [], notes, quit=True
            )
        cols, scores, parts = self.recommend()
        writer = ReasonWriter(
            context.llm if reasons else None,
            params=context.params,
            domain=context.domain,
            attempts=context.attempts,
            retry=context.retry,
            cache=context.cache,
            why_template="template requested" if not reasons else "no LLM",
        )
        items, more = explained_items(
            served,
            cols,
            scores,
            parts,
            group=self.group,
            history=self.history(),
            liked_cols=self.liked_items,
            writer=writer,
            segment_name=self._placement.name if self._placement else None,
        )
        notes += more
        question_fallbacks = sum(q.fallback for q in self._questions())
        if question_fallbacks:
            notes.append(f"{question_fallbacks} question(s) are templates (marked)")
        return ChatResult(self._questions(), self._answers(), self.profile(), segment, items, notes)

    def like_items(self, cols: Sequence[int]) -> None:
        """Take catalogue columns as liked without a question (an anonymous visitor's
        items): the draft, its vector and placement update as after an answer."""
        for col in cols:
            if col not in self.liked_items:
                self.liked_items.append(int(col))
        self._update()

    # ---------------------------------------------------------------- keeping

    def state(self) -> dict[str, Any]:
        """What :meth:`restore` needs, as JSON: settings, questions asked, answers given."""
        return {
            "max_questions": self.max_questions,
            "n": self.n,
            "favourites_at": self.favourites_at,
            "run": self.context.run_id,
            "turns": [
                {"question": t.question.state(), "answer": t.answer.text} for t in self.turns
            ],
            "pending": None if self._pending is None else self._pending.state(),
        }

    @classmethod
    def restore(cls, context: ChatContext, state: Mapping[str, Any]) -> ChatSession:
        """The session :meth:`state` describes, its answers replayed on ``context`` (no
        LLM call: the questions are kept as they were asked)."""
        session = cls(
            context,
            max_questions=int(state["max_questions"]),
            n=int(state["n"]),
            favourites_at=state.get("favourites_at"),
        )
        asked = [(Question.from_state(t["question"]), t["answer"]) for t in state["turns"]]
        pending = state.get("pending")
        if pending is not None:
            asked.append((Question.from_state(pending), None))
        for question, answer in asked:
            if not question.open:
                session._offered.update((o.kind, o.value) for o in question.options)
                session._asked.update(question.segments)
            session._pending = question
            if answer is not None:
                session.answer(answer)
        return session

    def _questions(self) -> list[Question]:
        return [t.question for t in self.turns]

    def _answers(self) -> list[str]:
        return [t.answer.text for t in self.turns]

    # ---------------------------------------------------------------- saving

    def save_as(self, store: Store, user_id: str) -> None:
        """Store the new user (source 'chat'): liked items, profile, chat, assignment.

        One transaction; an id that already exists is refused.
        """
        check_new_user(store, user_id)
        profile = self.profile()
        body = json.dumps(profile.model_dump(), sort_keys=True, ensure_ascii=False)
        record = ProfileRecord(
            user_id=user_id,
            cache_key=hashlib.sha256(f"chat:{body}".encode()).hexdigest(),
            profile=profile.model_dump(),
            raw_output=None,
            model_id="segrec-chat",
            prompt_version=self.context.prompt.version,
            params={},
            fallback=False,
            fallback_reason=None,
            removed=[],
            attempts=0,
            prompt_tokens=0,
            completion_tokens=0,
            latency_s=0.0,
        )
        assignment = None
        if self._placement is not None and self.context.run_id is not None:
            assignment = Assignment(
                user_id,
                self._placement.segment_id,
                self._placement.distance,
                self._placement.margin,
                late=True,
            )
        store.save_chat_user(
            user_id,
            items=[self.context.item_ids[c] for c in self.liked_items],
            behavior=CHAT_BEHAVIOR,
            profile=record,
            questions=[q.as_dict() for q in self._questions()],
            answers=self._answers(),
            run_id=self.context.run_id,
            assignment=assignment,
        )


def check_new_user(store: Store, user_id: str) -> str:
    """Refuse a --save-as id that exists already or cannot be an id."""
    if not user_id.strip() or len(user_id) > MAX_USER_ID or not user_id.isprintable():
        raise InputError(
            f"--save-as {user_id!r}: not a usable user id — use 1-{MAX_USER_ID} printable "
            "characters"
        )
    if store.has_user(user_id):
        raise InputError(
            f"--save-as {user_id}: user id already exists in {store.path.parent} — choose another"
        )
    return user_id


def run_chat(
    session: ChatSession,
    ask: Callable[[Question], str | bytes | None],
    *,
    on_turn: Callable[[Turn], None] | None = None,
    reasons: bool = True,
) -> ChatResult:
    """Ask until done; ``ask`` returns the user's answer, or None when they have no more
    (end of a script): the chat then finishes with what it has."""
    while (question := session.next_question()) is not None:
        reply = ask(question)
        if reply is None:
            break
        turn = session.answer(reply)
        if on_turn is not None:
            on_turn(turn)
    return session.finish(reasons=reasons)
