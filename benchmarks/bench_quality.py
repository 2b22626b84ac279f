"""Quality per PROTOCOL.md on ml-latest-small and on a product-style log: writes the
ranking sections of benchmarks/quality.md (#13's targets, each marked met or not).

Runs, each recorded with its exact command:

1. ml-latest-small, all 610 users, tracks warm, cold, segments and chat, without the
   LLM-profile methods (rule-based simulated user);
2. a product-style log written by `segrec.synthetic.write_synthetic_log(product=True)`:
   10,000 users, 5,000 items, implicit feedback, long titles, no category column, planted
   segments and item chains; `segrec eval --no-llm` with the default tracks (the "eval that
   scales" figure: wall and CPU seconds, load average beside them), and with
   ``--product-chat`` the chat track;
3. with ``--sample N``: a seeded sample of N users with every method, LLM profiles included
   (slow on a CPU). Without it, the sample, ablation and text sections already in
   quality.md are kept as they are (they say their own date).

Run: python benchmarks/bench_quality.py [--sample 60] [--seed 0] [--reuse]
Each run's JSON is kept next to quality.md in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
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


def run(args: list[str], out: Path, *, reuse: bool = False) -> tuple[str, dict[str, Any]]:
    """Run `segrec eval` (or, with ``reuse``, read its last JSON) and note CPU seconds and
    the load average beside the wall time."""
    command = ["segrec", "eval", *args, "--json", str(out.relative_to(ROOT))]
    if not reuse:
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([*segrec(), *command[1:]], cwd=ROOT, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        data = json.loads(out.read_text())
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        data["bench"] = {
            "cpu_s": round(cpu, 1),
            "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2),
        }
        out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return " ".join(command), json.loads(out.read_text())


def ranking_table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| method | NDCG@10 | Recall@20 |", "|---|---|---|"]
    for name, m in rows.items():
        bold = "**" if name.startswith("segrec") and "profile" not in name else ""
        lines.append(f"| {bold}{name}{bold} | {m['ndcg@10']:.4f} | {m['recall@20']:.4f} |")
    return lines


BASELINES = ("MostPop", "ItemKNN", "EASE", "ALS", "Transitions")


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def verdicts(tracks: dict[str, Any]) -> list[str]:
    """#13's targets, each with its numbers: warm ≥ 1.05× EASE and ≥ the best peer; cold
    ≥ 1.2× the best baseline; chat after 1 answer > MostPop, after 3 ≥ 2× MostPop; segment
    lift ≥ 1.5 with ARI ≥ 0.8."""
    lines = []
    warm, cold, chat = tracks.get("warm"), tracks.get("cold"), tracks.get("chat")
    if warm:
        name = max(
            ("segrec", "segrec:per-segment"), key=lambda m: warm.get(m, {}).get("ndcg@10", 0)
        )
        ours = warm[name]["ndcg@10"]
        ease = warm["EASE"]["ndcg@10"]
        best = max((b for b in BASELINES if b in warm), key=lambda b: warm[b]["ndcg@10"])
        ok = ours >= 1.05 * ease and ours >= warm[best]["ndcg@10"]
        lines.append(
            f"- warm: {name} {ours:.4f} = {ours / ease:.3f}× EASE ({ease:.4f}); best peer "
            f"{best} {warm[best]['ndcg@10']:.4f} → {_met(ok)} (target ≥ 1.05× EASE and "
            "≥ the best peer)"
        )
    if cold:
        name = max(
            ("segrec", "segrec:per-segment"), key=lambda m: cold.get(m, {}).get("ndcg@10", 0)
        )
        ours = cold[name]["ndcg@10"]
        best = max((b for b in BASELINES if b in cold), key=lambda b: cold[b]["ndcg@10"])
        ratio = ours / cold[best]["ndcg@10"]
        lines.append(
            f"- cold (3 known): {name} {ours:.4f} = {ratio:.3f}× the best baseline {best} "
            f"{cold[best]['ndcg@10']:.4f} → {_met(ratio >= 1.2)} (target ≥ 1.2×)"
        )
    if chat:
        pop, one, three = (chat[m]["ndcg@10"] for m in ("MostPop", "segrec@1", "segrec@3"))
        lines.append(
            f"- chat after 1 answer: {one:.4f} vs MostPop {pop:.4f} → {_met(one > pop)} "
            "(target: above MostPop)"
        )
        lines.append(
            f"- chat after 3 answers: {three:.4f} = {three / pop:.2f}× MostPop → "
            f"{_met(three >= 2 * pop)} (target ≥ 2×)"
        )
    for represent in ("items", "collab"):
        segments = tracks.get("segments", {}).get(represent)
        if not segments:
            continue
        lift, ari = segments["lift"], segments["stability_ari"]
        lines.append(
            f"- segments ({represent}): lift {lift} with ARI {ari} → "
            f"{_met(lift >= 1.5 and ari >= 0.8)} (target: lift ≥ 1.5 with ARI ≥ 0.8)"
        )
    return lines


RESULTS = Path(__file__).resolve().parent / "results"
ORACLE_BLENDS = (
    ("oracle blend of the fair signals (weights tuned on test)", "segrec's signals"),
    ("oracle blend of all of them (weights tuned on test)", "with hindsight (the later events)"),
)


def ceilings(log: str) -> list[str]:
    """Where the recorded oracle runs bound a target from above: the cold track's
    (`cold_ceiling.py --log ml|product`) and, on ml-latest-small, the segment lift's
    (`segment_lift_ceiling.py`). Nothing when a file is missing."""
    lines = []
    name = "cold-ceiling.json" if log == "ml" else "cold-ceiling-product.json"
    if (RESULTS / name).is_file():
        rows = json.loads((RESULTS / name).read_text())
        best = max(rows["pop"]["ndcg@10"], rows["itemknn"]["ndcg@10"])
        bounds = ", ".join(
            f"{label} {rows[row]['ndcg@10'] / best:.3f}×" for row, label in ORACLE_BLENDS
        )
        lines.append(
            f"- ceiling of the cold target, weights tuned on the test items themselves "
            f"(`benchmarks/results/{name.replace('.json', '.md')}`): {bounds} the best baseline"
        )
    if log == "ml" and (RESULTS / "segment-lift-ceiling.json").is_file():
        lift = json.loads((RESULTS / "segment-lift-ceiling.json").read_text())["lift"]
        leaky = [v for k, v in lift.items() if k.startswith("leaky: the metric itself")]
        honest = lift["train only: the same ascent on the validation items → lift on test"]
        lines.append(
            f"- ceiling of the segment target: partitions searched with the test items "
            f"themselves reach a lift of {min(leaky):.2f}–{max(leaky):.2f}; the same search "
            f"on validation items gives {honest:.2f} on test "
            "(`benchmarks/results/segment-lift-ceiling.md`)"
        )
    return lines


def dataset_section(
    title: str, runs: list[tuple[str, dict[str, Any]]], log: str = "ml"
) -> list[str]:
    """One dataset: its commands (wall, CPU, load), targets with their recorded ceilings,
    and every track's table."""
    tracks: dict[str, Any] = {}
    lines = [f"## {title}", ""]
    for command, data in runs:
        bench = data.get("bench", {})
        lines.append(
            f"`{command}` — {data['wall_s']:.0f} s wall, {bench.get('cpu_s', '?')} s CPU, "
            f"load average {bench.get('load_before', '?')} before / "
            f"{bench.get('load_after', '?')} after (2 cores shared with other jobs)"
        )
        lines.append("")
        tracks |= data["tracks"]
        spec = data.get("ranker", spec_of(runs))
    lines += ["Targets (#13):", *verdicts(tracks), *ceilings(log), ""]
    names = {
        "warm": "Warm track",
        "cold": "Cold track (3 known interactions)",
        "chat": "Chat track (simulated new users, rule-based)",
    }
    for track, name in names.items():
        if track in tracks:
            lines += [f"### {name}", *ranking_table(tracks[track]), ""]
    if "segments" in tracks:
        lines += [
            "### Segments (k = 5)",
            "",
            "| represent | lift | stability (ARI, 5 seeds) | silhouette | sizes |",
            "|---|---|---|---|---|",
        ]
        for name, m in tracks["segments"].items():
            lines.append(
                f"| {name} | {m['lift']} | {m['stability_ari']} | {m['silhouette']} | "
                f"{m['sizes']} |"
            )
        lines.append("")
    lines += tuned_ranker(spec, runs[0][1].get("peers", {}))
    return lines


