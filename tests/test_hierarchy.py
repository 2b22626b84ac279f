"""`segrec hierarchy`: parents over a run's segments, named contrastively, stored with the run.

The example data with the real encoder; fake LLM answers for the fast tests, the bundled
model in the slow one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import snapshot
from typer.testing import CliRunner

from segrec import pipeline
from segrec.cli import app
from segrec.config import Settings
from segrec.errors import InputError
from segrec.hierarchy import level_counts, make_hierarchy
from segrec.llm.base import Message
from segrec.store import Store
from segrec.testing import FakeLLM, schema_answer

runner = CliRunner()


@pytest.mark.parametrize(
    ("k", "levels", "counts"),
    [(9, 2, [3]), (16, 2, [4]), (27, 3, [9, 3]), (8, 3, [4, 2]), (3, 2, [2]), (3, 3, [2])],
)
def test_level_sizes_shrink_geometrically(k: int, levels: int, counts: list[int]) -> None:
    got, notes = level_counts(k, levels)
    assert got == counts
    assert all(a > b >= 2 for a, b in zip([k, *got], got, strict=False))
    assert len(notes) == levels - 1 - len(got)  # a dropped level is said


def test_level_counts_refuse_what_cannot_be_built() -> None:
    with pytest.raises(InputError, match="at least 3"):
        level_counts(2, 2)
    with pytest.raises(InputError, match="--levels 4"):
        level_counts(20, 4)


@pytest.fixture(scope="module")
def clustered(
    tmp_path_factory: pytest.TempPathFactory, example_ratings: Path, example_movies: Path
) -> Settings:
    settings = Settings(workspace=tmp_path_factory.mktemp("hier") / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    users = pipeline.select_users(settings).user_ids
    pipeline.run_profiles(settings, users, llm=FakeLLM(default=schema_answer))
    pipeline.run_clustering(settings, k=5, llm=FakeLLM(default=schema_answer))
    return settings


def _categories_answer(messages: Sequence[Message], schema: dict[str, Any] | None) -> str:
    """A grounded parent name from the prompt's own main categories (valid for the checks)."""
    found = re.search(r"Main categories: ([^(]+) \(", messages[-1]["content"])
    first = found.group(1).strip() if found else "Drama"
    return json.dumps(
        {
            "name": f"{first} family fans",
            "description": f"Users whose groups share a taste for {first} films.",
        }
    )


@pytest.mark.slow
def test_parents_before_and_after_a_hierarchy(clustered: Settings) -> None:
    flat = pipeline.segments_report(clustered)
    assert flat["parents"] == [] and flat["hierarchy"] is None
    assert all(s["parent"] is None for s in flat["segments"])
    tree = runner.invoke(app, ["segments", "--tree", "-w", str(clustered.workspace)])
    assert tree.exit_code == 0 and "no hierarchy" in tree.stderr

    llm = FakeLLM(default=_categories_answer)
    record = make_hierarchy(clustered, levels=3, llm=llm)
    report = pipeline.segments_report(clustered)
    segments, parents = report["segments"], report["parents"]
    level1 = [p for p in parents if p["level"] == 1]
    level2 = [p for p in parents if p["level"] == 2]
    assert record.params["parents_per_level"] == [len(level1), len(level2)] == [3, 2]
    # every segment has exactly one parent; parents partition the level below
    assert sorted(c for p in level1 for c in p["children"]) == [s["id"] for s in segments]
    assert sorted(c for p in level2 for c in p["children"]) == sorted(p["id"] for p in level1)
    by_id = {s["id"]: s for s in segments}
    for p in level1:
        assert p["size"] == sum(by_id[c]["size"] for c in p["children"])
        assert all(by_id[c]["parent"] == p["id"] for c in p["children"])
        assert p["parent"] in {q["id"] for q in level2}
    assert all(p["parent"] is None for p in level2)
    # distinct from each other and from the segments; a fallback is marked with its reason
    names = [s["name"].casefold() for s in segments] + [p["name"].casefold() for p in parents]
    assert len(set(names)) == len(names)
    for p in parents:
        assert p["fallback"] == (p["fallback_reason"] is not None)
    assert any(not p["fallback"] for p in parents)  # valid answers are kept
    # contrastive: a parent's prompt lists its own children and, apart, other parents' ones
    first = llm.calls[0]["messages"][-1]["content"]
    own, others = first.split("<others>")
    assert "<subgroups>" in own and own.count("\n- ") >= 1 and others.count("\n- ") >= 1

    shown = runner.invoke(app, ["segments", "--tree", "-w", str(clustered.workspace)])
    assert shown.exit_code == 0, shown.output
    flat_out = " ".join(shown.stdout.split())
    for p in parents:
        assert p["name"] in flat_out
    for s in segments:
        assert s["name"] in flat_out
    as_json = runner.invoke(app, ["segments", "--json", "-w", str(clustered.workspace)])
    assert json.loads(as_json.stdout)["parents"] == parents

    # rebuilding replaces the stored hierarchy (all fallbacks now: the fake's name is generic)
    again = make_hierarchy(clustered, levels=2, llm=FakeLLM(default=schema_answer))
    assert again.params["levels"] == 2 and len(again.parents) == 2
    assert all(p.fallback and p.facts["fallback_reason"] for p in again.parents)
    assert any("fallback" in note for note in again.notes)
    tree = runner.invoke(app, ["segments", "--tree", "-w", str(clustered.workspace)])
    assert "(fallback)" in tree.stdout


@pytest.mark.slow
def test_hierarchy_bad_flags_leave_the_workspace_unchanged(clustered: Settings) -> None:
    before = snapshot(clustered.workspace)
    for args, message in [
        (["--levels", "4"], "--levels 4"),
        (["--run", "99"], "--run 99"),
    ]:
        result = runner.invoke(app, ["hierarchy", *args, "-w", str(clustered.workspace)])
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(clustered.workspace) == before


