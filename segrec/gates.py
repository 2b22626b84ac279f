"""Quality gates for every text segrec shows: fluent, specific, consistent — or a template.

Grounding (``segrec.grounding``) catches invented names; these gates catch what a reader
notices next: broken words, URLs and quote debris, sentences that stop mid-way, summaries
that could describe anyone, reasons that only repeat their anchor, segment names that
contradict the categories printed beside them, and chat questions that are not questions to
the user. Each stage calls its gate where it accepts an LLM answer (inside its ``parse_*``
function), so a failing text is retried and then replaced by the stage's template like any
other invalid answer; :class:`GateError` messages start ``gate/code:`` so that the reason a
text was replaced can be counted (:func:`failure_code`, :class:`TextTally`).

A word is a word of the language when ``wordfreq`` knows it (Zipf frequency above
:data:`MIN_ZIPF`, a maintained word list) or it is a word of a title, category or name from
the workspace's own data (:class:`Lexicon`), so "Amélie", "WALL·E" and "Matrix, The (1999)"
pass while "httpsa" and "xtraordinary" do not.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from segrec.grounding import SENTENCE, norm

# Zipf 1.0 is about once per 100 million words: below it are typos and debris ("httpsa" 0,
# "xtraordinary" 0), above it every dictionary word we have seen in a profile or reason.
MIN_ZIPF = 1.0
KINDS = ("summary", "theme", "segment", "parent", "reason", "question")

# Words that end no finished English sentence (often cut off by a length bound).
DANGLING = frozenset(
    {"a", "about", "an", "and", "are", "as", "at", "be", "because", "but", "by", "for", "from"}
    | {"has", "have", "in", "is", "it", "its", "it's", "like", "of", "on", "or", "so", "than"}
    | {"that", "the", "their", "to", "was", "which", "while", "who", "with"}
)
# Labels the prompts print before facts ("Most like: …"); echoed, they are debris.
PROMPT_ECHOES = (
    *("most like", "recommended movie", "recommended item", "json", "the history"),
    # the label prompt's ("for a marketing report", "what the members enjoy more than the
    # others"), echoed in the second blind read's descriptions
    *("marketing report", "more than the others"),
)
# What a behaviour log cannot show about a person: their memories, health, family or work.
# A text that claims it invented it ("fond memories of a camping experience", "the right
# food for their health", blind reads 1 and 2).
UNSUPPORTED = frozenset(
    {"memories", "memory", "nostalgia", "nostalgic", "experience", "experiences", "childhood"}
    | {"health", "healthy", "lifestyle", "career", "job", "jobs", "hobby", "hobbies"}
    | {"personality", "retired", "student", "students", "parents", "married", "wife"}
    | {"husband", "friends"}
)
# Words of the language that say nothing about a particular user, item or segment.
VAGUE = frozenset(
    {"movie", "movies", "film", "films", "item", "items", "one", "ones", "thing", "things"}
    | {"particular", "certain", "various", "variety", "wide", "different", "kind", "kinds"}
    | {"type", "types", "genre", "genres", "last", "first", "same", "other", "others", "lot"}
    | {"watch", "watching", "enjoy", "enjoys", "love", "loves", "like", "likes", "liked"}
    | {"user", "users", "people", "fans", "good", "great", "nice", "fine", "much", "more"}
)
_LETTERS = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_URL = re.compile(r"(?i)\b(?:https?|www|ftp)\w*|://|\.(?:com|org|net|io)\b|@\w")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(%|percent)?")
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_TRAILING_ARTICLE = re.compile(
    r"^(?P<head>.+), (?P<article>The|A|An|Les|La|Le|L'|Il|El|Die|Der|Das)$"
)
# A quote mark is stray unless it closes a quoted phrase, or is an apostrophe inside a word
# or after a plural's s.
_QUOTED = re.compile(r"(?<!\w)(?:'[^'\n]{2,60}'|\"[^\"\n]{2,60}\"|“[^”\n]{2,60}”)(?!\w)")
_STRAY_QUOTE = re.compile(r"\"|“|”|‘|(?<![^\W\d_])'|'(?![^\W\d_])(?<!s')")
FIRST_PERSON = frozenset({"i", "me", "my", "mine", "myself", "i'm", "i've", "we", "us", "our"})
_PREFERENCE = frozenset(
    {"like", "likes", "enjoy", "enjoys", "love", "loves", "prefer", "fancy", "want", "into"}
    | {"favourite", "favourites", "favorite", "favorites", "interest", "interested", "watch"}
    | {"read", "listen", "buy", "try", "liked", "enjoyed", "loved", "appeal", "appeals"}
)
# A question about the chat itself rather than about the user's taste.
_META = frozenset({"question", "questions", "answer", "answers", "offered", "used", "prompt"})
_CO_WATCH = re.compile(
    r"\b(?:people|users|viewers|fans) who (?:liked|loved|enjoyed)\b|\balso liked\b"
)


class GateError(ValueError):
    """A text that fails a gate; ``str()`` is ``gate/code: detail`` (see :func:`failure_code`)."""

    def __init__(self, gate: str, code: str, detail: str) -> None:
        super().__init__(f"{gate}/{code}: {detail}")
        self.gate = gate
        self.code = code


_CODE = re.compile(r"\b(fluent|specific|consistent)/([a-z-]+)")


def failure_code(why: str | None) -> str:
    """Why a text was replaced, as a short key for counting.

    ``gate/code`` for a gate; ``llm-error``, ``not-json``, ``ungrounded``, ``no-facts`` or
    ``form`` (length, markup, loops, the pattern) for the other reasons stages give.
    """
    if not why:
        return "none"
    found = _CODE.search(why)
    if found:
        return f"{found.group(1)}/{found.group(2)}"
    lowered = why.lower()
    if lowered.startswith("llm error"):
        return "llm-error"
    if lowered.startswith("no llm") or "requested" in lowered:
        return "not-asked"
    if "not json" in lowered:
        return "not-json"
    if "lack" in lowered or "ungrounded" in lowered or "absent" in lowered:
        return "ungrounded"
    if "shares" in lowered and "no liked" in lowered:
        return "no-facts"
    return "form"


# ------------------------------------------------------------------------------ words


@cache
def _zipf(word: str) -> float:
    from wordfreq import zipf_frequency

    return float(zipf_frequency(word, "en"))


def words_of(text: str) -> list[str]:
    """The letter runs of ``text``, lower-cased (apostrophes inside words kept)."""
    return [
        w.lower().replace("’", "'") for w in _LETTERS.findall(unicodedata.normalize("NFC", text))
    ]


def natural_order(title: str) -> str:
    """A catalogue title as people write it: "Matrix, The (1999)" → "The Matrix"."""
    bare = _YEAR.sub("", title).strip()
    match = _TRAILING_ARTICLE.match(bare)
    return f"{match['article']} {match['head']}" if match else bare


@dataclass(frozen=True)
class Lexicon:
    """The words a text may use: the language's (wordfreq) and the workspace's own names."""

    names: frozenset[str] = frozenset()

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Lexicon:
        return cls(frozenset(w for name in names for w in words_of(str(name))))

    def known(self, word: str) -> bool:
        if word in self.names or len(word) == 1:
            return True
        if _zipf(word) >= MIN_ZIPF:
            return True
        base = word.removesuffix("'s").removesuffix("s'")  # possessives: "Nolan's"
        return base != word and (base in self.names or _zipf(base) >= MIN_ZIPF)


def blank_names(text: str, names: Iterable[str]) -> str:
    """``text`` with every occurrence of ``names`` (and their natural order) replaced by a
    neutral word, longest first, so a title's own commas, stops and quotes are not read as
    the sentence's."""
    forms = {form for name in names for form in (name, natural_order(name)) if len(form) >= 2}
    for form in sorted(forms, key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(form)}(?!\w)", "name", text, flags=re.IGNORECASE)
    return text


