"""The teacher benchmark (issue 5): the engine and the flow next to a bare client, in one run.

    .venv/bin/python bench/run.py [--only 1a,1b,2,3,4,6] [--repeats 3] [--out bench/results.md]

Every figure is measured in this run, on this machine, next to its baseline, and reported as a
ratio with the command that reproduces it. The fake teacher (tests/fake_teacher.py) runs as its
own process, as a real endpoint would; the `distillery` runs use one Prefect server started here
(as a deployment has one), so Prefect's ephemeral start-up (~30 s) is not in their times.

1. Throughput, 64 slots x 0.2 s: the engine vs a bare AsyncOpenAI (aiohttp) + semaphore client,
   N=2000; and the whole flow for 2000 answers vs the bare client's time for as many requests.
2. Rate limits: an RPM cap of 3000 and a TPM cap, enforced per second (as providers quantise
   per-minute limits): achieved rate vs the cap and the share of 429s, engine vs bare client.
3. 5% faults (500, 503, dropped connections): every prompt answered, none answered twice.
4. SIGKILL, then SIGINT, at about half of a run, each followed by the same command: what was
   sent again, how fast it stopped, and a third run that sends nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import openai

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import tasks.batch  # noqa: E402
from fake_openai_batches import FakeOpenAIBatches  # noqa: E402
from fake_openai_batches import Knobs as BatchKnobs  # noqa: E402
from fake_teacher import gen_question, gen_user_context, spawn  # noqa: E402
from tasks.cost import Price  # noqa: E402
from tasks.teacher import (  # noqa: E402
    CallStats,
    ChatRequest,
    EngineSettings,
    TeacherEndpoint,
    TeacherEngine,
)

DISTILLERY = str(Path(sys.executable).parent / "distillery")
RECIPE = REPO / "recipes" / "stock-advisor.yaml"


# --------------------------------------------------------------------------------------------
# Parts: the fake teacher as a process, the two clients, the CLI
# --------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A spawned fake teacher and its counters."""

    proc: subprocess.Popen[str]
    url: str

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/_stats", timeout=10) as r:
            data: dict[str, Any] = json.loads(r.read())
        return data


@contextmanager
def fake_teacher(*args: str) -> Iterator[Server]:
    proc, url = spawn(*args)
    try:
        yield Server(proc, url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def requests_for(n: int, tag: str, max_tokens: int = 256) -> list[ChatRequest]:
    """Distinct answer-style requests (the system prompt + a user context and a question)."""
    rng = random.Random(tag)
    return [
        ChatRequest(
            messages=(
                ("system", "You are an expert for stock markets. Justify the answer."),
                (
                    "user",
                    f"# USER CONTEXT\n{gen_user_context(rng)} ({tag}-{i})\n\n"
                    f"# QUESTION\n{gen_question(rng)}",
                ),
            ),
            temperature=0.7,
            top_p=1.0,
            max_tokens=max_tokens,
        )
        for i in range(n)
    ]


@dataclass
class BareResult:
    seconds: float
    failed: int = 0  # requests that still failed after the SDK's own retries


async def bare_client(
    url: str, reqs: list[ChatRequest], concurrency: int, max_retries: int = 0
) -> BareResult:
    """What a user writes by hand: AsyncOpenAI on the aiohttp transport, a semaphore, gather."""
    client = openai.AsyncOpenAI(
        base_url=url,
        api_key="bench",
        max_retries=max_retries,
        http_client=openai.DefaultAioHttpClient(),
    )
    semaphore = asyncio.Semaphore(concurrency)

    async def one(req: ChatRequest) -> bool:
        async with semaphore:
            try:
                completion = await client.chat.completions.create(
                    model="fake-teacher",
                    messages=[{"role": r, "content": c} for r, c in req.messages],  # type: ignore[misc]
                    temperature=req.temperature,
                    top_p=req.top_p,
                    max_tokens=req.max_tokens,
                )
            except openai.APIError:
                if not max_retries:
                    raise
                return False
            return bool(completion.choices[0].message.content)

    started = time.perf_counter()
    answered = await asyncio.gather(*(one(r) for r in reqs))
    elapsed = time.perf_counter() - started
    await client.close()
    return BareResult(elapsed, failed=answered.count(False))


def engine_run(
    url: str, reqs: list[ChatRequest], concurrency: int, **settings: Any
) -> tuple[float, CallStats]:
    """The engine with an empty request cache, so it sends every request too."""
    with tempfile.TemporaryDirectory() as cache:
        config = EngineSettings(
            cache_dir=Path(cache), concurrency=concurrency, progress=False, **settings
        )
        engine = TeacherEngine(TeacherEndpoint(model="fake-teacher", base_url=url), config, "b")
        started = time.perf_counter()
        try:
            results, stats = engine.complete(reqs, "bench")
        finally:
            elapsed = time.perf_counter() - started
            engine.close()
    assert stats.sent - stats.retries == len(reqs) and all(r.content for r in results)
    return elapsed, stats


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """One Prefect API server for every `distillery` run of the bench."""
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=180)
    try:
        yield server.api_url
    finally:
        server.stop()


