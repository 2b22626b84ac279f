"""Profile-stage benchmark on a seeded sample of ml-latest-small users.

Measures, in one run on one machine:
- the local backend's users/s and completion tokens/s, with fallback and hallucination rates;
- segrec's wall time over raw ``llama_cpp`` calls on exactly the same prompts, schemas and
  sampling parameters (overhead ratio; target ≤ 1.05);
- the OpenAI backend against a real ``llama_cpp.server`` at concurrency 1 vs 4 (speed-up).

Usage: python benchmarks/bench_profile.py [--users 24] [--seed 0] [--no-server]
Writes benchmarks/results/profile.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"
sys.path.insert(0, str(ROOT))

from segrec import pipeline  # noqa: E402
from segrec.config import Settings  # noqa: E402
from segrec.llm.base import Completion  # noqa: E402
from segrec.llm.llamacpp import LlamaCppLLM  # noqa: E402
from segrec.llm.openai import OpenAILLM  # noqa: E402
from segrec.store import Store  # noqa: E402
from segrec.testing import llama_server  # noqa: E402


class Recorder:
    """Passes calls through to a backend and records what was asked."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.model_id, self.concurrency = inner, inner.model_id, inner.concurrency
        self.calls: list[dict[str, Any]] = []

    def complete(self, messages: Any, *, params: Any, schema: Any = None) -> Completion:
        self.calls.append({"messages": list(messages), "params": params, "schema": schema})
        return self.inner.complete(messages, params=params, schema=schema)


def fresh_workspace(root: Path, name: str, users: list[str]) -> Settings:
    settings = Settings(workspace=root / name, domain="movie")
    pipeline.ingest(settings, DATA / "ratings.csv", DATA / "movies.csv")
    return settings


def grounding_rates(settings: Settings, users: list[str]) -> dict[str, float]:
    with Store.open(settings.workspace) as store:
        records = [store.profile(u) for u in users]
    done = [r for r in records if r is not None]
    llm_written = [r for r in done if not r.fallback]
    return {
        "fallback_rate": sum(r.fallback for r in done) / len(done),
        "hallucinated_profiles": sum(bool(r.removed) for r in llm_written)
        / max(1, len(llm_written)),
        "removed_claims_per_profile": sum(len(r.removed) for r in llm_written)
        / max(1, len(llm_written)),
    }


def raw_llama_replay(llama: Any, calls: list[dict[str, Any]]) -> float:
    """The same completions with llama_cpp alone: grammar from the schema, then the call."""
    from llama_cpp import LlamaGrammar

    start = time.perf_counter()
    for call in calls:
        params = call["params"]
        grammar = LlamaGrammar.from_json_schema(json.dumps(call["schema"]), verbose=False)
        llama.create_chat_completion(
            messages=call["messages"],
            grammar=grammar,
            temperature=params.temperature,
            repeat_penalty=params.repeat_penalty,
            max_tokens=params.max_tokens,
            seed=params.seed,
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        first = fresh_workspace(root, "a", [])
        with Store.open(first.workspace) as store:
            everyone = store.user_ids()
        users = sorted(random.Random(args.seed).sample(everyone, args.users), key=int)

        llm = LlamaCppLLM(n_threads=args.threads)
        warm = Recorder(llm)  # a first run warms the model and records the prompts
        pipeline.run_profiles(first, users, llm=warm)

        # Alternate the two paths and keep each one's best round: a shared machine's noise
        # then inflates both alike instead of whichever ran while another job was busy.
        segrec_times, raw_times = [], []
        for round_ in range(args.rounds):
            second = fresh_workspace(root, f"b{round_}", users)
            timed = Recorder(llm)
            start = time.perf_counter()
            stats = pipeline.run_profiles(second, users, llm=timed)
            segrec_times.append(time.perf_counter() - start)
            raw_times.append(raw_llama_replay(llm._llama, timed.calls))
        segrec_s, raw_s = min(segrec_times), min(raw_times)
        rates = grounding_rates(second, users)

        server_rows = []
        if not args.no_server:
            with llama_server(threads=args.threads) as url:
                for concurrency in (1, 4):
                    settings = fresh_workspace(root, f"server{concurrency}", users)
                    backend = OpenAILLM(
                        "smollm2", base_url=url, concurrency=concurrency, timeout_s=300
                    )
                    t0 = time.perf_counter()
                    s = pipeline.run_profiles(settings, users, llm=backend)
                    server_rows.append((concurrency, time.perf_counter() - t0, s))

    lines = [
        "# Profile-stage benchmark",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        f"- data: ml-latest-small, {args.users} users sampled with seed {args.seed}; "
        f"bundled SmolLM2-135M-Instruct Q4_1, {args.threads} threads",
        f"- command: `python benchmarks/bench_profile.py --users {args.users} --seed {args.seed}`",
        "",
        "## Local backend (llama.cpp)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| users | {stats.users} |",
        f"| LLM calls (incl. validation retries) | {len(timed.calls)} |",
        f"| users/s | {stats.users / segrec_s:.3f} |",
        f"| completion tokens/s | {stats.completion_tokens / segrec_s:.1f} |",
        f"| prompt tokens per user | {stats.prompt_tokens / stats.users:.0f} |",
        f"| segrec wall time (best of {args.rounds}: "
        f"{', '.join(f'{t:.1f}' for t in segrec_times)} s) | {segrec_s:.1f} s |",
        f"| raw llama_cpp, same prompts/schemas/params (best of "
        f"{', '.join(f'{t:.1f}' for t in raw_times)} s) | {raw_s:.1f} s |",
        f"| **overhead ratio** (target ≤ 1.05) | **{segrec_s / raw_s:.3f}** |",
        f"| fallback rate | {rates['fallback_rate']:.1%} |",
        f"| LLM profiles with ≥1 ungrounded claim removed | {rates['hallucinated_profiles']:.1%} |",
        f"| ungrounded claims removed per LLM profile | "
        f"{rates['removed_claims_per_profile']:.2f} |",
    ]
    if server_rows:
        base = server_rows[0][1]
        lines += [
            "",
            "## OpenAI backend against `python -m llama_cpp.server` (same users, same model)",
            "",
            "llama_cpp.server answers one request at a time, so more requests in flight can",
            "only overlap network and JSON work; the speed-up measures that, not the model.",
            "",
            "| concurrency | wall time | users/s | speed-up vs 1 | fallback | failed |",
            "|---|---|---|---|---|---|",
        ]
        for concurrency, seconds, s in server_rows:
            lines.append(
                f"| {concurrency} | {seconds:.1f} s | {s.users / seconds:.3f} | "
                f"{base / seconds:.2f}× | {s.fallback} | {s.failed} |"
            )
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "profile.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