# ------------------------------------------------------------------------------ fluent


def check_fluent(
    text: str, lexicon: Lexicon, *, names: Iterable[str] = (), sentence: bool = True
) -> None:
    """Raise GateError unless ``text`` reads as finished, clean language.

    ``names`` are catalogue names the text may quote verbatim (titles with commas, years,
    odd characters). ``sentence=False`` checks a phrase (a name, a theme): words and debris
    only, no sentence end.
    """
    plain = blank_names(text, names)
    if _URL.search(plain):
        raise GateError("fluent", "url", f"contains a URL or address: {text!r}")
    if "''" in plain or _STRAY_QUOTE.search(_QUOTED.sub("name", plain)):
        raise GateError("fluent", "stray-quote", f"has a stray quote mark: {text!r}")
    lowered = f" {norm(plain)} "
    for echo in PROMPT_ECHOES:
        if f" {echo} " in lowered:
            raise GateError("fluent", "prompt-echo", f"repeats the prompt's label {echo!r}")
    if re.search(r"[,;:]\s*[,;:.!?]|\s[,;:.!?]|[.!?]\s*[,;:]", plain):
        raise GateError("fluent", "debris", f"has stray punctuation: {text!r}")
    if re.search(r"\b([A-Z][\w-]+) (?:and|or|&) \1\b", text):  # "Romance and Romance"
        raise GateError("fluent", "repeat", f"names the same thing twice: {text!r}")
    unknown = [w for w in words_of(plain) if not lexicon.known(w)]
    if unknown:
        raise GateError("fluent", "unknown-word", f"not a word: {', '.join(unknown[:3])}")
    if not sentence:
        return
    stripped = plain.strip()
    if stripped.endswith(("…", "...")) or not stripped.endswith((".", "!", "?")):
        raise GateError("fluent", "unfinished", "does not end as a finished sentence")
    for part in SENTENCE.split(stripped):
        words = words_of(part)
        if len(words) < 3:
            raise GateError("fluent", "fragment", f"sentence too short to say anything: {part!r}")
        if words[-1] in DANGLING:
            raise GateError("fluent", "cut-off", f"sentence ends on {words[-1]!r}")
        if part[:1].isalpha() and not part[:1].isupper():
            raise GateError("fluent", "fragment", f"sentence starts in lower case: {part!r}")
    if FIRST_PERSON & set(words_of(plain)):
        raise GateError("fluent", "first-person", "speaks in the first person")


