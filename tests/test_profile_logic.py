"""Fast unit tests of the profile stage's pure parts, with the fake LLM."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from segrec.errors import LLMError, TransientLLMError
from segrec.llm.base import GenerationParams, RetryPolicy, complete_with_retry
from segrec.profile import (
    Event,
    Vocabulary,
    build_request,
    compact_history,
    fallback_profile,
    parse_profile,
    profile_one,
    ungrounded_claims,
    user_events,
    value_scales,
)
from segrec.templates import load_prompt
from segrec.testing import FakeLLM

PARAMS = GenerationParams()


def event(item: str, title: str, cats: tuple[str, ...], value: float, ts: int) -> Event:
    strength = (value / 5) * 2 - 1
    return Event(item, title, cats, "rating", value, ts, ts, strength, f"rated {value}/5")


HISTORY = [
    event("1", "Toy Story (1995)", ("Animation", "Children", "Comedy"), 5.0, 1),
    event("2", "Heat (1995)", ("Action", "Crime", "Thriller"), 4.5, 2),
    event("3", "Sudden Death (1995)", ("Action",), 1.0, 3),
    event("4", "Jumanji (1995)", ("Adventure", "Children"), 2.0, 4),
    event("5", "Balto (1995)", ("Animation", "Children"), 4.0, 5),
]
VOCAB = Vocabulary(
    frozenset(
        {
            "Animation",
            "Children",
            "Comedy",
            "Action",
            "Crime",
            "Thriller",
            "Adventure",
            "Horror",
            "Romance",
            "Documentary",
        }
    )
)


def request(history: list[Event] = HISTORY):  # type: ignore[no-untyped-def]
    return build_request(
        "u1",
        history,
        prompt=load_prompt("profile"),
        model_id="fake",
        params=PARAMS,
        max_items=20,
        max_tokens=700,
    )


def test_compact_history_keeps_strongest_and_most_recent_in_order() -> None:
    history = [event(str(i), f"Film {i} (2000)", ("Drama",), 3.0, i) for i in range(30)]
    history[3] = event("3", "Loved (2000)", ("Drama",), 5.0, 3)
    history[5] = event("5", "Hated (2000)", ("Drama",), 0.5, 5)
    kept = compact_history(history, max_items=6, max_tokens=10_000)
    ids = [e.item_id for e in kept]
    assert "3" in ids and "5" in ids  # strongest signals, though old
    assert {"29", "28"} <= set(ids)  # most recent
    assert len(ids) == 6
    assert ids == sorted(ids, key=int)  # chronological


def test_compact_history_respects_token_cap_and_dedupes_items() -> None:
    history = [
        event(
            str(i % 10), f"A rather long film title number {i} (2000)", ("Drama",), 3.0 + (i % 3), i
        )
        for i in range(40)
    ]
    kept = compact_history(history, max_items=20, max_tokens=60)
    assert len({e.item_id for e in kept}) == len(kept)
    assert sum(len(e.title) + len(e.description) + 12 for e in kept) / 4 <= 80


def test_schema_enums_come_from_the_history_and_are_disjoint() -> None:
    req = request()
    schema = req.schema()["properties"]
    likes = set(schema["likes"]["items"]["enum"])
    dislikes = set(schema["dislikes"]["items"]["enum"])
    assert likes <= req.history_categories and dislikes <= req.history_categories
    assert not likes & dislikes
    assert "Animation" in likes and "Action" in likes  # Action: 4.5 and 1.0 → net > 0
    assert dislikes == {"Adventure"}  # only in a 2.0 rating
    assert set(schema["favourite_items"]["items"]["enum"]) <= {e.title for e in HISTORY}
    assert schema["summary"]["pattern"].startswith("^This user ")
    assert schema["likes"]["minItems"] == 1


def test_cache_key_changes_with_history_prompt_model_and_params() -> None:
    base = request()
    assert base.cache_key == request().cache_key
    assert base.cache_key != request(HISTORY[:-1]).cache_key
    other_model = build_request(
        "u1",
        HISTORY,
        prompt=load_prompt("profile"),
        model_id="other",
        params=PARAMS,
        max_items=20,
        max_tokens=700,
    )
    other_params = build_request(
        "u1",
        HISTORY,
        prompt=load_prompt("profile"),
        model_id="fake",
        params=GenerationParams(temperature=0.9),
        max_items=20,
        max_tokens=700,
    )
    assert len({base.cache_key, other_model.cache_key, other_params.cache_key}) == 3


def answer(**fields: object) -> str:
    data = {
        "likes": ["Animation"],
        "dislikes": [],
        "favourite_items": ["Toy Story (1995)"],
        "themes": ["animated family films"],
        "summary": "Enjoys Animation and Children films such as Toy Story.",
    }
    data.update(fields)
    return json.dumps(data)


def test_parse_profile_removes_ungrounded_claims_and_counts_them() -> None:
    text = answer(
        likes=["Animation", "Horror"],
        dislikes=["Animation"],
        favourite_items=["The Legend of Lara Croft"],
        themes=["romance novels", "animated family films"],
        summary="Loves Toy Story and Animation. Has a fondness for Horror films. "
        "Adores The Legend of Lara Croft.",
    )
    grounded = parse_profile(text, request(), VOCAB)
    p = grounded.profile
    assert p.likes == ["Animation"]
    assert p.dislikes == []  # liked and disliked: dropped from dislikes
    assert p.favourite_items == []
    assert p.themes == ["animated family films"]
    assert "Horror" not in p.summary and "Lara Croft" not in p.summary
    assert "Toy Story" in p.summary
    assert len(grounded.removed) >= 5


def test_parse_profile_rejects_loops_and_garbage() -> None:
    with pytest.raises(ValueError):
        parse_profile("{not json", request(), VOCAB)
    with pytest.raises(ValueError):
        parse_profile(json.dumps({"likes": []}), request(), VOCAB)
    loop = "likes toy story a lot " * 6
    with pytest.raises(ValueError):
        parse_profile(answer(summary=loop), request(), VOCAB)
    with pytest.raises(ValueError):  # nothing left once the ungrounded sentence goes
        parse_profile(answer(summary="Really into Horror and Romance."), request(), VOCAB)


def test_parse_profile_accepts_raw_newlines_in_strings() -> None:
    text = answer(summary="Enjoys Animation\nand Children films.")
    assert parse_profile(text, request(), VOCAB).profile.summary.startswith("Enjoys")


def test_ungrounded_claims_allows_history_titles_and_categories() -> None:
    assert ungrounded_claims("A fan of Toy Story and Heat, mostly Comedy.", request(), VOCAB) == []
    assert "Documentary" in ungrounded_claims("Watches Documentary films", request(), VOCAB)


def test_fallback_profile_is_deterministic_and_grounded() -> None:
    req = request()
    first, second = fallback_profile(req), fallback_profile(req)
    assert first == second
    assert set(first.likes) <= set(req.like_options)
    assert set(first.dislikes) <= set(req.dislike_options)
    assert first.summary and "Animation" in first.summary


def test_profile_one_retries_then_falls_back() -> None:
    llm = FakeLLM(responses=["{oops", "[]", answer(summary="Horror Horror. Romance.")])
    record = profile_one(
        request(),
        llm=llm,
        prompt=load_prompt("profile"),
        params=PARAMS,
        vocabulary=VOCAB,
        attempts=3,
    )
    assert record.fallback and record.attempts == 3
    assert "invalid after 3 tries" in (record.fallback_reason or "")
    assert [c["params"].seed for c in llm.calls] == [0, 1, 2]  # re-sampled, not repeated
    assert llm.calls[0]["schema"]["properties"]["likes"]["items"]["enum"]


def test_profile_one_uses_valid_llm_output() -> None:
    llm = FakeLLM(responses=[answer()])
    record = profile_one(
        request(), llm=llm, prompt=load_prompt("profile"), params=PARAMS, vocabulary=VOCAB
    )
    assert not record.fallback and record.profile["likes"] == ["Animation"]
    assert record.model_id == "fake-llm" and record.prompt_version.startswith("profile@")
    prompt_text = llm.calls[0]["messages"][1]["content"]
    assert "<history>" in prompt_text and "Toy Story (1995)" in prompt_text


def test_transient_errors_are_retried_then_raised() -> None:
    llm = FakeLLM(responses=[TransientLLMError("503"), TransientLLMError("timeout"), answer()])
    sleeps: list[float] = []
    done = complete_with_retry(
        llm,
        [{"role": "user", "content": "x"}],
        params=PARAMS,
        policy=RetryPolicy(attempts=3, backoff_s=0.1),
        sleep=sleeps.append,
    )
    assert done.text == answer() and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.5
    failing = FakeLLM(default=TransientLLMError("still down"))
    with pytest.raises(TransientLLMError):
        complete_with_retry(
            failing, [], params=PARAMS, policy=RetryPolicy(attempts=2), sleep=lambda s: None
        )
    assert len(failing.calls) == 2
    permanent = FakeLLM(responses=[LLMError("HTTP 400")])
    with pytest.raises(LLMError):
        complete_with_retry(permanent, [], params=PARAMS, sleep=lambda s: None)
    assert len(permanent.calls) == 1


def test_user_events_describe_ratings_in_words() -> None:
    interactions = pd.DataFrame(
        {
            "user_id": ["u", "u"],
            "item_id": ["1", "2"],
            "behavior": ["rating", "rating"],
            "value": [5.0, 1.0],
            "timestamp": pd.array([2, 1], dtype="Int64"),
            "seq": [2, 3],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["1", "2"],
            "title": ["A (1990)", "B (1991)"],
            "categories": [["Drama"], ["Horror"]],
        }
    )
    events = user_events(interactions, items, value_scales(interactions))["u"]
    assert [e.item_id for e in events] == ["2", "1"]  # by timestamp
    assert "disliked" in events[0].description and "loved" in events[1].description
