"""`segrec report`: the offline page in a real browser, the comparison of two runs, the
privacy threshold and the differentially private counts.

The browser tests open the page in headless Chromium (Debian's ``chromium``, which
``.ci/run`` installs); in CI (``CI=true``) a missing browser fails them instead of skipping.
"""

from __future__ import annotations

import html
import importlib.machinery
import io
import json
import os
import re
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import snapshot
from typer.testing import CliRunner

from segrec import pipeline, report
from segrec.cli import app
from segrec.config import Settings
from segrec.files import current_umask
from segrec.hierarchy import make_hierarchy
from segrec.report import (
    CSP,
    MAP_MAX_POINTS,
    NoisyCounts,
    PageInputs,
    Projection,
    compare_runs,
    laplace,
    noisy_counts,
    palette,
    project,
    public_name,
    render,
    sample_rows,
    write_report,
)
from segrec.store import (
    Assignment,
    HierarchyRecord,
    ParentRecord,
    RunRecord,
    SegmentRecord,
    Store,
)
from segrec.testing import FakeLLM, chromium_path, schema_answer, visit_page

runner = CliRunner()
# the workspace fixture names parents with the bundled model: on a busy 2-core machine its
# set-up alone can take several minutes
pytestmark = pytest.mark.timeout(2400)


def _browser() -> None:
    if chromium_path() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI — .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")


def _embedded(page: str, element: str) -> Any:
    found = re.search(rf'<script type="application/json" id="{element}">(.*?)</script>', page)
    assert found, element
    return json.loads(found.group(1))


# ------------------------------------------------------------------------------ pure parts


def _segment(segment_id: int, centroid: list[float], size: int) -> SegmentRecord:
    return SegmentRecord(
        segment_id=segment_id,
        name=f"segment {segment_id}",
        description="",
        fallback=False,
        described=True,
        size=size,
        centroid=np.array(centroid, dtype=np.float32),
        facts={},
    )


def test_compare_finds_a_planted_split() -> None:
    old = [_segment(0, [0, 0], 40), _segment(1, [10, 0], 30), _segment(2, [0, 10], 30)]
    new = [
        _segment(0, [10, 0.5], 30),
        _segment(1, [0.5, 10], 30),
        _segment(2, [-1, 0], 20),
        _segment(3, [1, 0], 20),
    ]
    users = [f"u{i}" for i in range(100)]
    old_of = [0] * 40 + [1] * 30 + [2] * 30
    new_of = [2] * 20 + [3] * 20 + [0] * 30 + [1] * 30
    old_assign = {u: Assignment(u, s, 0.0, 0.0) for u, s in zip(users, old_of, strict=True)}
    new_assign = {u: Assignment(u, s, 0.0, 0.0) for u, s in zip(users, new_of, strict=True)}
    new_assign["late"] = Assignment("late", 0, 0.0, 0.0)
    result = compare_runs((1, old, old_assign), (2, new, new_assign))
    assert result.splits == [{"old": 0, "into": [2, 3]}] and result.merges == []
    assert result.migration[0].tolist() == [0, 0, 20, 20]
    assert result.migration.sum() == 100 and result.only_new == 1 and result.only_old == 0
    pairs = {(m["old"], m["new"]) for m in result.matches}
    assert {(1, 0), (2, 1)} <= pairs and len(pairs) == 3
    assert len(result.new) == 1 and result.new[0] in (2, 3) and result.vanished == []
    # the reverse direction is a merge, and a segment vanishes
    back = compare_runs((2, new, new_assign), (1, old, old_assign))
    assert back.merges == [{"new": 0, "from": [2, 3]}] and len(back.vanished) == 1


def test_laplace_noise_has_the_stated_scale() -> None:
    exact = np.arange(100, 600, 5)
    for scale in (2.0, 20.0):
        draws = np.stack([laplace(exact, scale=scale) for _ in range(60)])
        errors = draws - exact
        assert abs(errors.mean()) < 0.2 * scale  # unbiased
        assert 0.8 * scale < np.abs(errors).mean() < 1.2 * scale  # E|noise| ≈ scale
    counts = noisy_counts(np.array([50, 30]), np.ones((2, 20), dtype=np.int64) * 10, 1.0)
    assert counts.sizes_scale == 2.0 and counts.categories_sensitivity == 20
    assert counts.categories_scale == 40.0 and (counts.categories >= 0).all()