def check_supported(text: str, *, names: Iterable[str] = ()) -> None:
    """Raise GateError when ``text`` claims what a behaviour log cannot show (memories,
    health, family, work: :data:`UNSUPPORTED`), outside the catalogue ``names`` it quotes."""
    found = sorted(UNSUPPORTED & set(words_of(blank_names(text, names))))
    if found:
        raise GateError(
            "consistent", "unsupported", f"claims what the data cannot show: {', '.join(found)}"
        )


def unknown_names(text: str, lexicon: Lexicon) -> list[str]:
    """Capitalised words inside a sentence (not its first word) that are no word of the
    workspace's names: invented names ("the user group Dog Training and Pet Products")."""
    found = []
    for part in SENTENCE.split(text):
        for word in _LETTERS.findall(part)[1:]:
            if word[:1].isupper() and word.lower() not in lexicon.names and word != "I":
                found.append(word)
    return list(dict.fromkeys(found))


# ------------------------------------------------------------------------------ specific


def mentioned(text: str, names: Iterable[str]) -> list[str]:
    """The ``names`` that ``text`` mentions: whole words, case-insensitive, a title with or
    without its year or leading article ("The Matrix" for "Matrix, The (1999)")."""
    padded = f" {norm(text)} "
    found = []
    for name in names:
        forms = {norm(name), norm(_YEAR.sub("", name)), norm(natural_order(name))}
        if any(form and f" {form} " in padded for form in forms):
            found.append(name)
    return found


def check_summary_specific(summary: str, own: Iterable[str]) -> list[str]:
    """Raise GateError unless the summary names one of the user's own categories or titles.

    Grounding has already removed every name the history lacks, so what is left names only
    this user's things: with at least one of them, it is not interchangeable with another
    user's. Returns the names it mentions.
    """
    named = mentioned(summary, own)
    if not named:
        raise GateError(
            "specific", "no-own-name", "names none of the user's own categories or titles"
        )
    return named


