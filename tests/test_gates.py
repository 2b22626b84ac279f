"""The quality gates: the bad texts issue #11 quoted are rejected, good ones with odd
catalogue names pass, and each stage applies them where it accepts an LLM answer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import segrec_cmd

from segrec.chat import parse_question
from segrec.gates import (
    GateError,
    Lexicon,
    TextTally,
    check_fluent,
    check_question_consistent,
    check_reason_specific,
    check_segment_consistent,
    check_summary_specific,
    failure_code,
    natural_order,
)
from segrec.label import SegmentDoc, check_label_gates, fallback_label, parse_label
from segrec.profile import Event, ProfileRequest, Vocabulary, parse_profile
from segrec.reasons import Candidate, ReasonContext, anchors, parse_reason, template_reason

CATEGORIES = frozenset(
    {"Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary"}
    | {"Drama", "Fantasy", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War"}
    | {"Western", "Film-Noir"}
)


def event(item: str, title: str, categories: tuple[str, ...], strength: float) -> Event:
    return Event(item, title, categories, "rating", 4.0, None, int(item), strength, "rated")


HISTORY = [
    event("1", "Days of Thunder (1990)", ("Action", "Drama"), 0.6),
    event("2", "Iron Giant, The (1999)", ("Adventure", "Animation", "Children", "Drama"), 0.8),
    event("3", "Forrest Gump (1994)", ("Comedy", "Drama", "Romance", "War"), 1.0),
    event("4", "Pianist, The (2002)", ("Drama", "War"), 0.9),
    event("5", "Frost/Nixon (2008)", ("Drama",), 0.7),
    event("6", "Usual Suspects, The (1995)", ("Crime", "Mystery", "Thriller"), 1.0),
    event("7", "Heat (1995)", ("Action", "Crime", "Thriller"), 0.9),
    event("8", "Matrix, The (1999)", ("Action", "Sci-Fi", "Thriller"), 1.0),
    event("9", "WALL·E (2008)", ("Adventure", "Animation", "Children", "Romance", "Sci-Fi"), 0.9),
    event("10", "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", ("Comedy", "Romance"), 1),
]
TITLES = [e.title for e in HISTORY]
LEXICON = Lexicon.from_names([*TITLES, *CATEGORIES])
CANDIDATE = Candidate(
    "99", "Ronin (1998)", ("Action", "Crime", "Thriller"), 1.0, {"itemknn": 0.8}, ("Heat (1995)",)
)


def answer(**fields: object) -> str:
    return json.dumps(fields)


# ------------------------------------------------------------------------------ regressions

BAD_REASONS = [
    "Because you liked Days of Thunder (1990) and Iron Giant, The (1999), but most like is "
    "''httpsa.",
    "Because you liked Forrest Gump (1994) and Pianist, The (2002), xtraordinary films that "
    "are not for everyone.",
    "Because you liked Frost/Nixon (2008), and most like, the movie.",
    "Because you liked Mystery, the most like is usual suspects, the last one.",
]


@pytest.mark.parametrize("text", BAD_REASONS)
def test_the_quoted_bad_reasons_fail_a_gate(text: str) -> None:
    with pytest.raises(GateError):
        check_fluent(text, LEXICON, names=TITLES)


@pytest.mark.parametrize("text", BAD_REASONS)
def test_the_reason_stage_rejects_the_quoted_bad_reasons(text: str) -> None:
    # Each as an answer for an item sharing Drama (so the old checks let most through).
    drama = Candidate("98", "Schindler's List (1993)", ("Drama", "War"), 1.0, {"ease": 1.0})
    context = ReasonContext.build(HISTORY)
    with pytest.raises(ValueError):
        parse_reason(
            answer(reason=text),
            drama,
            context,
            Vocabulary(CATEGORIES),
            [*anchors(drama, HISTORY), "Mystery", "Frost/Nixon (2008)"],
        )


@pytest.mark.parametrize(
    "summary", ["This user loves to watch the movie", "This user enjoys a particular movie."]
)
def test_the_quoted_empty_summaries_fail(summary: str) -> None:
    with pytest.raises(GateError):
        check_fluent(summary, LEXICON, names=TITLES)
        check_summary_specific(summary, [*TITLES, "Drama", "War"])
    request = ProfileRequest("u", tuple(HISTORY), (), ("Drama",), (), (), "k")
    with pytest.raises(GateError):
        parse_profile(
            answer(likes=["Drama"], dislikes=[], favourite_items=[], themes=[], summary=summary),
            request,
            Vocabulary(CATEGORIES),
        )


def test_the_quoted_chat_question_fails() -> None:
    question = "Which of the offered types should be used to answer this Documentary question?"
    with pytest.raises(GateError, match="consistent/meta"):
        check_question_consistent(question, ["Documentary", "War", "Western"])
    with pytest.raises(ValueError):
        parse_question(
            answer(question=question),
            kinds=["Documentary", "War"],
            system="You help a new user.",
            choices=["Documentary", "War"],
        )


PLANTED = SegmentDoc(
    segment_id=0,
    size=42,
    members=[],
    contrast=[],
    categories={
        "Comedy": 0.2,
        "Drama": 0.18,
        "Action": 0.15,
        "Romance": 0.1,
        "Thriller": 0.08,
        "Sci-Fi": 0.03,
        "Musical": 0.02,
        "Western": 0.01,
        "War": 0.01,
    },
    top_items=["Heat (1995)", "Forrest Gump (1994)"],
    lift_categories=("Musical", "Western", "War"),
)


def test_the_planted_segment_rejects_a_name_contradicting_its_facts() -> None:
    # The case: "Sci-Fi & Drama fans", while Sci-Fi is neither a top category by
    # share (Comedy, Drama, Action, Romance, Thriller) nor by lift (Musical, Western, War).
    with pytest.raises(GateError, match="consistent/category-not-top: names Sci-Fi"):
        check_label_gates(
            "Sci-Fi & Drama fans",
            "They centre on Comedy, Drama and Action.",
            PLANTED,
            CATEGORIES,
        )
    with pytest.raises(ValueError, match="category-not-top"):
        parse_label(
            answer(name="Sci-Fi & Drama fans", description="They centre on Comedy and Drama."),
            PLANTED,
            taken=set(),
            vocabulary=CATEGORIES,
        )
    # Numbers quoted must be the stored ones: 42 members, 20% Comedy.
    check_label_gates(
        "Musical fans", "42 users; 20% of what they watch is Comedy.", PLANTED, CATEGORIES
    )
    with pytest.raises(GateError, match="consistent/number"):
        check_label_gates("Musical fans", "Some 300 users who love Comedy.", PLANTED, CATEGORIES)
    with pytest.raises(GateError, match="consistent/name-off-top"):
        check_label_gates("Film buffs", "They love Comedy and Drama.", PLANTED, CATEGORIES)
    label = parse_label(
        answer(name="Western & War fans", description="They watch Comedy and Drama, and Heat."),
        PLANTED,
        taken=set(),
        vocabulary=CATEGORIES,
    )
    assert label.name == "Western & War fans"


def test_the_fallback_label_passes_its_own_gates() -> None:
    label = fallback_label(PLANTED, ["Sci-Fi", "Heat (1995)", "Musical"], set())
    assert "Sci-Fi" not in label.name
    check_label_gates(label.name, label.description, PLANTED, CATEGORIES)


# ------------------------------------------------------------------------------ good texts


@pytest.mark.parametrize(
    "text",
    [
        "This user loves Matrix, The (1999) and other Sci-Fi thrillers.",
        "This user adores The Matrix and WALL·E, gentle Sci-Fi with heart.",
        "This user's favourite is Amélie, a Romance told with whimsy.",
        "This user watches Heat (1995) again and again.",
    ],
)
def test_well_formed_texts_with_odd_catalogue_names_pass(text: str) -> None:
    check_fluent(text, LEXICON, names=TITLES)
    assert check_summary_specific(text, [*TITLES, *CATEGORIES])


def test_natural_order_reads_a_catalogue_title_as_people_write_it() -> None:
    assert natural_order("Matrix, The (1999)") == "The Matrix"
    assert natural_order("WALL·E (2008)") == "WALL·E"


def test_a_reason_must_say_more_than_its_anchor() -> None:
    shared = ["Action", "Crime", "Thriller"]
    for good in (
        "Because you liked Heat (1995), another Crime and Thriller movie.",
        "Because you liked Heat (1995), and people who liked it also liked this.",
    ):
        check_fluent(good, LEXICON, names=TITLES)
        check_reason_specific(
            good, anchors=["Heat (1995)"], shared=shared, item_title="Ronin (1998)", co_watch=True
        )
    with pytest.raises(GateError, match="specific/restates-anchor"):
        check_reason_specific(
            "Because you liked Heat (1995), a great one.",
            anchors=["Heat (1995)"],
            shared=shared,
            item_title="Ronin (1998)",
            co_watch=True,
        )
    # A co-watch claim needs a collaborative signal behind it.
    with pytest.raises(GateError):
        check_reason_specific(
            "Because you liked Heat (1995), and people who liked it also liked this.",
            anchors=["Heat (1995)"],
            shared=[],
            item_title="Ronin (1998)",
            co_watch=False,
        )


def test_templates_are_grammatical_and_specific() -> None:
    text = template_reason(CANDIDATE, HISTORY)
    assert text == (
        "People who liked Heat (1995) also liked this; it shares Thriller and Action with your "
        "favourites."
    )
    check_fluent(text, LEXICON, names=TITLES)
    check_question_consistent(
        "Which of these kinds of movie do you enjoy: Comedy, Drama and War?", ["Comedy"]
    )


def test_segment_numbers_and_categories() -> None:
    check_segment_consistent(
        "40 users, 35% Animation.", allowed=["Animation"], vocabulary=CATEGORIES, numbers=[40, 35]
    )
    with pytest.raises(GateError, match="consistent/number"):
        check_segment_consistent(
            "41 users.", allowed=["Animation"], vocabulary=CATEGORIES, numbers=[40, 35]
        )


# ------------------------------------------------------------------------------ counts


def test_failure_codes_and_the_tally_add_up() -> None:
    assert failure_code("invalid after 2 tries: fluent/unknown-word: not a word: httpsa") == (
        "fluent/unknown-word"
    )
    assert failure_code("LLM error: connection refused") == "llm-error"
    assert failure_code("invalid after 3 tries: not JSON: x") == "not-json"
    assert failure_code("invalid after 2 tries: names what the user's history lacks: x") == (
        "ungrounded"
    )
    tally = TextTally()
    tally.add("reason", replaced=False)
    tally.add("reason", replaced=True, why="invalid after 2 tries: specific/restates-anchor: x")
    tally.add("reason", replaced=True, why="LLM error: boom")
    tally.add("summary", replaced=False)
    data = tally.as_json()
    assert data["reason"] == {
        "texts": 3,
        "kept": 1,
        "replaced": 2,
        "kept_share": 0.3333,
        "reasons": {"llm-error": 1, "specific/restates-anchor": 1},
    }
    again = TextTally.from_rows(tally.rows())
    assert again.as_json() == data
    assert tally.lines()[0].startswith("reason: 1/3 written by the LLM and kept")


# ------------------------------------------------------------------------------ real model


@pytest.mark.slow
@pytest.mark.timeout(2400)  # every kind of text, retried, on a busy 2-core machine
def test_real_model_texts_all_pass_the_gates_and_the_counts_add_up(  # type: ignore[no-untyped-def]
    local_llm, example_ratings, example_movies, tmp_path
) -> None:
    """The text track on the example data with the bundled model: every displayed text
    (the LLM's and the templates) passes the gates, and kept + replaced = texts."""
    from segrec.config import Settings
    from segrec.data import load_dataset
    from segrec.quality import text_track
    from segrec.store import Store

    dataset = load_dataset(example_ratings, example_movies)
    settings = Settings(workspace=tmp_path, domain="movie", threads=2)
    out = text_track(
        settings,
        dataset,
        users=3,
        seed=0,
        llm=local_llm,
        reasons_per_user=2,
        chats=1,
        k=2,
        show_samples=100,
    )
    assert set(out["kinds"]) == {"summary", "segment", "reason", "question"}
    for kind, m in out["kinds"].items():
        assert m["texts"] == m["kept"] + m["replaced"] > 0, kind
        assert sum(m["reasons"].values()) == m["replaced"], kind
        assert len(m["samples"]["kept"]) == m["kept"]
        assert len(m["samples"]["replaced"]) == m["replaced"]
        assert m["seconds_per_text"] >= 0
    assert out["kinds"]["summary"]["ungrounded_rate"] == 0
    # every displayed text, checked again from the stored facts: passes, names nothing absent
    assert len(out["texts"]) == out["texts_shown"] == sum(m["texts"] for m in out["kinds"].values())
    assert [t for t in out["texts"] if t["gate_failure"] or t["ungrounded"]] == []
    assert out["displayed_pass_share"] == 1.0
    titles = list(dataset.items["title"])
    categories = {c for cats in dataset.items["categories"] for c in cats}
    lexicon = Lexicon.from_names([*titles, *categories])
    with Store.open(Path(out["workspace"])) as store:
        interactions = store.interactions_frame()
        by_user = interactions.groupby("user_id")["item_id"].apply(set)
        items = store.items_frame().set_index("item_id")
        for record in store.profiles():
            summary = record.profile["summary"]
            own = items.loc[sorted(by_user[record.user_id])]
            names = [*own["title"], *{c for cats in own["categories"] for c in cats}]
            check_fluent(summary, lexicon, names=names)
            check_summary_specific(summary, names)
    for text in [
        *out["kinds"]["reason"]["samples"]["kept"],
        *out["kinds"]["reason"]["samples"]["replaced"],
    ]:
        check_fluent(text, lexicon, names=titles)
    for text in [
        *out["kinds"]["question"]["samples"]["kept"],
        *out["kinds"]["question"]["samples"]["replaced"],
    ]:
        check_fluent(text, lexicon, names=[*categories])
        check_question_consistent(text, [*categories, *titles])
    for text in [
        *out["kinds"]["segment"]["samples"]["kept"],
        *out["kinds"]["segment"]["samples"]["replaced"],
    ]:
        name, _, description = text.partition(" — ")
        check_fluent(name, lexicon, names=[*categories, *titles], sentence=False)
        check_fluent(description, lexicon, names=[*categories, *titles])


def test_plain_schema_keeps_fields_and_lengths_but_no_patterns_or_enums() -> None:
    from segrec.quality import plain_schema

    schema = {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "pattern": "^Because you liked (Heat)[.]$"},
            "likes": {"type": "array", "items": {"type": "string", "enum": ["Drama"]}},
            "name": {"type": "string", "minLength": 1, "maxLength": 48},
        },
        "required": ["reason", "likes", "name"],
    }
    plain = plain_schema(schema)
    assert "pattern" not in json.dumps(plain) and "enum" not in json.dumps(plain)
    assert plain["properties"]["name"] == schema["properties"]["name"]
    assert plain["properties"]["likes"]["items"] == {"type": "string"}
    assert plain["required"] == schema["required"]
    assert "pattern" in schema["properties"]["reason"]  # the original is left alone