def cli_env(work: Path, api_url: str, concurrency: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(work / "prefect-home"),
        DISTILLERY_CACHE_DIR=str(work / "cache"),
        DISTILLERY_CONCURRENCY=str(concurrency),
        DISTILLERY_PROGRESS="false",
    )
    return env


def cli_args(url: str, out: Path, examples: int) -> list[str]:
    return [
        DISTILLERY, "run", str(RECIPE), "--examples", str(examples), "--output", str(out),
        "--no-train", "--teacher-base-url", url, "--teacher-model", "fake-teacher",
    ]  # fmt: skip


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a hung run can be killed with its children
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(f"a distillery run hung:\n{output[-3000:]}") from None
    return output


_CALL_LOG = re.compile(
    r"distillery\.teacher - (.+?): (\d+) requests, .*? retried, ([\d.]+) s", re.MULTILINE
)


def teacher_calls(output: str) -> list[tuple[str, int, float]]:
    """(label, requests, seconds) of each engine call, from its log line."""
    return [(m[1], int(m[2]), float(m[3])) for m in _CALL_LOG.finditer(output)]


def last_flow_run_seconds(api_url: str) -> float:
    """Prefect's own start-to-end time of the newest flow run."""
    body = json.dumps({"limit": 1, "sort": "START_TIME_DESC"}).encode()
    request = urllib.request.Request(
        f"{api_url}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        run = json.loads(r.read())[0]
    started = datetime.fromisoformat(run["start_time"])
    ended = datetime.fromisoformat(run["end_time"])
    return (ended - started).total_seconds()


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class Section:
    title: str
    command: str
    lines: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.lines += [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows),
            "",
        ]

    def verdict(self, name: str, value: str, target: str, met: bool) -> None:
        self.verdicts.append(f"| {name} | {value} | {target} | {'met' if met else '**not met**'} |")

    def markdown(self) -> str:
        out = [f"### {self.title}", "", f"`{self.command}`", "", *self.lines]
        if self.verdicts:
            out += ["| figure | measured | target | |", "|---|---|---|---|", *self.verdicts, ""]
        return "\n".join(out)


def machine() -> str:
    model = "unknown CPU"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("openai", "aiohttp", "prefect", "pydantic")
    )
    load = os.getloadavg()[0]
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{os.cpu_count()} cores ({model}), {platform.machine()}, Python "
        f"{platform.python_version()}; {versions}; code {commit or 'unknown'}; load average "
        f"{load:.1f} at the start (the machine is shared)."
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


# --------------------------------------------------------------------------------------------
# 1. Throughput
# --------------------------------------------------------------------------------------------


