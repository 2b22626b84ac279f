"""`segrec report`: one self-contained HTML page of a clustering run, for readers who do not
use a terminal — the map of users, the hierarchy, one card per segment, the run's quality,
and how the segments changed since another run.

The page works offline: Plotly's JavaScript and every style are inlined and a strict
Content-Security-Policy forbids the page any network request. Figures are Plotly figures
built here and drawn by Plotly in the browser (no hand-written drawing code).

What is published is checked here, not by the reader: segments under the privacy threshold
get their size only (no description, categories, items or members); with ``epsilon`` the
sizes and per-segment category counts carry Laplace noise from OpenDP, the release and its
ε are recorded in the workspace, and nothing about individual users is on the page.
"""

from __future__ import annotations

import html
import importlib.util
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from segrec.config import Settings
from segrec.errors import InputError, WorkspaceError
from segrec.files import atomic_path
from segrec.hierarchy import category_users
from segrec.pipeline import active_run, run_vectors
from segrec.store import (
    Assignment,
    HierarchyRecord,
    ParentRecord,
    RunRecord,
    SegmentRecord,
    Store,
)

MAP_MAX_POINTS = 10_000  # users drawn on the map; above this, a seeded uniform sample
UMAP_PCA_DIMS = 50  # UMAP runs on this many principal components
SPLIT_SHARE = 0.25  # a segment "split" when ≥ 2 new segments each took this share of it
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:; connect-src 'none'; base-uri 'none'; "
    "form-action 'none'"
)
_PALETTE = [
    "#4C78A8",
    "#F58518",
    "#54A24B",
    "#E45756",
    "#72B7B2",
    "#B279A2",
    "#FF9DA6",
    "#9D755D",
    "#EECA3B",
    "#BAB0AC",
    "#1F77B4",
    "#D62728",
    "#2CA02C",
    "#9467BD",
    "#8C564B",
    "#E377C2",
    "#17BECF",
    "#BCBD22",
    "#393B79",
    "#637939",
]


def palette(n: int) -> list[str]:
    """``n`` segment colours: a qualitative palette, then evenly spaced hues."""
    if n <= len(_PALETTE):
        return list(_PALETTE[:n])
    return [*_PALETTE, *(f"hsl({(i * 137) % 360},60%,50%)" for i in range(n - len(_PALETTE)))]


# ------------------------------------------------------------------------------ projection


@dataclass(frozen=True)
class Projection:
    """2-D coordinates of (a sample of) the users, and how they were obtained."""

    rows: np.ndarray  # indices into the full user list
    coords: np.ndarray  # len(rows) × 2
    method: str
    sampled: bool
    total: int
    seconds: float


def sample_rows(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices: all rows, or a seeded uniform sample of ``max_points``."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def project(
    X: np.ndarray, rows: np.ndarray, total: int, *, seed: int, method: str = "auto"
) -> Projection:
    """2-D coordinates of ``X`` (the rows ``rows`` of ``total`` users).

    ``auto``: UMAP when `umap-learn` is installed and there are at least 20 points (its
    neighbourhood graph needs some), else PCA; ``umap`` or ``pca`` to choose. UMAP runs on
    the first 50 principal components of the L2-normalised vectors (Euclidean there is
    cosine on the sphere) with 200 epochs: several times faster than on the raw 384-d
    vectors with UMAP's 500 epochs for small inputs, and the map is for the eye.
    """
    start = time.perf_counter()
    use_umap = method == "umap" or (method == "auto" and len(X) >= 20 and _has_umap())
    if use_umap:
        import umap
        from sklearn.decomposition import PCA

        unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        if unit.shape[1] > UMAP_PCA_DIMS and len(unit) > UMAP_PCA_DIMS:
            unit = PCA(n_components=UMAP_PCA_DIMS, random_state=seed).fit_transform(unit)
        with warnings.catch_warnings():  # "n_jobs overridden by random_state": wanted
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            coords = umap.UMAP(
                n_components=2,
                n_neighbors=min(15, len(X) - 1),
                min_dist=0.1,
                n_epochs=200,
                random_state=seed,
            ).fit_transform(unit)
    elif len(X) > 2:
        from sklearn.decomposition import PCA

        coords = PCA(n_components=2, random_state=seed).fit_transform(X)
    else:
        coords = np.zeros((len(X), 2))
    return Projection(
        rows=rows,
        coords=np.asarray(coords, dtype=np.float64),
        method="UMAP" if use_umap else "PCA",
        sampled=len(rows) < total,
        total=total,
        seconds=time.perf_counter() - start,
    )


def _has_umap() -> bool:
    return importlib.util.find_spec("umap") is not None


# ------------------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class Comparison:
    """How the segments of ``new_run`` relate to those of ``old_run``."""

    old_run: int
    new_run: int
    old_names: list[str]
    new_names: list[str]
    old_sizes: list[int]
    new_sizes: list[int]
    matches: list[dict[str, Any]]  # new, old, centroid distance, member overlap (Jaccard)
    new: list[int]  # new segments matched to none of the old ones
    vanished: list[int]  # old segments matched to none of the new ones
    migration: np.ndarray  # old × new: users in both runs, by their segment in each
    splits: list[dict[str, Any]]  # old segment → ≥ 2 new ones, each with ≥ SPLIT_SHARE of it
    merges: list[dict[str, Any]]  # new segment ← ≥ 2 old ones, each ≥ SPLIT_SHARE of it
    only_old: int
    only_new: int


def _in_space_of(
    store: Store,
    settings: Settings,
    run: RunRecord,
    segments: Sequence[SegmentRecord],
    assignments: Mapping[str, Assignment],
) -> list[SegmentRecord]:
    """Another run's segments with centroids recomputed in ``run``'s fitted space (a
    ``collab`` run's space is its own: each run's SVD has its own axes), as the mean of
    their members' vectors there."""
    users = list(assignments)
    X = run_vectors(store, settings, run, users)
    labels = np.array([assignments[u].segment_id for u in users])
    out = []
    for segment in segments:
        members = labels == segment.segment_id
        centroid = X[members].mean(axis=0) if members.any() else np.zeros(X.shape[1])
        out.append(replace(segment, centroid=centroid.astype(np.float32)))
    return out