def check_reason_specific(
    reason: str,
    *,
    anchors: Sequence[str],
    shared: Iterable[str],
    item_title: str,
    co_watch: bool,
    similar: bool = False,
) -> None:
    """Raise GateError unless the reason says something beyond its anchor.

    Enough: a category the item shares with the user's liked history, a co-watch fact
    ("people who liked it also liked this", when a collaborative signal ranked the item),
    a content-similarity fact ("close to X", when the content signal ranked it), or a word
    of the item's own title (a theme grounded in the item's text).
    """
    rest = blank_names(reason, anchors)
    rest = re.sub(r"(?i)^because you (?:liked|loved|enjoyed|rated)\s*", "", rest)
    if mentioned(rest, shared):
        return
    if co_watch and _CO_WATCH.search(rest.lower()):
        return
    if similar and re.search(r"(?i)\b(?:close to|similar to)\b", rest):
        return
    title_words = {w for w in words_of(natural_order(item_title)) if len(w) >= 4} - VAGUE
    if title_words & set(words_of(rest)):
        return
    raise GateError(
        "specific",
        "restates-anchor",
        "says nothing beyond its anchor (no shared category, co-watch fact or theme of the item)",
    )


# ------------------------------------------------------------------------------ consistent


def allowed_segment_categories(
    shares: Mapping[str, float], lift: Iterable[str] = (), *, top: int = 5
) -> list[str]:
    """The categories a segment's label may name: its top ``top`` by share, and by lift."""
    by_share = [c for c, s in sorted(shares.items(), key=lambda kv: (-kv[1], kv[0])) if s > 0]
    return list(dict.fromkeys([*by_share[:top], *lift]))


def check_segment_consistent(
    text: str,
    *,
    allowed: Sequence[str],
    vocabulary: Iterable[str],
    numbers: Iterable[float] | None,
) -> None:
    """Raise GateError when a segment's name or description contradicts its facts.

    Every catalogue category it names must be among ``allowed`` (top by share or lift);
    every number it quotes must be one of the stored ``numbers`` (size, shares in percent;
    None: numbers are not checked).
    """
    named = mentioned(text, [c for c in vocabulary if len(c) > 2])
    outside = sorted(set(named) - set(allowed))
    if outside:
        raise GateError(
            "consistent",
            "category-not-top",
            f"names {', '.join(outside)}, not among the top categories {', '.join(allowed)}",
        )
    if numbers is None:
        return
    stored = {round(float(n)) for n in numbers}
    for match in _NUMBER.finditer(text):
        value = float(match.group(1))
        if round(value) not in stored:
            raise GateError("consistent", "number", f"quotes {match.group(0).strip()}, not stored")


def check_question_consistent(question: str, choices: Sequence[str]) -> None:
    """Raise GateError unless the question asks the user about their taste in the choices."""
    words = set(words_of(question))
    if not question.rstrip().endswith("?"):
        raise GateError("consistent", "not-a-question", "does not end with '?'")
    named = [c for c in choices if c]
    for choice in named:
        if len(re.findall(rf"(?<!\w){re.escape(choice)}(?!\w)", question, re.IGNORECASE)) > 1:
            raise GateError("fluent", "repeat", f"names {choice!r} twice")
    if words & _META:
        raise GateError("consistent", "meta", "talks about the chat, not the user's taste")
    if not words & {"you", "your", "you'd", "you're"}:
        raise GateError("consistent", "not-to-user", "does not ask the user")
    if not words & _PREFERENCE:
        raise GateError("consistent", "no-preference", "does not ask what the user likes")
    refers = words & {"these", "them", "which", "those", "following", "any"}
    if not (mentioned(question, choices) or refers):
        raise GateError("consistent", "off-choices", "names none of the offered choices")


# ------------------------------------------------------------------------------ counts


@dataclass
class KindCount:
    texts: int = 0
    kept: int = 0  # written by the LLM and passed every gate
    replaced: int = 0  # a template instead
    reasons: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "kept": self.kept,
            "replaced": self.replaced,
            "kept_share": round(self.kept / self.texts, 4) if self.texts else None,
            "reasons": dict(sorted(self.reasons.items())),
        }