def bench_throughput(repeats: int, n: int) -> Section:
    section = Section(
        f"1a. Engine throughput: N={n}, 64 slots x 0.2 s (ceiling 320 req/s)",
        f".venv/bin/python bench/run.py --only 1a --repeats {repeats}",
    )
    rows, ratios = [], []
    with fake_teacher("--slots", "64", "--latency", "0.2") as server:
        # Warm-up: first connections, imports, cold code paths.
        asyncio.run(bare_client(server.url, requests_for(200, "warm"), 64))
        for rep in range(repeats):
            order = ["bare", "engine"] if rep % 2 == 0 else ["engine", "bare"]
            timing: dict[str, float] = {}
            for who in order:
                reqs = requests_for(n, f"r{rep}-{who}")
                if who == "bare":
                    timing[who] = asyncio.run(bare_client(server.url, reqs, 64)).seconds
                else:
                    timing[who] = engine_run(server.url, reqs, 64)[0]
            bare, engine = n / timing["bare"], n / timing["engine"]
            ratios.append(engine / bare)
            rows.append([str(rep + 1), f"{bare:.1f}", f"{engine:.1f}", f"{engine / bare:.2f}"])
    section.table(["repeat", "bare client (req/s)", "engine (req/s)", "engine / bare"], rows)
    median = statistics.median(ratios)
    section.verdict("engine / bare throughput (median)", f"{median:.2f}", ">= 0.95", median >= 0.95)
    return section


def bench_flow(api_url: str, work: Path, examples: int) -> Section:
    section = Section(
        f"1b. The whole flow for {examples} answers vs the bare client for as many requests",
        f".venv/bin/python bench/run.py --only 1b  # distillery run --examples {examples} "
        "--no-train, DISTILLERY_CONCURRENCY=64, fake teacher 64 slots x 0.2 s",
    )
    with fake_teacher("--slots", "64", "--latency", "0.2") as server:
        env = cli_env(work, api_url, 64)
        started = time.perf_counter()
        output = finish(start_cli(cli_args(server.url, work / "out", examples), env), 900)
        wall = time.perf_counter() - started
        if f"rows: {examples}" not in output:
            raise RuntimeError(f"the flow did not publish {examples} rows:\n{output[-3000:]}")
        flow = last_flow_run_seconds(api_url)
        calls = teacher_calls(output)
        sent = server.stats()["received"]
        published = work / "out" / "stock-advisor"
        version = (published / "LATEST").read_text().strip()
        manifest = json.loads((published / version / "manifest.json").read_text())
        teacher_s = float(manifest["timings_s"]["teacher"])
        bare = asyncio.run(
            bare_client(server.url, requests_for(sent, "flow-bare", max_tokens=768), 64)
        ).seconds
    expansion = [c for c in calls if c[0].startswith("expand")]
    answers = [c for c in calls if c[0].startswith("answer")]
    # Expansion rounds run one after the other; the answer tasks run side by side (4 at a time,
    # all started together here), so their span is about the longest one.
    engine_s = sum(c[2] for c in expansion) + max((c[2] for c in answers), default=0.0)
    section.table(
        ["what", "seconds", "ratio to the bare client"],
        [
            [f"bare client, {sent} requests (what the flow sent)", f"{bare:.1f}", "1.00"],
            ["engine calls (expansion rounds + the longest answer task)", f"{engine_s:.1f}",
             ratio(engine_s, bare)],
            ["flow: teacher stages (expansion + answers, manifest)", f"{teacher_s:.1f}",
             ratio(teacher_s, bare)],
            ["flow run (Prefect start to end: + validation, export)", f"{flow:.1f}",
             ratio(flow, bare)],
            ["whole command (process start to exit, server running)", f"{wall:.1f}",
             ratio(wall, bare)],
        ],
    )  # fmt: skip
    section.lines += [
        "Where the flow's time goes (the engine's own log line per call):",
        "",
        f"- expansion: {len(expansion)} rounds, one after the other (a round shows inputs the "
        f"last one accepted), {sum(c[1] for c in expansion)} requests in "
        f"{sum(c[2] for c in expansion):.1f} s of teacher calls;",
        f"- answers: {len(answers)} calls (tasks of up to 500 inputs, 4 at a time), "
        f"{sum(c[1] for c in answers)} requests; the longest call took "
        f"{max((c[2] for c in answers), default=0):.1f} s;",
        "- the rest of the flow run: parsing and near-duplicate checks of the expansion replies, "
        "Prefect task runs, Great Expectations (import and validation) and the export.",
        "",
    ]
    section.verdict("flow run / bare client", ratio(flow, bare), "<= 1.25", flow <= 1.25 * bare)
    return section


