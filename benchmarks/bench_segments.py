"""Segment quality on ml-latest-small (PROTOCOL.md track 4), by user representation.

On the same seeded sample of users, with profiles written from their *train* history only:
- ``llm-profile``: embedding of the LLM profile (bundled SmolLM2-135M, grounded fields);
- ``deterministic``: embedding of the deterministic profile built from the history;
- ``items``: mean embedding of the user's 30 most recent train items (segrec's default);
- ``mix``: normalised 50/50 mix of ``llm-profile`` and ``items``.

For each: KMeans k=5; stability = mean adjusted Rand index between 5 seeds; silhouette
(cosine); lift = NDCG@10 of "most popular train items within the user's segment" divided
by the same for plain MostPop, both counted over the same sampled users, scored on test.

Usage: python benchmarks/bench_segments.py [--users 80] [--seed 0] [--k 5]
LLM profiles are cached in a workspace under the system temp dir, so reruns are cheap.
Writes benchmarks/results/segments.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"
sys.path.insert(0, str(ROOT))

from segrec import pipeline  # noqa: E402
from segrec.cluster import cluster_vectors, seed_ari  # noqa: E402
from segrec.config import Settings  # noqa: E402
from segrec.embed import SentenceTransformerEncoder, embed_texts  # noqa: E402
from segrec.evaluate import evaluate_scores, protocol_split, subsample  # noqa: E402
from segrec.llm.llamacpp import LlamaCppLLM  # noqa: E402
from segrec.profile import (  # noqa: E402
    Profile,
    build_request,
    fallback_profile,
    user_events,
    value_scales,
)
from segrec.segments import Histories, user_vectors  # noqa: E402
from segrec.store import Store  # noqa: E402
from segrec.templates import load_prompt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    ratings = pd.read_csv(DATA / "ratings.csv", dtype={"userId": str, "movieId": str})
    interactions = pd.DataFrame(
        {
            "user_id": ratings["userId"],
            "item_id": ratings["movieId"],
            "behavior": "rating",
            "value": ratings["rating"].astype(float),
            "timestamp": ratings["timestamp"].astype("Int64"),
            "line": np.arange(2, len(ratings) + 2),
        }
    )
    split = subsample(protocol_split(interactions), args.users, seed=args.seed)
    users = split.users
    train = split.train_frames[split.train_frames["user_id"].isin(set(users))]

    workspace = Path(tempfile.gettempdir()) / f"segrec-bench-segments-{args.users}-{args.seed}"
    settings = Settings(workspace=workspace, domain="movie", threads=args.threads)
    train_csv = workspace.parent / f"{workspace.name}-train.csv"
    workspace.parent.mkdir(parents=True, exist_ok=True)
    train.rename(columns={"user_id": "userId", "item_id": "movieId", "value": "rating"})[
        ["userId", "movieId", "rating", "timestamp"]
    ].to_csv(train_csv, index=False)
    pipeline.ingest(settings, train_csv, DATA / "movies.csv")
    start = time.perf_counter()
    stats = pipeline.run_profiles(settings, users, llm=LlamaCppLLM(n_threads=args.threads))
    profile_s = time.perf_counter() - start

    encoder = SentenceTransformerEncoder()
    with Store.open(workspace) as store:
        records = {r.user_id: r for r in store.profiles()}
        items = store.items_frame()
        stored = store.interactions_frame(users)
        llm_texts = {u: Profile.model_validate(records[u].profile).embedding_text() for u in users}
        scales = value_scales(stored)
        events = user_events(stored, items, scales)
        prompt = load_prompt("profile")
        det_texts = {}
        for u in users:
            request = build_request(
                u,
                events[u],
                prompt=prompt,
                model_id="-",
                params=pipeline.generation_params(settings),
                max_items=settings.max_history_items,
                max_tokens=settings.max_history_tokens,
            )
            det_texts[u] = fallback_profile(request).embedding_text()
        seen_items = items[items["item_id"].isin(set(stored["item_id"]))]
        item_vecs = embed_texts(list(seen_items["text"]), encoder, cache=store)
        common = {
            "histories": Histories.from_frame(stored, users, list(seen_items["item_id"])),
            "item_vectors": item_vecs,
            "encoder": encoder,
            "cache": store,
        }
        llm_vec = user_vectors("profile", users, profile_texts=llm_texts, **common)
        reps = {
            "llm-profile": llm_vec,
            "deterministic": user_vectors("profile", users, profile_texts=det_texts, **common),
            "items": user_vectors("items", users, profile_texts=llm_texts, **common),
            "mix": user_vectors("mix", users, profile_texts=llm_texts, **common),
        }
    fallback_rate = sum(records[u].fallback for u in users) / len(users)

    X_train = sp.csr_matrix(split.train, dtype=np.float32)
    pop = np.asarray(X_train.sum(axis=0)).ravel()
    mostpop = evaluate_scores(np.tile(pop, (len(users), 1)), split)["ndcg@10"]
    rows = []
    for name, X in reps.items():
        clustering = cluster_vectors(X, k=args.k, seed=args.seed)
        ari = seed_ari(X, k=args.k, seeds=range(args.seed, args.seed + 5))
        counts = np.stack(
            [
                np.asarray(X_train[clustering.labels == j].sum(axis=0)).ravel()
                for j in range(clustering.k)
            ]
        )
        seg_ndcg = evaluate_scores(counts[clustering.labels], split)["ndcg@10"]
        rows.append(
            (
                name,
                seg_ndcg / mostpop,
                seg_ndcg,
                ari,
                clustering.silhouette,
                sorted(np.bincount(clustering.labels).tolist(), reverse=True),
            )
        )

    lines = [
        "# Segment quality (PROTOCOL.md track 4)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores",
        f"- command: `python benchmarks/bench_segments.py --users {args.users} --seed "
        f"{args.seed} --k {args.k}`",
        f"- users: {len(users)} of ml-latest-small, sampled with seed {args.seed} (profiles from "
        f"train only); LLM: bundled SmolLM2-135M ({stats.profiled} new, {stats.cached} cached, "
        f"{stats.fallback} fallback this run, {profile_s:.0f} s; fallback rate "
        f"{fallback_rate:.0%})",
        f"- MostPop NDCG@10 over the same users and counts: {mostpop:.4f}",
        "",
        "| representation | lift | segment-pop NDCG@10 | stability (ARI, 5 seeds) | "
        "silhouette (cosine) | sizes |",
        "|---|---|---|---|---|---|",
    ]
    for name, lift, ndcg, ari, silhouette, sizes in rows:
        lines.append(
            f"| {name} | {lift:.3f} | {ndcg:.4f} | {ari:.3f} | {silhouette:.3f} | {sizes} |"
        )
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "segments.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
