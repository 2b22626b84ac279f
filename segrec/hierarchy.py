"""Parent segments over a clustering run: fine segments grouped into fewer, broader ones.

As in Anthropic's Clio, the hierarchy is built bottom-up from the fine clusters: their
centroids are clustered (k-means weighted by segment size, so a parent's centroid is the
mean of its users), and every parent is named by the LLM from its children's names and
facts, contrasted with the nearest children of *other* parents. Naming reuses the label
stage (its validation, the quality gates, distinct names and deterministic fallback, marked
as such) with its own prompt, ``prompts/parent.jinja``; a parent's name and description may
name only the top categories stored and printed beside it (the consistency gate).

Level sizes shrink geometrically, as in Clio: with ``k`` segments and ``L`` levels in all
(the segments are level 0), level ``l`` has ``round(k ** ((L - l) / L))`` parents, e.g.
``√k`` parents for two levels, ``k^(2/3)`` then ``k^(1/3)`` for three. A level needs at
least 2 parents and fewer than the level below; one that cannot have that is dropped, and
the notes say so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from segrec.config import Settings
from segrec.errors import InputError
from segrec.label import SegmentDoc, label_segments
from segrec.llm import make_llm
from segrec.llm.base import LLM, RetryPolicy
from segrec.pipeline import active_run, generation_params
from segrec.profile import Vocabulary
from segrec.store import HierarchyRecord, ParentRecord, RunRecord, SegmentRecord, Store
from segrec.templates import load_prompt

LEVELS = (2, 3)
PROMPT_CHILDREN, PROMPT_OTHERS = 8, 5


def level_counts(k: int, levels: int) -> tuple[list[int], list[str]]:
    """Parents per level above the ``k`` segments, and a note per level dropped."""
    if levels not in LEVELS:
        raise InputError(f"--levels {levels}: choose 2 or 3 (segments count as one level)")
    counts: list[int] = []
    notes: list[str] = []
    below = k
    for level in range(1, levels):
        n = round(k ** ((levels - level) / levels))
        if 2 <= n < below:
            counts.append(n)
            below = n
        else:
            notes.append(
                f"level {level} dropped: {k} segments leave no room for {n} parents "
                f"between {below} and 2"
            )
    if not counts:
        raise InputError(
            f"--levels {levels}: the run has {k} segments; a hierarchy needs at least 3"
        )
    return counts, notes


def group(centroids: np.ndarray, weights: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Parent index of each centroid: k-means weighted by size; parents numbered by size."""
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=n, n_init=10, random_state=seed).fit_predict(
        centroids.astype(np.float64), sample_weight=weights
    )
    sizes = np.bincount(labels, weights=weights, minlength=n)
    order = np.argsort(-sizes, kind="stable")
    relabel = np.empty(n, dtype=int)
    relabel[order] = np.arange(n)
    return relabel[labels]


@dataclass(frozen=True)
class _Node:
    """A segment or a parent as the next level up sees it."""

    node_id: int
    name: str
    description: str
    described: bool
    size: int
    centroid: np.ndarray
    categories: np.ndarray  # members per category (columns of the category table)
    top_categories: list[str]
    top_items: list[str]


def _line(node: _Node) -> dict[str, Any]:
    """A child as the label prompt's "member": its name, description and main categories
    (its items reach the prompt as the parent's top items, so fallback names stay broad)."""
    return {
        "summary": f"{node.name}: {node.description}",
        "likes": node.top_categories[:3],
        "themes": [],
        "favourite_items": [],
    }


def _shares(counts: np.ndarray, categories: Sequence[str]) -> dict[str, float]:
    total = counts.sum()
    if total <= 0:
        return {}
    return {c: round(float(v / total), 4) for c, v in zip(categories, counts, strict=True) if v}