def compare_runs(
    old: tuple[int, Sequence[SegmentRecord], Mapping[str, Assignment]],
    new: tuple[int, Sequence[SegmentRecord], Mapping[str, Assignment]],
) -> Comparison:
    """Match segments by centroid (Hungarian assignment), count users' moves between them."""
    from scipy.optimize import linear_sum_assignment

    (old_id, old_segs, old_assign), (new_id, new_segs, new_assign) = old, new
    old_c = np.stack([s.centroid for s in old_segs]).astype(np.float64)
    new_c = np.stack([s.centroid for s in new_segs]).astype(np.float64)
    if old_c.shape[1] != new_c.shape[1]:
        raise InputError(
            f"--compare {old_id}: its vectors have {old_c.shape[1]} dimensions, run {new_id}'s "
            f"{new_c.shape[1]} — compare runs of the same representation and encoder"
        )
    cost = np.linalg.norm(new_c[:, None, :] - old_c[None, :, :], axis=2)
    new_rows, old_cols = linear_sum_assignment(cost)
    old_pos = {s.segment_id: i for i, s in enumerate(old_segs)}
    new_pos = {s.segment_id: i for i, s in enumerate(new_segs)}
    migration = np.zeros((len(old_segs), len(new_segs)), dtype=np.int64)
    common = old_assign.keys() & new_assign.keys()
    for user in common:
        migration[old_pos[old_assign[user].segment_id], new_pos[new_assign[user].segment_id]] += 1
    matches = []
    for i, j in zip(new_rows, old_cols, strict=True):
        both = int(migration[j, i])
        union = int(migration[j].sum() + migration[:, i].sum() - both)
        matches.append(
            {
                "new": new_segs[i].segment_id,
                "old": old_segs[j].segment_id,
                "distance": round(float(cost[i, j]), 4),
                "overlap": round(both / union, 3) if union else 0.0,
                "size_change": new_segs[i].size - old_segs[j].size,
            }
        )
    splits = [
        {"old": old_segs[j].segment_id, "into": [new_segs[i].segment_id for i in parts]}
        for j in range(len(old_segs))
        if len(parts := _big_parts(migration[j])) >= 2
    ]
    merges = [
        {"new": new_segs[i].segment_id, "from": [old_segs[j].segment_id for j in parts]}
        for i in range(len(new_segs))
        if len(parts := _big_parts(migration[:, i])) >= 2
    ]
    return Comparison(
        old_run=old_id,
        new_run=new_id,
        old_names=[s.name for s in old_segs],
        new_names=[s.name for s in new_segs],
        old_sizes=[s.size for s in old_segs],
        new_sizes=[s.size for s in new_segs],
        matches=sorted(matches, key=lambda m: m["new"]),
        new=[s.segment_id for i, s in enumerate(new_segs) if i not in set(new_rows)],
        vanished=[s.segment_id for j, s in enumerate(old_segs) if j not in set(old_cols)],
        migration=migration,
        splits=splits,
        merges=merges,
        only_old=len(old_assign.keys() - common),
        only_new=len(new_assign.keys() - common),
    )


def _big_parts(counts: np.ndarray) -> list[int]:
    total = counts.sum()
    if total == 0:
        return []
    return [int(i) for i in np.flatnonzero(counts >= SPLIT_SHARE * total)]


# ------------------------------------------------------------------------------ privacy


@dataclass(frozen=True)
class NoisyCounts:
    """Sizes and per-segment category counts with Laplace noise (OpenDP), and the scales."""

    epsilon: float
    sizes: np.ndarray
    categories: np.ndarray  # segments × categories: members with the category in their history
    sizes_scale: float
    categories_scale: float
    categories_sensitivity: int


