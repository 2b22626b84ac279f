"""Quality on ml-latest-small per PROTOCOL.md: writes benchmarks/quality.md.

Two `segrec eval` runs, both recorded with their exact commands:

1. all 610 users, tracks warm, cold, segments and chat, without the LLM-profile methods
   and with the rule-based simulated user (the targets: the default ranker ≥ EASE on warm;
   > MostPop, ItemKNN and EASE on cold; > MostPop after 3 chat answers);
2. a seeded sample of users with every method, LLM profiles included (the ablation: what
   the LLM profile adds over the deterministic profile), the grounding track, and the chat
   track with the LLM-played simulated user too.

Run: python benchmarks/bench_quality.py [--sample 60] [--seed 0]
     (profiles are cached in the evaluation workspace, so a rerun is fast)
Each run's JSON is kept next to quality.md in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"
RESULTS = ROOT / "benchmarks" / "results"
WORKSPACE = Path(os.environ.get("SEGREC_EVAL_WORKSPACE", ROOT / ".segrec-eval"))


def segrec() -> list[str]:
    exe = shutil.which("segrec", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "segrec.cli"]


def run(args: list[str], out: Path) -> tuple[str, dict[str, Any]]:
    command = ["segrec", "eval", *args, "--json", str(out.relative_to(ROOT))]
    subprocess.run([*segrec(), *command[1:]], cwd=ROOT, check=True)
    return " ".join(command), json.loads(out.read_text())


def ranking_table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| method | NDCG@10 | Recall@20 |", "|---|---|---|"]
    for name, m in rows.items():
        bold = "**" if name == "segrec" else ""
        lines.append(f"| {bold}{name}{bold} | {m['ndcg@10']:.4f} | {m['recall@20']:.4f} |")
    return lines


def verdicts(tracks: dict[str, Any]) -> list[str]:
    warm, cold, chat = tracks["warm"], tracks["cold"], tracks.get("chat")
    ours = warm["segrec"]["ndcg@10"]
    lines = [
        f"- warm: segrec {ours:.4f} vs EASE {warm['EASE']['ndcg@10']:.4f} → "
        + ("**met**" if ours >= warm["EASE"]["ndcg@10"] else "**missed**")
        + " (target: ≥ EASE)"
    ]
    ours = cold["segrec"]["ndcg@10"]
    best = max(("MostPop", "ItemKNN", "EASE"), key=lambda b: cold[b]["ndcg@10"])
    lines.append(
        f"- cold: segrec {ours:.4f} vs best baseline {best} {cold[best]['ndcg@10']:.4f} → "
        + ("**met**" if ours > cold[best]["ndcg@10"] else "**missed**")
        + " (target: beat MostPop, ItemKNN and EASE)"
    )
    if chat:
        ours, pop = chat["segrec@3"]["ndcg@10"], chat["MostPop"]["ndcg@10"]
        lines.append(
            f"- chat: segrec after 3 answers {ours:.4f} vs MostPop {pop:.4f} → "
            + ("**met**" if ours > pop else "**missed**")
            + " (target: beat MostPop after 3 questions; rule-based simulated user)"
        )
    return lines


def ablation(tracks: dict[str, Any]) -> list[str]:
    """LLM profile against the deterministic profile from the same history, same users."""
    lines = [
        "Same users, same history; the deterministic profile is what segrec writes without an "
        "LLM (liked/disliked categories and favourite titles from the ratings).",
        "",
        "| comparison | LLM profile | deterministic profile | difference |",
        "|---|---|---|---|",
    ]
    for track in ("warm", "cold"):
        rows = tracks.get(track, {})
        for method in ("cosine", "segrec"):
            llm, det = (
                rows.get(f"{method}:llm-profile"),
                rows.get(f"{method}:deterministic-profile"),
            )
            if llm and det:
                diff = llm["ndcg@10"] - det["ndcg@10"]
                lines.append(
                    f"| {track}: {method} NDCG@10 | {llm['ndcg@10']:.4f} | {det['ndcg@10']:.4f} "
                    f"| {diff:+.4f} |"
                )
    segments = tracks.get("segments", {})
    if "llm-profile" in segments and "deterministic-profile" in segments:
        for key in ("lift", "stability_ari", "silhouette"):
            llm, det = segments["llm-profile"][key], segments["deterministic-profile"][key]
            lines.append(f"| segments: {key} | {llm} | {det} | {llm - det:+.4f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sample-tracks",
        default="warm,cold,segments,grounding,chat",
        help="tracks of the sample run (chat with the LLM user takes ~10 min on 2 cores)",
    )
    parser.add_argument(
        "--reuse-all-users",
        action="store_true",
        help="take the all-users run from results/quality-all-users.json instead of rerunning",
    )
    args = parser.parse_args()
    ratings = os.path.relpath(DATA / "ratings.csv", ROOT)
    movies = os.path.relpath(DATA / "movies.csv", ROOT)
    workspace = os.path.relpath(WORKSPACE, ROOT)
    full_args = [
        ratings,
        "--items",
        movies,
        "--tracks",
        "warm,cold,segments,chat",
        "--no-llm",
        "--domain",
        "movie",
        "-w",
        workspace,
    ]
    if args.reuse_all_users:
        full_out = RESULTS / "quality-all-users.json"
        full_cmd = " ".join(
            ["segrec", "eval", *full_args, "--json", str(full_out.relative_to(ROOT))]
        )
        full = json.loads(full_out.read_text())
    else:
        full_cmd, full = run(full_args, RESULTS / "quality-all-users.json")
    sample_cmd, sample = run(
        [
            ratings,
            "--items",
            movies,
            "--users",
            str(args.sample),
            "--seed",
            str(args.seed),
            "--tracks",
            args.sample_tracks,
            "--domain",
            "movie",
            "-w",
            workspace,
        ],
        RESULTS / "quality-sample.json",
    )
    lines = [
        "# Recommendation and segment quality (PROTOCOL.md)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores",
        "- reproduce: `python benchmarks/bench_quality.py` (runs the two commands below)",
        "",
        f"## All {full['users']} users, no LLM methods",
        "",
        f"`{full_cmd}` — {full['wall_s']:.0f} s",
        "",
        "Targets:",
        *verdicts(full["tracks"]),
        "",
        "### Warm track",
        *ranking_table(full["tracks"]["warm"]),
        "",
        "### Cold track (3 known interactions)",
        *ranking_table(full["tracks"]["cold"]),
        "",
        "### Chat track (simulated new users, rule-based)",
        *ranking_table(full["tracks"]["chat"]),
        "",
        "### Segments (k = 5, `--represent items`)",
        "",
        "| represent | lift | stability (ARI, 5 seeds) | silhouette | sizes |",
        "|---|---|---|---|---|",
    ]
    for name, m in full["tracks"]["segments"].items():
        lines.append(
            f"| {name} | {m['lift']} | {m['stability_ari']} | {m['silhouette']} | {m['sizes']} |"
        )
    spec = full["ranker"]
    lines += [
        "",
        "### The tuned ranker",
        "",
        f"- weights for long histories: `{json.dumps(spec['weights']['long'])}`",
        f"- weights for short histories (≤ {spec['short_history']} items): "
        f"`{json.dumps(spec['weights']['short'])}`",
        f"- EASE λ: {spec['ease_lambda']}; validation NDCG@10 per λ: "
        f"`{json.dumps(spec['validation'].get('ease_lambda'))}`",
        f"- validation (long): `{json.dumps(spec['validation'].get('long'))}`",
        f"- validation (short): `{json.dumps(spec['validation'].get('short'))}`",
        f"- weights for chat users: `{json.dumps(spec['weights'].get('chat'))}`; validation: "
        f"`{json.dumps(spec['validation'].get('chat'))}`",
        "",
        f"## Sample of {sample['users']} users (seed {sample['seed']}), every method",
        "",
        f"`{sample_cmd}` — {sample['wall_s']:.0f} s (LLM profiles cached after the first run)",
        "",
        "### Warm track",
        *ranking_table(sample["tracks"]["warm"]),
        "",
        "### Cold track",
        *ranking_table(sample["tracks"]["cold"]),
        "",
        *(
            [
                "### Chat track (rule-based and LLM-played simulated users)",
                *ranking_table(sample["tracks"]["chat"]),
            ]
            if "chat" in sample["tracks"]
            else ["(chat track not in this run)"]
        ),
        "",
        "### Segments",
        "",
        "| represent | lift | stability (ARI, 5 seeds) | silhouette | sizes |",
        "|---|---|---|---|---|",
    ]
    for name, m in sample["tracks"]["segments"].items():
        lines.append(
            f"| {name} | {m['lift']} | {m['stability_ari']} | {m['silhouette']} | {m['sizes']} |"
        )
    grounding = sample["tracks"].get("grounding", {})
    if grounding:
        lines += [
            "",
            "### Grounding",
            "",
            f"- LLM profiles: {grounding['profiles']}",
            f"- raw model output naming something absent from the history: "
            f"{grounding['hallucination_rate_raw']:.1%} of profiles "
            f"({grounding['claims_removed_per_profile']:.2f} claims removed per profile)",
            f"- stored profiles doing so after grounding: "
            f"{grounding['hallucination_rate_stored']:.1%}",
            f"- fell back to the deterministic profile: {grounding['fallback_rate']:.1%}",
        ]
    lines += ["", "## Ablation: what the LLM profile adds", "", *ablation(sample["tracks"])]
    out = ROOT / "benchmarks" / "quality.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