def spec_of(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return next(data["ranker"] for _, data in runs if "ranker" in data)


def tuned_ranker(spec: dict[str, Any], peers: dict[str, Any]) -> list[str]:
    validation = spec["validation"]
    lines = [
        "### The tuned ranker and peers",
        "",
        f"- weights, long histories: `{json.dumps(spec['weights']['long'])}`",
        f"- weights, short histories (≤ {spec['short_history']} items): "
        f"`{json.dumps(spec['weights']['short'])}`",
        f"- weights, chat users (2 or more liked items): "
        f"`{json.dumps(spec['weights'].get('chat'))}`",
        f"- weights, chat users who told less (a category, one item): "
        f"`{json.dumps(spec['weights'].get('chat_start'))}`",
        f"- EASE λ {spec['ease_lambda']}; validation NDCG@10 per λ "
        f"`{json.dumps(validation.get('ease_lambda'))}`",
        f"- validation (long): `{json.dumps(validation.get('long'))}`",
        f"- validation (short): `{json.dumps(validation.get('short'))}`",
        f"- validation (chat): `{json.dumps(validation.get('chat'))}`",
        f"- validation (chat_start): `{json.dumps(validation.get('chat_start'))}`",
    ]
    if peers:
        lines.append(
            f"- ALS tuned on validation: `{json.dumps(peers['als'])}` (NDCG@10 per "
            f"factors/regularisation/alpha: `{json.dumps(peers['validation']['als_ndcg@10'])}`)"
        )
    for group in ("long", "short"):
        entries = validation.get(f"segments_{group}")
        if not entries:
            continue
        lines += [
            "",
            f"Per-segment strategies, {group} histories (validation):",
            "",
            "| segment | users | strategy | global NDCG@10 | own | gain |",
            "|---|---|---|---|---|---|",
        ]
        for label, e in entries.items():
            figures = " | ".join(
                str(e.get(k, "—")) for k in ("global_ndcg@10", "segment_ndcg@10", "gain")
            )
            lines.append(f"| {label} | {e['users']} | {e['strategy']} | {figures} |")
    return [*lines, ""]


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
    parser.add_argument("--sample", type=int, default=0, help="also rerun the LLM sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sample-tracks",
        default="warm,cold,segments,grounding,chat",
        help="tracks of the sample run (chat with the LLM user takes ~10 min on 2 cores)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="rewrite quality.md from the recorded JSON only"
    )
    parser.add_argument(
        "--product-chat",
        action="store_true",
        help="also run the chat track on the product log (10,000 simulated chats: slow)",
    )
    parser.add_argument(
        "--only",
        choices=("movielens", "product"),
        help="rerun one dataset; the other's figures come from its recorded JSON",
    )
    args = parser.parse_args()
    ratings = os.path.relpath(DATA / "ratings.csv", ROOT)
    movies = os.path.relpath(DATA / "movies.csv", ROOT)
    workspace = os.path.relpath(WORKSPACE, ROOT)
    movielens = run(
        [
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
        ],
        RESULTS / "quality-all-users.json",
        reuse=args.reuse or args.only == "product",
    )
    product = WORKSPACE / "product-10k"
    reuse_product = args.reuse or args.only == "movielens"
    if not reuse_product:
        from segrec.synthetic import write_synthetic_log

        write_synthetic_log(product, **PRODUCT)
    log = os.path.relpath(product / "log.csv", ROOT)
    catalogue = os.path.relpath(product / "items.csv", ROOT)
    product_runs = [
        run(
            [log, "--items", catalogue, "--no-llm", "-w", workspace],
            RESULTS / "quality-product.json",
            reuse=reuse_product,
        ),
    ]
    if args.product_chat:
        product_runs.append(
            run(
                [log, "--items", catalogue, "--tracks", "chat", "--no-llm", "-w", workspace],
                RESULTS / "quality-product-chat.json",
                reuse=reuse_product,
            )
        )
    out = ROOT / "benchmarks" / "quality.md"
    # The sample, ablation and text sections follow the ranking sections; keep them.
    _, _, rest = out.read_text().partition("\n## Sample of")
    rest = "## Sample of" + rest if rest else ""
    if args.sample:
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
        _, marker, text_track = rest.partition("## Text track")
        rest = "\n".join(sample_section(sample_cmd, sample)) + "\n" + marker + text_track
    settings = ", ".join(f"{k}={v}" for k, v in PRODUCT.items())
    lines = [
        "# Recommendation and segment quality (PROTOCOL.md)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores, possibly shared with "
        "other jobs (load averages beside each command)",
        "- reproduce: `python benchmarks/bench_quality.py` (runs the commands below; "
        "`--reuse` rewrites this file from the recorded JSON)",
        "- methods: MostPop, ItemKNN and EASE (PROTOCOL baselines), ALS (`implicit`, factors/"
        "regularisation/alpha tuned on validation) and Transitions (item-to-item next-item "
        "model over the chronological train part) as peers; `segrec` (global weights) and "
        "`segrec:per-segment` (weights per segment where they beat the global ones on "
        "validation)",
        "",
        *dataset_section(f"ml-latest-small, all {movielens[1]['users']} users", [movielens]),
        *dataset_section(
            "Product-style log: 10,000 users, 5,000 items, implicit feedback "
            f"(`write_synthetic_log({settings})`); the same command timed alone at lower load: "
            "`benchmarks/results/eval-scale.md` (293 s wall)",
            product_runs,
            log="product",
        ),
    ]
    text = "\n".join(lines) + "\n" + rest
    out.write_text(text)
    print(text)


PRODUCT: dict[str, Any] = {
    "n_users": 10_000,
    "n_events": 300_000,
    "n_items": 5_000,
    "seed": 0,
    "product": True,
}


def sample_section(command: str, sample: dict[str, Any]) -> list[str]:
    """The LLM sample run: every method on the same seeded users, and the ablation."""
    lines = [
        f"## Sample of {sample['users']} users (seed {sample['seed']}), every method",
        "",
        f"`{command}` — {sample['wall_s']:.0f} s (LLM profiles cached after the first run)",
        "",
    ]
    for track in ("warm", "cold", "chat"):
        if track in sample["tracks"]:
            lines += [
                f"### {track.capitalize()} track",
                *ranking_table(sample["tracks"][track]),
                "",
            ]
    lines += ["## Ablation: what the LLM profile adds", "", *ablation(sample["tracks"]), ""]
    return lines


if __name__ == "__main__":
    main()
