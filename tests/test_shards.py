"""Sharded runs (flows/shard.py): in-process shards here; real workers on a real server below."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import fsspec
import pandas as pd
import pytest
import yaml

from distillery.flows.distill import distill
from distillery.flows.shard import (
    CRASHED_AFTER_S,
    ShardFailed,
    limit_name,
    merge_parts,
    shard_of,
    write_frame,
)
from distillery.tasks.answer import build_answer_request
from distillery.tasks.recipe import load_recipe
from distillery.tasks.teacher import TeacherEndpoint
from distillery.tasks.teacher.pacing import RateLimiter
from fake_teacher import FakeTeacher, Knobs

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "stock-advisor.yaml")


def run(teacher: FakeTeacher, output: Path, examples: int, **options: Any) -> dict[str, Any]:
    return distill(
        recipe=RECIPE,
        examples=examples,
        output=str(output),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=20,
        train=False,
        **options,
    )


def published(output: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    base = output / "stock-advisor"
    folder = base / (base / "LATEST").read_text().strip()
    rows = pd.concat(pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation"))
    return rows, json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("shards", [2, 3])
def test_in_process_shards_answer_each_input_once_and_publish_what_one_process_would(
    workdir: Path, teacher: FakeTeacher, shards: int
) -> None:
    out = workdir / "sharded"
    summary = run(teacher, out, examples=50, shards=shards)
    rows, manifest = published(out)
    assert len(rows) == 50 and rows["id"].is_unique
    assert summary["outcome"] == "published"
    stats = teacher.stats
    assert stats.answered_twice == 0 and stats.resent_after_answer == 0
    assert manifest["tokens"]["requests_sent"] == stats.answered == summary["requests_sent"]
    assert set(summary["timings_s"]) >= {"shard_plan", "shard_merge"}

    # Every shard's part holds exactly the inputs whose answer request hashes to it.
    recipe = load_recipe(RECIPE)
    endpoint = TeacherEndpoint(model="fake-teacher", base_url=teacher.url)
    dispatch = out / "stock-advisor" / "runs" / manifest["run_id"] / "shards" / "answers-1"
    seen: list[str] = []
    for part in sorted(dispatch.glob("part-*.parquet")):
        shard = int(part.stem.removeprefix("part-"))
        frame = pd.read_parquet(part)
        keys = [
            build_answer_request(recipe, c, q).key(endpoint)
            for c, q in zip(frame["user_context"], frame["question"], strict=True)
        ]
        assert {shard_of(k, shards) for k in keys} == {shard}
        seen += list(frame["id"])
    assert len(seen) == len(set(seen))
    assert set(rows["id"]) <= set(seen)
    assert len(list(dispatch.glob("part-*.parquet"))) == shards

    # The same run in one process, on the same request cache: nothing sent, the same content.
    before = teacher.stats.received
    single = run(teacher, workdir / "single", examples=50, shards=1)
    assert teacher.stats.received == before and single["requests_sent"] == 0
    _, alone = published(workdir / "single")
    assert alone["content_fingerprint"] == manifest["content_fingerprint"]

    # A re-run of the sharded run: nothing changed, nothing sent.
    again = run(teacher, out, examples=50, shards=shards)
    assert teacher.stats.received == before
    assert again["outcome"] == "unchanged" and again["requests_sent"] == 0


def test_in_process_shards_take_the_endpoints_global_concurrency_limit(
    workdir: Path, teacher: FakeTeacher
) -> None:
    from prefect.client.orchestration import get_client

    run(teacher, workdir / "out", examples=20, shards=2, refresh=False)
    endpoint = TeacherEndpoint(model="fake-teacher", base_url=teacher.url)
    with get_client(sync_client=True) as client:
        found = client.read_global_concurrency_limit_by_name(limit_name(endpoint))
    assert found.limit == 2 and found.active_slots == 0


def test_in_process_shards_judge_their_answers_like_one_process(
    workdir: Path, teacher: FakeTeacher
) -> None:
    """The judge stage runs in the shards, with the answers: every kept answer scored once, low
    scores rejected with the judge's reason, the manifest's judge entry the shards' sum; one
    process on the same cache publishes the same content and sends nothing."""
    teacher.knobs.judge_score = 8
    teacher.knobs.judge_low_marker = "switching"  # in about one answer in fifteen
    data = yaml.safe_load(Path(RECIPE).read_text())
    data["seeds_file"] = str(Path(RECIPE).parent / data["seeds_file"])
    data["judge"] = {"enabled": True, "min_score": 5, "max_low_share": 0.5}
    data["validation"] = {**data["validation"], "max_rejected_share": 0.5}
    recipe = workdir / "judged.yaml"
    recipe.write_text(yaml.safe_dump(data))

    def judged_run(output: Path, shards: int) -> dict[str, Any]:
        return distill(
            recipe=str(recipe), examples=40, output=str(output), teacher_model="fake-teacher",
            teacher_base_url=teacher.url, answer_batch_size=10, train=False, shards=shards,
        )  # fmt: skip

    summary = judged_run(workdir / "sharded", 2)
    rows, manifest = published(workdir / "sharded")
    base = workdir / "sharded" / "stock-advisor"
    rejected = pd.read_parquet(base / (base / "LATEST").read_text().strip() / "rejected.parquet")
    assert len(rows) == 40 and (rows["judge_score"] == 8).all()
    assert not rows["answer"].str.contains("switching").any()
    low = rejected[rejected["reason"] == "low_score"]
    assert len(low) > 0 and low["detail"].str.contains("marked as a poor answer").all()
    entry = manifest["judge"]
    assert entry["requests"] == entry["requests_sent"] == teacher.stats.judged["score"]
    assert entry["scored"] >= 40 + len(low) and entry["rejected"]["low_score"] == len(low)
    assert summary["judge"] == entry and summary["outcome"] == "published"
    parts = list((base / "runs" / manifest["run_id"] / "shards").glob("answers-*/part-*.parquet"))
    assert len(parts) >= 2 and all("judge_score" in pd.read_parquet(p) for p in parts)

    before = teacher.stats.received
    single = judged_run(workdir / "single", 1)
    assert teacher.stats.received == before and single["requests_sent"] == 0
    _, alone = published(workdir / "single")
    assert alone["content_fingerprint"] == manifest["content_fingerprint"]
    assert alone["judge"]["mean_score"] == entry["mean_score"] == 8


def test_merge_refuses_parts_that_miss_an_input(tmp_path: Path) -> None:
    """A part lost or cut short fails the run before anything is validated or published."""
    inputs = pd.DataFrame({"id": ["a", "b", "c"], "user_context": ["x"] * 3, "question": ["q"] * 3})
    write_frame(f"{tmp_path}/part-0.parquet", inputs.iloc[:2].assign(answer="fine"))
    counters = {"stats": {}, "sent": {}, "rejects": {}}
    (tmp_path / "stats-0.json").write_text(json.dumps(counters))
    with pytest.raises(ShardFailed, match=r"1 inputs came back from no shard .* \(e\.g\. c\)"):
        merge_parts(str(tmp_path), [0], inputs, elsewhere=True)
    write_frame(f"{tmp_path}/part-1.parquet", inputs.iloc[2:].assign(answer="fine"))
    (tmp_path / "stats-1.json").write_text(json.dumps(counters))
    merged = merge_parts(str(tmp_path), [1, 0], inputs, elsewhere=True)
    assert list(merged.answers.rows["id"]) == ["a", "b", "c"]  # in the order of the inputs


def test_rate_share_scales_set_and_learned_limits() -> None:
    limiter = RateLimiter(rpm=600, tpm=None, share=1 / 3)
    assert limiter.rpm == 200
    limiter.observe({"x-ratelimit-limit-requests": "300", "x-ratelimit-limit-tokens": "90000"})
    assert (limiter.rpm, limiter.tpm) == (100, 30000)  # the endpoint's limits, a third each
    learned = RateLimiter(rpm=None, tpm=None, share=0.5)
    learned.observe({"x-ratelimit-limit-requests": "1000"})
    assert learned.rpm == 500


# ---- Real workers: a Prefect server, a shard pool limited to 2 runs, two workers, moto S3 ----

SHARD_POOL = "distillery-shards"
PARENT_POOL = "distillery-process"
EXAMPLES = 300
SHARDS = 3
SHARD_CONCURRENCY = 4  # requests a shard has in flight at most (DISTILLERY_CONCURRENCY)
RPM = 2400  # the fake teacher's cap, per second pro rata (40 requests in any second)


@dataclass
class ShardRun:
    id: str
    name: str
    run_count: int
    state: str
    running: list[tuple[datetime, datetime]]  # from each Running state to the next state
    shard: int
    message: str  # of its last state


@dataclass
class Deployed:
    api_url: str
    output: str
    parent: dict[str, Any]  # id, state, summary of the sharded run
    shards: list[ShardRun]
    killed: str | None  # the shard run whose worker was SIGKILLed with it
    killed_worker: str | None  # that worker's name
    stats: Any  # the fake teacher's counters after the run
    rerun_state: str
    rerun_received: int  # requests the same run again sent
    limit: Any  # the endpoint's global concurrency limit after the runs


async def _create_pools(api_url: str) -> None:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    async with PrefectClient(api_url) as client:
        await client.create_work_pool(
            WorkPoolCreate(name=PARENT_POOL, type="process", base_job_template=template)
        )
        await client.create_work_pool(
            WorkPoolCreate(
                name=SHARD_POOL, type="process", base_job_template=template, concurrency_limit=2
            )
        )


async def _start_parent(api_url: str, parameters: dict[str, Any]) -> str:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        deployment = await client.read_deployment_by_name("distill/adhoc")
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        return str(run.id)


async def _flow_run(api_url: str, run_id: str) -> Any:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        return await client.read_flow_run(UUID(run_id))


async def _shard_runs(api_url: str, parent_id: str | None = None) -> list[Any]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with PrefectClient(api_url) as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["distill-shard"]))
        )
    return [r for r in runs if parent_id is None or r.parameters["folder"].count(parent_id)]


async def _history(api_url: str, run: Any) -> ShardRun:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        states = sorted(await client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
    running = [
        (s.timestamp, nxt.timestamp) for s, nxt in itertools.pairwise(states) if s.is_running()
    ]
    shard = int(run.parameters["shard"])
    message = str(run.state.message or "")
    return ShardRun(
        str(run.id), run.name, run.run_count, str(run.state.name), running, shard, message
    )


def _wait(api_url: str, run_id: str, timeout: float, on_poll: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        run = asyncio.run(_flow_run(api_url, run_id))
        if run.state is not None and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"{run.name} still {run.state.name} after {timeout} s"
        if on_poll is not None:
            on_poll()
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Deployed]:
    """A 3-shard run of 300 examples on a real server, two shard workers, S3 for the cache and
    the output; one shard worker SIGKILLed mid-run with the shard run it ran; then the same run
    again.

    Expected duration: about 3 minutes (183 s measured on 2 cores with a CI run beside it:
    server, three workers, seven flow-run processes; the killed shard is declared crashed 90 to
    120 s after its last heartbeat, while the other shards go on); most of the rest is Prefect
    starting processes.
    """
    import boto3

    from distillery.flows import stack as stack_module

    tmp = tmp_path_factory.mktemp("shards")
    home = tmp / "home"
    home.mkdir()
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="shards")
    output = "s3://shards/datasets"
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = stack_module._child_env(home, api_url)
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    env.update(
        DISTILLERY_CACHE="s3://shards/teacher-cache",  # shared by every worker
        DISTILLERY_CACHE_DIR=str(tmp / "local-cache"),  # each process's local first level
        DISTILLERY_CONCURRENCY=str(SHARD_CONCURRENCY),
        DISTILLERY_PROGRESS="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="0",
    )
    knobs = Knobs(latency=0.05, slots=32, rpm=RPM, rate_window=1.0)
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = home / f"{name}.log"
        with log.open("wb") as out:
            # Its own session: a worker started with a plain `&` ignores SIGTERM (flows/stack.py).
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", *args], cwd=REPO, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        started.append((name, proc, log))
        return proc

    with FakeTeacher(knobs) as teacher:
        try:
            server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
            deadline = time.monotonic() + 180
            while not stack_module._healthy(api_url):
                assert server.poll() is None and time.monotonic() < deadline, "server down"
                time.sleep(0.5)
            asyncio.run(_create_pools(api_url))
            deploy = subprocess.run(
                [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                 "deployments/prefect.yaml", "--name", "adhoc", "--name", "shard"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
            for name, pool in (
                ("worker-parent", PARENT_POOL),
                ("worker-shards-1", SHARD_POOL),
                ("worker-shards-2", SHARD_POOL),
            ):
                start(name, "worker", "start", "--pool", pool, "--name", name)
            parameters = {
                "recipe": str(REPO / "recipes" / "stock-advisor.yaml"),
                "examples": EXAMPLES,
                "output": output,
                "teacher_base_url": teacher.url,
                "teacher_model": "fake-teacher",
                "train": False,
                "shards": SHARDS,
                "answer_batch_size": 40,
            }
            parent_id = asyncio.run(_start_parent(api_url, parameters))
            killed: list[str] = []
            answered_at_start: list[int] = []

            workers = {proc.pid: name for name, proc, _ in started if name.startswith("worker-s")}

            def kill_one_shard_worker_mid_run() -> None:
                """SIGKILL a shard worker and every process it started, its shard run among
                them, as a lost machine would: no one is left to report the run's end."""
                if killed:
                    return
                running = [
                    r
                    for r in asyncio.run(_shard_runs(api_url, parent_id))
                    if r.state is not None and r.state.is_running() and r.infrastructure_pid
                ]
                if not running:
                    return
                if not answered_at_start:
                    answered_at_start.append(teacher.stats.answered)
                # Mid-run: some of the shards' answers are in, most are not.
                if teacher.stats.answered - answered_at_start[0] < 40:
                    return
                victim = min(running, key=lambda r: r.start_time)  # the furthest on
                pid = int(str(victim.infrastructure_pid).rsplit(":", 1)[-1])
                table = stack_module._proc_table()
                while pid in table and pid not in workers:
                    pid = table[pid][0]  # up to the worker that started the run
                assert pid in workers, f"no shard worker started {victim.name}"
                for group in stack_module._groups_under(pid):  # the worker first, then its runs
                    os.killpg(group, signal.SIGKILL)
                killed.append(str(victim.id))
                killed.append(workers[pid])

            parent = _wait(api_url, parent_id, 900, kill_one_shard_worker_mid_run)
            print(f"sharded run {parent.name}: {parent.state.name}; killed (run, worker) {killed}")
            shards = [
                asyncio.run(_history(api_url, r))
                for r in asyncio.run(_shard_runs(api_url, parent_id))
            ]
            stats = teacher.stats
            print(
                f"teacher: {stats.received} received, {stats.answered} answered, "
                f"{stats.rate_limited} rate-limited, {stats.answered_twice} answered twice, "
                f"{stats.resent_after_answer} re-sent after their answer, most in flight "
                f"{stats.max_in_flight}"
            )
            summary = {"id": parent_id, "state": parent.state.name, "name": parent.name}
            received = teacher.stats.received
            again = asyncio.run(_start_parent(api_url, parameters))
            rerun = _wait(api_url, again, 600)
            limit = asyncio.run(_read_limit(api_url, teacher.url))
            yield Deployed(
                api_url, output, summary, shards, killed[0] if killed else None,
                killed[1] if killed else None, stats,
                str(rerun.state.name), teacher.stats.received - received, limit,
            )  # fmt: skip
        finally:
            for name, proc, log in reversed(started):  # workers (and their runs), then server
                stack_module._stop_group(proc.pid)
                proc.wait()
                print(_log_tail(name, str(log)))


