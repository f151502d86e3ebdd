"""The teacher benchmark (issue 5): the engine and the flow next to a bare client, in one run.

    .venv/bin/python bench/run.py [--only 1a,1b,2,3,4,5,6,7] [--repeats 3] [--flow-repeats 5]
        [--scale 10000,100000] [--work DIR] [--out bench/results.md]
    .venv/bin/python bench/run.py --only 5    # item 5 alone (about 7 minutes on 2 cores)

Every figure is measured in this run, on this machine, next to its baseline, and reported as a
ratio with the command that reproduces it. The fake teacher (tests/fake_teacher.py) runs as its
own process, as a real endpoint would; the `distillery` runs use a Prefect server started here
(as a deployment has one), so Prefect's ephemeral start-up (~30 s) is not in their times.

1. Throughput, 64 slots x 0.2 s: the engine vs a bare AsyncOpenAI (aiohttp) + semaphore client,
   N=2000; and the whole flow for 2000 answers vs the bare client's time for as many requests
   (median of --flow-repeats runs).
2. Rate limits: an RPM cap of 3000 and a TPM cap, enforced per second (as providers quantise
   per-minute limits): achieved rate vs the cap and the share of 429s, engine vs bare client.
3. 5% faults (500, 503, dropped connections): every prompt answered, none answered twice.
4. SIGKILL, then SIGINT, at about half of a run, each followed by the same command: what was
   sent again, how fast it stopped, and a third run that sends nothing.
5. Scale: the whole flow for 10,000 and 100,000 examples against a zero-latency teacher: peak
   RSS of the flow's process, time per stage (Prefect's task runs), and the 100k/10k time ratio.
6. Batch mode against a loopback /v1/files + /v1/batches server.
7. The judge stage: the whole flow with the recipe's judge on and off (fake teacher, 64 slots x
   0.2 s): judge requests per answered row and the judge's share of the run's time.
8. Shards: the whole flow for 20,000 examples from the `distill/adhoc` deployment on a local
   process pool, answered in 1 (the parent alone), 2 and 4 shards (`distill-shard/shard` runs on
   a second pool), each process capped at 16 requests in flight: throughput per shard count and
   the parent's planning and merging overhead.
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
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import distillery.tasks.teacher.batch  # noqa: E402
from distillery.tasks.cost import Price  # noqa: E402
from distillery.tasks.teacher import (  # noqa: E402
    CallStats,
    ChatRequest,
    EngineSettings,
    TeacherEndpoint,
    TeacherEngine,
)
from fake_openai_batches import FakeOpenAIBatches  # noqa: E402
from fake_openai_batches import Knobs as BatchKnobs  # noqa: E402
from fake_teacher import gen_question, gen_user_context, spawn  # noqa: E402

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
def prefect_server_process(home: Path) -> Iterator[tuple[str, int]]:
    """A Prefect API server (its database under `home`): its API URL and process id."""
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no telemetry (offline)
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME, temporary_settings

    server = SubprocessASGIServer()
    # The server's environment comes from the settings loaded first: name this home in them.
    with temporary_settings(updates={PREFECT_HOME: home}):
        server.start(timeout=180)
    assert server.server_process is not None
    try:
        yield server.api_url, server.server_process.pid
    finally:
        server.stop()


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """One Prefect API server for every `distillery` run of the bench."""
    with prefect_server_process(home) as (api_url, _):
        yield api_url


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
    r"^(\d\d):(\d\d):([\d.]+) \| INFO +\| distillery\.teacher - (.+?): (\d+) requests, .*? "
    r"retried, ([\d.]+) s",
    re.MULTILINE,
)


def teacher_calls(output: str) -> list[tuple[str, int, float, float]]:
    """(label, requests, seconds, ended: seconds since midnight) of each engine call, from its
    log line (written as the call ends)."""
    return [
        (m[4], int(m[5]), float(m[6]), int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]))
        for m in _CALL_LOG.finditer(output)
    ]


def calls_span(calls: list[tuple[str, int, float, float]]) -> float:
    """Seconds from the start of the first engine call to the end of the last one."""
    if not calls:
        return 0.0
    first = calls[0][3]  # times of day: taken relative to the first, past midnight too
    ends = [(c[3] - first) % 86400 for c in calls]
    return max(ends) - min(e - c[2] for e, c in zip(ends, calls, strict=True))


def api_post(api_url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{api_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def last_flow_run(api_url: str) -> dict[str, Any]:
    """The newest flow run, as the Prefect API returns it."""
    run: dict[str, Any] = api_post(
        api_url, "/flow_runs/filter", {"limit": 1, "sort": "START_TIME_DESC"}
    )[0]
    return run


def span(run: dict[str, Any]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(run["start_time"]), datetime.fromisoformat(run["end_time"])


def task_runs(api_url: str, flow_run_id: str) -> list[dict[str, Any]]:
    """Every task run of a flow run (paged: the API returns at most 200 at a time)."""
    runs: list[dict[str, Any]] = []
    while True:
        page = api_post(
            api_url,
            "/task_runs/filter",
            {
                "flow_runs": {"id": {"any_": [flow_run_id]}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 200,
                "offset": len(runs),
            },
        )
        runs += page
        if len(page) < 200:
            return runs


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


@dataclass
class FlowRun:
    """One `distillery run` of item 1b and the bare client's time for as many requests."""

    bare: float
    engine: float  # the first engine call's start to the last one's end (they overlap)
    teacher: float  # the manifest's teacher stages
    flow: float  # Prefect's flow run, start to end
    wall: float  # the whole command
    sent: int
    calls: list[tuple[str, int, float, float]]
    stages: dict[str, float]  # seconds each stage's task runs took (their union)