# --------------------------------------------------------------------------------------------
# 2. Rate limits
# --------------------------------------------------------------------------------------------


def bench_rate_limit(kind: str, cap: int, n: int, max_tokens: int) -> Section:
    flag = "--rpm" if kind == "RPM" else "--tpm"
    section = Section(
        f"2. {kind} cap {cap:,}, enforced per second (1 s window, pro rata), N={n}",
        f".venv/bin/python bench/run.py --only 2  # fake teacher {flag} {cap} --rate-window 1 "
        "--slots 64 --latency 0.2; concurrency 64",
    )
    # What the fake counts per request against a TPM limit: prompt chars / 4 + max_tokens.
    rows, results = [], {}
    for who in ("engine", "bare"):
        with fake_teacher(
            flag, str(cap), "--rate-window", "1", "--slots", "64", "--latency", "0.2"
        ) as server:
            reqs = requests_for(n, f"{kind}-{who}", max_tokens=max_tokens)
            cost = sum(r.estimated_tokens() for r in reqs)
            if who == "engine":
                seconds, _ = engine_run(server.url, reqs, 64)
                failed = 0
            else:
                # The SDK's own retries (it honours Retry-After), as a user would leave them.
                result = asyncio.run(bare_client(server.url, reqs, 64, max_retries=2))
                seconds, failed = result.seconds, result.failed
            stats = server.stats()
        # What was really answered: a bare client's failed requests do not count.
        answered = stats["answered"]
        achieved = (answered if kind == "RPM" else cost * answered / n) / seconds * 60
        share = stats["rate_limited"] / stats["received"]
        results[who] = (achieved, share, failed)
        rows.append(
            [who, f"{achieved:,.0f}", f"{achieved / cap:.2f}", f"{stats['rate_limited']}",
             f"{100 * share:.1f}%", str(failed), f"{seconds:.1f}"]
        )  # fmt: skip
    unit = "req/min" if kind == "RPM" else "tokens/min"
    section.table(
        ["client", f"achieved ({unit})", "/ cap", "429s", "429 share", "failed", "seconds"], rows
    )
    achieved, share, _ = results["engine"]
    met = achieved >= 0.95 * cap
    section.verdict(f"engine {kind} / cap", f"{achieved / cap:.2f}", ">= 0.95", met)
    section.verdict(f"engine 429 share ({kind})", f"{100 * share:.1f}%", "<= 2%", share <= 0.02)
    return section


# --------------------------------------------------------------------------------------------
# 3. Faults
# --------------------------------------------------------------------------------------------


def bench_faults(n: int) -> Section:
    section = Section(
        f"3. 5% faults (500, 503, dropped connections), N={n}",
        ".venv/bin/python bench/run.py --only 3  # fake teacher --fault-rate 0.05 "
        "--faults 500,503,drop --slots 64 --latency 0.05; concurrency 64",
    )
    rows, engine_stats = [], {}
    for who in ("engine", "bare"):
        args = ("--fault-rate", "0.05", "--faults", "500,503,drop", "--slots", "64")
        with fake_teacher(*args, "--latency", "0.05") as server:
            reqs = requests_for(n, f"faults-{who}")
            if who == "engine":
                seconds, _ = engine_run(server.url, reqs, 64)
                failed = 0
            else:
                result = asyncio.run(bare_client(server.url, reqs, 64, max_retries=2))
                seconds, failed = result.seconds, result.failed
            stats = server.stats()
        if who == "engine":
            engine_stats = stats
        rows.append(
            [who, str(sum(stats["faults"].values())), str(stats["answered"]), str(failed),
             str(stats["answered_twice"]), f"{seconds:.1f}"]
        )  # fmt: skip
    section.table(
        ["client", "faults served", "prompts answered", "failed", "answered twice", "seconds"],
        rows,
    )
    section.verdict(
        "engine: prompts answered", f"{engine_stats['answered']} of {n}", f"{n}",
        engine_stats["answered"] == n,
    )  # fmt: skip
    twice = engine_stats["answered_twice"]
    section.verdict("engine: answered twice", str(twice), "0", twice == 0)
    return section