async def _read_limit(api_url: str, base_url: str) -> Any:
    from prefect.client.orchestration import PrefectClient

    endpoint = TeacherEndpoint(model="fake-teacher", base_url=base_url)
    async with PrefectClient(api_url) as client:
        return await client.read_global_concurrency_limit_by_name(limit_name(endpoint))


def _log_tail(name: str, path: str, chars: int = 2500) -> str:
    return f"--- {name} ({path}):\n{Path(path).read_text(errors='replace')[-chars:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.s3
def test_three_shards_on_two_workers_publish_every_input_answered_once(
    deployed: Deployed,
) -> None:
    assert deployed.parent["state"] == "Completed", deployed.parent
    fs, root = fsspec.core.url_to_fs(f"{deployed.output}/stock-advisor")
    version = fs.cat_file(f"{root}/LATEST").decode().strip()
    rows = pd.concat(
        pd.read_parquet(fs.open(f"{root}/{version}/{split}.parquet", "rb"))
        for split in ("train", "validation")
    )
    assert len(rows) == EXAMPLES and rows["id"].is_unique
    parts = fs.glob(f"{root}/runs/{deployed.parent['id']}/shards/answers-*/part-*.parquet")
    by_shard = [set(pd.read_parquet(fs.open(p, "rb"))["id"]) for p in parts]
    assert len({p.rsplit("/", 1)[-1] for p in parts}) == SHARDS
    everything = set().union(*by_shard)
    assert sum(len(ids) for ids in by_shard) == len(everything)  # no input in two shards
    assert set(rows["id"]) <= everything
    # Every request answered once, but for what the killed shard had in flight.
    assert deployed.stats.answered_twice <= SHARD_CONCURRENCY
    # One spend ledger for the run: the parent's entry and each finished shard run's.
    ledger = fs.glob(f"shards/teacher-cache/spend/{deployed.parent['id']}/*")
    assert len(ledger) >= SHARDS + 1, ledger