# ------------------------------------------------------------------------------ page from records
# The page's parts rendered from records built here the way `segrec cluster` and
# `segrec hierarchy` store them (no workspace, no model, no browser: fast).

_SUMMARIES = {  # segment id → profile summaries of the members nearest its centroid
    0: ["Binges Pixar films with the kids", "Rewatches Toy Story every winter"],
    1: ["Late-night noir and heist films", "Collects Hitchcock thrillers"],
    2: ["Documentaries about space missions", "Nature films & BBC series"],
    3: ["Eighties action & martial arts", "Marathons of Die Hard sequels"],
    4: ["Only Swedish silent films", "Secret taste: opera recordings"],  # under the threshold
}
_CATEGORIES = ["Animation", "Children", "Crime", "Thriller", "Documentary", "Action", "Drama"]


def _facts(sid: int) -> dict[str, Any]:
    """Facts as `segment_facts` stores them, each value distinct per segment."""
    return {
        "size": 0,  # set by the caller
        "share": 0.0,
        "top_items": [
            {
                "item_id": f"{sid}{j}",
                "title": f"Film {sid}-{j} ({1980 + 7 * sid + j})",
                "lift": round(4.5 - 0.75 * j + 0.01 * sid, 3),
                "members": 12 - j - sid,
            }
            for j in range(3)
        ],
        "top_categories": [
            {
                "category": _CATEGORIES[(sid + j) % len(_CATEGORIES)],
                "lift": round(3.25 - 0.5 * j + 0.02 * sid, 3),
                "members": 20 - 2 * j - sid,
            }
            for j in range(2)
        ],
        "nearest": [
            {"user_id": f"u{sid}{j}", "distance": 0.1 * (j + 1), "summary": summary}
            for j, summary in enumerate(_SUMMARIES[sid])
        ],
        "silhouette": round(0.11 + 0.13 * sid, 4),
        "stability": round(0.93 - 0.07 * sid, 4),
        "variance": 0.5,
        "fallback_reason": None,
    }


_SIZES = [30, 25, 20, 21, 4]  # segment 4 is under the run's threshold (5) and not named
_PARENT_NAMES = {0: "Family & heist evenings", 1: "Big-screen spectacle"}


