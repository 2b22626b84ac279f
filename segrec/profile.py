"""The profile stage: one grounded, structured interest profile per user.

For each user: compact the history (strongest and most recent signals, capped by count and
tokens, described in words), build a per-user JSON schema whose ``likes``/``dislikes``/
``favourite_items`` are enums of what is actually in that history (so the grammar cannot
name anything else), ask the LLM, then check what a grammar cannot: free text that names a
category or title absent from the history is removed and counted. Output still invalid after
retries becomes a deterministic profile built from the history, marked as a fallback.

Everything here is a plain function over a batch of users; :func:`profile_users` is the only
place that touches the workspace, and it commits each user as soon as it is done.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd
from pydantic import BaseModel, Field

from segrec.errors import LLMError
from segrec.gates import (
    Lexicon,
    TextTally,
    check_fluent,
    check_summary_specific,
    check_supported,
)
from segrec.grounding import (
    PATTERN_UNSAFE,
    SENTENCE,
    absent_categories,
    decode_json,
    degenerate,
    join_words,
    norm,
    one_or_two,
    pattern_group,
)
from segrec.llm.base import (
    LLM,
    GenerationParams,
    RetryPolicy,
    generate_structured,
    map_concurrent,
)
from segrec.store import ProfileRecord, Store
from segrec.templates import Prompt

# Bumped when the profile schema, compaction or grounding rules change: part of cache keys.
PROFILE_LOGIC_VERSION = "6"

SUMMARY_MIN, SUMMARY_MAX = 20, 280
SUMMARY_PREFIX = "This user "
# Any characters but a quote or a backslash, so the grammar closes the string itself, and a
# final stop: the quality gates want finished sentences.
SUMMARY_PATTERN = (
    f'^{SUMMARY_PREFIX}[^"\\\\{{}}\\[\\]]{{9,{SUMMARY_MAX - len(SUMMARY_PREFIX) - 1}}}[.]$'
)
# With a grammar, the summary is said from the user's own facts: a verb, one or two of
# their liked categories, one or two favourites, one or two categories they rate low. Free
# words were the blind read's untrue summaries ("fond memories of a camping experience",
# "the blue protein kettlebell" for the Nordic one).
SUMMARY_VERBS = ("mostly enjoys", "keeps coming back to", "is drawn to", "often picks")
SUMMARY_OPTIONS = 3  # liked categories and favourites the grammar may pick from
MAX_LIKES, MAX_DISLIKES, MAX_FAVOURITES, MAX_THEMES, THEME_MAX = 3, 2, 3, 3, 40
# A theme is a short phrase of words: no digits (years), brackets or JSON debris.
THEME_PATTERN = f"^[A-Za-z][A-Za-z' -]{{2,{THEME_MAX - 1}}}$"
POSITIVE, NEGATIVE = 0.3, -0.15

# Strength of behaviours that carry no rating, in [-1, 1].
IMPLICIT_STRENGTH = {
    "purchase": 0.8,
    "buy": 0.8,
    "order": 0.8,
    "favorite": 0.7,
    "favourite": 0.7,
    "like": 0.7,
    "add_to_cart": 0.6,
    "cart": 0.6,
    "share": 0.6,
    "play": 0.4,
    "listen": 0.4,
    "read": 0.4,
    "click": 0.3,
    "view": 0.3,
    "interaction": 0.4,
    "dislike": -0.7,
    "return": -0.6,
    "skip": -0.4,
}
RATING_WORDS = ("rat", "score", "star")


class Profile(BaseModel):
    """A user's interest profile: what gets stored, embedded and shown."""

    summary: str
    likes: list[str] = Field(default_factory=list)
    dislikes: list[str] = Field(default_factory=list)
    favourite_items: list[str] = Field(default_factory=list)
    themes: list[str] = Field(default_factory=list)

    def embedding_text(self) -> str:
        """The validated fields that segments are built from (never the raw LLM output)."""
        parts = [self.summary.strip()]
        if self.likes:
            parts.append("Likes: " + ", ".join(self.likes) + ".")
        if self.themes:
            parts.append("Themes: " + ", ".join(self.themes) + ".")
        return " ".join(parts)