@pytest.mark.slow
@pytest.mark.s3
def test_never_more_than_two_shards_answer_at_once(deployed: Deployed) -> None:
    events = sorted(
        [(start, 1) for run in deployed.shards for start, _ in run.running]
        + [(end, -1) for run in deployed.shards for _, end in run.running]
    )
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2, [(r.name, r.running) for r in deployed.shards]
    assert deployed.limit.limit == SHARDS  # the endpoint's limit, created by the first run


@pytest.mark.slow
@pytest.mark.s3
def test_shards_share_the_endpoints_rate_budget(deployed: Deployed) -> None:
    assert deployed.stats.rate_limited <= 2, deployed.stats.summary()


@pytest.mark.slow
@pytest.mark.s3
def test_shard_whose_worker_was_killed_runs_again_and_resends_at_most_its_requests_in_flight(
    deployed: Deployed,
) -> None:
    assert deployed.killed is not None, "no shard was running long enough to be killed"
    victim = next(r for r in deployed.shards if r.id == deployed.killed)
    # No worker was left to report it: the heartbeat automation marked it Crashed.
    assert victim.state == "Crashed", victim
    assert f"no heartbeat for {CRASHED_AFTER_S} s" in victim.message, victim
    assert deployed.killed_worker in ("worker-shards-1", "worker-shards-2")
    again = [r for r in deployed.shards if r.shard == victim.shard and r.id != victim.id]
    assert [r.state for r in again] == ["Completed"], again
    assert deployed.stats.resent_after_answer <= SHARD_CONCURRENCY


@pytest.mark.slow
@pytest.mark.s3
def test_the_same_run_again_sends_no_request(deployed: Deployed) -> None:
    assert deployed.rerun_state == "Completed"
    assert deployed.rerun_received == 0