def flow_once(api_url: str, work: Path, examples: int) -> FlowRun:
    work.mkdir(parents=True, exist_ok=True)
    with fake_teacher("--slots", "64", "--latency", "0.2") as server:
        env = cli_env(work, api_url, 64)
        started = time.perf_counter()
        output = finish(start_cli(cli_args(server.url, work / "out", examples), env), 900)
        wall = time.perf_counter() - started
        (work / "flow.log").write_text(output)
        if f"rows: {examples}" not in output:
            raise RuntimeError(f"the flow did not publish {examples} rows:\n{output[-3000:]}")
        run = last_flow_run(api_url)
        stages, _ = stage_intervals(api_url, run)
        calls = teacher_calls(output)
        sent = server.stats()["received"]
        published = work / "out" / "stock-advisor"
        version = (published / "LATEST").read_text().strip()
        manifest = json.loads((published / version / "manifest.json").read_text())
        bare = asyncio.run(
            bare_client(server.url, requests_for(sent, "flow-bare", max_tokens=768), 64)
        ).seconds
    started_at, ended_at = span(run)
    return FlowRun(
        bare=bare,
        engine=calls_span(calls),
        teacher=float(manifest["timings_s"]["teacher"]),
        flow=(ended_at - started_at).total_seconds(),
        wall=wall,
        sent=sent,
        calls=calls,
        stages={stage: seconds_in(ts) for stage, ts in stages.items()},
    )


