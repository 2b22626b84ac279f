"""The label stage: a short name and description for every segment, written by the LLM.

As in Anthropic's Clio, the LLM sees a sample of the segment's members next to the nearest
users who are *not* members, so the name says what sets the segment apart rather than what
every user has in common. The answer is checked for what a grammar cannot enforce: a short,
non-generic name, distinct from the names given to earlier segments, and a description that
names no catalogue category the members' histories lack. Output still invalid after retries,
and any LLM transport failure, give a deterministic label built from the segment's most
distinctive terms (class-based TF-IDF, as in BERTopic), marked as a fallback: naming segments
never stops a clustering run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from pydantic import BaseModel
from sklearn.feature_extraction import DictVectorizer
from sklearn.preprocessing import normalize

from segrec.errors import LLMError
from segrec.gates import (
    GateError,
    Lexicon,
    allowed_segment_categories,
    blank_names,
    check_fluent,
    check_segment_consistent,
    check_supported,
    mentioned,
    unknown_names,
)
from segrec.grounding import (
    PATTERN_UNSAFE,
    absent_categories,
    check_prose,
    decode_json,
    join_words,
    norm,
    one_or_two,
    pattern_group,
)
from segrec.llm.base import LLM, GenerationParams, Message, RetryPolicy, generate_structured
from segrec.templates import Prompt, load_prompt

NAME_MAX_WORDS, NAME_MAX_CHARS = 6, 48
DESCRIPTION_MIN, DESCRIPTION_MAX, DESCRIPTION_MAX_SENTENCES = 20, 300, 2
# What the prompt shows: kept small, the bundled 135M model reads ~700 tokens slowly.
PROMPT_MEMBERS, PROMPT_OTHERS, PROMPT_CATEGORIES, PROMPT_ITEMS = 8, 5, 5, 5
MEMBER_CHARS, OTHER_CHARS = 120, 90

# Names made only of these words (and numbers) say nothing about a segment; they also never
# count as the topic words that a name or description must share with the segment.
GENERIC_WORDS = frozenset(
    [
        "segment",
        "segments",
        "cluster",
        "clusters",
        "group",
        "groups",
        "user",
        "users",
        "customer",
        "customers",
        "people",
        "member",
        "members",
        "audience",
        "fans",
        "lovers",
        "enthusiasts",
        "buffs",
        "name",
        "label",
        "category",
        "categories",
        "other",
        "others",
        "general",
        "misc",
        "mixed",
        "various",
        "unknown",
        "top",
        "best",
        "most",
        "popular",
        "likes",
        "like",
        "loves",
        "the",
        "a",
        "an",
        "of",
        "and",
        "or",
        "in",
        "on",
        "for",
        "with",
        "all",
    ]
)
_GROUP_WORDS = frozenset({"group", "groups", "segment", "segments", "cluster", "clusters"})
_NUMBERED = re.compile(r"\b(segment|cluster|group)\s*#?\d+\b", re.IGNORECASE)
# Sentence punctuation or markup inside a name means the model wrote something else.
_NOT_A_NAME = re.compile(r"[.;:!?*()\[\]{}<>\"]")
_STEM = 5  # words sharing their first five letters match: romance/romantic, thriller/thrilling

# Categories safe to put in a grammar pattern verbatim.
_SAFE_CATEGORY = re.compile(r"^[A-Za-z][A-Za-z' -]*$")


# The words a name may end on after its categories.
NAME_NOUNS = ("fans", "lovers", "enthusiasts", "regulars")


def name_pattern(categories: Sequence[str]) -> str | None:
    """A name made of ``categories`` (the segment's top ones): one, or two different ones
    joined by "&", then "fans", "lovers", "enthusiasts" or "regulars". None when no
    category fits a pattern. Free words around the category were where a small model
    invents ("Young Comedy fans", "The Group Drama")."""
    safe = [c for c in categories if _SAFE_CATEGORY.match(c)]
    if not safe:
        return None
    options = [*safe, *(f"{a} & {b}" for a in safe for b in safe if a != b)]
    return f"^{pattern_group(options)} ({'|'.join(NAME_NOUNS)})$"


# With a grammar, a description is said from the segment's facts: who, a verb, one or two
# of its top categories by share, one or two of its top items. Free words were the blind
# read's untrue descriptions ("They love choosing the right food for their health").
DESCRIPTION_SUBJECTS = ("Members", "These users")
DESCRIPTION_VERBS = ("often pick", "keep coming back to", "are drawn to", "share a taste for")
DESCRIPTION_OPTIONS, DESCRIPTION_ITEM_CHARS = 3, 60


def named_categories(doc: SegmentDoc) -> list[str]:
    """The categories a grammar lets a label say: among those it may name, up to three by
    share, each with at least a third of the top one's share ("Fitness & Pet supplies
    enthusiasts" for 6% and 82% was a blind read's misleading name)."""
    allowed = set(doc.allowed_categories)
    ranked = [
        (c, share)
        for c, share in _top_categories(doc.categories, len(doc.categories))
        if c in allowed and not PATTERN_UNSAFE.search(c)
    ]
    if not ranked:  # shares unknown: the categories shown beside it, in order
        return [c for c in doc.allowed_categories if not PATTERN_UNSAFE.search(c)][:3]
    top = ranked[0][1]
    return [c for c, share in ranked if share >= top / 3][:DESCRIPTION_OPTIONS]


def description_pattern(doc: SegmentDoc) -> str | None:
    """ "Members often pick <top categories>. Top items include <top items>." from the
    segment's own facts (its top categories by share among those it may name, its top items); None
    when no category fits a pattern."""
    categories = named_categories(doc)
    items = [
        t
        for t in doc.top_items
        if len(t) <= DESCRIPTION_ITEM_CHARS and not PATTERN_UNSAFE.search(t)
    ][:DESCRIPTION_OPTIONS]
    if not categories:
        return None
    subjects, verbs = "|".join(DESCRIPTION_SUBJECTS), "|".join(DESCRIPTION_VERBS)
    pattern = f"^({subjects}) ({verbs}) {pattern_group(one_or_two(categories))}"
    if items:
        # a sentence of its own: "Action, especially <title>" would say the title is Action
        return pattern + f"[.]( Top items include {pattern_group(one_or_two(items))}[.])?$"
    return pattern + "[.]$"


def label_schema(doc: SegmentDoc) -> dict[str, Any]:
    """The answer's JSON schema; the name must contain one of the segment's top categories,
    the description says its top categories and items (:func:`description_pattern`)."""
    name: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": NAME_MAX_CHARS}
    pattern = name_pattern(named_categories(doc))
    if pattern:
        name = {"type": "string", "pattern": pattern}
    description: dict[str, Any] = {
        "type": "string",
        "minLength": DESCRIPTION_MIN,
        "maxLength": DESCRIPTION_MAX,
    }
    said = description_pattern(doc)
    if said:
        description = {"type": "string", "pattern": said}
    return {
        "type": "object",
        "properties": {"name": name, "description": description},
        "required": ["name", "description"],
    }


@dataclass(frozen=True)
class SegmentDoc:
    """What the label stage knows about one segment; built by the caller from the store."""

    segment_id: int
    size: int
    members: list[dict[str, Any]]  # Profile.model_dump() dicts, nearest the centroid first
    contrast: list[dict[str, Any]]  # the nearest non-members' profiles
    categories: dict[str, float]  # category -> share of the members' interactions
    top_items: list[str]  # titles of the segment's top items by lift
    lift_categories: tuple[str, ...] = ()  # the segment's top categories by lift
    # The top categories printed beside the label, when the caller prints its own (a
    # parent's): then the only ones the label may name.
    shown_categories: tuple[str, ...] = ()

    @property
    def allowed_categories(self) -> list[str]:
        """The categories its name and description may name: those shown beside it, else
        its top ones by share or by lift."""
        if self.shown_categories:
            return list(self.shown_categories)
        return allowed_segment_categories(self.categories, self.lift_categories)


class SegmentLabel(BaseModel):
    """A segment's name and description, and whether they came from the fallback."""

    name: str
    description: str
    fallback: bool = False
    fallback_reason: str | None = None
    raw_output: str | None = None


class _Answer(BaseModel):
    name: str
    description: str


# ------------------------------------------------------------------------------ c-TF-IDF


def _term_key(term: str) -> str:
    return " ".join(term.split()).casefold()


def distinctive_terms(docs: Sequence[SegmentDoc], n: int = 4) -> list[list[str]]:
    """The ``n`` terms most distinctive of each segment, by class-based TF-IDF (BERTopic).

    One document per segment: its members' likes, themes and favourite items, each counted
    once per member, plus its categories weighted by share (scaled so that they weigh as
    much as one member-level mention per member). Terms are whole phrases, merged
    case-insensitively and shown in their first spelling (categories first). Weights are
    ``tf`` (L1-normalised per segment) times ``log(1 + A / f_t)``, where ``A`` is the mean
    number of terms per segment and ``f_t`` the term's count over all segments. Ties break
    alphabetically, so the result is deterministic.
    """
    if not docs:
        return []
    spelling: dict[str, str] = {}
    bags: list[dict[str, float]] = []
    for doc in docs:
        bag: dict[str, float] = {}
        scale = max(1, len(doc.members))
        for category, share in sorted(doc.categories.items(), key=lambda kv: (-kv[1], kv[0])):
            if share > 0:
                _add(bag, spelling, category, float(share) * scale)
        for member in doc.members:
            for field_name in ("likes", "themes", "favourite_items"):
                for term in dict.fromkeys(member.get(field_name) or []):
                    _add(bag, spelling, str(term), 1.0)
        bags.append(bag)
    if not any(bags):
        return [[] for _ in docs]
    vectorizer = DictVectorizer(sort=True)
    counts = vectorizer.fit_transform(bags).tocsr()
    keys = vectorizer.get_feature_names_out()
    tf = normalize(counts, norm="l1", axis=1)
    per_term = np.asarray(counts.sum(axis=0)).ravel()
    average = float(counts.sum()) / counts.shape[0]
    idf = np.log1p(average / per_term)
    weights = tf.multiply(idf).tocsr()
    out: list[list[str]] = []
    for row in range(weights.shape[0]):
        start, end = weights.indptr[row], weights.indptr[row + 1]
        columns, values = weights.indices[start:end], weights.data[start:end]
        order = sorted(zip(-values, keys[columns], strict=True))
        out.append([spelling[str(key)] for _, key in order[:n]])
    return out


def _add(bag: dict[str, float], spelling: dict[str, str], term: str, weight: float) -> None:
    key = _term_key(term)
    if key:
        spelling.setdefault(key, " ".join(term.split()))
        bag[key] = bag.get(key, 0.0) + weight


# ------------------------------------------------------------------------------ fallback


def fallback_label(
    doc: SegmentDoc,
    terms: list[str],
    taken: set[str],
    *,
    reason: str = "deterministic label requested",
) -> SegmentLabel:
    """A deterministic label from the segment's distinctive terms, categories and top items.

    The name joins the top terms ("Animation & Children fans", at most six words), naming
    only the segment's top categories, and gets a number appended when an earlier segment
    already has it.
    """
    taken_keys = {_term_key(name) for name in taken}
    top_categories = _top_categories(doc.categories, 3)
    # Only top categories may be named (the consistency gate): others are dropped, and a
    # name that would name none starts with the top one.
    allowed = doc.allowed_categories
    source = [t for t in terms if t in allowed] + [t for t in terms if t not in doc.categories]
    if allowed and not any(t in allowed for t in source[:2]):
        source = [allowed[0], *source]
    source = source or [name for name, _ in top_categories]
    words = _name_words(source, NAME_MAX_WORDS)
    name = " ".join(words) if words else f"Segment {doc.segment_id}"
    if _term_key(name) in taken_keys:
        # Another of its categories before a number: "Fitness fans 2" read as debris in the
        # first blind read, "Baking and kitchen & Fitness fans" says what sets it apart.
        others = [c for c in allowed if c not in source[:1]]
        for terms in [*([source[0], c] for c in others[:4] if source), *([c] for c in others)]:
            alternative = " ".join(_name_words(terms, NAME_MAX_WORDS))
            if alternative and _term_key(alternative) not in taken_keys:
                name = alternative
                break
    if _term_key(name) in taken_keys:
        base = " ".join(_name_words(source, NAME_MAX_WORDS - 1)) or f"Segment {doc.segment_id}"
        number = 2
        while _term_key(f"{base} {number}") in taken_keys:
            number += 1
        name = f"{base} {number}"
    parts = [f"{doc.size} users"]
    # the shares it quotes are of categories it may name (those shown beside it)
    top_categories = [(c, share) for c, share in top_categories if c in allowed] or top_categories
    if top_categories:
        shares = [f"{name_} ({share:.0%})" for name_, share in top_categories]
        parts[0] += " whose histories centre on " + join_words(shares) + "."
    else:
        parts[0] += " with no category information."
    if doc.top_items:
        parts.append("Top items include " + join_words(doc.top_items[:3]) + ".")
    description = " ".join(parts)
    if len(description) > DESCRIPTION_MAX:
        description = description[: DESCRIPTION_MAX - 1].rsplit(" ", 1)[0] + "…"
    return SegmentLabel(name=name, description=description, fallback=True, fallback_reason=reason)


def _top_categories(categories: dict[str, float], n: int) -> list[tuple[str, float]]:
    ranked = sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(name, share) for name, share in ranked if share > 0][:n]