# ------------------------------------------------------------------------------ history


@dataclass(frozen=True)
class Event:
    """One item in a user's compacted history, with how strongly it signals taste."""

    item_id: str
    title: str
    categories: tuple[str, ...]
    behavior: str
    value: float | None
    timestamp: int | None
    seq: int
    strength: float
    description: str


@dataclass(frozen=True)
class ValueScale:
    """Observed min and max of a rating-like behaviour's values (to read 4.5 as 4.5/5)."""

    low: float
    high: float


def value_scales(interactions: pd.DataFrame) -> dict[str, ValueScale]:
    """Scales of every behaviour whose values read as ratings (name contains rat/score/star)."""
    ranges = interactions.dropna(subset=["value"]).groupby("behavior")["value"].agg(["min", "max"])
    return scales_from_ranges((str(b), float(lo), float(hi)) for b, lo, hi in ranges.itertuples())


def scales_from_ranges(ranges: Iterable[tuple[str, float, float]]) -> dict[str, ValueScale]:
    """:func:`value_scales` from (behaviour, min value, max value), e.g. as SQL computes them
    (``Store.value_ranges``) without loading the interactions."""
    scales: dict[str, ValueScale] = {}
    for behavior, low, high in ranges:
        if any(word in behavior.lower() for word in RATING_WORDS):
            scales[behavior] = ValueScale(min(low, 0.0) if low >= 0 else low, high)
    return scales


def _strength(behavior: str, value: float | None, scales: dict[str, ValueScale]) -> float:
    scale = scales.get(behavior)
    if scale is not None and value is not None and scale.high > scale.low:
        ratio = (value - scale.low) / (scale.high - scale.low)
        return max(-1.0, min(1.0, 2 * ratio - 1))
    return IMPLICIT_STRENGTH.get(behavior.lower(), 0.4)


def _describe(behavior: str, value: float | None, scale: ValueScale | None) -> str:
    if scale is not None and value is not None:
        ratio = (value - scale.low) / (scale.high - scale.low) if scale.high > scale.low else 1
        feeling = (
            "loved it"
            if ratio >= 0.85
            else "liked it"
            if ratio >= 0.65
            else "found it so-so"
            if ratio >= 0.45
            else "disliked it"
        )
        return f"rated {value:g}/{scale.high:g} ({feeling})"
    verb = {"view": "viewed", "click": "clicked", "purchase": "purchased", "buy": "bought"}.get(
        behavior.lower(), behavior.replace("_", " ")
    )
    return verb if value is None else f"{verb} (value {value:g})"