# --------------------------------------------------------------------------------------------
# 6. Batch mode
# --------------------------------------------------------------------------------------------


def bench_batch(n: int) -> Section:
    section = Section(
        f"6. Batch mode, N={n}: 2% of rows fail, the first batch expires with half its rows",
        ".venv/bin/python bench/run.py --only 6  # engine with DISTILLERY_BATCH against "
        "tests/fake_openai_batches.py (files + batches), max 800 requests per file",
    )
    price = Price(input_usd_per_1m=0.15, output_usd_per_1m=0.60)
    knobs = BatchKnobs(
        api_key="bench", batch_seconds=0.5, row_failure_rate=0.02, expire_batches=1,
        max_requests=800,
    )  # fmt: skip
    reqs = requests_for(n, "batch")
    # The API's 50,000 requests a file, scaled down so that N=2000 spans three files.
    tasks.batch.MAX_REQUESTS = 800
    with FakeOpenAIBatches(knobs) as server, tempfile.TemporaryDirectory() as cache:
        config = EngineSettings(
            cache_dir=Path(cache), progress=False, batch=True,
            batch_poll_interval_s=0.2, batch_max_poll_interval_s=1.0,
        )  # fmt: skip
        endpoint = TeacherEndpoint(model="gpt-4o-mini", base_url=server.base_url, price=price)
        engine = TeacherEngine(endpoint, config, "bench")
        started = time.perf_counter()
        try:
            results, stats = engine.complete(reqs, "bench-batch")
            seconds = time.perf_counter() - started
            _, again = engine.complete(reqs, "bench-batch-again")
        finally:
            engine.close()
        seen = server.stats
    answered = sum(1 for r in results if r.content)
    online = price.cost(stats.prompt_tokens, stats.completion_tokens)
    section.table(
        ["requests", "answered", "batches", "rows submitted", "rows failed", "rows expired",
         "submitted twice", "second call sent", "seconds", "cost / online cost"],
        [[str(n), str(answered), str(seen.batches_created), str(seen.rows_submitted),
          str(seen.rows_failed), str(seen.rows_expired), str(seen.submitted_twice),
          str(again.sent), f"{seconds:.1f}", ratio(stats.cost_usd or 0.0, online)]],
    )  # fmt: skip
    section.verdict("batch: answers in the results", f"{answered} of {n}", f"{n}", answered == n)
    resubmitted = seen.rows_submitted - n
    lost = seen.rows_failed + seen.rows_expired
    section.verdict(
        "batch: rows submitted beyond N", str(resubmitted), f"<= failed + expired ({lost})",
        resubmitted <= lost and seen.submitted_twice == 0,
    )  # fmt: skip
    section.verdict("batch: second identical call sends", str(again.sent), "0", again.sent == 0)
    return section


# --------------------------------------------------------------------------------------------
# 4. Kill and interrupt half-way
# --------------------------------------------------------------------------------------------


def run_until(
    server: Server, args: list[str], env: dict[str, str], half: int, sig: signal.Signals
) -> tuple[int, float, str]:
    """Start a run, send `sig` once `half` answers arrived; answers before it, stop time, output."""
    proc = start_cli(args, env)
    deadline = time.monotonic() + 600
    while server.stats()["answered"] < half and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before half-way:\n{finish(proc, 10)[-3000:]}")
        time.sleep(0.05)
    before = server.stats()["answered"]
    started = time.perf_counter()
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)  # as `kill -INT` (see bench/README.md on a terminal's Ctrl-C)
    output = finish(proc, 120)
    return before, time.perf_counter() - started, output


