"""Simulated chat users (PROTOCOL track 3) and `segrec eval --tracks chat`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from segrec.chat import Option, Question
from segrec.cli import app
from segrec.llm.base import GenerationParams
from segrec.profile import Event
from segrec.simulate import LLMUser, RuleBasedUser
from segrec.testing import FakeLLM

runner = CliRunner()


def event(item: str, categories: tuple[str, ...], strength: float) -> Event:
    return Event(item, f"Title {item}", categories, "rating", 4.0, 1, 1, strength, "rated 4")


HISTORY = [
    event("a", ("Horror",), 1.0),
    event("b", ("Horror", "Thriller"), 0.8),
    event("c", ("Comedy",), -1.0),
]
QUESTION = Question(
    "Which do you enjoy?",
    (
        Option("category", "Horror", "Horror"),
        Option("category", "Comedy", "Comedy"),
        Option("item", "b", "Title b"),
        Option("item", "c", "Title c"),
        Option("item", "test-item", "A test item"),
    ),
    (),
)


def test_rule_based_user_picks_only_what_its_history_liked() -> None:
    user = RuleBasedUser(HISTORY)
    assert user.answer(QUESTION) == "1, 3"  # Horror and the liked item b; not the disliked c


def test_both_users_name_favourites_from_their_history_when_asked() -> None:
    open_question = Question("Name a few films you loved.", (), (), open=True)
    assert RuleBasedUser(HISTORY).answer(open_question) == "Title a, Title b"
    user = LLMUser(HISTORY, FakeLLM(default=json.dumps({"choices": [2]})), GenerationParams())
    assert user.answer(open_question) == "Title b"


def test_llm_user_is_offered_only_categories_and_its_own_items() -> None:
    seen: list[Any] = []

    def answer(messages: Any, schema: dict[str, Any] | None) -> str:
        seen.append((messages, schema))
        return json.dumps({"choices": [4, 1]})

    user = LLMUser(HISTORY, FakeLLM(default=answer), GenerationParams())
    assert [n for n, _ in user.allowed(QUESTION)] == [1, 2, 3, 4]
    assert user.answer(QUESTION) == "4, 1"
    messages, schema = seen[0]
    assert schema["properties"]["choices"]["items"]["enum"] == [1, 2, 3, 4]
    assert "A test item" not in messages[-1]["content"]  # never shown, never picked


def test_llm_user_that_answers_outside_the_choices_counts_as_a_failure() -> None:
    user = LLMUser(HISTORY, FakeLLM(default=json.dumps({"choices": [5]})), GenerationParams())
    assert user.answer(QUESTION) == "" and user.failures == 1


def test_eval_chat_track_json(tmp_path: Path, example_ratings: Path, example_movies: Path) -> None:
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        [
            "eval",
            str(example_ratings),
            "--items",
            str(example_movies),
            "--users",
            "12",
            "--tracks",
            "chat",
            "--no-llm",
            "--k",
            "3",
            "--json",
            str(out),
            "-w",
            str(tmp_path / "ws"),
        ],
    )
    assert result.exit_code == 0, result.output
    chat = json.loads(out.read_text())["tracks"]["chat"]
    assert set(chat) == {"MostPop", "segrec@1", "segrec@3", "segrec@5"}
    assert all(0.0 <= m["ndcg@10"] <= 1.0 for m in chat.values())
    assert "rule-based simulated user only" in result.stderr


@pytest.mark.slow
def test_eval_chat_track_with_the_llm_user(
    tmp_path: Path, example_ratings: Path, example_movies: Path, local_llm: Any
) -> None:
    from segrec.config import Settings
    from segrec.quality import run_eval

    settings = Settings(workspace=tmp_path / "ws", domain="movie")
    result = run_eval(
        settings,
        example_ratings,
        example_movies,
        users=3,
        seed=1,
        tracks=["chat"],
        k=2,
        llm=local_llm,
    )
    chat = result["tracks"]["chat"]
    assert {"segrec@1:llm-user", "segrec@3:llm-user", "segrec@5:llm-user"} <= set(chat)
    assert result["users"] == 3 and result["sampled"]