@pytest.mark.slow
def test_the_text_track_checks_every_displayed_text_and_can_drop_the_constraints(
    example_ratings: Path, example_movies: Path, tmp_path: Path
) -> None:
    """With a fake LLM whose answers all fail, every text is a template; the track lists each
    with its gate verdict and facts, and they all pass. ``constrained=False`` sends the same
    prompts under schemas without patterns or enums; the parents of 3+ segments count too."""
    from segrec.config import Settings
    from segrec.data import load_dataset
    from segrec.quality import text_track
    from segrec.testing import FakeLLM

    dataset = load_dataset(example_ratings, example_movies)
    settings = Settings(workspace=tmp_path, domain="movie", min_segment_size=3)
    results = {}
    for constrained in (True, False):
        fake = FakeLLM(default=json.dumps({"summary": "httpsa"}))
        results[constrained] = out = text_track(
            settings,
            dataset,
            users=20,
            llm=fake,
            reasons_per_user=1,
            chats=1,
            k=5,
            constrained=constrained,
        )
        schemas = json.dumps([call["schema"] for call in fake.calls])
        assert ('"pattern"' in schemas) == constrained and ('"enum"' in schemas) == constrained
        assert out["constrained"] == constrained
        assert set(out["kinds"]) == {"summary", "segment", "parent", "reason", "question"}
        assert (
            out["texts_shown"]
            == len(out["texts"])
            == sum(m["texts"] for m in out["kinds"].values())
        )
        assert all(t["template"] and t["facts"] for t in out["texts"])
        assert [t for t in out["texts"] if t["gate_failure"] or t["ungrounded"]] == []
        assert out["kept_share"] == 0 and out["displayed_pass_share"] == 1
        for m in out["kinds"].values():
            assert m["displayed_pass_share"] == 1 and m["displayed_failures"] == {}
    assert results[True]["workspace"] != results[False]["workspace"]
    assert [t["text"] for t in results[True]["texts"]] == [
        t["text"] for t in results[False]["texts"]
    ]