def bench_interrupts(api_url: str, work: Path) -> Section:
    concurrency, examples, half = 8, 200, 130  # a 200-example run sends about 250 requests
    section = Section(
        f"4. SIGKILL and SIGINT at about half of a {examples}-example run, then the same command",
        f".venv/bin/python bench/run.py --only 4  # distillery run --examples {examples}, "
        f"DISTILLERY_CONCURRENCY={concurrency}, fake teacher {concurrency} slots x 0.5 s, "
        "drain grace 10 s",
    )
    rows = []
    checks: dict[str, bool] = {}
    for sig in (signal.SIGKILL, signal.SIGINT):
        case = work / sig.name
        env = cli_env(case, api_url, concurrency)
        args = cli_args("URL", case / "out", examples)
        with fake_teacher("--slots", str(concurrency), "--latency", "0.5") as server:
            args[args.index("URL")] = server.url
            before, stop_s, _ = run_until(server, args, env, half, sig)
            first = server.stats()
            second_started = time.perf_counter()
            output = finish(start_cli(args, env), 600)
            second_s = time.perf_counter() - second_started
            if "rows: 200" not in output:
                raise RuntimeError(f"the resumed run did not publish:\n{output[-3000:]}")
            second = server.stats()
            received = second["received"]
            finish(start_cli(args, env), 600)
            third = server.stats()["received"] - received
        resent = second["received"] - second["distinct_bodies"]
        rows.append(
            [sig.name, str(before), f"{stop_s:.1f}", str(first["answered"] - before),
             str(resent), str(second["resent_after_answer"]), f"{second_s:.1f}", str(third)]
        )  # fmt: skip
        if sig == signal.SIGKILL:
            checks["kill"] = resent <= concurrency
            section.verdict(
                "SIGKILL: requests sent again", str(resent), f"<= in flight (<= {concurrency})",
                resent <= concurrency,
            )  # fmt: skip
        else:
            section.verdict(
                "SIGINT: answered requests sent again", str(second["resent_after_answer"]), "0",
                second["resent_after_answer"] == 0,
            )  # fmt: skip
            section.verdict("SIGINT: seconds to stop", f"{stop_s:.1f}", "< 10 s grace + a few",
                            stop_s < 15)  # fmt: skip
        section.verdict(f"{sig.name}: third run sends", str(third), "0", third == 0)
    section.table(
        ["signal", "answers before it", "seconds to exit", "answered after it",
         "sent again (resume)", "answered ones sent again", "resume (s)", "third run sent"],
        rows,
    )  # fmt: skip
    section.lines.append(
        "A client without a durable cache would send again every request answered before the "
        "signal (the 'answers before it' column): that is the baseline here."
    )
    section.lines.append("")
    return section


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="1a,1b,2,3,4,6", help="items, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of item 1a")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.md")
    args = parser.parse_args()
    only = set(args.only.split(","))
    started = time.perf_counter()
    header = [
        "## Teacher benchmark",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine()}",
        "",
    ]
    sections: list[Section] = []

    def run(item: str, make: Callable[[], Section]) -> None:
        if item in only:
            print(f"running {item} ...", file=sys.stderr, flush=True)
            section = make()
            print(section.markdown(), flush=True)
            sections.append(section)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run("1a", lambda: bench_throughput(args.repeats, 2000))
        run("2", lambda: bench_rate_limit("RPM", 3000, 1500, 256))
        # ~280 tokens a request: a TPM cap of 840,000 is 3000 requests a minute again.
        run("2", lambda: bench_rate_limit("TPM", 840_000, 1500, 256))
        run("3", lambda: bench_faults(2000))
        run("6", lambda: bench_batch(2000))
        if only & {"1b", "4"}:
            with prefect_server(work / "prefect-server") as api_url:
                run("1b", lambda: bench_flow(api_url, work / "flow", 2000))
                run("4", lambda: bench_interrupts(api_url, work / "interrupts"))
    verdicts = [v for s in sections for v in s.verdicts]
    summary = ["| figure | measured | target | |", "|---|---|---|---|", *verdicts]
    text = "\n".join(
        [
            *header,
            *summary,
            "",
            f"Whole run: {time.perf_counter() - started:.0f} s. Item 5 (100k scale) is not in "
            "this bench yet.",
            "",
            *(s.markdown() for s in sections),
        ]
    )
    args.out.write_text(text + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