def _name_words(terms: Sequence[str], budget: int) -> list[str]:
    """Up to two terms joined by '&', then 'fans', within ``budget`` words."""
    chosen: list[str] = []
    for term in terms[:2]:
        candidate = [*chosen, *(["&"] if chosen else []), *term.split()]
        if len(candidate) + 1 <= budget:
            chosen = candidate
        elif not chosen:
            chosen = term.split()[: budget - 1]
    return [*chosen, "fans"] if chosen else []


# ------------------------------------------------------------------------------ validation


_LEAD = re.compile(r"^(?:name\s*[:=-]\s*|(?:likes|loves|enjoys)\s+)", re.IGNORECASE)


def _clean_name(name: str) -> str:
    """The name without quotes, end punctuation or a leading "Name:"/"Loves" the model echoes."""
    return _LEAD.sub("", " ".join(name.split()).strip(" \"'“”‘’.:;,-")).strip()


def _generic(domain: str) -> frozenset[str]:
    return GENERIC_WORDS | {norm(domain), norm(domain) + "s"}


def _is_generic(name: str, domain: str) -> bool:
    generic = _generic(domain)
    words = norm(name).split()
    return bool(_NUMBERED.search(name)) or all(w in generic or w.isdigit() for w in words)


def _topic_stems(doc: SegmentDoc, domain: str) -> set[str]:
    """Stems of the words a label may be about: the segment's categories, items and tastes."""
    phrases = [c for c, share in doc.categories.items() if share > 0] + list(doc.top_items)
    for member in doc.members:
        for field_name in ("likes", "themes", "favourite_items"):
            phrases.extend(str(v) for v in member.get(field_name) or [])
    generic = _generic(domain)
    return {
        _stem(w)
        for phrase in phrases
        for w in norm(phrase).split()
        if len(w) >= 4 and w not in generic and not w.isdigit()
    }


