"""The CPU-heavy stages at 1M rows: near-duplicate search and GX validation, each in one process.

    .venv/bin/python bench/scale_1m.py --rows 1000000 --out /tmp/scale_1m.md
    .venv/bin/python bench/scale_1m.py --rows 100000 --workers 2   # + signatures in a pool

Each stage runs in a child process of its own, so that its peak RSS (ru_maxrss) is its own. The
rows are made by the fake teacher's generators (tests/fake_teacher.py), seeded, so a run is
repeatable; the time to make them is reported apart from the stage's.

- `dedup`: what expansion does per generated row (tasks/expand.py): the MinHash signature of
  context + question, the LSH look-up of the closest row indexed so far, and indexing the row
  unless it is a near-duplicate (tasks/dedup.py, the recipe's default threshold). The time is
  split into signatures (independent per row: the part a process pool can take) and the index
  (sequential: each row is compared with those before it).
- `dedup-pool`: the same with the signatures computed by `--workers` processes
  (concurrent.futures), the index kept in the parent: how a process-pool split looks.
- `validate`: the GX suites (expectations/runner.py `validate_frame`) over the frame that the
  flow sends its validation worker (expectations/runner.py `suite_frame`: list columns as
  stand-ins), 2% of the rows rejected by the answer filters.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # distillery (the repo's symlink), fake_teacher

STAGES = ("dedup", "validate")
CHUNK = 20_000  # rows a pool worker signs at once


def make_inputs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` (user context, question) pairs from the fake teacher's generators."""
    from fake_teacher import gen_question, gen_user_context

    r = random.Random(seed)
    contexts = [gen_user_context(r) for _ in range(n)]
    questions = [gen_question(r) for _ in range(n)]
    return contexts, questions


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sign(args: tuple[float, list[str]]) -> Any:
    from distillery.tasks.dedup import NearDuplicateIndex

    threshold, texts = args
    index = NearDuplicateIndex(threshold)
    import numpy as np

    return np.stack([index.minhash(t) for t in texts])