def bench_flow(api_url: str, work: Path, examples: int, repeats: int) -> Section:
    section = Section(
        f"1b. The whole flow for {examples} answers vs the bare client for as many requests",
        f".venv/bin/python bench/run.py --only 1b --flow-repeats {repeats}  # distillery run "
        f"--examples {examples} --no-train, DISTILLERY_CONCURRENCY=64, fake teacher 64 slots "
        "x 0.2 s; a fresh output and request cache per repeat",
    )
    # The first flow run on a fresh Prefect server waits about 0.4 s between its Running state
    # and its first line of code (the server's first calls of their kind); a deployment's
    # server is long-lived, so a small run warms it up first, outside the figures.
    flow_once(api_url, work / "warm-up", 20)
    runs = [flow_once(api_url, work / f"repeat-{i + 1}", examples) for i in range(repeats)]
    by_ratio = sorted(runs, key=lambda r: r.flow / r.bare)
    median = by_ratio[len(by_ratio) // 2]
    if repeats > 1:
        section.table(
            ["repeat", "bare client (s)", "flow run (s)", "flow run / bare"],
            [
                [str(i + 1), f"{r.bare:.1f}", f"{r.flow:.1f}", ratio(r.flow, r.bare)]
                for i, r in enumerate(runs)
            ],
        )
        section.lines += [f"The median repeat ({runs.index(median) + 1}) in detail:", ""]
    r = median
    section.table(
        ["what", "seconds", "ratio to the bare client"],
        [
            [f"bare client, {r.sent} requests (what the flow sent)", f"{r.bare:.1f}", "1.00"],
            ["engine calls, the first one's start to the last one's end", f"{r.engine:.1f}",
             ratio(r.engine, r.bare)],
            ["flow: teacher stages (expansion + answers, manifest)", f"{r.teacher:.1f}",
             ratio(r.teacher, r.bare)],
            ["flow run (Prefect start to end: + validation, export)", f"{r.flow:.1f}",
             ratio(r.flow, r.bare)],
            ["whole command (process start to exit, server running)", f"{r.wall:.1f}",
             ratio(r.wall, r.bare)],
        ],
    )  # fmt: skip
    expansion = [c for c in r.calls if c[0].startswith("expand")]
    answers = [c for c in r.calls if c[0].startswith("answer")]
    section.lines += [
        "Where the flow's time goes (the engine's own log line per call; Prefect's task runs):",
        "",
        f"- expansion: {len(expansion)} rounds, one after the other (a round shows inputs the "
        f"last one accepted), {sum(c[1] for c in expansion)} requests in "
        f"{sum(c[2] for c in expansion):.1f} s of teacher calls; the expand task "
        f"{r.stages.get('expand', 0.0):.1f} s;",
        f"- answers: {len(answers)} calls (tasks of up to 500 inputs, the seeds' at once and the "
        "generated inputs' as expansion hands them over, up to 4 tasks at a time; expansion's "
        f"requests go first), {sum(c[1] for c in answers)} requests; the longest call took "
        f"{max((c[2] for c in answers), default=0):.1f} s; the answer tasks "
        f"{r.stages.get('answer', 0.0):.1f} s;",
        f"- validate task {r.stages.get('validate', 0.0):.1f} s (Great Expectations), publish "
        f"task {r.stages.get('publish', 0.0):.1f} s, data-docs task "
        f"{r.stages.get('data-docs', 0.0):.1f} s (beside publishing), the flow's code outside "
        f"any task {r.stages.get('flow code', 0.0):.1f} s.",
        "",
    ]
    flow_ratio = median.flow / median.bare
    section.verdict(
        "flow run / bare client" + (f" (median of {repeats})" if repeats > 1 else ""),
        f"{flow_ratio:.2f}", "<= 1.25", flow_ratio <= 1.25,
    )  # fmt: skip
    return section


# --------------------------------------------------------------------------------------------
# 7. The judge stage
# --------------------------------------------------------------------------------------------


@dataclass
class JudgeRun:
    """One `distillery run` of item 7."""

    flow: float  # Prefect's flow run, start to end
    teacher: float  # the manifest's teacher stages (expansion, answers, and verdicts if on)
    answered: int  # rows answered (the answer filters' input)
    judge: dict[str, Any]  # the manifest's judge entry
    judged: int  # judge requests the fake teacher answered
    judge_calls: float  # seconds of the engine's judge calls (summed; they overlap others)


def judge_recipe(work: Path, enabled: bool) -> Path:
    """The shipped recipe with the judge on or off (every other setting as shipped)."""
    data = yaml.safe_load(RECIPE.read_text())
    data["seeds_file"] = str(RECIPE.parent / data["seeds_file"])
    data["judge"] = {"enabled": enabled}
    path = work / f"judge-{'on' if enabled else 'off'}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def judge_once(api_url: str, work: Path, examples: int, enabled: bool) -> JudgeRun:
    work.mkdir(parents=True, exist_ok=True)
    with fake_teacher("--slots", "64", "--latency", "0.2") as server:
        args = cli_args(server.url, work / "out", examples)
        args[2] = str(judge_recipe(work, enabled))
        output = finish(start_cli(args, cli_env(work, api_url, 64)), 900)
        (work / "flow.log").write_text(output)
        if f"rows: {examples}" not in output:
            raise RuntimeError(f"the flow did not publish {examples} rows:\n{output[-3000:]}")
        run = last_flow_run(api_url)
        judged = int(server.stats().get("judged", {}).get("score", 0))
    published = work / "out" / "stock-advisor"
    version = (published / "LATEST").read_text().strip()
    manifest = json.loads((published / version / "manifest.json").read_text())
    started_at, ended_at = span(run)
    return JudgeRun(
        flow=(ended_at - started_at).total_seconds(),
        teacher=float(manifest["timings_s"]["teacher"]),
        answered=int(manifest["counts"]["answers"]["answered"]),
        judge=manifest["judge"],
        judged=judged,
        judge_calls=sum(c[2] for c in teacher_calls(output) if c[0].startswith("judge")),
    )


def bench_judge(api_url: str, work: Path, examples: int, repeats: int) -> Section:
    section = Section(
        f"7. The judge stage: the whole flow for {examples} answers, judge on vs off",
        f".venv/bin/python bench/run.py --only 7 --flow-repeats {repeats}  # distillery run "
        f"--examples {examples} --no-train, the shipped recipe with judge.enabled true / false, "
        "DISTILLERY_CONCURRENCY=64, fake teacher 64 slots x 0.2 s; a fresh output and request "
        "cache per run",
    )
    judge_once(api_url, work / "warm-up", 20, False)  # the Prefect server's first calls
    pairs = []
    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        runs = {on: judge_once(api_url, work / f"{i + 1}-{on}", examples, on) for on in order}
        pairs.append((runs[False], runs[True]))
    rows = []
    for i, (off, on) in enumerate(pairs):
        rows.append(
            [
                str(i + 1), f"{off.flow:.1f}", f"{on.flow:.1f}", f"{on.flow - off.flow:+.1f}",
                f"{on.judged} / {on.answered}", f"{on.judge_calls:.1f}",
            ]
        )  # fmt: skip
    section.table(
        [
            "repeat", "flow run, judge off (s)", "judge on (s)", "difference (s)",
            "judge requests / rows answered", "judge calls (s, summed)",
        ],
        rows,
    )  # fmt: skip
    per_row = max(on.judged / on.answered for _, on in pairs)
    shares = sorted((on.flow - off.flow) / on.flow for off, on in pairs)
    share = shares[len(shares) // 2]
    last = pairs[-1][1].judge
    section.lines += [
        f"The judge's share of the run's time is (judge on - judge off) / judge on, the median "
        f"of {repeats}. A judge request is sent for each answer the answer filters kept, in the "
        "same answer task, through the same engine (its slots are shared with the answers). "
        f"Last run: {last['requests']} judge requests, {last['scored']} rows scored, "
        f"{last['requests_sent']} sent, rejected {last['rejected']}.",
        "",
    ]
    section.verdict("judge requests per answered row (highest)", f"{per_row:.2f}", "<= 1",
                    per_row <= 1)  # fmt: skip
    section.verdict("judge's share of the flow run's time (median)", f"{share:.0%}",
                    "reported", True)  # fmt: skip
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
    distillery.tasks.teacher.batch.MAX_REQUESTS = 800
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
# 5. Scale: 10k and 100k examples, zero-latency teacher
# --------------------------------------------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    """A live process's peak resident set size (VmHWM), MiB; 0.0 once it is gone."""
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def folder_mib(path: Path) -> float:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        if path.exists()
        else 0.0
    )


Interval = tuple[datetime, datetime]


def tree_rss_mib(pid: int) -> tuple[float, float]:
    """RSS (MiB) of a process, and of it and all its descendants together (Linux /proc)."""
    own, total, todo = 0.0, 0.0, [pid]
    while todo:
        current = todo.pop()
        with suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    mib = int(line.split()[1]) / 1024
                    total += mib
                    own = mib if current == pid else own
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return own, total


def run_measured(
    args: list[str], env: dict[str, str], log: Path, timeout: float
) -> tuple[int, float, float, list[tuple[datetime, float, float]]]:
    """Run a command to its end, output to `log`: exit status, seconds, peak RSS (MiB), and
    its RSS sampled every 0.2 s (UTC time, the process's own MiB, with its descendants MiB).

    The peak is wait4's ru_maxrss: the largest of the process and the children it waited for
    (the Great Expectations worker), not their sum; the samples' sum is the process tree's.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    samples: list[tuple[datetime, float, float]] = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            seconds = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, seconds, usage.ru_maxrss / 1024, samples
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"the {args[3:5]} run hung:\n{log.read_text()[-3000:]}")
        own, tree = tree_rss_mib(proc.pid)
        if tree:
            samples.append((datetime.now(UTC), own, tree))
        time.sleep(0.2)


def merged(intervals: list[Interval]) -> list[Interval]:
    """The union of intervals, as disjoint sorted ones."""
    out: list[Interval] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def seconds_in(intervals: list[Interval]) -> float:
    return sum((e - s).total_seconds() for s, e in intervals)


def peak_in(
    samples: list[tuple[datetime, float, float]], intervals: list[Interval], tree: bool = False
) -> float:
    """The highest sampled RSS in the intervals: the process's own, or its tree's."""
    return max(
        (m[tree] for t, *m in samples if any(s <= t <= e for s, e in intervals)), default=0.0
    )


def stage_intervals(
    api_url: str, flow_run: dict[str, Any]
) -> tuple[dict[str, list[Interval]], int]:
    """When each stage ran (the union of its task runs), and the number of task runs. The rest
    of the flow run (`flow code`) is the flow's own code between tasks."""
    runs = [r for r in task_runs(api_url, flow_run["id"]) if r["start_time"] and r["end_time"]]
    stages: dict[str, list[Interval]] = {}
    for r in runs:
        stages.setdefault(r["name"].split("-cycle")[0], []).append(span(r))
    out = {stage: merged(ts) for stage, ts in stages.items()}
    busy = merged([span(r) for r in runs])
    gaps, (cursor, ended) = [], span(flow_run)
    for s, e in busy:
        if s > cursor:
            gaps.append((cursor, s))
        cursor = max(cursor, e)
    if ended > cursor:
        gaps.append((cursor, ended))
    out["flow code"] = gaps
    return out, len(runs)


@dataclass
class ScaleRun:
    examples: int
    command_s: float
    flow_s: float
    rss_mib: float  # wait4: the largest of the flow process and the children it waited for
    tree_rss_mib: float  # the flow process and its children (the GX worker) together, sampled
    server_rss_mib: float
    teacher_rss_mib: float
    requests: int
    task_runs: int
    stage_s: dict[str, float]  # seconds each stage ran (the union of its task runs)
    stage_rss_mib: dict[str, float]  # the flow process's highest sampled RSS in each stage
    stage_tree_mib: dict[str, float]  # the same of the process tree (flow + GX worker)
    manifest_timings: dict[str, float]
    cache_mib: float
    results_mib: float
    server_db_mib: float


def scale_run(work: Path, examples: int) -> ScaleRun:
    """One from-scratch run of `examples` against a zero-latency teacher, everything fresh."""
    work.mkdir(parents=True)
    with (
        prefect_server_process(work / "prefect-server") as (api_url, server_pid),
        fake_teacher("--slots", "64", "--latency", "0") as teacher,
    ):
        env = cli_env(work, api_url, 64)
        args = [*cli_args(teacher.url, work / "out", examples), "--from-scratch"]
        log = work / "flow.log"
        status, seconds, rss, samples = run_measured(args, env, log, 4 * 3600)
        output = log.read_text()
        if status != 0 or f"rows: {examples}" not in output:
            raise RuntimeError(f"the {examples}-example run failed ({status}):\n{output[-3000:]}")
        flow_run = last_flow_run(api_url)
        stages, n_tasks = stage_intervals(api_url, flow_run)
        server_rss = peak_rss_mib(server_pid)
        teacher_rss = peak_rss_mib(teacher.proc.pid)
        requests = teacher.stats()["received"]
    published = work / "out" / "stock-advisor"
    version = (published / "LATEST").read_text().strip()
    manifest = json.loads((published / version / "manifest.json").read_text())
    started, ended = span(flow_run)
    return ScaleRun(
        examples=examples, command_s=seconds, flow_s=(ended - started).total_seconds(),
        rss_mib=rss, tree_rss_mib=max((m for _, _, m in samples), default=0.0),
        server_rss_mib=server_rss, teacher_rss_mib=teacher_rss, requests=requests,
        task_runs=n_tasks,
        stage_s={stage: seconds_in(ts) for stage, ts in stages.items()},
        stage_rss_mib={stage: peak_in(samples, ts) for stage, ts in stages.items()},
        stage_tree_mib={stage: peak_in(samples, ts, tree=True) for stage, ts in stages.items()},
        manifest_timings=manifest.get("timings_s", {}),
        cache_mib=folder_mib(work / "cache"),
        results_mib=folder_mib(work / "prefect-home" / "storage"),
        server_db_mib=folder_mib(work / "prefect-server"),
    )  # fmt: skip


STAGES = [
    "load-recipe", "read-latest", "expand", "answer", "validate", "data-docs", "publish",
    "flow code",
]  # fmt: skip


def bench_scale(work: Path, sizes: list[int]) -> Section:
    section = Section(
        "5. Scale: " + " and ".join(f"{n:,}" for n in sizes) + " examples, zero-latency teacher",
        f".venv/bin/python bench/run.py --only 5 --scale {','.join(map(str, sizes))}  # "
        "distillery run --examples N --no-train --from-scratch, DISTILLERY_CONCURRENCY=64, "
        "fake teacher 64 slots x 0 s, a fresh output, cache and Prefect server per size",
    )
    runs = []
    for n in sizes:
        print(f"  {n} examples ...", file=sys.stderr, flush=True)
        runs.append(scale_run(work / f"scale-{n}", n))
    header = ["", *(f"{r.examples:,} examples" for r in runs)]
    rows = [
        ["teacher requests sent", *(f"{r.requests:,}" for r in runs)],
        ["Prefect task runs", *(str(r.task_runs) for r in runs)],
        *(
            [f"`{stage}`: seconds / peak RSS, flow process / with GX worker (MiB)",
             *(f"{r.stage_s.get(stage, 0.0):.1f} / {r.stage_rss_mib.get(stage, 0.0):,.0f} / "
               f"{r.stage_tree_mib.get(stage, 0.0):,.0f}" for r in runs)]
            for stage in STAGES
        ),
        ["flow run, Prefect start to end (s)", *(f"{r.flow_s:.1f}" for r in runs)],
        ["whole command (s)", *(f"{r.command_s:.1f}" for r in runs)],
        ["peak RSS, the flow's process or its GX worker, the larger (MiB, wait4)",
         *(f"{r.rss_mib:,.0f}" for r in runs)],
        ["peak RSS, the flow's process and its GX worker together (MiB, sampled)",
         *(f"{r.tree_rss_mib:,.0f}" for r in runs)],
        ["peak RSS, Prefect server (MiB)", *(f"{r.server_rss_mib:,.0f}" for r in runs)],
        ["peak RSS, fake teacher (MiB)", *(f"{r.teacher_rss_mib:,.0f}" for r in runs)],
        ["request cache on disk (MiB)", *(f"{r.cache_mib:,.0f}" for r in runs)],
        ["Prefect results on disk (MiB)", *(f"{r.results_mib:,.0f}" for r in runs)],
        ["Prefect server database (MiB)", *(f"{r.server_db_mib:,.0f}" for r in runs)],
        ["manifest `timings_s`", *(
            ", ".join(f"{k} {v}" for k, v in r.manifest_timings.items()) for r in runs
        )],
    ]  # fmt: skip
    section.table(header, rows)
    section.lines += [
        "A stage's seconds are the union of its task runs (answer tasks run 4 at a time); "
        "`flow code` is the flow run outside any task run (assembly, manifest, artifacts); "
        "peak RSS per stage is the highest of the flow process's RSS sampled every 0.2 s, "
        "alone and with its descendants (the Great Expectations worker process).",
        "",
    ]
    big = max(runs, key=lambda r: r.examples)
    # The flow process and its GX worker are one job: their sum counts (or, should sampling
    # have missed a peak, the larger one's own peak).
    peak = max(big.tree_rss_mib, big.rss_mib)
    section.verdict(
        f"peak RSS at {big.examples:,} examples (flow process + GX worker)",
        f"{peak / 1024:.2f} GiB", "<= 2 GiB", peak <= 2048,
    )  # fmt: skip
    if len(runs) >= 2:
        small = min(runs, key=lambda r: r.examples)
        scale = big.examples / small.examples
        flow_ratio = big.flow_s / small.flow_s
        section.verdict(
            f"flow run time {big.examples // 1000}k / {small.examples // 1000}k",
            f"{flow_ratio:.1f}", f"<= {1.1 * scale:.0f} (linear: {scale:.0f}, +10%)",
            flow_ratio <= 1.1 * scale,
        )  # fmt: skip
        section.lines += [
            f"Whole command {big.examples // 1000}k / {small.examples // 1000}k: "
            f"{big.command_s / small.command_s:.1f}; per stage: "
            + ", ".join(
                f"{stage} {big.stage_s[stage] / small.stage_s[stage]:.1f}"
                for stage in STAGES
                if small.stage_s.get(stage) and big.stage_s.get(stage)
            )
            + ".",
            "",
        ]
    return section


# --------------------------------------------------------------------------------------------


def bench_shards(work: Path, examples: int, counts: list[int]) -> Section:
    """Item 8: 1 vs 2 vs 4 shards of the same run on a local process pool (flows/shard.py)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.workers.process import ProcessWorker

    slots, latency, per_process = 64, 0.2, 16
    section = Section(
        "8. Shards on a local process pool",
        f".venv/bin/python bench/run.py --only 8 --shards-examples {examples} "
        f"--shard-counts {','.join(map(str, counts))}",
    )
    home = work / "shards"
    home.mkdir(parents=True, exist_ok=True)
    rows, seconds = [], {}
    with prefect_server_process(home / "prefect-server") as (api_url, _):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
        env.update(
            PREFECT_API_URL=api_url,
            PREFECT_HOME=str(home / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_WORKER_QUERY_SECONDS="1",
            DISTILLERY_HOME=str(REPO),
            DISTILLERY_OUTPUT=str(home / "out"),
            DISTILLERY_CACHE_DIR=str(home / "cache"),
            # The per-process ceiling: each shard (and the parent alone) has 16 requests in
            # flight at most, as one worker of a fixed size would.
            DISTILLERY_CONCURRENCY=str(per_process),
            DISTILLERY_ADAPTIVE_CONCURRENCY="false",
            DISTILLERY_PROGRESS="false",
        )
        template = ProcessWorker.get_default_base_job_template()
        with get_client(sync_client=True) as client:
            client.create_work_pool(
                WorkPoolCreate(name="distillery-process", type="process",
                               base_job_template=template)
            )  # fmt: skip
            client.create_work_pool(
                WorkPoolCreate(name="distillery-shards", type="process",
                               base_job_template=template, concurrency_limit=max(counts))
            )  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
             "deployments/prefect.yaml", "--name", "adhoc", "--name", "shard"],
            cwd=REPO, env=env, check=True, capture_output=True,
        )  # fmt: skip
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
                cwd=REPO,
                env=env,
                stdout=(home / f"worker-{pool}.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for pool in ("distillery-process", "distillery-shards")
        ]
        try:
            for shards in counts:
                # A fresh teacher (a new port: new request keys) per count: nothing cached.
                with fake_teacher("--latency", str(latency), "--slots", str(slots)) as teacher:
                    out = home / f"out-{shards}"
                    with get_client(sync_client=True) as client:
                        deployment = client.read_deployment_by_name("distill/adhoc")
                        run = client.create_flow_run_from_deployment(
                            deployment.id,
                            parameters={
                                "recipe": str(RECIPE), "examples": examples, "output": str(out),
                                "teacher_base_url": teacher.url, "teacher_model": "fake-teacher",
                                "train": False, "shards": shards,
                            },
                        )  # fmt: skip
                        while True:
                            time.sleep(2)
                            run = client.read_flow_run(run.id)
                            if run.state is not None and run.state.is_final():
                                break
                        assert run.state.is_completed(), f"{shards} shards: {run.state}"
                        shard_runs = [
                            r
                            for r in client.read_flow_runs(
                                flow_filter=FlowFilter(name=FlowFilterName(any_=["distill-shard"]))
                            )
                            if str(run.id) in r.parameters["folder"]
                        ]
                    version = (out / "stock-advisor" / "LATEST").read_text().strip()
                    manifest = json.loads(
                        (out / "stock-advisor" / version / "manifest.json").read_text()
                    )
                    stats = teacher.stats()
                timings = manifest["timings_s"]
                wall = run.total_run_time.total_seconds()
                spans = [(r.start_time, r.end_time) for r in shard_runs]
                phase = (
                    (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds()
                    if spans
                    else None
                )
                seconds[shards] = float(timings["teacher"])
                rows.append(
                    [
                        str(shards),
                        f"{wall:.0f}",
                        f"{timings['teacher']:.0f}",
                        f"{examples / timings['teacher']:.0f}",
                        f"{phase:.0f}" if phase is not None else "in the parent",
                        f"{timings.get('shard_plan', 0):.2f}",
                        f"{timings.get('shard_merge', 0):.2f}",
                        str(stats["answered"]),
                        str(stats["max_in_flight"]),
                    ]
                )
                print(f"  {shards} shards: {rows[-1]}", file=sys.stderr, flush=True)
        finally:
            for worker in workers:
                os.killpg(worker.pid, signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
    section.lines += [
        f"The fake teacher: {slots} slots x {latency} s (a ceiling of {slots / latency:.0f} "
        f"answers/s), a fresh one per shard count; every process (the parent, each shard) has "
        f"{per_process} requests in flight at most (`DISTILLERY_CONCURRENCY`, adaptive off). "
        f"{examples:,} examples, `--from-scratch` by construction (a fresh output). The parent "
        "expands; the shards answer. Teacher stage: expansion plus answers (the manifest's "
        "`timings_s.teacher`); shard phase: first shard start to last shard end (Prefect's "
        "API); plan: hashing the request keys and writing the shards' inputs; merge: reading "
        "the parts back.",
        "",
    ]
    section.table(
        ["shards", "run s", "teacher stage s", "examples/s (teacher stage)", "shard phase s",
         "plan s", "merge s", "requests answered", "most in flight at the teacher"],
        rows,
    )  # fmt: skip
    base = seconds.get(1)
    for shards in counts[1:]:
        if base:
            section.verdict(
                f"teacher stage, 1 vs {shards} shards (speed-up)",
                ratio(base, seconds[shards]), "> 1", seconds[shards] < base,
            )  # fmt: skip
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Item 8 (shards, about 11 min) is run on its own: --only 8.
    parser.add_argument("--only", default="1a,1b,2,3,4,5,6,7", help="items, comma-separated")
    parser.add_argument("--shards-examples", type=int, default=20_000, help="item 8's size")
    parser.add_argument("--shard-counts", default="1,2,4", help="item 8's shard counts")
    parser.add_argument("--flow-repeats", type=int, default=5, help="repeats of items 1b, 7")
    parser.add_argument(
        "--scale", default="10000,100000", help="example counts of item 5, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of item 1a")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.md")
    parser.add_argument(
        "--work", type=Path, help="keep the runs' files (outputs, flow logs) in this new folder"
    )
    args = parser.parse_args()
    # Ctrl-C raises here and in the `distillery` runs started here (item 4 interrupts them),
    # even when the bench was started with SIGINT ignored (a shell's `cmd &` without job
    # control): exec passes an ignored signal on, a handled one is reset to the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run("1a", lambda: bench_throughput(args.repeats, 2000))
        run("2", lambda: bench_rate_limit("RPM", 3000, 1500, 256))
        # ~280 tokens a request: a TPM cap of 840,000 is 3000 requests a minute again.
        run("2", lambda: bench_rate_limit("TPM", 840_000, 1500, 256))
        run("3", lambda: bench_faults(2000))
        run("6", lambda: bench_batch(2000))
        if only & {"1b", "4", "7"}:
            with prefect_server(work / "prefect-server") as api_url:
                run("1b", lambda: bench_flow(api_url, work / "flow", 2000, args.flow_repeats))
                run("4", lambda: bench_interrupts(api_url, work / "interrupts"))
                run("7", lambda: bench_judge(api_url, work / "judge", 1000, args.flow_repeats))
        sizes = [int(n) for n in args.scale.split(",")]
        run("5", lambda: bench_scale(work, sizes))
        counts = [int(n) for n in args.shard_counts.split(",")]
        run("8", lambda: bench_shards(work, args.shards_examples, counts))
    verdicts = [v for s in sections for v in s.verdicts]
    summary = ["| figure | measured | target | |", "|---|---|---|---|", *verdicts]
    text = "\n".join(
        [
            *header,
            *summary,
            "",
            f"Whole run: {time.perf_counter() - started:.0f} s.",
            "",
            *(s.markdown() for s in sections),
        ]
    )
    args.out.write_text(text + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