# ------------------------------------------------------------------------------ commands


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*segrec_cmd(), *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_stored_counts_are_summed_per_command_by_segrec_texts(tmp_path: Path) -> None:
    from segrec.store import Store

    tally = TextTally()
    tally.add("reason", replaced=False)
    tally.add("reason", replaced=True, why="LLM error: boom")
    with Store.open(tmp_path / "ws", create=True) as store:
        store.add_text_counts("explain", tally.rows())
        store.add_text_counts("explain", tally.rows())
        store.add_text_counts("profile", [("summary", "kept", "", 3)])
    result = _cli("texts", "--workspace", str(tmp_path / "ws"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["commands"]["explain"]["reason"]["texts"] == 4
    assert data["commands"]["explain"]["reason"]["reasons"] == {"llm-error": 2}
    assert data["total"]["summary"]["kept"] == 3


def test_the_text_track_needs_the_llm(example_ratings: Path, example_movies: Path) -> None:
    result = _cli(
        "eval",
        str(example_ratings),
        "--items",
        str(example_movies),
        "--tracks",
        "text",
        "--no-llm",
    )
    assert result.returncode == 2
    assert "--tracks text needs the LLM" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_gemma_shortcut_names_the_extra_s_gguf() -> None:
    from segrec.errors import LLMError
    from segrec.llm import GEMMA_SHORTCUT, resolve_model_path

    assert resolve_model_path(None) is None
    assert resolve_model_path(Path("x.gguf")) == Path("x.gguf")
    try:
        resolved = resolve_model_path(Path(GEMMA_SHORTCUT))
    except LLMError as exc:  # the extra is not installed: say what to install
        assert "segrec[gemma]" in str(exc)
    else:
        assert resolved is not None and resolved.name == "gemma-3-270m-q4_k_m.gguf"


def test_fact_and_name_grammars_hold_only_true_clauses_and_convert_for_llama_cpp() -> None:
    import re

    from segrec.label import label_schema
    from segrec.reasons import fact_clauses, reason_schema

    facts = fact_clauses(CANDIDATE, HISTORY, domain="movie")
    assert "Heat (1995)" in facts and "Usual Suspects, The (1995)" in facts
    pattern = reason_schema(anchors(CANDIDATE, HISTORY), facts)["properties"]["reason"]["pattern"]
    assert re.fullmatch(pattern, "Because you liked Heat (1995), another Crime and Thriller movie.")
    assert re.fullmatch(
        pattern, "Because you liked Heat (1995), and people who liked it also liked this."
    )
    # Usual Suspects shares Crime and Thriller, but is not among the items most like Ronin.
    assert re.fullmatch(
        pattern, "Because you liked Usual Suspects, The (1995), another Crime movie."
    )
    assert not re.fullmatch(
        pattern,
        "Because you liked Usual Suspects, The (1995), and people who liked it also liked this.",
    )
    assert not re.fullmatch(pattern, "Because you liked Heat (1995), another Drama movie.")
    assert not re.fullmatch(pattern, "Because you liked Heat (1995), a great one.")
    name = label_schema(PLANTED)["properties"]["name"]["pattern"]
    assert re.fullmatch(name, "Comedy & Drama fans") and re.fullmatch(name, "Action lovers")
    # Musical is a top category by lift but 2% of what they watch against Comedy's 20%: a
    # name may say only categories with a third of the top one's share (blind read 4).
    assert not re.fullmatch(name, "Musical lovers")
    assert not re.fullmatch(name, "Sci-Fi & Drama fans") and not re.fullmatch(name, "Film buffs")
    # Free words around the category are where a small model invents.
    for invented in ("Family comedy lovers", "Young Comedy fans", "The Group Drama"):
        assert not re.fullmatch(name, invented), invented
    assert not re.fullmatch(name, "Drama & Drama fans")
    llama_cpp = pytest.importorskip("llama_cpp")
    for schema in (reason_schema(anchors(CANDIDATE, HISTORY), facts), label_schema(PLANTED)):
        assert llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)


def test_a_name_said_twice_is_refused_and_the_grammar_cannot_say_it() -> None:
    import re

    from segrec.reasons import fact_clauses, reason_schema

    with pytest.raises(GateError, match="fluent/repeat"):
        check_fluent("Because you liked Heat (1995), another Romance and Romance movie.", LEXICON)
    facts = fact_clauses(CANDIDATE, HISTORY, domain="movie")
    pattern = reason_schema(anchors(CANDIDATE, HISTORY), facts)["properties"]["reason"]["pattern"]
    assert not re.fullmatch(
        pattern, "Because you liked Heat (1995), another Crime and Crime movie."
    )


def test_a_short_title_is_blanked_only_as_a_whole_word() -> None:
    # "Her (2013)" is a catalogue title; "another" must not lose its "her".
    check_fluent(
        "Because you liked Heat (1995), another Crime movie.", LEXICON, names=["Her (2013)"]
    )


def test_summary_and_description_grammars_say_only_the_facts_and_convert_for_llama_cpp() -> None:
    """The first blind read's untrue LLM summaries and descriptions were free words after a
    fixed start; the grammars now say them from the user's and the segment's own facts."""
    import re

    from segrec.label import label_schema
    from segrec.profile import summary_pattern

    request = ProfileRequest(
        user_id="1",
        history=tuple(HISTORY),
        lines=(),
        like_options=("Camping and hiking", "Gardening", "Drama"),
        dislike_options=("Western",),
        favourite_options=("Nordic protein kettlebell #157", "Matrix, The (1999)", "WALL·E (2008)"),
        cache_key="",
    )
    summary = summary_pattern(request)
    assert re.fullmatch(
        summary,
        "This user keeps coming back to Gardening and Drama. Favourites include Matrix, The "
        "(1999) and Nordic protein kettlebell #157. Less keen on Western.",
    )
    assert re.fullmatch(summary, "This user mostly enjoys Camping and hiking.")
    for invented in (
        "This user has a high favourite item in this category. They also have fond memories "
        "of a camping and hiking experience.",
        "This user has a fondness for various products related to yoga and fitness, including "
        "the blue protein kettlebell and zen yoga mat.",
        "This user mostly enjoys Camping and hiking and Gardening.",  # "X and Y and Z"
        "This user mostly enjoys Gardening and Gardening.",
        # ml-latest-small, 2026-12-03: "Action, especially" said Secret Garden is Action
        "This user is drawn to Drama, especially Matrix, The (1999).",
        "This user mostly enjoys Western.",  # a category the user rates low
    ):
        assert not re.fullmatch(summary, invented), invented
    description = label_schema(PLANTED)["properties"]["description"]["pattern"]
    assert re.fullmatch(
        description, "Members often pick Comedy and Drama. Top items include Heat (1995)."
    )
    assert re.fullmatch(description, "These users share a taste for Action.")
    for invented in (
        "This group is a mix of people who enjoy baking, baby care, hiking, gardening. They "
        "love choosing the right food for their health.",
        "Members often pick Sci-Fi.",  # not among the top categories by share
        "Members often pick Romance.",  # top 5 by share, but not among the top 3 it may say
    ):
        assert not re.fullmatch(description, invented), invented
    # Every text the grammars allow passes the gates.
    check_label_gates(
        "Comedy fans",
        "Members often pick Comedy and Drama. Top items include Heat (1995).",
        PLANTED,
        CATEGORIES,
    )
    profile = parse_profile(
        answer(
            likes=["Drama"],
            dislikes=[],
            favourite_items=["Matrix, The (1999)"],
            themes=[],
            summary="This user is drawn to Drama. Favourites include Matrix, The (1999) and "
            "WALL·E (2008).",
        ),
        request,
        Vocabulary(CATEGORIES),
    )
    assert profile.profile.summary.startswith("This user is drawn to Drama")
    llama_cpp = pytest.importorskip("llama_cpp")
    for schema in (request.schema(), label_schema(PLANTED)):
        assert llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)