@pytest.mark.slow
@pytest.mark.timeout(2400)  # up to three answers per parent, on a busy 2-core machine
def test_hierarchy_on_the_bundled_model(clustered: Settings, local_llm: Any) -> None:
    record = make_hierarchy(clustered, levels=2, llm=local_llm)
    assert record.params["model_id"] == local_llm.model_id
    with Store.open(clustered.workspace) as store:
        run = store.active_run()
        assert run is not None
        segments = store.segments(run.id)
    names = [s.name.casefold() for s in segments] + [p.name.casefold() for p in record.parents]
    assert len(set(names)) == len(names), names
    for parent in record.parents:
        assert parent.name and parent.description
        # a fallback is marked and says why; an LLM name passed the label checks
        assert parent.fallback == bool(parent.facts["fallback_reason"])
        if not parent.fallback:
            assert 1 <= len(parent.name.split()) <= 6
    fallbacks = sum(p.fallback for p in record.parents)
    assert (fallbacks > 0) == any("fallback" in note for note in record.notes)
    # the gates: every parent name names only top categories stored beside it (its
    # description may quote titles, which the gate reads as names, not categories)
    from segrec.gates import mentioned, tally_segments
    from segrec.profile import Vocabulary

    with Store.open(clustered.workspace) as store:
        vocabulary = Vocabulary.from_items(store.items_frame()).categories
    described = [p for p in record.parents if p.described]
    for parent in described:
        shown = [t["category"] for t in parent.facts["top_categories"]]
        named = mentioned(parent.name, sorted(vocabulary))
        assert named and set(named) <= set(shown), (parent.name, shown)
    counted = tally_segments(record.parents, kind="parent").kinds["parent"]
    assert counted.texts == len(described) and counted.replaced == fallbacks


# ------------------------------------------------------------------------------ gates


def test_a_parent_label_may_name_only_the_categories_shown_beside_it() -> None:
    """A parent's doc carries the top categories stored beside it; a name or description
    naming another category its members have is refused by the consistency gate."""
    from segrec.gates import GateError
    from segrec.label import SegmentDoc, parse_label

    doc = SegmentDoc(
        segment_id=7,
        size=20,
        members=[],
        contrast=[],
        categories={"Drama": 0.4, "Comedy": 0.3, "Romance": 0.2, "War": 0.1},
        top_items=["Heat (1995)"],
        shown_categories=("Drama", "Comedy"),
    )
    assert doc.allowed_categories == ["Drama", "Comedy"]
    vocabulary = frozenset({"Drama", "Comedy", "Romance", "War", "Western"})
    ok = json.dumps({"name": "Drama and Comedy fans", "description": "Users who love Drama."})
    assert parse_label(ok, doc, taken=set(), vocabulary=vocabulary).name == "Drama and Comedy fans"
    for name, description in [
        ("Romance fans", "Users who love Drama."),
        ("Drama fans", "Users who love Drama and War films."),
    ]:
        bad = json.dumps({"name": name, "description": description})
        with pytest.raises(GateError, match="consistent/"):
            parse_label(bad, doc, taken=set(), vocabulary=vocabulary)


_OFF_TOP = ("Romance", "Crime", "Sci-Fi", "Fantasy", "Mystery", "Children", "War", "Horror")


def _bad_parent_answer(off_top: bool) -> Any:
    """Parent names with the prompt's first main category and either a category missing
    from its main (top) categories, or a non-word."""

    def answer(messages: Sequence[Message], schema: dict[str, Any] | None) -> str:
        found = re.search(r"Main categories: (.+?)\.\n", messages[-1]["content"])
        shown = found.group(1) if found else ""
        first = shown.split(" (")[0]
        other = next(c for c in _OFF_TOP if f"{c} (" not in shown) if off_top else "xtraordinary"
        return json.dumps(
            {
                "name": f"{first} and {other} fans",
                "description": f"Users whose groups share {first} films.",
            }
        )

    return answer


@pytest.mark.slow
def test_bad_parent_names_are_replaced_and_counted(
    clustered: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names naming a category outside the parent's top ones, or a non-word, are replaced
    by the template (which names only top categories); `segrec hierarchy` stores the counts
    and `segments --json` reports them."""
    from segrec import gates

    attempts = clustered.validation_attempts  # the first parent's: off-top, then non-words
    fake = FakeLLM(
        responses=[_bad_parent_answer(True)] * attempts, default=_bad_parent_answer(False)
    )
    monkeypatch.setattr("segrec.hierarchy.make_llm", lambda settings: fake)
    result = runner.invoke(app, ["hierarchy", "--json", "-w", str(clustered.workspace)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    parents = report["parents"]
    assert parents and all(p["fallback"] for p in parents)
    counted = report["text"]["parent"]
    assert counted["texts"] == len(parents) == counted["replaced"]
    assert counted["reasons"]["consistent/category-not-top"] == 1, counted
    assert counted["reasons"]["fluent/unknown-word"] == len(parents) - 1, counted
    assert "texts: parent: 0/" in result.stderr
    stored = gates.stored_counts(clustered.workspace)["commands"]["hierarchy"]["parent"]
    assert stored["replaced"] == len(parents)
    vocabulary = {c for p in parents for c in (t["category"] for t in p["top_categories"])}
    for p in parents:
        shown = [t["category"] for t in p["top_categories"]]
        named = gates.mentioned(f"{p['name']}. {p['description']}", _OFF_TOP + tuple(vocabulary))
        assert set(named) <= set(shown), (p["name"], p["description"], shown)
