"""`segrec eval`'s ranking tracks end to end on a planted product-style log, with the real
encoder: peers in the same run, cold start and chat above popularity, per-segment rows and
strategies, progress per track, and --tracks subsets that skip the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from segrec.config import Settings
from segrec.quality import run_eval
from segrec.synthetic import write_synthetic_log


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Planted segments and item chains, implicit feedback, no category column."""
    return write_synthetic_log(
        tmp_path_factory.mktemp("product"),
        n_users=400,
        n_events=12_000,
        n_items=400,
        n_segments=4,
        product=True,
        seed=0,
    )


@pytest.mark.slow
def test_eval_on_a_planted_product_log(product, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    progress: dict[str, tuple[int, int]] = {}
    result = run_eval(
        Settings(workspace=tmp_path / "ws"),
        product.log,
        product.items,
        tracks=["warm", "cold", "chat"],
        k=4,
        use_llm=False,
        on_progress=lambda track, done, total: progress.__setitem__(track, (done, total)),
    )
    warm, cold, chat = (result["tracks"][t] for t in ("warm", "cold", "chat"))
    for table in (warm, cold):
        assert {"MostPop", "ItemKNN", "EASE", "ALS", "Transitions", "segrec"} <= set(table)
        assert "segrec:per-segment" in table
    # Order carries signal in this log: the transition peer beats popularity by far.
    assert warm["Transitions"]["ndcg@10"] > 2 * warm["MostPop"]["ndcg@10"]
    # Cold start (3 known items) and the first chat answer move the ranking above popularity.
    assert cold["segrec"]["ndcg@10"] > 1.2 * cold["MostPop"]["ndcg@10"]
    assert chat["segrec@1"]["ndcg@10"] > chat["MostPop"]["ndcg@10"]
    assert chat["segrec@3"]["ndcg@10"] > 2 * chat["MostPop"]["ndcg@10"]
    # The blend is at least as good as EASE on warm users (it starts from the best signal).
    assert warm["segrec"]["ndcg@10"] >= 0.95 * warm["EASE"]["ndcg@10"]
    assert set(result["peers"]["als"]) == {"factors", "regularization", "alpha"}
    strategies = result["ranker"]["validation"]["segments_long"]
    assert strategies and all("strategy" in s for s in strategies.values())
    users = result["users"]
    assert progress["warm"] == (users, users) and progress["cold"] == (users, users)
    assert progress["chat"][0] == progress["chat"][1] == users
    assert "segments" not in result["tracks"]


@pytest.mark.slow
def test_tracks_subset_skips_tuning_it_does_not_need(product, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stages: list[str] = []
    result = run_eval(
        Settings(workspace=tmp_path / "ws"),
        product.log,
        product.items,
        tracks=["segments"],
        k=4,
        use_llm=False,
        on_stage=stages.append,
    )
    assert set(result["tracks"]) == {"segments"}
    assert "ranker" not in result and "peers" not in result
    assert not any("tuning" in s for s in stages)
    # Planted segments are what the items representation recovers.
    assert result["tracks"]["segments"]["items"]["lift"] > 1.5
    # ... and the collab representation from behaviour alone, with seeds that agree.
    collab = result["tracks"]["segments"]["collab"]
    assert collab["lift"] > 1.5 and collab["stability_ari"] >= 0.8