def stage_dedup(n: int, workers: int) -> dict[str, Any]:
    from distillery.tasks.dedup import NearDuplicateIndex, example_text
    from distillery.tasks.recipe import ExpansionSettings

    threshold = ExpansionSettings.model_fields["near_duplicate_threshold"].default
    started = time.perf_counter()
    contexts, questions = make_inputs(n)
    texts = [example_text(c, q) for c, q in zip(contexts, questions, strict=True)]
    del contexts, questions
    made = time.perf_counter() - started
    index = NearDuplicateIndex(threshold)
    started = time.perf_counter()
    signing = 0.0
    if workers > 1:
        chunks = [(threshold, texts[i : i + CHUNK]) for i in range(0, n, CHUNK)]
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            signature_chunks = list(pool.map(_sign, chunks))
        signing = time.perf_counter() - started
        signatures = (row for chunk in signature_chunks for row in chunk)
    else:
        signatures = None
    dropped = 0
    for i, text in enumerate(texts):
        if signatures is None:
            tick = time.perf_counter()
            signature = index.minhash(text)
            signing += time.perf_counter() - tick
        else:
            signature = next(signatures)
        similarity, _ = index.closest(signature)
        if similarity >= threshold:
            dropped += 1
        else:
            index.add(str(i), signature)
    seconds = time.perf_counter() - started
    return {
        "stage": "dedup" if workers <= 1 else f"dedup-pool ({workers} processes)",
        "rows": n,
        "make_rows_s": round(made, 1),
        "seconds": round(seconds, 1),
        "signatures_s": round(signing, 1),
        "index_s": round(seconds - signing, 1),
        "rows_per_s": round(n / seconds),
        "near_duplicates": dropped,
        "threshold": threshold,
        "peak_rss_mib": round(peak_rss_mib()),
        # the pool's processes, the largest of them (0 without a pool)
        "pool_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def candidate_frame(n: int) -> Any:
    """What the flow sends its validation worker for `n` answered rows (suite_frame)."""
    import pandas as pd

    from distillery.expectations.runner import PRESENT
    from distillery.tasks.record import record_id
    from fake_teacher import gen_answer

    contexts, questions = make_inputs(n)
    r = random.Random(1)
    answers = [gen_answer(r, q) for q in questions]
    rejected = [i % 50 == 49 for i in range(n)]  # 2%: cut off by the length limit
    return pd.DataFrame(
        {
            "id": [record_id(c, q) for c, q in zip(contexts, questions, strict=True)],
            "user_context": contexts,
            "question": questions,
            "answer": ["" if x else a for a, x in zip(answers, rejected, strict=True)],
            "messages": PRESENT,
            "source": "generated",
            "seed_ids": PRESENT,
            "max_similarity": 0.2,
            "teacher_model": "fake-teacher",
            "expansion_request_id": [f"exp-{i // 5}" for i in range(n)],
            "answer_request_id": [f"ans-{i}" for i in range(n)],
            "finish_reason": ["length" if x else "stop" for x in rejected],
            "prompt_tokens": 300,
            "completion_tokens": [len(a) // 4 for a in answers],
            "split": ["validation" if i % 20 == 0 else "train" for i in range(n)],
            "run_id": "scale",
            "created_at": pd.Timestamp("2026-12-01", tz="UTC"),
            "status": ["rejected" if x else "accepted" for x in rejected],
            "reason": ["truncated" if x else None for x in rejected],
        }
    )


def stage_validate(n: int) -> dict[str, Any]:
    from distillery.expectations.runner import validate_frame
    from distillery.tasks.recipe import ValidationSettings

    started = time.perf_counter()
    frame = candidate_frame(n)
    made = time.perf_counter() - started
    started = time.perf_counter()
    import great_expectations  # noqa: F401  (its import, ~8 s here, is not the suite's time)

    imported = time.perf_counter() - started
    started = time.perf_counter()
    report, _ = validate_frame(frame, ValidationSettings(), min_rows=n // 2)
    seconds = time.perf_counter() - started
    return {
        "stage": "validate",
        "rows": n,
        "make_rows_s": round(made, 1),
        "import_gx_s": round(imported, 1),
        "seconds": round(seconds, 1),
        "rows_per_s": round(n / seconds),
        "expectations": report.evaluated,
        "success": report.success,
        "peak_rss_mib": round(peak_rss_mib()),
    }


def run_child(stage: str, rows: int, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", stage, "--rows", str(rows)]
    cmd += ["--workers", str(workers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| stage | rows | seconds | rows/s | peak RSS MiB | details |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        details = ", ".join(
            f"{k} {v}"
            for k, v in r.items()
            if k not in ("stage", "rows", "seconds", "rows_per_s", "peak_rss_mib")
        )
        lines.append(
            f"| {r['stage']} | {r['rows']:,} | {r['seconds']} | {r['rows_per_s']:,} | "
            f"{r['peak_rss_mib']:,} | {details} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stages", default=",".join(STAGES), help="dedup,validate")
    parser.add_argument(
        "--workers", type=int, default=1, help="also run dedup with signatures in N processes"
    )
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = (
            stage_dedup(args.rows, args.workers)
            if args.child == "dedup"
            else stage_validate(args.rows)
        )
        print(json.dumps(result))
        return
    load = os.getloadavg()
    results = []
    for stage in args.stages.split(","):
        results.append(run_child(stage, args.rows, 1))
        print(table(results[-1:]), flush=True)
        if stage == "dedup" and args.workers > 1:
            results.append(run_child(stage, args.rows, args.workers))
            print(table(results[-1:]), flush=True)
    text = (
        f"{table(results)}\n\nMachine: {os.cpu_count()} cores, {platform.processor() or '?'}, "
        f"Python {platform.python_version()}; load average at the start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