def laplace(values: np.ndarray, *, scale: float) -> np.ndarray:
    """Integer counts plus discrete Laplace noise of ``scale``, from OpenDP (not seedable:
    it draws from the operating system's secure generator)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    measurement = dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int), scale=float(scale)
    )
    flat = [int(v) for v in np.asarray(values).ravel()]
    return np.asarray(measurement(flat), dtype=np.int64).reshape(np.shape(values))


def noisy_counts(sizes: np.ndarray, categories: np.ndarray, epsilon: float) -> NoisyCounts:
    """Spend ``epsilon`` (add/remove-one-user neighbours) half on sizes, half on categories.

    A user is in one segment: the sizes' L1 sensitivity is 1. A user counts once for each
    category of their history, at most once per category: the category table's L1
    sensitivity is the number of categories. Laplace scale = sensitivity / (ε/2).
    Negative noisy counts are published as 0 (post-processing keeps the guarantee).
    """
    half = epsilon / 2
    sensitivity = max(1, categories.shape[1])
    sizes_scale, categories_scale = 1 / half, sensitivity / half
    return NoisyCounts(
        epsilon=epsilon,
        sizes=np.maximum(laplace(sizes, scale=sizes_scale), 0),
        categories=np.maximum(laplace(categories, scale=categories_scale), 0),
        sizes_scale=sizes_scale,
        categories_scale=categories_scale,
        categories_sensitivity=sensitivity,
    )


# ------------------------------------------------------------------------------ page inputs


@dataclass
class PageInputs:
    """Everything the page shows; gathered from a workspace by :func:`write_report`."""

    run: RunRecord
    segments: list[SegmentRecord]
    hierarchy: HierarchyRecord | None
    labels: np.ndarray  # segment id of every user in the run
    projection: Projection | None  # None: no user map (a DP report)
    min_size: int
    categories: list[str] = field(default_factory=list)
    noisy: NoisyCounts | None = None
    release: dict[str, Any] | None = None  # id, ε of this release, ε spent on the run
    comparison: Comparison | None = None
    generated_at: str = ""


def publishable(segment: SegmentRecord, min_size: int) -> bool:
    """Whether a segment may be described: named by the run and at the threshold or above."""
    return segment.described and segment.size >= min_size


def public_name(segment: SegmentRecord, min_size: int) -> str:
    if publishable(segment, min_size):
        return segment.name
    return f"Segment {segment.segment_id} (under the threshold)"


def published(inputs: PageInputs) -> dict[str, Any]:
    """The facts the page publishes, as data: also embedded in the page as JSON."""
    dp = inputs.noisy
    parent_of = inputs.hierarchy.segment_parents() if inputs.hierarchy else {}
    total = float(dp.sizes.sum()) if dp is not None else float(len(inputs.labels))
    segments = []
    for index, seg in enumerate(inputs.segments):
        shown = publishable(seg, inputs.min_size)
        size = int(dp.sizes[index]) if dp is not None else seg.size
        entry: dict[str, Any] = {
            "id": seg.segment_id,
            "name": public_name(seg, inputs.min_size),
            "size": size,
            "share": round(size / total, 4) if total else 0.0,
            "described": shown,
            "parent": parent_of.get(seg.segment_id),
        }
        if shown:
            entry |= {"description": _description(seg, dp), "fallback": seg.fallback}
            if dp is not None:
                entry["top_categories"] = _noisy_categories(inputs, index)
            else:
                entry |= {
                    "fallback_reason": seg.facts.get("fallback_reason"),
                    "top_categories": seg.facts["top_categories"],
                    "top_items": seg.facts["top_items"],
                    "silhouette": seg.facts["silhouette"],
                    "stability": seg.facts["stability"],
                    "nearest": seg.facts["nearest"],
                }
        segments.append(entry)
    parents = []
    for p in inputs.hierarchy.parents if inputs.hierarchy else []:
        shown = p.described and p.size >= inputs.min_size
        children_sizes = (
            [s["size"] for s in segments if s["id"] in p.children] if p.level == 1 else None
        )
        parents.append(
            {
                "id": p.parent_id,
                "level": p.level,
                "name": p.name if shown else f"Parent {p.parent_id} (under the threshold)",
                "description": _description(p, dp) if shown else "",
                "fallback": p.fallback,
                "children": p.children,
                "parent": p.parent,
                "size": sum(children_sizes) if children_sizes is not None else None,
            }
        )
    _fill_parent_sizes(parents)
    return {
        "run": inputs.run.id,
        "users": int(total) if dp is None else None,
        "min_segment_size": inputs.min_size,
        "epsilon": dp.epsilon if dp else None,
        "segments": segments,
        "parents": parents,
    }


def _description(node: SegmentRecord | ParentRecord, dp: NoisyCounts | None) -> str:
    """A fallback description is a template of exact counts: not in a DP report."""
    if dp is not None and node.fallback:
        return "(A template description of exact counts: left out of this private report.)"
    return node.description


def _fill_parent_sizes(parents: list[dict[str, Any]]) -> None:
    by_id = {p["id"]: p for p in parents}
    for p in parents:
        if p["size"] is None:
            p["size"] = sum(by_id[c]["size"] for c in p["children"])


def _noisy_categories(inputs: PageInputs, index: int, n: int = 5) -> list[dict[str, Any]]:
    """Top categories by noisy member count, lift from noisy counts (post-processing)."""
    dp = inputs.noisy
    assert dp is not None
    counts = dp.categories[index]
    size = max(1, int(dp.sizes[index]))
    everyone = dp.categories.sum(axis=0)
    population = max(1, int(dp.sizes.sum()))
    rows = []
    for j in np.argsort(-counts, kind="stable")[:n]:
        if counts[j] <= 0:
            break
        overall = everyone[j] / population
        lift = (counts[j] / size) / overall if overall > 0 else 0.0
        rows.append(
            {
                "category": inputs.categories[j],
                "members": int(counts[j]),
                "lift": round(float(lift), 3),
            }
        )
    return rows


# ------------------------------------------------------------------------------ figures


def _layout(**extra: Any) -> dict[str, Any]:
    base = {
        "template": "none",
        "font": {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12},
        "margin": {"l": 10, "r": 10, "t": 30, "b": 30},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
    }
    return base | extra


def _figure(
    div: str, data: list[dict[str, Any]], layout: dict[str, Any], *, toolbar: bool = False
) -> dict[str, Any]:
    """A figure as Plotly validates it, reduced to JSON for ``Plotly.newPlot``; small
    charts get no toolbar."""
    import plotly.graph_objects as go

    figure = go.Figure(data=data, layout=layout)
    return {"div": div, "toolbar": toolbar, **json.loads(figure.to_json())}


def map_figure(inputs: PageInputs, facts: dict[str, Any]) -> dict[str, Any] | None:
    """Users coloured by segment (legend grouped by parent), or, in a DP report, segment
    centroids sized by noisy size (no user is drawn)."""
    colours = palette(len(inputs.segments))
    titles = _legend_titles(inputs, facts)
    traces = []
    if inputs.projection is not None:
        projection = inputs.projection
        labels = inputs.labels[projection.rows]
        kind = "scattergl" if len(projection.rows) > 3_000 else "scatter"
        marker = 9 if len(projection.rows) <= 1_000 else 5
        for index in _legend_order(inputs):
            seg = facts["segments"][index]
            mask = labels == inputs.segments[index].segment_id
            if not mask.any():
                continue
            xy = np.round(projection.coords[mask], 3)
            traces.append(
                {
                    "type": kind,
                    "mode": "markers",
                    "x": xy[:, 0].tolist(),
                    "y": xy[:, 1].tolist(),
                    "name": seg["name"],
                    "marker": {"color": colours[index], "size": marker, "opacity": 0.8},
                    "hovertemplate": "%{fullData.name}<extra></extra>",
                    **_group(titles, seg["parent"]),
                }
            )
    else:
        centroids = np.stack([s.centroid for s in inputs.segments]).astype(np.float64)
        rows = np.arange(len(centroids))
        coords = project(centroids, rows, len(rows), seed=0).coords
        peak = max(1, max(s["size"] for s in facts["segments"]))
        for index in _legend_order(inputs):
            seg = facts["segments"][index]
            traces.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "x": [round(float(coords[index, 0]), 3)],
                    "y": [round(float(coords[index, 1]), 3)],
                    "name": seg["name"],
                    "marker": {
                        "color": colours[index],
                        "size": 14 + 50 * np.sqrt(seg["size"] / peak),
                        "opacity": 0.8,
                    },
                    "hovertemplate": f"%{{fullData.name}}: ≈{seg['size']} users<extra></extra>",
                    **_group(titles, seg["parent"]),
                }
            )
    if not traces:
        return None
    layout = _layout(
        height=560,
        xaxis={"visible": False},
        yaxis={"visible": False},
        legend={"groupclick": "togglegroup", "itemsizing": "constant", "font": {"size": 12}},
        margin={"l": 0, "r": 0, "t": 10, "b": 0},
        hovermode="closest",
    )
    return _figure("map", traces, layout, toolbar=True)


def _legend_titles(inputs: PageInputs, facts: dict[str, Any]) -> dict[int, str]:
    """Level-1 parent id → its legend group title ("Grandparent › Parent" with 3 levels)."""
    by_id = {p["id"]: p for p in facts["parents"]}
    titles = {}
    for p in facts["parents"]:
        if p["level"] == 1:
            chain = [p["name"]]
            up = p["parent"]
            while up is not None:
                chain.insert(0, by_id[up]["name"])
                up = by_id[up]["parent"]
            titles[p["id"]] = " › ".join(chain)
    return titles


def _group(titles: Mapping[int, str], parent: int | None) -> dict[str, Any]:
    if parent is None or parent not in titles:
        return {}
    return {"legendgroup": f"p{parent}", "legendgrouptitle": {"text": titles[parent]}}


def _legend_order(inputs: PageInputs) -> list[int]:
    """Segment indices ordered by parent (siblings together), then by size."""
    parent_of = inputs.hierarchy.segment_parents() if inputs.hierarchy else {}
    return sorted(
        range(len(inputs.segments)),
        key=lambda i: (
            parent_of.get(inputs.segments[i].segment_id, -1),
            -inputs.segments[i].size,
        ),
    )


def bars_figure(div: str, rows: list[dict[str, Any]], key: str, colour: str) -> dict[str, Any]:
    """Horizontal bars of lift (×), labelled with the number of members."""
    rows = rows[::-1]
    return _figure(
        div,
        [
            {
                "type": "bar",
                "orientation": "h",
                "x": [r["lift"] for r in rows],
                "y": [_short(str(r[key])) for r in rows],
                "text": [f"×{r['lift']:.2f} · {r['members']}" for r in rows],
                "textposition": "auto",
                "marker": {"color": colour},
                "hovertemplate": "%{y}: lift %{x:.2f}<extra></extra>",
            }
        ],
        _layout(
            height=40 + 26 * len(rows),
            margin={"l": 170, "r": 10, "t": 4, "b": 20},
            xaxis={"zeroline": True},
            yaxis={"automargin": True},
            bargap=0.25,
        ),
    )


def _short(text: str, limit: int = 32) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def curve_figure(curve: list[dict[str, float]], chosen: int) -> dict[str, Any]:
    ks = [row["k"] for row in curve]
    return _figure(
        "k-curve",
        [
            {
                "type": "scatter",
                "mode": "lines+markers",
                "x": ks,
                "name": "silhouette",
                "y": [row["silhouette"] for row in curve],
            },
            {
                "type": "scatter",
                "mode": "lines+markers",
                "x": ks,
                "name": "stability",
                "y": [row["stability"] for row in curve],
                "yaxis": "y2",
            },
        ],
        _layout(
            height=300,
            margin={"l": 50, "r": 50, "t": 20, "b": 40},
            xaxis={"title": {"text": "k"}, "dtick": 1},
            yaxis={"title": {"text": "silhouette"}},
            yaxis2={"title": {"text": "stability"}, "overlaying": "y", "side": "right"},
            shapes=[
                {
                    "type": "line",
                    "x0": chosen,
                    "x1": chosen,
                    "yref": "paper",
                    "y0": 0,
                    "y1": 1,
                    "line": {"dash": "dot", "color": "#888"},
                }
            ],
            legend={"orientation": "h", "y": 1.12},
        ),
    )


def migration_figure(comparison: Comparison) -> dict[str, Any]:
    old = [f"{i}: {_short(n, 28)}" for i, n in enumerate(comparison.old_names)]
    new = [f"{i}: {_short(n, 28)}" for i, n in enumerate(comparison.new_names)]
    matrix = comparison.migration
    return _figure(
        "migration",
        [
            {
                "type": "heatmap",
                "z": matrix.tolist(),
                "x": new,
                "y": old,
                "text": matrix.tolist(),
                "texttemplate": "%{text}",
                "colorscale": "Blues",
                "hovertemplate": "%{y} → %{x}: %{z} users<extra></extra>",
            }
        ],
        _layout(
            height=160 + 36 * len(old),
            margin={"l": 220, "r": 20, "t": 20, "b": 160},
            xaxis={"title": {"text": f"run {comparison.new_run}"}, "tickangle": -30},
            yaxis={"title": {"text": f"run {comparison.old_run}"}, "autorange": "reversed"},
        ),
    )


# ------------------------------------------------------------------------------ HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(share: float) -> str:
    return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(inputs: PageInputs) -> str:
    """The whole page as one string."""
    from plotly.offline import get_plotlyjs

    facts = published(inputs)
    colours = palette(len(inputs.segments))
    figures: list[dict[str, Any]] = []
    body = [_header(inputs, facts)]
    map_fig = map_figure(inputs, facts)
    if map_fig is not None:
        figures.append(map_fig)
    body.append(_map_section(inputs, facts, map_fig is not None))
    cards = []
    for index in _legend_order(inputs):
        seg = facts["segments"][index]
        cards.append(_card(seg, facts, colours[index], figures, inputs.noisy is not None))
    body.append(
        '<section id="segments"><h2>Segments</h2><div class="cards">'
        + "".join(cards)
        + "</div></section>"
    )
    body.append(_run_section(inputs, figures))
    if inputs.comparison is not None:
        figures.append(migration_figure(inputs.comparison))
        body.append(_compare_section(inputs.comparison))
    body.append(
        f"<footer>Made by segrec on {_e(inputs.generated_at)} · one offline file: every script "
        "and style is inside it, and its Content-Security-Policy forbids any network request."
        "</footer>"
    )
    data = json.dumps(facts, ensure_ascii=False).replace("</", "<\\/")
    figs = json.dumps(figures, ensure_ascii=False).replace("</", "<\\/")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>segrec report · run {inputs.run.id}</title><style>{_STYLE}</style></head>"
        f"<body><main>{''.join(body)}</main>"
        f'<script type="application/json" id="segrec-data">{data}</script>'
        f'<script type="application/json" id="segrec-figures">{figs}</script>'
        f"<script>{get_plotlyjs()}</script><script>{_DRAW}</script></body></html>\n"
    )


_DRAW = """
(function () {
  const figures = JSON.parse(document.getElementById('segrec-figures').textContent);
  const config = {displaylogo: false, responsive: true,
                  modeBarButtonsToRemove: ['select2d', 'lasso2d']};
  for (const f of figures) {
    const el = document.getElementById(f.div);
    const bar = f.toolbar ? 'hover' : false;
    if (el) Plotly.newPlot(el, f.data, f.layout, {...config, displayModeBar: bar});
  }
  document.body.dataset.drawn = String(figures.length);
})();
"""

_STYLE = """
:root { --ink:#1d2433; --muted:#5b6475; --line:#e3e7ee; --bg:#f6f7fb; --card:#fff;
        --accent:#4C78A8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; }
main { max-width:1280px; margin:0 auto; padding:28px 28px 60px; }
header h1 { font-size:26px; margin:0 0 4px; }
header .sub { color:var(--muted); margin:0 0 14px; }
h2 { font-size:20px; margin:36px 0 12px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h3 { font-size:17px; margin:0; }
.banner { background:#fff8e6; border:1px solid #f0d48a; border-radius:8px; padding:10px 14px;
          margin:10px 0; }
.banner.dp { background:#eef6ff; border-color:#a9c8ef; }
.kpis { display:flex; flex-wrap:wrap; gap:12px; margin:8px 0 0; padding:0; list-style:none; }
.kpis li { background:var(--card); border:1px solid var(--line); border-radius:8px;
           padding:8px 14px; min-width:120px; }
.kpis b { display:block; font-size:20px; }
.kpis span { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.mapwrap { display:grid; grid-template-columns:minmax(0,1fr) 300px; gap:16px; }
.panel { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px; }
.tree ul { list-style:none; margin:0; padding-left:14px; }
.tree > ul { padding-left:0; }
.tree li { margin:3px 0; }
.tree .parent { font-weight:600; }
.tree .n { color:var(--muted); font-size:12px; }
.dot { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:6px; }
.note { color:var(--muted); font-size:13px; }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(380px,1fr)); gap:16px; }
.card { background:var(--card); border:1px solid var(--line); border-left:6px solid var(--c);
        border-radius:10px; padding:14px 16px; }
.card .meta { color:var(--muted); font-size:13px; margin:4px 0 8px; }
.card h4 { font-size:13px; margin:12px 0 2px; color:var(--muted); text-transform:uppercase;
           letter-spacing:.04em; }
.card ol { margin:4px 0 0; padding-left:18px; font-size:13px; }
.badge { display:inline-block; font-size:11px; padding:1px 7px; border-radius:9px;
         background:#fde7c7; color:#7a4a00; margin-left:6px; vertical-align:middle; }
.badge.hidden { background:#e8eaf0; color:#4a5060; }
table { border-collapse:collapse; background:var(--card); font-size:14px; }
td, th { border:1px solid var(--line); padding:5px 10px; text-align:left; vertical-align:top; }
th { background:#f0f2f7; }
.grid2 { display:grid; grid-template-columns:repeat(auto-fit,minmax(320px,1fr)); gap:16px; }
footer { color:var(--muted); font-size:12px; margin-top:40px; }
@media (max-width: 900px) { .mapwrap { grid-template-columns:1fr; } }
"""


def _header(inputs: PageInputs, facts: dict[str, Any]) -> str:
    run, metrics = inputs.run, inputs.run.metrics
    users = facts["users"]
    kpis = [
        ("users", f"≈{int(sum(s['size'] for s in facts['segments']))}" if users is None else users),
        ("segments", len(inputs.segments)),
        ("parents", sum(1 for p in facts["parents"] if p["level"] == 1) or "—"),
    ]
    if inputs.noisy is None:
        kpis += [
            ("silhouette", _num(metrics.get("silhouette"))),
            ("stability", _num(metrics.get("stability"))),
        ]
    items = "".join(f"<li><span>{_e(k)}</span><b>{_e(v)}</b></li>" for k, v in kpis)
    banners = []
    if inputs.noisy is not None:
        dp, release = inputs.noisy, inputs.release or {}
        banners.append(
            '<div class="banner dp"><b>Differentially private release</b> '
            f"(#{_e(release.get('id'))}): ε = {dp.epsilon:g} for this page. Segment sizes carry "
            f"Laplace noise of scale {dp.sizes_scale:.3g} (ε/2, sensitivity 1) and per-segment "
            f"category counts noise of scale {dp.categories_scale:.3g} (ε/2, sensitivity "
            f"{dp.categories_sensitivity}: a user counts once per category). Total ε spent on "
            f"run {run.id} across its {release.get('releases')} release(s): "
            f"{release.get('epsilon_total', dp.epsilon):g}. Not on this page: member ids and "
            "summaries, top items, silhouette and stability, and the user map (segments are "
            "drawn at their centroids). Names, descriptions and centroids come from the exact "
            "data and are not covered by ε.</div>"
        )
    hidden = sum(1 for s in facts["segments"] if not s["described"])
    banners.append(
        f'<div class="banner">Privacy threshold: segments under {inputs.min_size} users are '
        "shown with their size only — never described or listed with members"
        + (f" ({hidden} such segment(s) here)." if hidden else ".")
        + "</div>"
    )
    return (
        f"<header><h1>Segments of run {run.id}</h1>"
        f'<p class="sub">{_e(run.params.get("represent"))} vectors · '
        f"{_e(run.params.get('algorithm'))} · k = {_e(run.params.get('k'))} · run made "
        f'{_e(run.created_at)}</p><ul class="kpis">{items}</ul>{"".join(banners)}</header>'
    )


def _map_section(inputs: PageInputs, facts: dict[str, Any], drawn: bool) -> str:
    colours = palette(len(inputs.segments))
    projection = inputs.projection
    if projection is not None:
        how = (
            f"{projection.method} projection of the users' vectors"
            + (
                f"; a seeded sample of {len(projection.rows):,} of {projection.total:,} users "
                f"(above {MAP_MAX_POINTS:,} users the map is sampled)"
                if projection.sampled
                else f"; all {projection.total:,} users"
            )
            + ". Hover a point for its segment; click a legend entry to hide it, a group title "
            "to hide the whole parent."
        )
    else:
        how = "Segments at their centroids (projected), sized by noisy size; no user is drawn."
    tree = _tree(inputs, facts, colours)
    return (
        '<section id="map-section"><h2>Map</h2><div class="mapwrap">'
        f'<div class="panel"><div id="map">{"" if drawn else "No users to draw."}</div>'
        f'<p class="note">{_e(how)}</p></div>'
        f'<div class="panel tree" id="hierarchy"><h3>Hierarchy</h3>{tree}</div>'
        "</div></section>"
    )


def _tree(inputs: PageInputs, facts: dict[str, Any], colours: list[str]) -> str:
    segs = {s["id"]: (i, s) for i, s in enumerate(facts["segments"])}

    def leaf(seg_id: int) -> str:
        i, s = segs[seg_id]
        return (
            f'<li><span class="dot" style="background:{colours[i]}"></span>'
            f'<a href="#seg-{seg_id}">{_e(s["name"])}</a> <span class="n">{s["size"]:,}</span></li>'
        )

    if not facts["parents"]:
        return (
            '<p class="note">No hierarchy for this run: the legend is flat. Build one with '
            "<code>segrec hierarchy</code>.</p><ul>"
            + "".join(leaf(inputs.segments[i].segment_id) for i in _legend_order(inputs))
            + "</ul>"
        )
    parents = {p["id"]: p for p in facts["parents"]}

    def node(parent_id: int) -> str:
        p = parents[parent_id]
        inner = "".join(
            leaf(c) if p["level"] == 1 else node(c)
            for c in sorted(
                p["children"],
                key=lambda c: -(segs[c][1]["size"] if p["level"] == 1 else parents[c]["size"]),
            )
        )
        badge = '<span class="badge">fallback name</span>' if p["fallback"] else ""
        return (
            f'<li><span class="parent" title="{_e(p["description"])}">{_e(p["name"])}</span>'
            f'{badge} <span class="n">{p["size"]:,}</span><ul>{inner}</ul></li>'
        )

    top = max(p["level"] for p in facts["parents"])
    roots = sorted((p for p in facts["parents"] if p["level"] == top), key=lambda p: -p["size"])
    described = "".join(
        f"<li><b>{_e(p['name'])}</b>: {_e(p['description'])}</li>"
        for p in sorted(facts["parents"], key=lambda p: (-p["level"], -p["size"]))
        if p["description"]
    )
    return (
        f"<ul>{''.join(node(p['id']) for p in roots)}</ul>"
        f'<details><summary class="note">What the parents are</summary><ul>{described}</ul>'
        "</details>"
    )


def _card(
    seg: dict[str, Any],
    facts: dict[str, Any],
    colour: str,
    figures: list[dict[str, Any]],
    dp: bool,
) -> str:
    sid = seg["id"]
    parents = {p["id"]: p for p in facts["parents"]}
    parent = parents.get(seg["parent"]) if seg["parent"] is not None else None
    size = f"≈{seg['size']:,}" if dp else f"{seg['size']:,}"
    meta = [f"{size} users · {_pct(seg['share'])}"]
    if parent is not None:
        meta.append(f"in <b>{_e(parent['name'])}</b>")
    if not seg["described"]:
        return (
            f'<article class="card" id="seg-{sid}" style="--c:{colour}"><h3>{_e(seg["name"])}'
            '<span class="badge hidden">not described</span></h3>'
            f'<p class="meta">{" · ".join(meta)}</p><p class="note">Fewer than '
            f"{facts['min_segment_size']} users: not described and its members are not "
            "listed (privacy threshold).</p></article>"
        )
    if not dp:
        meta.append(f"silhouette {_num(seg['silhouette'])} · stability {_num(seg['stability'])}")
    badge = (
        f'<span class="badge" title="{_e(seg.get("fallback_reason") or "")}">fallback label</span>'
        if seg["fallback"]
        else ""
    )
    parts = [
        f'<article class="card" id="seg-{sid}" style="--c:{colour}">'
        f'<h3>{_e(seg["name"])}{badge}</h3><p class="meta">{" · ".join(meta)}</p>'
        f"<p>{_e(seg['description'])}</p>"
    ]
    if seg["top_categories"]:
        figures.append(bars_figure(f"cats-{sid}", seg["top_categories"], "category", colour))
        label = "Top categories (lift · noisy members)" if dp else "Top categories (lift · members)"
        parts.append(f'<h4>{label}</h4><div id="cats-{sid}"></div>')
    if not dp and seg["top_items"]:
        figures.append(bars_figure(f"items-{sid}", seg["top_items"], "title", colour))
        parts.append(f'<h4>Top items (lift · members)</h4><div id="items-{sid}"></div>')
    if not dp and seg["nearest"]:
        members = "".join(
            f"<li><b>user {_e(m['user_id'])}</b>: {_e(m['summary'])}</li>" for m in seg["nearest"]
        )
        parts.append(f"<h4>Members nearest the centroid</h4><ol>{members}</ol>")
    parts.append("</article>")
    return "".join(parts)


def _run_section(inputs: PageInputs, figures: list[dict[str, Any]]) -> str:
    run = inputs.run
    params = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in sorted(run.params.items())
    )
    shown = {k: v for k, v in run.metrics.items() if k != "curve"}
    if inputs.noisy is not None:
        shown = {k: v for k, v in shown.items() if k in ("k", "fallback_labels")}
    metrics = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in shown.items())
    notes = list(run.notes)
    if inputs.hierarchy is not None:
        h = inputs.hierarchy
        notes.append(
            f"hierarchy: {h.params.get('levels')} levels, parents per level "
            f"{h.params.get('parents_per_level')} ({h.params.get('rule')}), named by "
            f"{h.params.get('model_id')}"
        )
        notes += [f"hierarchy: {n}" for n in h.notes]
    else:
        notes.append("no hierarchy stored for this run: the legend is flat")
    projection = inputs.projection
    if projection is not None and projection.sampled:
        notes.append(
            f"map: a seeded sample of {len(projection.rows):,} of {projection.total:,} users "
            f"(at most {MAP_MAX_POINTS:,} are drawn)"
        )
    fallbacks = [s.name for s in inputs.segments if s.fallback and publishable(s, inputs.min_size)]
    if fallbacks:
        notes.append(
            "fallback labels (the LLM's answers failed validation): " + ", ".join(fallbacks)
        )
    curve = run.metrics.get("curve") or []
    chart = ""
    if curve:
        figures.append(curve_figure(curve, int(run.params.get("k", 0))))
        chart = (
            '<div class="panel"><h3>How k was chosen (--k auto)</h3><div id="k-curve"></div>'
            '<p class="note">Best silhouette among k whose bootstrap stability is at least '
            "0.6; the dotted line is the chosen k.</p></div>"
        )
    notes_html = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return (
        '<section id="run"><h2>The run</h2><div class="grid2">'
        f"<div><h3>Parameters</h3><table>{params}</table></div>"
        f"<div><h3>Metrics</h3><table>{metrics}</table><h3>Notes</h3><ul>{notes_html}</ul>"
        f"</div>{chart}</div></section>"
    )


def _compare_section(c: Comparison) -> str:
    def name(names: list[str], sid: int) -> str:
        return f"{sid}: {names[sid] if sid < len(names) else sid}"

    rows = "".join(
        f"<tr><td>{_e(name(c.old_names, m['old']))}</td><td>{_e(name(c.new_names, m['new']))}"
        f"</td><td>{c.old_sizes[m['old']]:,} → {c.new_sizes[m['new']]:,} "
        f"({m['size_change']:+,})</td><td>{m['overlap']:.2f}</td><td>{m['distance']:.3f}</td></tr>"
        for m in c.matches
    )
    events = [
        f"<li><b>split</b>: {_e(name(c.old_names, s['old']))} → "
        + ", ".join(_e(name(c.new_names, i)) for i in s["into"])
        + "</li>"
        for s in c.splits
    ]
    events += [
        "<li><b>merged</b>: "
        + ", ".join(_e(name(c.old_names, i)) for i in m["from"])
        + f" → {_e(name(c.new_names, m['new']))}</li>"
        for m in c.merges
    ]
    events += [f"<li><b>new</b>: {_e(name(c.new_names, i))}</li>" for i in c.new]
    events += [f"<li><b>vanished</b>: {_e(name(c.old_names, i))}</li>" for i in c.vanished]
    if not events:
        events.append("<li>every segment has a counterpart; no split or merge</li>")
    return (
        f'<section id="compare"><h2>Changes since run {c.old_run}</h2>'
        f"<ul>{''.join(events)}</ul>"
        "<h3>Matched segments (Hungarian assignment of centroids)</h3>"
        f"<table><tr><th>run {c.old_run}</th><th>run {c.new_run}</th><th>size</th>"
        f"<th>member overlap (Jaccard)</th><th>centroid distance</th></tr>{rows}</table>"
        f"<h3>Where users moved (users in both runs)</h3>"
        f'<div class="panel"><div id="migration"></div><p class="note">Rows: run {c.old_run}'
        f"'s segments; columns: run {c.new_run}'s. {c.only_old:,} user(s) only in run "
        f"{c.old_run}, {c.only_new:,} only in run {c.new_run}. A split is an old segment "
        f"with at least {SPLIT_SHARE:.0%} of its users in each of two or more new segments."
        "</p></div></section>"
    )


# ------------------------------------------------------------------------------ workspace


@dataclass(frozen=True)
class ReportResult:
    path: Path
    bytes: int
    run: int
    segments: int
    users: int
    map_points: int
    projection: str | None
    projection_s: float
    sampled: bool
    epsilon: float | None
    release: int | None
    notes: list[str]


def write_report(
    settings: Settings,
    *,
    out: Path,
    run_id: int | None = None,
    compare: int | None = None,
    epsilon: float | None = None,
    min_segment_size: int | None = None,
    max_points: int = MAP_MAX_POINTS,
    on_stage: Callable[[str], None] | None = None,
) -> ReportResult:
    """Gather a run from the workspace, build the page, record a DP release, write the file.

    Every flag is checked before anything is computed or written; the file is written
    atomically, so a failure leaves no half page.
    """
    stage = on_stage or (lambda _: None)
    if epsilon is not None and not (0 < epsilon < float("inf")):
        raise InputError(f"--epsilon {epsilon}: must be a positive number, e.g. 1.0")
    if epsilon is not None and compare is not None:
        raise InputError(
            "--compare with --epsilon: the migration counts would need their own privacy "
            "budget — make the comparison without --epsilon"
        )
    if min_segment_size is not None and min_segment_size < 1:
        raise InputError(f"--min-segment-size {min_segment_size}: must be at least 1")
    if out.exists() and out.is_dir():
        raise InputError(f"--out {out}: is a directory — give a file name, e.g. report.html")
    if not out.parent.exists():
        raise InputError(f"--out {out}: folder {out.parent} does not exist — create it first")
    notes: list[str] = []
    with Store.open(settings.workspace) as store:
        run = active_run(store, settings, run_id)
        segments = store.segments(run.id)
        assignments = store.assignments(run.id)
        comparison = None
        if compare is not None:
            old = store.run(compare)
            if old is None:
                raise InputError(f"--compare {compare}: no such clustering run — see `segrec runs`")
            for key in ("represent", "encoder_id"):
                if old.params.get(key) != run.params.get(key):
                    raise InputError(
                        f"--compare {compare}: run {compare} has {key} "
                        f"{old.params.get(key)!r}, run {run.id} {run.params.get(key)!r} — "
                        "centroids are only comparable in the same vector space"
                    )
        stored_min = int(run.params.get("min_segment_size", 1))
        min_size = max(stored_min, min_segment_size or stored_min)
        if min_segment_size is not None and min_segment_size < stored_min:
            notes.append(
                f"--min-segment-size {min_segment_size} is below the run's threshold "
                f"({stored_min}), which applies"
            )
        if compare is not None:
            stage("comparing runs")
            old_segments = store.segments(compare)
            old_assignments = store.assignments(compare)
            if run.params.get("represent") == "collab":
                old_segments = _in_space_of(store, settings, run, old_segments, old_assignments)
            comparison = compare_runs(
                (compare, _masked(old_segments, min_size), old_assignments),
                (run.id, _masked(segments, min_size), assignments),
            )
        user_ids = list(assignments)
        position = {s.segment_id: i for i, s in enumerate(segments)}
        labels = np.array([assignments[u].segment_id for u in user_ids], dtype=np.int64)
        inputs = PageInputs(
            run=run,
            segments=segments,
            hierarchy=store.hierarchy(run.id),
            labels=labels,
            projection=None,
            min_size=min_size,
            generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
            comparison=comparison,
        )
        if epsilon is None:
            stage("projecting users")
            rows = sample_rows(len(user_ids), max_points, settings.seed)
            X = run_vectors(store, settings, run, [user_ids[i] for i in rows])
            inputs.projection = project(X, rows, len(user_ids), seed=settings.seed)
        else:
            stage("adding noise")
            categories, matrix = category_users(store, run.id, [s.segment_id for s in segments])
            sizes = np.bincount([position[s] for s in labels], minlength=len(segments))
            inputs.categories, inputs.noisy = categories, noisy_counts(sizes, matrix, epsilon)
        if inputs.noisy is not None:  # recorded before publishing: ε is never under-counted
            dp = inputs.noisy
            release = store.save_release(
                run.id,
                epsilon=dp.epsilon,
                details={
                    "mechanism": "discrete Laplace (OpenDP make_laplace)",
                    "sizes_scale": dp.sizes_scale,
                    "categories_scale": dp.categories_scale,
                    "categories_sensitivity": dp.categories_sensitivity,
                    "out": str(out),
                },
            )
            spent = store.releases(run.id)
            inputs.release = {
                "id": release,
                "releases": len(spent),
                "epsilon_total": sum(r["epsilon"] for r in spent),
            }
        stage("writing the page")
        page = render(inputs)
    _write_atomic(out, page)
    projection = inputs.projection
    if projection is not None and projection.sampled:
        notes.append(
            f"map sampled: {len(projection.rows):,} of {projection.total:,} users "
            f"(seed {settings.seed})"
        )
    if inputs.hierarchy is None:
        notes.append("no hierarchy for this run: the legend is flat (run `segrec hierarchy`)")
    return ReportResult(
        path=out,
        bytes=len(page.encode()),
        run=run.id,
        segments=len(segments),
        users=len(user_ids),
        map_points=len(projection.rows) if projection else 0,
        projection=projection.method if projection else None,
        projection_s=round(projection.seconds, 3) if projection else 0.0,
        sampled=bool(projection and projection.sampled),
        epsilon=epsilon,
        release=inputs.release["id"] if inputs.release else None,
        notes=notes,
    )


def _masked(segments: Sequence[SegmentRecord], min_size: int) -> list[SegmentRecord]:
    """Segments with the names the page may show (none for those under the threshold)."""
    return [replace(s, name=public_name(s, min_size)) for s in segments]


def _write_atomic(path: Path, text: str) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise WorkspaceError(f"--out {path}: cannot write ({exc.strerror})") from None