def _stem(word: str) -> str:
    return word.removesuffix("s")[:_STEM]


def _on_topic(text: str, stems: set[str]) -> bool:
    return any(len(w) >= 4 and _stem(w) in stems for w in norm(text).split())


def parse_label(
    text: str,
    doc: SegmentDoc,
    *,
    taken: set[str],
    vocabulary: frozenset[str],
    domain: str = "item",
) -> SegmentLabel:
    """Decode and validate one LLM answer for ``doc``; raise ValueError when it is unusable."""
    data = decode_json(text)
    answer = _Answer.model_validate(data)
    name = _clean_name(answer.name)
    words = name.split()
    if not 1 <= len(words) <= NAME_MAX_WORDS or len(name) > NAME_MAX_CHARS:
        raise ValueError(f"name {name!r} must be 1-{NAME_MAX_WORDS} words")
    if _NOT_A_NAME.search(name):
        raise ValueError(f"name {name!r} contains punctuation a name does not have")
    if _is_generic(name, domain):
        raise ValueError(f"name {name!r} is generic")
    stems = _topic_stems(doc, domain)
    if not _on_topic(name, stems):
        raise ValueError(f"name {name!r} names none of the segment's categories, items or tastes")
    if _term_key(name) in {_term_key(t) for t in taken}:
        raise ValueError(f"name {name!r} is already used by another segment")
    description = " ".join(answer.description.split())
    check_prose(
        description,
        what="description",
        min_chars=DESCRIPTION_MIN,
        max_chars=DESCRIPTION_MAX,
        max_sentences=DESCRIPTION_MAX_SENTENCES,
    )
    if not _on_topic(description, stems):
        raise ValueError("description names none of the segment's categories, items or tastes")
    absent = absent_categories(f"{name}. {description}", doc.categories, vocabulary)
    if absent:
        raise ValueError(f"names categories the members' histories lack: {', '.join(absent)}")
    check_label_gates(name, description, doc, vocabulary)
    return SegmentLabel(name=name, description=description, raw_output=text)


