"""`segrec report`: the offline page in a real browser, the comparison of two runs, the
privacy threshold and the differentially private counts.

The browser tests open the page in headless Chromium (Debian's ``chromium``, which
``.ci/run`` installs); in CI (``CI=true``) a missing browser fails them instead of skipping.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import snapshot
from typer.testing import CliRunner

from segrec import pipeline
from segrec.cli import app
from segrec.config import Settings
from segrec.files import current_umask
from segrec.hierarchy import make_hierarchy
from segrec.report import (
    CSP,
    compare_runs,
    laplace,
    noisy_counts,
    palette,
    write_report,
)
from segrec.store import Assignment, SegmentRecord, Store
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