def compact_history(
    events: Sequence[Event], *, max_items: int = 15, max_tokens: int = 500
) -> list[Event]:
    """Keep the strongest and the most recent signals, one per item, oldest first.

    Half the budget goes to the strongest signals (either sign), the rest to the most
    recent; then the weakest are dropped until the described lines fit ``max_tokens``
    (estimated at 4 characters a token, so the cut is the same for every backend).
    """
    by_item: dict[str, Event] = {}
    for event in events:  # chronological: a later event of the same strength wins
        kept = by_item.get(event.item_id)
        if kept is None or abs(event.strength) >= abs(kept.strength):
            by_item[event.item_id] = event
    unique = sorted(by_item.values(), key=lambda e: (_ts(e), e.seq))
    strongest = sorted(unique, key=lambda e: (-abs(e.strength), -_ts(e), -e.seq))
    chosen = {e.item_id for e in strongest[: (max_items + 1) // 2]}
    for event in reversed(unique):
        if len(chosen) >= max_items:
            break
        chosen.add(event.item_id)
    kept_events = [e for e in unique if e.item_id in chosen]
    while len(kept_events) > 1 and sum(len(_line(e)) for e in kept_events) / 4 > max_tokens:
        weakest = min(kept_events, key=lambda e: (abs(e.strength), _ts(e), e.seq))
        kept_events.remove(weakest)
    return kept_events


def _ts(event: Event) -> int:
    return event.timestamp if event.timestamp is not None else -1


def _line(event: Event) -> str:
    categories = f" [{', '.join(event.categories)}]" if event.categories else ""
    return f'"{event.title}"{categories} — {event.description}'


def user_events(
    interactions: pd.DataFrame, items: pd.DataFrame, scales: dict[str, ValueScale]
) -> dict[str, list[Event]]:
    """Every user's events, oldest first, with item text and signal strength attached."""
    item_info = items.set_index("item_id")[["title", "categories"]]
    merged = interactions.join(item_info, on="item_id")
    ts = merged["timestamp"].astype("Int64").fillna(-1).astype("int64")
    merged = merged.assign(ts_key=ts).sort_values(["user_id", "ts_key", "seq"], kind="stable")
    out: dict[str, list[Event]] = defaultdict(list)
    for row in merged.itertuples(index=False):
        value = None if pd.isna(row.value) else float(row.value)
        timestamp = None if row.ts_key < 0 else int(row.ts_key)
        out[row.user_id].append(
            Event(
                item_id=row.item_id,
                title=row.title,
                categories=tuple(row.categories),
                behavior=row.behavior,
                value=value,
                timestamp=timestamp,
                seq=int(row.seq),
                strength=_strength(row.behavior, value, scales),
                description=_describe(row.behavior, value, scales.get(row.behavior)),
            )
        )
    return dict(out)


# ------------------------------------------------------------------------------ request


@dataclass(frozen=True)
class ProfileRequest:
    """Everything needed to profile one user, and the key that caches the result."""

    user_id: str
    history: tuple[Event, ...]
    lines: tuple[str, ...]
    like_options: tuple[str, ...]
    dislike_options: tuple[str, ...]
    favourite_options: tuple[str, ...]
    cache_key: str

    @property
    def history_categories(self) -> set[str]:
        return {c for e in self.history for c in e.categories}

    def schema(self) -> dict[str, Any]:
        """A per-user JSON schema: lists are enums of this history, lengths are bounded."""
        return {
            "type": "object",
            "properties": {
                "likes": _enum_list(self.like_options, MAX_LIKES, min_items=1),
                "dislikes": _enum_list(self.dislike_options, MAX_DISLIKES),
                "favourite_items": _enum_list(self.favourite_options, MAX_FAVOURITES),
                "themes": {
                    "type": "array",
                    "items": {"type": "string", "pattern": THEME_PATTERN},
                    "maxItems": MAX_THEMES,
                },
                # Third person, bounded: the small model otherwise writes as the user, or loops.
                "summary": {"type": "string", "pattern": summary_pattern(self)},
            },
            "required": ["likes", "dislikes", "favourite_items", "themes", "summary"],
        }


def summary_pattern(request: ProfileRequest) -> str:
    """The summary's pattern: "This user <verb> <liked categories>. Favourites include
    <favourites>. Less keen on <categories>." from the request's own options (those a
    pattern can hold), within SUMMARY_MAX; a history with no liked category or favourite
    gets the free pattern (third person, bounded, a final stop)."""

    def usable(options: Sequence[str], n: int) -> list[str]:
        return [o for o in options if not PATTERN_UNSAFE.search(o)][:n]

    likes = usable(request.like_options, SUMMARY_OPTIONS)
    favourites = usable(request.favourite_options, SUMMARY_OPTIONS)
    dislikes = usable(request.dislike_options, MAX_DISLIKES)
    if not likes:
        likes, favourites = favourites, []
    if not likes:
        return SUMMARY_PATTERN

    def longest(names: Sequence[str]) -> int:
        return max((len(o) for o in one_or_two(names)), default=0)

    def length() -> int:
        verb = max(len(v) for v in SUMMARY_VERBS) + 1
        extra = len(" Favourites include .") + longest(favourites) if favourites else 0
        tail = len(" Less keen on .") + longest(dislikes) if dislikes else 0
        return len(SUMMARY_PREFIX) + verb + longest(likes) + extra + 1 + tail

    for names in (dislikes, favourites, likes):  # shortest lists first, down to one name
        while length() > SUMMARY_MAX and len(names) > 1:
            names.pop()
    if length() > SUMMARY_MAX:
        return SUMMARY_PATTERN
    pattern = f"^{SUMMARY_PREFIX}({'|'.join(SUMMARY_VERBS)}) {pattern_group(one_or_two(likes))}"
    pattern += "[.]"
    if favourites:
        # a sentence of its own: "Action, especially Secret Garden" would say it is Action
        pattern += f"( Favourites include {pattern_group(one_or_two(favourites))}[.])?"
    if dislikes:
        pattern += f"( Less keen on {pattern_group(one_or_two(dislikes))}[.])?"
    return pattern + "$"


def _enum_list(options: Sequence[str], max_items: int, min_items: int = 0) -> dict[str, Any]:
    if not options:
        return {"type": "array", "items": {"type": "string"}, "maxItems": 0}
    schema: dict[str, Any] = {
        "type": "array",
        "items": {"type": "string", "enum": list(options)},
        "maxItems": min(max_items, len(options)),
    }
    if min_items:
        schema["minItems"] = min_items
    return schema


def build_request(
    user_id: str,
    events: Sequence[Event],
    *,
    prompt: Prompt,
    model_id: str,
    params: GenerationParams,
    max_items: int,
    max_tokens: int,
) -> ProfileRequest:
    history = compact_history(events, max_items=max_items, max_tokens=max_tokens)
    net: Counter[str] = Counter()
    for event in history:
        for category in event.categories:
            net[category] += event.strength
    likes = [
        c
        for c, s in net.most_common()
        if s > 0 and any(c in e.categories and e.strength >= POSITIVE for e in history)
    ]
    dislikes = [
        c
        for c, s in sorted(net.items(), key=lambda kv: kv[1])
        if s < 0 and any(c in e.categories and e.strength <= NEGATIVE for e in history)
    ]
    favourites = [
        e.title
        for e in sorted(history, key=lambda e: (-e.strength, -_ts(e), -e.seq))
        if e.strength >= POSITIVE
    ][:10]
    lines = tuple(_line(e) for e in history)
    key_material = {
        "history": lines,
        "prompt": prompt.version,
        "model": model_id,
        "params": params.as_dict(),
        "logic": PROFILE_LOGIC_VERSION,
    }
    cache_key = hashlib.sha256(
        json.dumps(key_material, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()
    return ProfileRequest(
        user_id=user_id,
        history=tuple(history),
        lines=lines,
        like_options=tuple(likes),
        dislike_options=tuple(dislikes),
        favourite_options=tuple(dict.fromkeys(favourites)),
        cache_key=cache_key,
    )


# ------------------------------------------------------------------------------ grounding


@dataclass(frozen=True)
class Vocabulary:
    """What free text could name: every category and title in the catalogue."""

    categories: frozenset[str]

    @classmethod
    def from_items(cls, items: pd.DataFrame) -> Vocabulary:
        return cls(frozenset(c for cats in items["categories"] for c in cats))


_QUOTED = re.compile(r"[\"“”]([^\"“”]{3,80})[\"“”]")
_TOKEN = re.compile(r"[\w'’-]+")
_CONNECTORS = frozenset({"of", "the", "and", "in", "on", "a", "an", "to", "&"})
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


def _capitalised_names(sentence: str, category_words: set[str]) -> list[list[str]]:
    """Runs of capitalised words (title-like names), split at category names.

    Connectors ("of", "the") may sit inside a run. A run that starts the sentence drops its
    first word when the rest is still a name ("Adores The Legend of Zorro" → "The Legend of
    Zorro"), so a capitalised verb is not taken for part of a title.
    """
    runs: list[list[str]] = []
    current: list[str] = []
    tokens = _TOKEN.findall(sentence)
    for index, token in enumerate(tokens):
        lower = token.lower()
        if token[:1].isupper() and lower not in category_words:
            current.append(token)
            continue
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        if current and lower in _CONNECTORS and following[:1].isupper():
            current.append(token)
            continue
        runs.append(current)
        current = []
    runs.append(current)
    names = []
    for run in runs:
        while run and run[-1].lower() in _CONNECTORS:
            run = run[:-1]
        if run and tokens and run[0] == tokens[0]:
            run = run[1:] if len(run) > 2 else []
        while run and run[0].lower() in _CONNECTORS:  # "Close to Heat" → "Heat"
            run = run[1:]
        if len(run) >= 2:
            names.append(run)
    return names


def ungrounded_claims(text: str, request: ProfileRequest, vocabulary: Vocabulary) -> list[str]:
    """Names in ``text`` that the user's history does not contain.

    Checked: catalogue categories absent from the history; quoted titles and capitalised
    multi-word names none of whose two-word pieces occurs in a history title.
    """
    claims = absent_categories(text, request.history_categories, vocabulary.categories)
    titles = [norm(_YEAR.sub("", e.title)) for e in request.history]
    category_words = {norm(c) for c in vocabulary.categories}
    names = [norm(m.group(1)).split() for m in _QUOTED.finditer(text)]
    names += [[norm(w) for w in run] for run in _capitalised_names(text, category_words)]
    for words in names:
        if len(words) < 2:
            continue
        pairs = {  # "in the" matches half the catalogue: a pair needs a content word
            " ".join(words[i : i + 2])
            for i in range(len(words) - 1)
            if not {words[i], words[i + 1]} <= _CONNECTORS
        }
        if not any(pair in title for pair in pairs for title in titles):
            claims.append(" ".join(words))
    return claims


def _dedupe(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v.strip() for v in values if v and v.strip()))


@dataclass
class Grounded:
    profile: Profile
    removed: list[str]


def parse_profile(text: str, request: ProfileRequest, vocabulary: Vocabulary) -> Grounded:
    """Decode, validate and ground one LLM answer; raise ValueError when it is unusable."""
    data = decode_json(text)
    raw = Profile.model_validate(data)
    removed: list[str] = []

    def keep(values: list[str], options: Sequence[str], limit: int, label: str) -> list[str]:
        kept = []
        for value in _dedupe(values):
            if value not in options:
                removed.append(f"{label}: {value}")
            elif len(kept) < limit:
                kept.append(value)
        return kept

    likes = keep(raw.likes, request.like_options, MAX_LIKES, "likes")
    dislikes = keep(raw.dislikes, request.dislike_options, MAX_DISLIKES, "dislikes")
    for both in set(likes) & set(dislikes):
        dislikes.remove(both)
        removed.append(f"dislikes: {both} (also liked)")
    favourites = keep(raw.favourite_items, request.favourite_options, MAX_FAVOURITES, "favourite")
    own = [*request.history_categories, *(e.title for e in request.history)]
    lexicon = Lexicon.from_names([*own, *vocabulary.categories])
    themes = []
    for theme in _dedupe(raw.themes)[:MAX_THEMES]:
        if ungrounded_claims(theme, request, vocabulary):
            removed.append(f"theme: {theme}")
        elif re.fullmatch(THEME_PATTERN, theme):  # a phrase, not a list or JSON debris
            check_fluent(theme, lexicon, names=own, sentence=False)
            themes.append(theme)
    if degenerate(raw.summary):
        raise ValueError("summary repeats itself")
    sentences = []
    for sentence in _dedupe(SENTENCE.split(" ".join(raw.summary.split()))):
        bad = ungrounded_claims(sentence, request, vocabulary)
        if bad:
            removed.extend(f"summary: {claim}" for claim in bad)
        else:
            sentences.append(sentence)
    summary = " ".join(sentences)[:SUMMARY_MAX]
    if len(summary) < SUMMARY_MIN:
        raise ValueError("summary is empty or too short once ungrounded sentences are removed")
    check_summary_gates(summary, request, vocabulary)
    profile = Profile(
        summary=summary,
        likes=likes,
        dislikes=dislikes,
        favourite_items=favourites,
        themes=themes,
    )
    return Grounded(profile=profile, removed=removed)


def check_summary_gates(summary: str, request: ProfileRequest, vocabulary: Vocabulary) -> None:
    """The quality gates on a summary (:mod:`segrec.gates`): fluent words and sentences, and
    at least one of the user's own categories or titles named."""
    own = [*request.history_categories, *(e.title for e in request.history)]
    check_fluent(summary, Lexicon.from_names([*own, *vocabulary.categories]), names=own)
    check_supported(summary, names=own)
    check_summary_specific(summary, own)


def fallback_profile(request: ProfileRequest) -> Profile:
    """A deterministic profile from the history alone: used when the LLM output fails."""
    likes = list(request.like_options[:MAX_LIKES])
    dislikes = list(request.dislike_options[:MAX_DISLIKES])
    favourites = list(request.favourite_options[:MAX_FAVOURITES])
    parts = []
    if likes:
        parts.append("This user mostly enjoys " + join_words(likes) + ".")
    if favourites:
        parts.append("Favourites include " + join_words(favourites) + ".")
    if dislikes:
        parts.append("Less keen on " + join_words(dislikes) + ".")
    if not parts:
        recent = [e.title for e in request.history[-3:]]
        parts.append("This user recently interacted with " + join_words(recent) + ".")
    summary = " ".join(parts)
    if len(summary) > SUMMARY_MAX:
        summary = summary[: SUMMARY_MAX - 1].rsplit(" ", 1)[0] + "…"
    return Profile(
        summary=summary,
        likes=likes,
        dislikes=dislikes,
        favourite_items=favourites,
        themes=likes[:MAX_THEMES],
    )


# ------------------------------------------------------------------------------ one user


def profile_one(
    request: ProfileRequest,
    *,
    llm: LLM,
    prompt: Prompt,
    params: GenerationParams,
    vocabulary: Vocabulary,
    domain: str = "item",
    attempts: int = 3,
    retry: RetryPolicy = RetryPolicy(),
) -> ProfileRecord:
    """Profile one user: LLM under the per-user schema, grounded, or the fallback.

    Transport failures that persist through the retries raise LLMError for the caller to
    report for this user; they never produce a fallback, so a rerun tries them again.
    """
    messages = prompt.render(history=request.lines, domain=domain)
    result = generate_structured(
        llm,
        messages,
        parse=lambda text: parse_profile(text, request, vocabulary),
        params=params,
        schema=request.schema(),
        attempts=attempts,
        policy=retry,
    )
    if result.value is not None:
        profile, removed, fallback, reason = (
            result.value.profile,
            result.value.removed,
            False,
            None,
        )
    else:
        profile, removed, fallback = fallback_profile(request), [], True
        reason = f"invalid after {result.attempts} tries: {result.errors[-1]}"
    return ProfileRecord(
        user_id=request.user_id,
        cache_key=request.cache_key,
        profile=profile.model_dump(),
        raw_output=result.raw_outputs[-1] if result.raw_outputs else None,
        model_id=llm.model_id,
        prompt_version=prompt.version,
        params=params.as_dict(),
        fallback=fallback,
        fallback_reason=reason,
        removed=removed,
        attempts=result.attempts,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        latency_s=result.latency_s,
    )


# ------------------------------------------------------------------------------ many users


@dataclass(frozen=True)
class ProfileJob:
    """Everything :func:`profile_one` needs besides the request and the backend.

    Plain data, so a distributed runner (:mod:`segrec.batch`) ships it once to workers that
    each hold their own backend, and they run exactly what this process would.
    """

    prompt: Prompt
    params: GenerationParams
    vocabulary: Vocabulary
    domain: str = "item"
    attempts: int = 3
    retry: RetryPolicy = RetryPolicy()

    def run(self, request: ProfileRequest, llm: LLM) -> ProfileRecord:
        return profile_one(
            request,
            llm=llm,
            prompt=self.prompt,
            params=self.params,
            vocabulary=self.vocabulary,
            domain=self.domain,
            attempts=self.attempts,
            retry=self.retry,
        )


# What a runner yields per user: a call that returns the record or raises the LLMError.
Outcome = Callable[[], ProfileRecord]


class ProfileRunner(Protocol):
    """Runs :meth:`ProfileJob.run` over requests elsewhere (e.g. Ray actors), yielding each
    user's outcome as it finishes; :func:`profile_users` stores it. ``model_id`` is the
    workers' backend's, so cache keys match the in-process path's."""

    @property
    def model_id(self) -> str: ...

    def run(
        self, requests: Sequence[ProfileRequest], job: ProfileJob
    ) -> Iterator[tuple[ProfileRequest, Outcome]]: ...


@dataclass
class ProfileStats:
    """The closing summary of a run; ``as_json`` is what ``segrec profile --json`` prints."""

    users: int = 0
    profiled: int = 0
    cached: int = 0
    fallback: int = 0
    failed: int = 0
    removed_claims: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    text: TextTally = field(default_factory=TextTally)

    @property
    def done(self) -> int:
        return self.profiled + self.cached + self.fallback + self.failed

    def as_json(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "profiled": self.profiled,
            "cached": self.cached,
            "fallback": self.fallback,
            "failed": self.failed,
            "removed_claims": self.removed_claims,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "text": self.text.as_json(),
        }


def profile_users(
    store: Store,
    user_ids: Sequence[str],
    *,
    llm: LLM | None = None,
    runner: ProfileRunner | None = None,
    prompt: Prompt,
    params: GenerationParams,
    domain: str = "item",
    max_items: int = 15,
    max_tokens: int = 500,
    attempts: int = 3,
    retry: RetryPolicy = RetryPolicy(),
    on_progress: Callable[[ProfileStats], None] | None = None,
) -> ProfileStats:
    """Profile ``user_ids``, skipping those whose cached profile has the same key.

    Each finished user is committed at once; up to ``llm.concurrency`` calls run together.
    With a ``runner`` instead of an ``llm``, the calls run where the runner puts them and only
    this process writes to the store.
    """
    if (llm is None) == (runner is None):
        raise ValueError("profile_users needs exactly one of llm and runner")
    model_id = runner.model_id if runner is not None else llm.model_id  # type: ignore[union-attr]
    start = time.perf_counter()
    stats = ProfileStats(users=len(user_ids))
    items = store.items_frame()
    scales = scales_from_ranges(store.value_ranges())
    vocabulary = Vocabulary.from_items(items)
    events = user_events(store.interactions_frame(user_ids), items, scales)
    cached_keys = store.profile_keys()
    todo: list[ProfileRequest] = []
    for user_id in user_ids:
        request = build_request(
            user_id,
            events.get(user_id, []),
            prompt=prompt,
            model_id=model_id,
            params=params,
            max_items=max_items,
            max_tokens=max_tokens,
        )
        if cached_keys.get(user_id) == request.cache_key:
            stats.cached += 1
        else:
            todo.append(request)
    if on_progress:
        on_progress(stats)

    job = ProfileJob(prompt, params, vocabulary, domain, attempts, retry)

    def run(request: ProfileRequest) -> ProfileRecord:
        return job.run(request, llm)  # type: ignore[arg-type]

    def record(request: ProfileRequest, outcome: Callable[[], ProfileRecord]) -> None:
        try:
            result = outcome()
        except LLMError as exc:
            stats.failed += 1
            stats.failures[request.user_id] = str(exc)
            store.save_failure(request.user_id, request.cache_key, str(exc))
        else:
            store.save_profile(result)
            stats.text.add("summary", replaced=result.fallback, why=result.fallback_reason)
            stats.prompt_tokens += result.prompt_tokens
            stats.completion_tokens += result.completion_tokens
            stats.removed_claims += len(result.removed)
            if result.fallback:
                stats.fallback += 1
            else:
                stats.profiled += 1
        stats.seconds = time.perf_counter() - start
        if on_progress:
            on_progress(stats)

    if runner is not None:
        for request, outcome in runner.run(todo, job):
            record(request, outcome)
    else:
        with closing(map_concurrent(llm, run, todo)) as finished:  # an error stops the rest
            for request, outcome in finished:
                record(request, outcome)
    stats.seconds = time.perf_counter() - start
    store.add_text_counts("profile", stats.text.rows())  # what the gates kept, and why not
    return stats