def _doc(
    parent_id: int,
    members: list[_Node],
    others: list[_Node],
    centroid: np.ndarray,
    categories: Sequence[str],
    shown: Sequence[str],
) -> SegmentDoc:
    def near(nodes: list[_Node]) -> list[_Node]:
        return sorted(nodes, key=lambda n: float(np.linalg.norm(n.centroid - centroid)))

    children = near([m for m in members if m.described])
    counts = np.sum([m.categories for m in members], axis=0)
    # titles from described children only: a child under the privacy threshold publishes none
    by_size = sorted(children, key=lambda m: -m.size)
    items = [title for child in by_size for title in child.top_items]
    return SegmentDoc(
        segment_id=parent_id,
        size=sum(m.size for m in members),
        members=[_line(c) for c in children[:PROMPT_CHILDREN]],
        contrast=[_line(o) for o in near([o for o in others if o.described])[:PROMPT_OTHERS]],
        categories=_shares(counts, categories),
        top_items=list(dict.fromkeys(items))[:5],
        shown_categories=tuple(shown),
    )


def category_users(
    store: Store, run_id: int, segment_ids: Sequence[int]
) -> tuple[list[str], np.ndarray]:
    """Members of each segment with at least one interaction in each catalogue category:
    the categories (sorted) and a segments × categories count matrix."""
    seg_of = {u: a.segment_id for u, a in store.assignments(run_id).items()}
    interactions = store.interactions_frame(list(seg_of))
    item_categories = store.items_frame().set_index("item_id")["categories"]
    pairs = (
        pd.DataFrame(
            {
                "user": interactions["user_id"],
                "segment": interactions["user_id"].map(seg_of),
                "category": interactions["item_id"].map(item_categories),
            }
        )
        .explode("category")
        .dropna()
        .drop_duplicates(["user", "category"])
    )
    vocabulary = sorted({str(c) for values in item_categories for c in values})
    table = pd.crosstab(pairs["segment"], pairs["category"]).reindex(
        index=list(segment_ids), columns=vocabulary, fill_value=0
    )
    return vocabulary, table.to_numpy(dtype=np.int64)


def build_hierarchy(
    store: Store,
    run: RunRecord,
    *,
    levels: int,
    llm: LLM,
    settings: Settings,
    on_stage: Callable[[str], None] | None = None,
) -> HierarchyRecord:
    """Group the run's segments into parents (and grandparents), name them, store them."""
    stage = on_stage or (lambda _: None)
    segments = store.segments(run.id)
    counts, notes = level_counts(len(segments), levels)
    min_size = int(run.params.get("min_segment_size", settings.min_segment_size))
    categories, matrix = category_users(store, run.id, [s.segment_id for s in segments])
    vocabulary = Vocabulary.from_items(store.items_frame()).categories
    population = matrix.sum(axis=0)
    total_users = sum(s.size for s in segments)
    nodes = [_segment_node(s, matrix[i]) for i, s in enumerate(segments)]
    reserved = [s.name for s in segments if s.described]
    parents: list[ParentRecord] = []
    next_id = 0
    for level, n in enumerate(counts, start=1):
        stage(f"grouping level {level} into {n} parents")
        labels = group(
            np.stack([node.centroid for node in nodes]),
            np.array([node.size for node in nodes], dtype=np.float64),
            n,
            settings.seed,
        )
        groups = [
            [node for node, lab in zip(nodes, labels, strict=True) if lab == j] for j in range(n)
        ]
        centroids = [
            np.average([m.centroid for m in g], axis=0, weights=[m.size for m in g]) for g in groups
        ]
        group_counts = [np.sum([m.categories for m in g], axis=0) for g in groups]
        tops = [
            _top_categories(c, population, categories, sum(m.size for m in g), total_users)
            for c, g in zip(group_counts, groups, strict=True)
        ]
        docs = [
            _doc(
                next_id + j,
                g,
                [o for o in nodes if o not in g],
                centroids[j],
                categories,
                [t["category"] for t in tops[j]],
            )
            for j, g in enumerate(groups)
        ]
        described = [d for d in docs if d.size >= min_size]
        stage(f"naming {len(described)} level {level} parents")
        labels_ = (
            label_segments(
                described,
                llm=llm,
                params=generation_params(settings),
                vocabulary=vocabulary,
                attempts=settings.validation_attempts,
                domain=settings.domain,
                prompt=load_prompt("parent"),
                retry=RetryPolicy(attempts=settings.retries),
                reserved=reserved,
            )
            if described
            else []
        )
        by_id = {d.segment_id: lab for d, lab in zip(described, labels_, strict=True)}
        reserved += [lab.name for lab in labels_]
        if len(described) < len(docs):
            notes.append(
                f"{len(docs) - len(described)} level {level} parent(s) under {min_size} users "
                "are not described (privacy threshold)"
            )
        level_records = []
        new_nodes = []
        for j, (doc, members) in enumerate(zip(docs, groups, strict=True)):
            label = by_id.get(doc.segment_id)
            name = label.name if label else f"Unnamed parent {doc.segment_id}"
            description = (
                label.description
                if label
                else f"Fewer than {min_size} users: not described (privacy threshold)."
            )
            top = tops[j]
            level_records.append(
                ParentRecord(
                    parent_id=doc.segment_id,
                    level=level,
                    name=name,
                    description=description,
                    fallback=bool(label and label.fallback),
                    described=label is not None,
                    size=doc.size,
                    children=[m.node_id for m in members],
                    parent=None,
                    facts={
                        "share": round(doc.size / total_users, 4) if total_users else 0.0,
                        "top_categories": top if label else [],
                        "fallback_reason": label.fallback_reason if label else None,
                    },
                )
            )
            new_nodes.append(
                _Node(
                    node_id=doc.segment_id,
                    name=name,
                    description=description,
                    described=label is not None,
                    size=doc.size,
                    centroid=centroids[j],
                    categories=group_counts[j],
                    top_categories=[t["category"] for t in top],
                    top_items=doc.top_items,
                )
            )
        if parents:
            up = {child: rec.parent_id for rec in level_records for child in rec.children}
            parents = [
                replace(p, parent=up.get(p.parent_id)) if p.level == level - 1 else p
                for p in parents
            ]
        parents += level_records
        nodes = new_nodes
        next_id += n
    fallbacks = sum(p.fallback for p in parents)
    if fallbacks:
        notes.append(f"{fallbacks} parent name(s) are fallback labels (the LLM's were invalid)")
    params = {
        "levels": 1 + len(counts),
        "levels_requested": levels,
        "parents_per_level": counts,
        "rule": "round(k ** ((L - l) / L)) parents at level l of L",
        "seed": settings.seed,
        "model_id": llm.model_id,
        "min_segment_size": min_size,
    }
    store.save_hierarchy(run.id, params=params, notes=notes, parents=parents)
    record = store.hierarchy(run.id)
    assert record is not None
    return record