def check_label_gates(
    name: str, description: str, doc: SegmentDoc, vocabulary: frozenset[str]
) -> None:
    """The quality gates on a segment's label (see :mod:`segrec.gates`): fluent words, a name
    that names one of the top categories, only top categories, and in the description only
    stored numbers (a name's number tells apart two segments)."""
    names = [*doc.categories, *doc.top_items]
    lexicon = Lexicon.from_names([*names, *vocabulary])
    check_fluent(name, lexicon, names=names, sentence=False)
    words = norm(name).split()
    if words[0] in {"the", "a", "an"} or set(words) & _GROUP_WORDS:  # "The Group Drama"
        raise GateError("fluent", "not-a-name", f"{name!r} reads as a phrase about a group")
    check_fluent(description, lexicon, names=names)
    check_supported(f"{name}. {description}", names=names)
    invented = unknown_names(blank_names(description, names), lexicon)
    if invented:
        raise GateError(
            "consistent", "unknown-name", f"names what the facts lack: {', '.join(invented)}"
        )
    allowed = doc.allowed_categories
    if allowed and not mentioned(name, allowed):
        raise GateError(
            "consistent", "name-off-top", f"name {name!r} names none of {', '.join(allowed)}"
        )
    check_segment_consistent(name, allowed=allowed, vocabulary=vocabulary, numbers=None)
    check_segment_consistent(
        blank_names(description, doc.top_items),
        allowed=allowed,
        vocabulary=vocabulary,
        numbers=[doc.size, *(100 * share for share in doc.categories.values())],
    )