# The second blind read's failures (benchmarks/results/text-blindread-2.md), one per class.
PRODUCT_PARENT = SegmentDoc(
    segment_id=1,
    size=5,
    members=[],
    contrast=[],
    categories={
        "Gardening": 0.3,
        "Camping and hiking": 0.2,
        "Baby care": 0.2,
        "Baking and kitchen": 0.2,
        "Pet supplies": 0.1,
    },
    top_items=["Orbit compost seeds #124", "Apex compost garden hose #324"],
    shown_categories=(
        "Gardening",
        "Camping and hiking",
        "Baby care",
        "Baking and kitchen",
        "Pet supplies",
    ),
)
PRODUCT_CATEGORIES = frozenset([*PRODUCT_PARENT.categories, "Fitness", "Video games"])


@pytest.mark.parametrize(
    ("name", "description", "code"),
    [
        (  # invented names, the prompt's "marketing report" echoed
            "Family of Pet supplies",
            "This family is dedicated to a wide variety of pet items. Their main categories "
            "include Orbit, Apex, and Nordic, which have been featured in the marketing report "
            "by the user group Dog Training and Pet Products.",
            "fluent/prompt-echo",
        ),
        (
            "Family of Pet supplies",
            "Their main categories include Gardening, as featured by the user group Dog "
            "Training and Pet Products.",
            "consistent/unknown-name",
        ),
        (  # the label prompt's "what the members enjoy more than the others"
            "Gardening fans",
            "The members enjoy more than the others, with a preference for gardening.",
            "fluent/prompt-echo",
        ),
        (  # read 1: what a behaviour log cannot show
            "Baking and kitchen fans",
            "This group enjoys baking and gardening. They love choosing the right food for "
            "their health.",
            "consistent/unsupported",
        ),
    ],
)
def test_the_second_blind_reads_labels_fail_a_gate(name: str, description: str, code: str) -> None:
    with pytest.raises(GateError, match=code):
        check_label_gates(name, description, PRODUCT_PARENT, PRODUCT_CATEGORIES)


