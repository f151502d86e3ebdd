"""Benchmark: the teacher engine vs a bare AsyncOpenAI + semaphore client, same server, same run.

    .venv/bin/python bench/engine_throughput.py [--n 2000] [--slots 64] [--latency 0.2]

The fake teacher runs in its own process (as a real endpoint would), with `slots` concurrent
requests of `latency` seconds each. Both clients send N distinct chat requests with `slots`
in flight; the engine starts each repeat with an empty request cache, so it sends all N too.
Repeats alternate the order (baseline first, then engine first) and the table reports each
pair and the median ratio. Prints a markdown table; --out writes it to a file as well.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fake_teacher import spawn  # noqa: E402
from tasks.teacher import ChatRequest, EngineSettings, TeacherEndpoint, TeacherEngine  # noqa: E402


def requests_for(n: int, tag: str) -> list[ChatRequest]:
    return [
        ChatRequest(
            messages=(
                ("system", "You are an expert for stock markets."),
                (
                    "user",
                    f"# USER CONTEXT\nInvestor {tag}-{i}, age {20 + i % 50}.\n\n# QUESTION\nBuy?",
                ),
            ),
            temperature=0.7,
            top_p=1.0,
            max_tokens=256,
        )
        for i in range(n)
    ]


async def bare_client(url: str, reqs: list[ChatRequest], concurrency: int, aiohttp: bool) -> float:
    """What a user would write by hand: AsyncOpenAI, a semaphore, gather."""
    kwargs = {"http_client": openai.DefaultAioHttpClient()} if aiohttp else {}
    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, **kwargs)  # type: ignore[arg-type]
    semaphore = asyncio.Semaphore(concurrency)

    async def one(req: ChatRequest) -> str:
        async with semaphore:
            completion = await client.chat.completions.create(
                model="fake-teacher",
                messages=[{"role": r, "content": c} for r, c in req.messages],  # type: ignore[misc]
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.max_tokens,
            )
            return completion.choices[0].message.content or ""

    started = time.perf_counter()
    answers = await asyncio.gather(*(one(r) for r in reqs))
    elapsed = time.perf_counter() - started
    await client.close()
    assert all(answers)
    return elapsed


def engine_run(url: str, reqs: list[ChatRequest], concurrency: int) -> float:
    with tempfile.TemporaryDirectory() as cache:
        settings = EngineSettings(cache_dir=Path(cache), concurrency=concurrency, progress=False)
        endpoint = TeacherEndpoint(model="fake-teacher", base_url=url)
        engine = TeacherEngine(endpoint, settings, api_key="bench")
        started = time.perf_counter()
        results, stats = engine.complete(reqs, "bench")
        elapsed = time.perf_counter() - started
        engine.close()
    assert stats.sent == len(reqs) and all(r.content for r in results)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    proc, url = spawn("--slots", str(args.slots), "--latency", str(args.latency))
    rows = []
    try:
        # Warm-up: first connections, imports, JIT-free but cache-cold Python paths.
        asyncio.run(bare_client(url, requests_for(200, "warm"), args.slots, aiohttp=True))
        for rep in range(args.repeats):
            tag = f"r{rep}"
            order = ["bare", "engine"] if rep % 2 == 0 else ["engine", "bare"]
            timing: dict[str, float] = {}
            for who in order:
                reqs = requests_for(args.n, f"{tag}-{who}")
                if who == "bare":
                    timing[who] = asyncio.run(bare_client(url, reqs, args.slots, aiohttp=True))
                else:
                    timing[who] = engine_run(url, reqs, args.slots)
            timing["bare_default_transport"] = asyncio.run(
                bare_client(url, requests_for(args.n, f"{tag}-default"), args.slots, aiohttp=False)
            )
            rows.append(timing)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    theory = args.slots / args.latency if args.latency else float("inf")
    lines = [
        f"## Engine throughput: N={args.n}, {args.slots} slots x {args.latency} s "
        f"(theoretical {theory:.0f} req/s)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, openai {metadata.version('openai')}, "
        f"aiohttp {metadata.version('aiohttp')}.",
        "",
        "| repeat | bare AsyncOpenAI + aiohttp (req/s) | engine (req/s) | engine / bare | "
        "bare, default transport (req/s) |",
        "|---|---|---|---|---|",
    ]
    ratios = []
    for i, t in enumerate(rows, start=1):
        bare, eng, default = (
            args.n / t["bare"],
            args.n / t["engine"],
            args.n / t["bare_default_transport"],
        )
        ratios.append(eng / bare)
        lines.append(f"| {i} | {bare:.1f} | {eng:.1f} | {eng / bare:.2f} | {default:.1f} |")
    lines += [
        "",
        f"Median engine / bare ratio: **{statistics.median(ratios):.2f}** (target >= 0.90).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