def _segment_node(segment: SegmentRecord, counts: np.ndarray) -> _Node:
    return _Node(
        node_id=segment.segment_id,
        name=segment.name,
        description=segment.description,
        described=segment.described,
        size=segment.size,
        centroid=segment.centroid.astype(np.float64),
        categories=counts,
        top_categories=[c["category"] for c in segment.facts.get("top_categories", [])],
        top_items=[i["title"] for i in segment.facts.get("top_items", [])],
    )


def _top_categories(
    counts: np.ndarray,
    population: np.ndarray,
    categories: Sequence[str],
    size: int,
    users: int,
    n: int = 5,
) -> list[dict[str, Any]]:
    """A parent's largest categories by share of its interactions, with lift over everyone."""
    total, everyone = counts.sum(), population.sum()
    if total <= 0 or everyone <= 0:
        return []
    rows = []
    for j in np.argsort(-counts, kind="stable")[:n]:
        if counts[j] <= 0:
            break
        share = counts[j] / total
        rows.append(
            {
                "category": categories[j],
                "share": round(float(share), 4),
                "lift": round(float(share / (population[j] / everyone)), 3),
            }
        )
    return rows


def make_hierarchy(
    settings: Settings,
    *,
    run_id: int | None = None,
    levels: int = 2,
    llm: LLM | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> HierarchyRecord:
    """`segrec hierarchy`: build and store the hierarchy of the active (or given) run."""
    if levels not in LEVELS:
        raise InputError(f"--levels {levels}: choose 2 or 3 (segments count as one level)")
    with Store.open(settings.workspace) as store:
        run = active_run(store, settings, run_id)
        return build_hierarchy(
            store,
            run,
            levels=levels,
            llm=llm if llm is not None else make_llm(settings),
            settings=settings,
            on_stage=on_stage,
        )