def test_a_summary_claiming_memories_fails() -> None:
    request = ProfileRequest(
        user_id="1",
        history=(event("1", "Orbit sleeping bag trail #464", ("Camping and hiking",), 1.0),),
        lines=(),
        like_options=("Camping and hiking",),
        dislike_options=(),
        favourite_options=("Orbit sleeping bag trail #464",),
        cache_key="",
    )
    from segrec.profile import check_summary_gates

    with pytest.raises(GateError, match="consistent/unsupported"):
        check_summary_gates(
            "This user has a high favourite item in this category. They also have fond "
            "memories of a camping and hiking experience.",
            request,
            Vocabulary(PRODUCT_CATEGORIES),
        )
    check_summary_gates(
        "This user keeps coming back to Camping and hiking. Favourites include Orbit sleeping "
        "bag trail #464.",
        request,
        Vocabulary(PRODUCT_CATEGORIES),
    )


def test_the_popularity_template_says_what_the_item_is_next_to_the_users_own() -> None:
    """Read 2's largest class (13 of 19): "Widely popular right now, in Baking and kitchen."
    said nothing about the user; the template now places the item next to their categories."""
    history = [event("1", "Nordic protein kettlebell #157", ("Fitness",), 1.0)]
    item = Candidate("2", "Acme oven mixer #201", ("Baking and kitchen",), 1.0, {"pop": 1.0}, ())
    text = template_reason(item, history, domain="product")
    assert text == "Widely popular: a Baking and kitchen product, outside your usual Fitness."
    check_fluent(text, Lexicon.from_names(["Baking and kitchen", "Fitness"]))