@dataclass
class TextTally:
    """How many texts of each kind the LLM wrote and kept, and why the others were replaced."""

    kinds: dict[str, KindCount] = field(default_factory=dict)

    def add(self, kind: str, *, replaced: bool, why: str | None = None) -> None:
        count = self.kinds.setdefault(kind, KindCount())
        count.texts += 1
        if replaced:
            count.replaced += 1
            count.reasons[failure_code(why)] += 1
        else:
            count.kept += 1

    def update(self, other: TextTally) -> None:
        for kind, count in other.kinds.items():
            mine = self.kinds.setdefault(kind, KindCount())
            mine.texts += count.texts
            mine.kept += count.kept
            mine.replaced += count.replaced
            mine.reasons.update(count.reasons)

    def rows(self) -> list[tuple[str, str, str, int]]:
        """(kind, outcome, reason, n) rows: what the workspace stores."""
        out = []
        for kind, count in sorted(self.kinds.items()):
            if count.kept:
                out.append((kind, "kept", "", count.kept))
            out += [(kind, "replaced", why, n) for why, n in sorted(count.reasons.items())]
        return out

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> TextTally:
        tally = cls()
        for kind, outcome, why, n in rows:
            count = tally.kinds.setdefault(str(kind), KindCount())
            count.texts += int(n)
            if outcome == "kept":
                count.kept += int(n)
            else:
                count.replaced += int(n)
                count.reasons[str(why)] += int(n)
        return tally

    def as_json(self) -> dict[str, Any]:
        return {kind: count.as_json() for kind, count in sorted(self.kinds.items())}

    def lines(self) -> list[str]:
        """One line per kind for a terminal: 'reason: 4/5 written by the LLM kept; …'."""
        out = []
        for kind, count in sorted(self.kinds.items()):
            line = f"{kind}: {count.kept}/{count.texts} written by the LLM and kept"
            if count.reasons:
                why = ", ".join(f"{k} {n}" for k, n in count.reasons.most_common())
                line += f"; {count.replaced} templates ({why})"
            out.append(line)
        return out


def tally_items(items: Iterable[Mapping[str, Any]], tally: TextTally | None = None) -> TextTally:
    """Count the reasons of `explain`/`chat` items (``reason_fallback``, ``…_why``)."""
    tally = tally if tally is not None else TextTally()
    for item in items:
        tally.add(
            "reason", replaced=bool(item["reason_fallback"]), why=item.get("reason_fallback_why")
        )
    return tally


def tally_segments(segments: Iterable[Any], kind: str = "segment") -> TextTally:
    """Count the labels (name and description, accepted together) of described segments or
    parents (``SegmentRecord``/``ParentRecord``: ``fallback``, ``described``,
    ``facts["fallback_reason"]``) as texts of ``kind``."""
    tally = TextTally()
    for segment in segments:
        if segment.described:
            tally.add(kind, replaced=segment.fallback, why=segment.facts.get("fallback_reason"))
    return tally


def tally_chat(questions: Iterable[Any], items: Iterable[Mapping[str, Any]]) -> TextTally:
    """Count a chat's worded questions (not the open favourites one) and its reasons."""
    tally = TextTally()
    for question in questions:
        if not question.open:
            tally.add("question", replaced=question.fallback, why=question.fallback_reason)
    return tally_items(items, tally)


def record_counts(workspace: Any, command: str, tally: TextTally) -> None:
    """Store what ``command`` kept and replaced in the workspace (table ``text_counts``)."""
    from segrec.store import Store

    if tally.kinds:
        with Store.open(workspace) as store:
            store.add_text_counts(command, tally.rows())


def stored_counts(workspace: Any) -> dict[str, Any]:
    """Everything the workspace has recorded, per command and in total, as JSON."""
    from segrec.store import Store

    with Store.open(workspace) as store:
        per_command = store.text_counts()
    total = TextTally()
    out: dict[str, Any] = {}
    for command, rows in per_command.items():
        tally = TextTally.from_rows(rows)
        total.update(tally)
        out[command] = tally.as_json()
    return {"commands": out, "total": total.as_json()}