# ------------------------------------------------------------------------------ prompt


def _profile_line(profile: dict[str, Any], limit: int) -> str:
    summary = " ".join(str(profile.get("summary", "")).split())
    likes = [str(x) for x in profile.get("likes") or []]
    line = f"{summary} Likes: {', '.join(likes)}." if likes else summary
    return line if len(line) <= limit else line[: limit - 1].rsplit(" ", 1)[0] + "…"


def render_label_prompt(
    doc: SegmentDoc, *, taken: Sequence[str], prompt: Prompt, domain: str = "item"
) -> list[Message]:
    """The contrastive prompt for one segment: members, nearest non-members, names taken."""
    return prompt.render(
        domain=domain,
        size=doc.size,
        categories=[
            (name, round(share * 100))
            for name, share in _top_categories(doc.categories, PROMPT_CATEGORIES)
        ],
        top_items=doc.top_items[:PROMPT_ITEMS],
        members=[_profile_line(p, MEMBER_CHARS) for p in doc.members[:PROMPT_MEMBERS]],
        others=[_profile_line(p, OTHER_CHARS) for p in doc.contrast[:PROMPT_OTHERS]],
        taken=list(taken),
    )


# ------------------------------------------------------------------------------ segments


def label_segments(
    docs: Sequence[SegmentDoc],
    *,
    llm: LLM,
    params: GenerationParams,
    vocabulary: frozenset[str],
    attempts: int = 3,
    domain: str = "item",
    prompt: Prompt | None = None,
    retry: RetryPolicy | None = None,
    reserved: Sequence[str] = (),
) -> list[SegmentLabel]:
    """Name every segment (largest first, so big segments get first pick of names).

    Returns one label per doc, in the order of ``docs``; names are distinct
    case-insensitively, also from ``reserved`` (names given elsewhere, e.g. to the segments
    under a parent). A segment whose answers all fail validation, or whose LLM call fails,
    gets :func:`fallback_label` with the reason.
    """
    prompt = prompt or load_prompt("label")
    terms = distinctive_terms(docs)
    labels: dict[int, SegmentLabel] = {}
    taken: list[str] = list(reserved)
    for index in sorted(range(len(docs)), key=lambda i: (-docs[i].size, docs[i].segment_id)):
        doc = docs[index]
        already = set(taken)
        messages = render_label_prompt(doc, taken=taken, prompt=prompt, domain=domain)
        parse = partial(parse_label, doc=doc, taken=already, vocabulary=vocabulary, domain=domain)
        try:
            result = generate_structured(
                llm,
                messages,
                parse=parse,
                params=params,
                schema=label_schema(doc),
                attempts=attempts,
                policy=retry or RetryPolicy(),
            )
        except LLMError as exc:
            label = fallback_label(doc, terms[index], already, reason=f"LLM error: {exc}")
        else:
            if result.value is not None:
                label = result.value
            else:
                reason = f"invalid after {result.attempts} tries: {result.errors[-1]}"
                label = fallback_label(doc, terms[index], already, reason=reason)
                label.raw_output = result.raw_outputs[-1]
        labels[index] = label
        taken.append(label.name)
    return [labels[i] for i in range(len(docs))]