def test_the_second_blind_reads_names_are_outside_the_name_grammar() -> None:
    import re

    from segrec.label import label_schema

    name = label_schema(PRODUCT_PARENT)["properties"]["name"]["pattern"]
    assert re.fullmatch(name, "Gardening & Baby care fans")
    for invented in ("Gardeners and Pet supplies", "Baking and fitness fans", "Family of Pet"):
        assert not re.fullmatch(name, invented), invented


def test_a_co_like_is_said_only_of_a_title_sharing_a_category() -> None:
    """Blind read 3: "Because you liked Terra lantern tent #320, and people who liked it also
    liked this." for a dog leash — the title was only the nearest by content."""
    from segrec.reasons import fact_clauses

    history = [
        event("1", "Terra lantern tent #320", ("Camping and hiking",), 1.0),
        event("2", "Zen arcade headset #394", ("Video games",), 0.9),
    ]
    leash = Candidate(
        "3",
        "Orbit aquarium dog leash #470",
        ("Pet supplies",),
        1.0,
        {"ease": 0.5, "pop": 0.1},
        ("Terra lantern tent #320",),
    )
    assert fact_clauses(leash, history, domain="product") == {}
    text = template_reason(leash, history, domain="product")
    assert "Terra lantern tent" not in text
    assert text == (
        "People with tastes like yours liked this: a Pet supplies product, outside your usual "
        "Camping and hiking."
    )


