"""Why each recommended item: one short reason per item, grounded in the user's own history.

The LLM sees a short history (the user's strongest and most recent liked items, the same for
every candidate of one user, so llama.cpp reuses the cached prompt prefix) and then the
candidate: title, categories, and the history items it is most similar to. A per-candidate
grammar makes the reason start "Because you liked" + a liked history title or a category the
item shares (its anchors), then allows only lower-case words, so the small model cannot
name anything new there. Validation checks the rest: one or two finished sentences, no
loops, an anchor named, no catalogue category the history and the candidate lack, no
title-like name that is neither a history title nor the candidate's own (for backends that
ignore the pattern). An answer still invalid after the retries, an LLM failure, and an item
sharing nothing with what the user liked give a deterministic reason from the candidate's
strongest signal, marked as a fallback with why: explaining never stops a recommendation.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from pydantic import BaseModel

from segrec.gates import (
    DANGLING,
    FIRST_PERSON,
    Lexicon,
    check_fluent,
    check_reason_specific,
)
from segrec.grounding import (
    PATTERN_UNSAFE,
    check_prose,
    decode_json,
    join_words,
    norm,
    pattern_group,
    pattern_literal,
)
from segrec.llm.base import (
    LLM,
    GenerationParams,
    Message,
    RetryPolicy,
    map_ordered,
    structured_or_why,
)
from segrec.profile import Event, ProfileRequest, Vocabulary, compact_history, ungrounded_claims
from segrec.templates import Prompt, load_prompt

REASON_MIN, REASON_MAX, REASON_MAX_SENTENCES = 10, 160, 2
# The grammar makes every reason start from what the user liked that the item shares,
# "Because you liked <anchor>" (or "<anchor> and <anchor>"), then lets the model say why in
# lower-case words only: no new names, years or numbers the anchors do not carry.
REASON_PREFIX = "Because you liked "
MAX_ANCHORS, ANCHOR_MAX_CHARS = 6, 50
_TAIL = "(,? [a-z][a-z ,'-]{{0,{n}}})?[.!]"
_YEAR = re.compile(r"\s*\(\d{4}\)$")
_WORD = re.compile(r"[\w'’]+")
# What the prompt shows: the 135M model reads ~170 tokens/s on two cores.
PROMPT_HISTORY, PROMPT_HISTORY_TOKENS, PROMPT_BECAUSE = 8, 160, 2

# How each signal is said when the facts its full sentence needs are missing (no shared
# category, no similar history item, no segment name). Also the known signals, in the order
# that breaks ties between equally strong ones.
SIGNAL_WORDS: dict[str, str] = {
    "ease": "People with tastes like yours liked this.",
    "itemknn": "People who liked what you liked also liked this.",
    "cosine": "Close to what you liked.",
    "segment_pop": "Popular in your segment.",
    "pop": "Widely popular.",
}
NO_SIGNAL = "Picked for you from your history."


@dataclass(frozen=True)
class Candidate:
    """One recommended item, with what the ranker knows about why it ranks high."""

    item_id: str
    title: str
    categories: tuple[str, ...]
    score: float
    signals: dict[str, float] = field(hash=False)  # per-signal contribution to the score
    because: tuple[str, ...] = ()  # titles of the user's most similar history items


class Reason(BaseModel):
    """The reason shown next to one recommended item, and whether it is the template."""

    item_id: str
    reason: str
    fallback: bool = False
    fallback_reason: str | None = None


class _Answer(BaseModel):
    reason: str


class ReasonCache(Protocol):
    """Validated LLM reasons by content key; the workspace store is the persistent one."""

    def cached_reason(self, key: str) -> dict[str, Any] | None: ...

    def cache_reason(self, key: str, reason: dict[str, Any]) -> None: ...


def reason_key(
    llm: LLM, prompt: Prompt, params: GenerationParams, messages: Any, **extra: Any
) -> str:
    """Content hash of one reason call: model, prompt version, parameters and the exact
    messages, so a cached reason is only reused for the very same question."""
    body = {
        "model": llm.model_id,
        "prompt": prompt.version,
        "params": params.as_dict(),
        "messages": messages,
        **extra,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------ history


@dataclass(frozen=True)
class ReasonContext:
    """One user's history as the reason stage reads it; built once, shared by all candidates.

    ``history`` is every event (what a reason may cite); ``shown`` is the short history the
    prompt shows: liked items only when there are any, since a reason cites what the user
    liked.
    """

    history: tuple[Event, ...]
    shown: tuple[Event, ...]

    @classmethod
    def build(
        cls,
        history: Sequence[Event],
        *,
        max_items: int = PROMPT_HISTORY,
        max_tokens: int = PROMPT_HISTORY_TOKENS,
    ) -> ReasonContext:
        liked = [e for e in history if e.strength > 0] or list(history)
        shown = compact_history(liked, max_items=max_items, max_tokens=max_tokens)
        return cls(history=tuple(history), shown=tuple(shown))

    def claims(self, text: str, candidate: Candidate, vocabulary: Vocabulary) -> list[str]:
        """Names in ``text`` absent from the history and the candidate (profile's rules).

        Catalogue categories and title-like names are checked by
        :func:`segrec.profile.ungrounded_claims`, which reads a request's events only, so the
        candidate joins the history as one more event.
        """
        itself = Event(
            item_id=candidate.item_id,
            title=candidate.title,
            categories=candidate.categories,
            behavior="recommended",
            value=None,
            timestamp=None,
            seq=-1,
            strength=0.0,
            description="recommended",
        )
        request = ProfileRequest(
            user_id="",
            history=(*self.history, itself),
            lines=(),
            like_options=(),
            dislike_options=(),
            favourite_options=(),
            cache_key="",
        )
        return ungrounded_claims(text, request, vocabulary)


# ------------------------------------------------------------------------------ facts


def similar_titles(candidate: Candidate, history: Sequence[Event]) -> list[str]:
    """The candidate's ``because`` titles that are history items the user liked."""
    titles = {norm(e.title): e.title for e in history if e.strength > 0}
    found = (titles.get(norm(title)) for title in candidate.because)
    return list(dict.fromkeys(title for title in found if title))


def _liked_sharing(candidate: Candidate, history: Sequence[Event]) -> list[Event]:
    """Liked history items sharing a category with the candidate, most shared and liked first."""
    wanted = set(candidate.categories)
    sharing = [e for e in history if e.strength > 0 and wanted & set(e.categories)]
    return sorted(
        sharing,
        key=lambda e: (-len(wanted & set(e.categories)), -e.strength, -(e.timestamp or -1)),
    )


def shared_categories(candidate: Candidate, history: Sequence[Event]) -> list[str]:
    """The candidate's categories that the user's liked history has, weightiest first."""
    weight: Counter[str] = Counter()
    for event in history:
        if event.strength > 0:
            for category in set(event.categories) & set(candidate.categories):
                weight[category] += event.strength
    return sorted(weight, key=lambda c: (-weight[c], candidate.categories.index(c)))


def anchors(candidate: Candidate, history: Sequence[Event]) -> list[str]:
    """What a reason may start from: liked history titles and categories the item shares.

    The ``because`` titles come first, then shared categories, then liked items sharing a
    category; names too long or with characters a grammar pattern cannot hold are skipped.
    """
    options = [
        *similar_titles(candidate, history),
        *shared_categories(candidate, history),
        *(e.title for e in _liked_sharing(candidate, history)),
    ]
    usable = (a for a in options if len(a) <= ANCHOR_MAX_CHARS and not PATTERN_UNSAFE.search(a))
    return list(dict.fromkeys(usable))[:MAX_ANCHORS]


COLLABORATIVE = ("ease", "itemknn")


def co_watched(candidate: Candidate) -> bool:
    """Whether a collaborative signal ranked the item: "people who liked X also liked it"."""
    return any(candidate.signals.get(name, 0.0) > 0 for name in COLLABORATIVE)


def fact_clauses(
    candidate: Candidate, history: Sequence[Event], *, domain: str = "item"
) -> dict[str, list[str]]:
    """For each liked title the reason may start from, the clauses true of it and the item.

    "another Crime and Thriller movie" when the item shares those categories with that
    title; "and people who liked it also liked this" when a collaborative signal ranked the
    item, the title is one of the liked items most like it and shares a category with it.
    The reason grammar offers
    only these, so what the model adds to its anchor is a fact the ranker knows.
    """
    wanted = set(candidate.categories)
    similar = set(similar_titles(candidate, history))
    out: dict[str, list[str]] = {}
    titles = [
        *similar_titles(candidate, history),
        *(e.title for e in _liked_sharing(candidate, history)),
    ]
    events = {e.title: e for e in history if e.strength > 0}
    for title in dict.fromkeys(titles):
        if len(title) > ANCHOR_MAX_CHARS or PATTERN_UNSAFE.search(title):
            continue
        shared = [c for c in candidate.categories if c in set(events[title].categories) & wanted]
        clauses = []
        if shared:  # one category, or two different ones
            names = [
                *shared,
                *(f"{a} and {b}" for i, a in enumerate(shared) for b in shared[i + 1 :]),
            ]
            clauses.append(f"another {pattern_group(names)} {pattern_literal(domain)}")
        # The similar titles are the nearest by content, not checked co-likes: tied to a
        # title of another category ("Because you liked a lantern tent, and people who
        # liked it also liked this" for a dog leash, blind read 3) the co-watch clause
        # claims what nothing shows, so it needs a category in common too.
        if title in similar and co_watched(candidate) and shared:
            clauses.append("and people who liked it also liked this")
        if clauses:
            out[title] = clauses
        if len(out) >= MAX_ANCHORS:
            break
    return out


def _tail_bound(options: Sequence[str]) -> int:
    """How many free characters fit after the longest two anchors within REASON_MAX."""
    longest = max(len(option) for option in options)
    # ", " + the first letter + the closing stop
    return max(0, REASON_MAX - len(REASON_PREFIX) - 2 * longest - len(" and ") - 4)


def _reason_pattern(options: Sequence[str], tail: int) -> str:
    anchor = pattern_group(options)
    return f"^{REASON_PREFIX}{anchor}( and {anchor})?{_TAIL.format(n=tail)}$"


def _fact_pattern(facts: Mapping[str, Sequence[str]]) -> str:
    starts = [
        f"{pattern_literal(title)}, ({'|'.join(clauses)})" for title, clauses in facts.items()
    ]
    return f"^{REASON_PREFIX}({'|'.join(starts)})[.]$"


def reason_schema(
    options: Sequence[str], facts: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """The JSON schema for one candidate: one sentence that starts from its anchors.

    With ``facts`` (:func:`fact_clauses`), the sentence is a liked title and one clause true
    of it; without, an anchor and a few free lower-case words.
    """
    pattern = _fact_pattern(facts) if facts else _reason_pattern(options, _tail_bound(options))
    return {
        "type": "object",
        "properties": {"reason": {"type": "string", "pattern": pattern}},
        "required": ["reason"],
    }


def _cut_off(reason: str, options: Sequence[str]) -> bool:
    """True when the grammar ended the reason: its free words filled the whole bound.

    A bound one shorter would not match then. A reason from a backend that ignored the
    pattern does not match at all; only its last word tells.
    """
    tail = _tail_bound(options)
    return (
        tail > 0
        and re.fullmatch(_reason_pattern(options, tail), reason) is not None
        and re.fullmatch(_reason_pattern(options, tail - 1), reason) is None
    )


# ------------------------------------------------------------------------------ template


def strongest_signal(candidate: Candidate) -> str | None:
    """The known signal contributing most to the score, or None when none contributes."""
    known = [name for name in SIGNAL_WORDS if candidate.signals.get(name, 0.0) > 0]
    return max(known, key=lambda name: candidate.signals[name], default=None)


def _categories_phrase(categories: Sequence[str]) -> str:
    """One or two categories joined: "Drama and War"; a name that has its own "and"
    ("Baking and kitchen") stands alone, so the phrase never reads "X and Y and Z"."""
    first = list(categories[:2])
    if len(first) == 2 and any(" and " in c.lower() for c in first):
        first = first[:1]
    return join_words(first) if first else ""


def liked_categories(history: Sequence[Event], n: int = 2) -> list[str]:
    """The categories of the user's liked history, weightiest first."""
    weight: Counter[str] = Counter()
    for event in history:
        if event.strength > 0:
            for category in event.categories:
                weight[category] += event.strength
    return [c for c, _ in sorted(weight.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _what_it_is(candidate: Candidate, history: Sequence[Event], domain: str) -> str:
    """What an item sharing no category with the liked history is, and where it stands
    next to the user's own: ": a Drama and War movie, outside your usual Comedy"."""
    kind = _categories_phrase(candidate.categories)
    if not kind:
        return ""
    text = f": {'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind} {domain}"
    usual = _categories_phrase(liked_categories(history))
    return text + (f", outside your usual {usual}" if usual else "")


def template_reason(
    candidate: Candidate,
    history: Sequence[Event],
    *,
    segment_name: str | None = None,
    domain: str = "item",
) -> str:
    """A deterministic reason from the candidate's strongest signal, naming only facts.

    It cites a history title only if the user liked it (a ``because`` title, or a liked item
    sharing a category), and a category only if both the candidate and the user's liked
    history have it. Categories the item shares with the liked history are added when the
    signal's words name none, so a template is as specific as the facts allow ("People who
    liked Heat (1995) also liked this; it shares Crime and Thriller with your favourites.").
    An item that shares nothing is said for what it is, next to the user's own categories
    ("Widely popular: a Drama and War movie, outside your usual Comedy and Romance."): a
    signal's words alone ("Widely popular.") were the first blind read's generic reasons.
    """
    signal = strongest_signal(candidate)
    if signal is None:
        return NO_SIGNAL
    because = similar_titles(candidate, history)
    shared = shared_categories(candidate, history)
    text = SIGNAL_WORDS[signal].removesuffix(".")
    cites = False  # whether the words name a liked title
    if signal in COLLABORATIVE:
        # a co-like said of a title needs a category in common (see fact_clauses)
        sharing = [e.title for e in _liked_sharing(candidate, history)]
        titles = [t for t in because if t in sharing] or sharing
        if titles:
            text, cites = f"People who liked {titles[0]} also liked this", True
    elif signal == "cosine":
        if because and shared:
            return f"Close to {because[0]} and your taste for {shared[0]}."
        if because:
            return f"Close to {because[0]}."
        if shared:
            return f"Close to your taste for {shared[0]}."
    elif signal == "segment_pop" and segment_name and segment_name.strip():
        text = f"Popular in your segment '{' '.join(segment_name.split())}'"
    if shared:
        text += f"; it shares {join_words(shared[:2])} with your favourites"
    elif not cites:
        text += _what_it_is(candidate, history, domain)
    return text + "."


# ------------------------------------------------------------------------------ LLM


def render_reason_prompt(
    candidate: Candidate, context: ReasonContext, *, prompt: Prompt, domain: str = "item"
) -> list[Message]:
    """The prompt for one candidate: the user's short history first, the candidate last."""
    return prompt.render(
        domain=domain,
        history=context.shown,
        title=candidate.title,
        categories=candidate.categories,
        because=similar_titles(candidate, context.history)[:PROMPT_BECAUSE],
    )


def _cites(reason: str, options: Sequence[str]) -> bool:
    """Whether ``reason`` names one of ``options`` (a title with or without its year)."""
    text = f" {norm(reason)} "
    names = {norm(n) for option in options for n in (option, _YEAR.sub("", option))}
    return any(name and f" {name} " in text for name in names)


def parse_reason(
    text: str,
    candidate: Candidate,
    context: ReasonContext,
    vocabulary: Vocabulary,
    options: Sequence[str],
) -> Reason:
    """Decode and validate one LLM answer for ``candidate``; raise ValueError when unusable.

    ``options`` are the candidate's :func:`anchors`: the reason must name one of them,
    whether or not the backend enforced the schema's pattern.
    """
    data = decode_json(text)
    reason = " ".join(_Answer.model_validate(data).reason.split())
    sentences = check_prose(
        reason,
        what="reason",
        min_chars=REASON_MIN,
        max_chars=REASON_MAX,
        max_sentences=REASON_MAX_SENTENCES,
    )
    words = _WORD.findall(reason.lower())
    if (words and words[-1] in DANGLING) or _cut_off(reason, options):
        raise ValueError("reason is cut off mid-sentence")
    if FIRST_PERSON & set(words):
        raise ValueError("speaks in the first person; a reason addresses the user")
    # Sentence by sentence, as the profile stage checks: a capitalised first word is no name.
    claims = [c for s in sentences for c in context.claims(s, candidate, vocabulary)]
    if claims:
        raise ValueError(f"names what the user's history lacks: {', '.join(claims)}")
    if not _cites(reason, options):
        raise ValueError("names none of the liked titles or categories the item shares")
    check_reason_gates(reason, candidate, context, vocabulary, options)
    return Reason(item_id=candidate.item_id, reason=reason)


def check_reason_gates(
    reason: str,
    candidate: Candidate,
    context: ReasonContext,
    vocabulary: Vocabulary,
    options: Sequence[str],
) -> None:
    """The quality gates on a reason (:mod:`segrec.gates`): fluent, and saying something
    beyond its anchor — a shared category, a co-watch fact, a word of the item's title.

    A reason for an item that shares nothing with the liked history (no ``options``) can
    only name its signal, and is held to fluency alone.
    """
    names = [candidate.title, *(e.title for e in context.history), *options]
    lexicon = Lexicon.from_names([*names, *candidate.categories, *vocabulary.categories])
    check_fluent(reason, lexicon, names=names)
    if options:
        check_reason_specific(
            reason,
            anchors=[o for o in options if o not in candidate.categories],
            shared=shared_categories(candidate, context.history),
            item_title=candidate.title,
            co_watch=co_watched(candidate),
            similar=candidate.signals.get("cosine", 0.0) > 0,
        )


def write_reasons(
    candidates: Sequence[Candidate],
    history: Sequence[Event],
    *,
    llm: LLM,
    params: GenerationParams,
    vocabulary: frozenset[str],
    segment_name: str | None = None,
    attempts: int = 2,
    domain: str = "item",
    prompt: Prompt | None = None,
    retry: RetryPolicy | None = None,
    cache: ReasonCache | None = None,
    constrain: bool = True,
) -> list[Reason]:
    """One reason per candidate, in order: the LLM's when valid, else the template's.

    ``history`` is the user's events (see :func:`segrec.profile.user_events`);
    ``vocabulary`` every category in the catalogue. A candidate sharing no liked title or
    category with the history, an answer still invalid after ``attempts`` tries, and an
    LLM error all give :func:`template_reason`, marked as a fallback with the reason why;
    LLM trouble never raises. ``constrain`` (default) lets the grammar offer only clauses
    true of the item (:func:`fact_clauses`); off, the model writes a few free words. With a
    ``cache``, the outcome of each LLM question is stored by content key (the messages and
    the grammar's schema) and a repeated question is answered from it without calling the
    LLM; a fallback after an LLM error is not cached, so a later call tries the LLM again.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    prompt = prompt or load_prompt("reason")
    context = ReasonContext.build(history)
    grounding = Vocabulary(vocabulary)

    def explain(candidate: Candidate) -> Reason:
        options = anchors(candidate, history)
        facts = fact_clauses(candidate, history, domain=domain) if constrain else None
        key = None  # the cache key, once the LLM is asked
        if not options:
            why = "the history has no liked title or category this item shares"
        elif constrain and not facts:
            # Free words after an anchor were the blind read's untrue reasons ("and most of
            # you enjoyed a great blue whisk mixer"): without a fact, the template speaks.
            why = "no liked title shares a category or a co-watch with this item: no fact to add"
        else:
            messages = render_reason_prompt(candidate, context, prompt=prompt, domain=domain)
            schema = reason_schema(options, facts)
            key = reason_key(llm, prompt, params, messages, schema=schema, attempts=attempts)
            if cache is not None and (hit := cache.cached_reason(key)) is not None:
                return Reason.model_validate(hit)
            parse = partial(
                parse_reason,
                candidate=candidate,
                context=context,
                vocabulary=grounding,
                options=options,
            )
            value, why = structured_or_why(
                llm,
                messages,
                parse=parse,
                params=params,
                schema=schema,
                attempts=attempts,
                policy=retry or RetryPolicy(),
            )
            if value is not None:
                if cache is not None:
                    cache.cache_reason(key, value.model_dump())
                return value
        reason = Reason(
            item_id=candidate.item_id,
            reason=template_reason(candidate, history, segment_name=segment_name, domain=domain),
            fallback=True,
            fallback_reason=why,
        )
        # The same question gets the same invalid answers (fixed seeds); an LLM error may not.
        if key is not None and cache is not None and not str(why).startswith("LLM error"):
            cache.cache_reason(key, reason.model_dump())
        return reason

    # One at a time for llama.cpp (the shared history prefix stays cached); a hosted
    # backend that takes concurrent calls gets them.
    return map_ordered(llm, explain, candidates)