def _records(curve: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """A run of 100 users in 5 segments of clearly separated 8-d vectors, two parents."""
    rng = np.random.default_rng(3)
    centroids = np.eye(8, dtype=np.float32)[:5] * 5
    labels = np.repeat(np.arange(5), _SIZES)
    X = centroids[labels] + rng.normal(scale=0.3, size=(len(labels), 8))
    segments = []
    for sid, size in enumerate(_SIZES):
        facts = _facts(sid) | {"size": size, "share": size / len(labels)}
        named = sid != 4
        segments.append(
            SegmentRecord(
                segment_id=sid,
                name=f"Segment name {sid}" if named else "Unnamed segment 4",
                description=f"Description of segment {sid}." if named else "Fewer than 5.",
                fallback=False,
                described=named,
                size=size,
                centroid=centroids[sid],
                facts=facts,
            )
        )
    parents = [
        ParentRecord(
            0, 1, _PARENT_NAMES[0], "Films for the evening.", False, True, 55, [0, 1], None, {}
        ),
        ParentRecord(1, 1, _PARENT_NAMES[1], "Loud films.", False, True, 45, [2, 3, 4], None, {}),
    ]
    metrics: dict[str, Any] = {"users": 100, "k": 5, "silhouette": 0.42, "stability": 0.81}
    if curve is not None:
        metrics["curve"] = curve
    run = RunRecord(
        id=3,
        created_at="2026-12-01T10:00:00",
        params={
            "k": 5,
            "k_requested": "auto" if curve else 5,
            "represent": "profile",
            "algorithm": "kmeans",
            "min_segment_size": 5,
        },
        metrics=metrics,
        notes=[],
    )
    hierarchy = HierarchyRecord(
        run_id=3,
        created_at="2026-12-01T10:05:00",
        params={"levels": 1, "parents_per_level": [2], "rule": "test", "model_id": "fake"},
        notes=[],
        parents=parents,
    )
    return {"run": run, "segments": segments, "hierarchy": hierarchy, "labels": labels, "X": X}


def _inputs(
    records: dict[str, Any], projection: Projection | None = None, min_size: int = 5
) -> PageInputs:
    if projection is None:
        rows = np.arange(len(records["labels"]))
        projection = project(records["X"], rows, len(rows), seed=0, method="pca")
    return PageInputs(
        run=records["run"],
        segments=records["segments"],
        hierarchy=records["hierarchy"],
        labels=records["labels"],
        projection=projection,
        min_size=min_size,
        generated_at="2026-12-01T11:00:00+00:00",
    )


def _card(page: str, sid: int) -> str:
    found = re.search(rf'<article class="card" id="seg-{sid}".*?</article>', page, re.S)
    assert found, sid
    return found.group(0)


def _figure(page: str, div: str) -> dict[str, Any] | None:
    return next((f for f in _embedded(page, "segrec-figures") if f["div"] == div), None)


def _map_note(page: str) -> str:
    found = re.search(r'<div id="map">.*?<p class="note">(.*?)</p>', page, re.S)
    assert found
    return html.unescape(found.group(1))


def test_sample_rows_is_a_seeded_uniform_sample_above_the_limit() -> None:
    assert MAP_MAX_POINTS == 10_000  # the README's figure
    assert sample_rows(MAP_MAX_POINTS, MAP_MAX_POINTS, 0).tolist() == list(range(MAP_MAX_POINTS))
    n = 12_000
    rows = sample_rows(n, MAP_MAX_POINTS, 42)
    assert len(rows) == MAP_MAX_POINTS and rows[0] >= 0 and rows[-1] < n
    assert (np.diff(rows) > 0).all()  # sorted, no user twice
    assert np.array_equal(rows, sample_rows(n, MAP_MAX_POINTS, 42))  # seeded
    assert not np.array_equal(rows, sample_rows(n, MAP_MAX_POINTS, 43))
    # uniform: each user is drawn with probability 10/12, wherever it sits in the list
    per_block = np.bincount(rows // 1_000, minlength=12)
    assert ((per_block > 760) & (per_block < 910)).all(), per_block


def test_map_above_the_limit_draws_a_sample_and_the_page_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(report, "MAP_MAX_POINTS", 30)  # rather than a 10,000-user run
    records = _records()
    total = len(records["labels"])
    rows = sample_rows(total, report.MAP_MAX_POINTS, 7)
    projection = project(records["X"][rows], rows, total, seed=7, method="pca")
    assert projection.sampled and projection.total == total == 100
    page = render(_inputs(records, projection))
    note = _map_note(page)
    assert "a seeded sample of 30 of 100 users (above 30 users the map is sampled)" in note
    assert "map: a seeded sample of 30 of 100 users (at most 30 are drawn)" in page
    # the map draws exactly the sampled users, each in their own segment's trace
    traces = _figure(page, "map")["data"]  # type: ignore[index]
    names = [s.name for s in records["segments"][:4]] + ["Segment 4 (under the threshold)"]
    drawn = {t["name"]: len(t["x"]) for t in traces}
    expected = np.bincount(records["labels"][rows], minlength=5)
    assert drawn == {names[i]: int(c) for i, c in enumerate(expected) if c}
    assert sum(drawn.values()) == 30
    # the control: everyone fits, so nothing is said about a sample
    everyone = render(_inputs(records))
    assert "all 100 users" in _map_note(everyone) and "seeded sample" not in everyone


def test_hovering_a_point_names_its_segment() -> None:
    records = _records()
    inputs = _inputs(records)
    figure = _figure(render(inputs), "map")
    assert figure is not None
    traces = figure["data"]
    public = [public_name(s, inputs.min_size) for s in records["segments"]]
    assert sorted(t["name"] for t in traces) == sorted(public)  # one trace per segment
    for trace in traces:
        # the hover label is the trace's name: the segment's public name
        assert trace["hovertemplate"].startswith("%{fullData.name}"), trace["hovertemplate"]
        members = records["labels"] == records["segments"][public.index(trace["name"])].segment_id
        assert len(trace["x"]) == members.sum()  # the trace holds that segment's users
    assert "Unnamed segment 4" not in json.dumps(traces)  # an unnamed segment stays unnamed
    # the private page draws centroids; hovering one names it with its noisy size
    dp_sizes = np.array([31, 24, 19, 22, 6])
    private = replace(
        inputs,
        projection=None,
        categories=_CATEGORIES,
        noisy=NoisyCounts(1.0, dp_sizes, np.ones((5, 7), dtype=np.int64), 2.0, 14.0, 7),
        release={"id": 1, "releases": 1, "epsilon_total": 1.0},
    )
    dp_figure = _figure(render(private), "map")
    assert dp_figure is not None
    for trace in dp_figure["data"]:
        size = dp_sizes[public.index(trace["name"])]
        assert trace["hovertemplate"] == f"%{{fullData.name}}: ≈{size} users<extra></extra>"
    assert sorted(t["name"] for t in dp_figure["data"]) == sorted(public)


def test_k_curve_is_drawn_only_for_a_run_that_chose_k() -> None:
    curve = [
        {"k": 2, "silhouette": 0.31, "stability": 0.95},
        {"k": 3, "silhouette": 0.35, "stability": 0.9},
        {"k": 4, "silhouette": 0.38, "stability": 0.72},
        {"k": 5, "silhouette": 0.42, "stability": 0.81},
        {"k": 6, "silhouette": 0.44, "stability": 0.41},
    ]
    page = render(_inputs(_records(curve)))
    figure = _figure(page, "k-curve")
    assert figure is not None and '<div id="k-curve"></div>' in page
    assert "How k was chosen (--k auto)" in page
    silhouette, stability = figure["data"]
    assert silhouette["x"] == [2, 3, 4, 5, 6] and stability["x"] == [2, 3, 4, 5, 6]
    assert silhouette["y"] == [r["silhouette"] for r in curve]
    assert stability["y"] == [r["stability"] for r in curve] and stability["yaxis"] == "y2"
    assert figure["layout"]["shapes"][0]["x0"] == 5  # the chosen k is marked
    assert "<th>curve</th>" not in page  # the chart, not a dump of the list in the metrics
    for fixed in (_records(), _records(curve=[])):  # no curve stored, or an empty one (--k 5)
        other = render(_inputs(fixed))
        assert _figure(other, "k-curve") is None
        assert 'id="k-curve"' not in other and "How k was chosen" not in other


def test_cards_show_the_stored_facts_of_described_segments_only() -> None:
    records = _records()
    page = render(_inputs(records))
    parent_of = {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}
    for seg in records["segments"][:4]:
        sid, facts = seg.segment_id, seg.facts
        card = _card(page, sid)
        assert f"<h3>{seg.name}</h3>" in card and seg.description in card
        assert f"{seg.size:,} users" in card
        assert f"in <b>{html.escape(_PARENT_NAMES[parent_of[sid]])}</b>" in card
        assert f"silhouette {facts['silhouette']:.2f} · stability {facts['stability']:.2f}" in card
        for key, label, div in (
            ("top_categories", "category", f"cats-{sid}"),
            ("top_items", "title", f"items-{sid}"),
        ):
            assert f'<div id="{div}"></div>' in card
            bars = _figure(page, div)
            assert bars is not None, div
            (trace,) = bars["data"]
            rows = facts[key][::-1]  # drawn bottom-up
            assert trace["y"] == [r[label] for r in rows]
            assert trace["x"] == [r["lift"] for r in rows]
            assert trace["text"] == [f"×{r['lift']:.2f} · {r['members']}" for r in rows]
        for member in facts["nearest"]:
            line = f"<li><b>user {member['user_id']}</b>: {html.escape(member['summary'])}</li>"
            assert line in card
    # under the threshold: the size and the parent, nothing that describes the segment
    hidden = records["segments"][4]
    card = _card(page, 4)
    assert "not described" in card and f"{hidden.size:,} users" in card
    assert f"in <b>{html.escape(_PARENT_NAMES[1])}</b>" in card
    for absent in ("silhouette", "stability", "cats-4", "items-4", "Members nearest", "<ol>"):
        assert absent not in card, absent
    assert _figure(page, "cats-4") is None and _figure(page, "items-4") is None
    secrets = [hidden.name, *(m["summary"] for m in hidden.facts["nearest"])]
    secrets += [f"user {m['user_id']}" for m in hidden.facts["nearest"]]
    secrets += [i["title"] for i in hidden.facts["top_items"]]
    for secret in secrets:
        assert secret not in page and html.escape(secret) not in page, secret
    # a named segment under a raised threshold loses its card's facts the same way
    strict = render(_inputs(records, min_size=26))
    card = _card(strict, 1)
    assert "not described" in card and "silhouette" not in card and "Members nearest" not in card
    assert _figure(strict, "cats-1") is None and _figure(strict, "items-1") is None
    assert "Segment name 1" not in strict and _SUMMARIES[1][0] not in strict
    assert "silhouette 0.11 · stability 0.93" in _card(strict, 0)  # 30 users: still described


def test_project_falls_back_to_pca_without_umap(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.decomposition import PCA

    records = _records()
    X, rows = records["X"], np.arange(len(records["labels"]))
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` fails: not installed
    with pytest.raises(ImportError):
        import umap  # noqa: F401
    projection = project(X, rows, len(rows), seed=0)
    assert projection.method == "PCA" and projection.coords.shape == (100, 2)
    assert np.allclose(projection.coords, PCA(n_components=2, random_state=0).fit_transform(X))
    page = render(_inputs(records, projection))
    assert _map_note(page).startswith("PCA projection of the users' vectors; all 100 users")

    # the control: with a `umap` module importable, the same call takes UMAP
    class FakeUMAP:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

        def fit_transform(self, data: np.ndarray) -> np.ndarray:
            return np.zeros((len(data), 2)) + 1.0

    fake = types.ModuleType("umap")
    fake.__spec__ = importlib.machinery.ModuleSpec("umap", None)
    fake.UMAP = FakeUMAP  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "umap", fake)
    with_umap = project(X, rows, len(rows), seed=0)
    assert with_umap.method == "UMAP" and (with_umap.coords == 1.0).all()
    assert _map_note(render(_inputs(records, with_umap))).startswith("UMAP projection")


# ------------------------------------------------------------------------------ workspace


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory,
    example_ratings: Path,
    example_movies: Path,
    local_llm: Any,
) -> Settings:
    """Example data, real encoder; parents named by the bundled model, segments by their
    fallback labels (the bundled model names segments in test_label and test_hierarchy)."""
    settings = Settings(workspace=tmp_path_factory.mktemp("report") / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    users = pipeline.select_users(settings).user_ids
    pipeline.run_profiles(settings, users, llm=FakeLLM(default=schema_answer))
    pipeline.run_clustering(settings, k=4, llm=FakeLLM(default=schema_answer))
    make_hierarchy(settings, levels=2, llm=local_llm)
    return settings


@pytest.mark.slow
def test_report_opens_offline_in_chromium(workspace: Settings, tmp_path: Path) -> None:
    _browser()
    from PIL import Image

    out = tmp_path / "report.html"
    result = write_report(workspace, out=out)
    page = out.read_text()
    assert f'content="{CSP}"' in page and "default-src 'none'" in CSP
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)  # nothing to fetch
    report = pipeline.segments_report(workspace)
    visit = visit_page(
        out.as_uri(),
        ready="document.body && document.body.dataset.drawn",
        # the plot area only (not the legend, whose symbols share the colours)
        evaluate="JSON.stringify(document.querySelector('#map g.cartesianlayer')"
        ".getBoundingClientRect())",
    )
    assert visit.errors == []  # no script error, no CSP violation
    assert visit.requests == [out.as_uri()]  # the page itself, nothing over the network
    dom = visit.dom
    figures = _embedded(page, "segrec-figures")
    assert f'data-drawn="{len(figures)}"' in dom
    legend = re.findall(r'class="legendtext"[^>]*>([^<]*)<', dom)  # drawn by Plotly
    for segment in report["segments"]:
        assert html.escape(segment["name"], quote=False) in dom
        assert segment["name"] in {html.unescape(t) for t in legend}
    assert report["parents"]
    tree = dom.split('id="hierarchy"')[1].split("</section>")[0]
    for parent in report["parents"]:
        assert html.escape(parent["name"], quote=False) in tree
    # the legend is the hierarchy: each parent is a group title among the legend's texts
    assert {p["name"] for p in report["parents"]} <= {html.unescape(t) for t in legend}
    assert f"{result.projection} projection" in dom and "all 36 users" in dom

    box = json.loads(visit.value)
    image = Image.open(io.BytesIO(visit.screenshot)).convert("RGB")
    region = np.asarray(image.crop((box["left"], box["top"], box["right"], box["bottom"]))).reshape(
        -1, 3
    )
    assert len(np.unique(region, axis=0)) > 50  # not blank
    for colour in palette(len(report["segments"])):
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        drawn = 0.8 * rgb + 0.2 * 255  # markers at opacity 0.8 on white
        close = np.abs(region.astype(float) - drawn).max(axis=1) < 12
        assert close.sum() > 30, colour  # every segment's points are on the map


@pytest.mark.slow
def test_the_network_check_sees_a_request(tmp_path: Path) -> None:
    """The control for the test above: a page that does fetch is caught."""
    _browser()
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<html><body><img src="http://127.0.0.1:9/pixel.png"></body></html>')
    visit = visit_page(leaky.as_uri())
    assert "http://127.0.0.1:9/pixel.png" in visit.requests


def _split_run(settings: Settings) -> tuple[int, int, int]:
    """Store a copy of the active run with its largest segment split in two along its
    members' first principal component. Returns (old run, new run, split segment)."""
    with Store.open(settings.workspace) as store:
        old = store.active_run()
        assert old is not None
        segments = store.segments(old.id)
        assignments = store.assignments(old.id)
        big = max(segments, key=lambda s: s.size)
        members = [u for u, a in assignments.items() if a.segment_id == big.segment_id]
        X = pipeline.run_vectors(store, settings, old, members)
        centred = X - X.mean(axis=0)
        side = centred @ np.linalg.svd(centred, full_matrices=False)[2][0] > 0
        fresh = len(segments)
        moved = {u for u, s in zip(members, side, strict=True) if s}
        records = [
            replace(s, size=s.size - len(moved), centroid=X[~side].mean(axis=0))
            if s.segment_id == big.segment_id
            else s
            for s in segments
        ]
        records.append(
            replace(
                big,
                segment_id=fresh,
                name=f"{big.name} (split)",
                size=len(moved),
                centroid=X[side].mean(axis=0),
            )
        )
        new = store.save_run(
            params=old.params,
            metrics=old.metrics,
            notes=["planted split"],
            segments=records,
            assignments=[
                replace(a, segment_id=fresh) if u in moved else a for u, a in assignments.items()
            ],
        )
        store.set_active_run(old.id)
    return old.id, new, big.segment_id


@pytest.mark.slow
def test_compare_shows_the_planted_split(workspace: Settings, tmp_path: Path) -> None:
    old, new, split = _split_run(workspace)
    out = tmp_path / "compare.html"
    write_report(workspace, out=out, run_id=new, compare=old)
    page = out.read_text()
    heatmap = next(f for f in _embedded(page, "segrec-figures") if f["div"] == "migration")
    matrix = np.array(heatmap["data"][0]["z"])
    with Store.open(workspace.workspace) as store:
        old_sizes = [s.size for s in store.segments(old)]
        new_segments = store.segments(new)
    assert matrix.sum() == sum(old_sizes)
    row = matrix[split]
    assert (row > 0).sum() == 2 and row.sum() == old_sizes[split]  # one row, two columns
    assert row[split] > 0 and row[len(new_segments) - 1] > 0
    others = np.delete(np.delete(matrix, split, axis=0), [split, len(new_segments) - 1], axis=1)
    assert (others == np.diag(np.diag(others))).all()  # everyone else stayed
    assert "<b>split</b>" in page and "<b>new</b>" in page
    assert f"Changes since run {old}" in page


@pytest.mark.slow
def test_threshold_keeps_small_segments_off_the_page(workspace: Settings, tmp_path: Path) -> None:
    with Store.open(workspace.workspace) as store:
        run = store.active_run()
        assert run is not None
        segments = store.segments(run.id)
    small = min(segments, key=lambda s: s.size)
    old, other, _ = _split_run(workspace)  # the comparison names segments too
    out = tmp_path / "strict.html"
    write_report(workspace, out=out, min_segment_size=small.size + 1, compare=other)
    assert old == run.id
    page = out.read_text()
    hidden = [s for s in segments if s.size <= small.size]
    shown = [s for s in segments if s.size > small.size]
    shown_titles = {i["title"] for s in shown for i in s.facts["top_items"]}
    # the same summary text may legitimately belong to a shown segment's member too
    shown_summaries = {m["summary"] for s in shown for m in s.facts["nearest"]}
    for seg in hidden:
        summaries = [m["summary"] for m in seg.facts["nearest"]]
        for secret in [seg.name, seg.description, *set(summaries) - shown_summaries]:
            assert html.escape(secret, quote=False) not in page and secret not in page
        for member in seg.facts["nearest"]:  # a user is in one segment: never listed
            assert f"<b>user {member['user_id']}</b>" not in page
        for item in seg.facts["top_items"]:
            if item["title"] not in shown_titles:
                assert html.escape(item["title"], quote=False) not in page
    data = _embedded(page, "segrec-data")
    for entry in data["segments"]:
        if entry["id"] in {s.segment_id for s in hidden}:
            assert set(entry) == {"id", "name", "size", "share", "described", "parent"}
            assert not entry["described"]


@pytest.mark.slow
def test_dp_report_records_epsilon_and_publishes_no_member(
    workspace: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "dp.html"
    first = write_report(workspace, out=out, epsilon=1.0)
    second = write_report(workspace, out=out, epsilon=0.5)
    page = out.read_text()
    with Store.open(workspace.workspace) as store:
        run = store.active_run()
        assert run is not None
        releases = store.releases(run.id)
        segments = store.segments(run.id)
    assert [r["epsilon"] for r in releases] == [1.0, 0.5]
    assert [r["id"] for r in releases] == [first.release, second.release]
    assert releases[1]["sizes_scale"] == 4.0  # 1 / (ε/2)
    assert "ε = 0.5" in page and "scale 4" in page and "1.5" in page  # total spent on the run
    data = _embedded(page, "segrec-data")
    assert data["epsilon"] == 0.5
    for entry in data["segments"]:
        assert "nearest" not in entry and "top_items" not in entry
    for seg in segments:
        if seg.fallback:  # a template of exact counts
            assert html.escape(seg.description, quote=False) not in page
        for member in seg.facts["nearest"]:
            assert html.escape(member["summary"], quote=False) not in page
            assert f"user {member['user_id']}" not in page
    assert 'id="map"' in page and "no user is drawn" in page


@pytest.mark.slow
def test_report_bad_flags_are_one_line_and_change_nothing(
    workspace: Settings, tmp_path: Path
) -> None:
    before = snapshot(workspace.workspace)
    cases = [
        (["--epsilon", "-1"], "--epsilon -1"),
        (["--out", str(tmp_path / "missing" / "r.html")], "does not exist"),
        (["--compare", "99"], "--compare 99"),
        (["--run", "99"], "--run 99"),
        (["--epsilon", "1", "--compare", "1"], "--compare with --epsilon"),
    ]
    for args, message in cases:
        out = ["--out", str(tmp_path / "r.html")] if "--out" not in args else []
        result = runner.invoke(app, ["report", *args, *out, "-w", str(workspace.workspace)])
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "r.html").exists()
    assert snapshot(workspace.workspace) == before
    ok = runner.invoke(
        app, ["report", "--out", str(tmp_path / "r.html"), "-w", str(workspace.workspace)]
    )
    assert ok.exit_code == 0, ok.output
    assert "wrote" in ok.stdout and (tmp_path / "r.html").stat().st_size > 1_000_000
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == 0o666 & ~current_umask()