def test_the_fourth_blind_reads_classes_fail() -> None:
    """A question naming a choice twice (4 of read 4's 5 failures) and a label putting a
    6% category on a par with an 82% one."""
    import re

    from segrec.chat import question_pattern
    from segrec.label import label_schema

    repeat = "Which of these do you enjoy most: Pet supplies, Skin care and beauty or Pet supplies?"
    choices = ["Pet supplies", "Skin care and beauty"]
    with pytest.raises(GateError, match="fluent/repeat"):
        check_question_consistent(repeat, choices)
    assert not re.fullmatch(question_pattern(choices), repeat)
    assert re.fullmatch(
        question_pattern(choices),
        "Which of these do you enjoy most: Pet supplies or Skin care and beauty?",
    )
    pets = SegmentDoc(
        segment_id=2,
        size=6,
        members=[],
        contrast=[],
        categories={"Pet supplies": 0.82, "Fitness": 0.06, "Baking and kitchen": 0.04},
        top_items=["Apex pet bed chew toy #198"],
        lift_categories=("Baking and kitchen", "Pet supplies", "Fitness"),
    )
    schema = label_schema(pets)["properties"]
    assert not re.fullmatch(schema["name"]["pattern"], "Fitness & Pet supplies enthusiasts")
    assert re.fullmatch(schema["name"]["pattern"], "Pet supplies enthusiasts")
    assert not re.fullmatch(
        schema["description"]["pattern"], "These users are drawn to Fitness and Pet supplies."
    )
