"""Sharded runs: the answer stage split by request key over child flow runs (one per shard).

The parent (the distill flow) expands, as it does unsharded: expansion is sequential by nature
(each round rejects near-duplicates of every input accepted so far, and asks for what is still
missing), and it is the small part of the traffic (one request per `examples_per_request` new
inputs, against one per input for the answers). The answers are independent of each other: the
parent splits the inputs to answer by a hash of each answer request's key into N shards, writes
each shard's inputs as a Parquet file beside the run, and starts one child flow run per shard:

- from a deployment (a parent run on a work pool): `run_deployment` of the `distill-shard/shard`
  deployment (deployments/prefect.yaml), with an idempotency key per parent run, dispatch and
  shard, so a retried parent never starts a shard twice; a shard whose process died (Crashed:
  its worker saw it exit, e.g. on SIGKILL) gets a new run, up to `scale.attempts` runs; a shard
  whose worker died with it (a machine lost, a pod evicted: no one is left to report the end)
  is marked Crashed by an automation when its heartbeats stop (`ensure_crash_detection`), and
  gets a new run the same way;
- else (the CLI, Prefect's ephemeral mode): the same flow as in-process subflows, one at a time.

Each shard runs today's answer tasks and engine and writes its answered rows as a Parquet part
(plus its counters as JSON) to the output store; the parent reads the parts back, checks that
every input came back exactly once, and the flow validates and publishes once, as unsharded. A
shard that fails for good fails the run before anything is published.

One rate budget per endpoint: a Prefect global concurrency limit named after the endpoint
(`limit_name`, created if missing) bounds the shards answering at once, across runs; a shard
takes one slot and paces to 1 / limit of the endpoint's RPM and TPM, set or learned from its
headers (EngineSettings.rate_share). In-process shards run one at a time and take every slot
(the whole budget). 429s with Retry-After still pause the shard that got them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import re
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import FlowRun
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from distillery.tasks.answer import AnswerResult, build_answer_request
from distillery.tasks.judge import JudgedAnswers, judge_summary, sent_from_now, submit_answers
from distillery.tasks.recipe import Recipe
from distillery.tasks.record import INPUT_COLUMNS
from distillery.tasks.teacher import (
    CallStats,
    EngineSettings,
    TeacherEndpoint,
    TeacherError,
    close_engine,
)

# A shard's slot of the endpoint's concurrency limit is leased (Prefect renews the lease while
# the shard runs); a shard whose process died frees its slot when the lease runs out. 60 s is
# the shortest lease Prefect 3.9's server accepts.
LEASE_S = 60.0
POLL_S = 2.0  # between two looks at the shard runs of a dispatch
# A shard run sends a heartbeat event every 30 s (PREFECT_FLOWS_HEARTBEAT_FREQUENCY in the shard
# deployment's job variables, deployments/prefect.yaml; 30 s is Prefect's shortest); a run that
# sent none for CRASHED_AFTER_S (three heartbeats missed) is marked Crashed.
CRASHED_AFTER_S = 90


class ShardFailed(RuntimeError):
    """A shard failed for good: nothing is published; the message names the shard run."""


def limit_name(endpoint: TeacherEndpoint) -> str:
    """The global concurrency limit of an endpoint: one per server and model, across runs."""
    who = re.sub(r"[^a-z0-9.]+", "-", f"{endpoint.identity} {endpoint.model}".lower())
    return f"teacher-{who.strip('-')}"


def shard_of(key: str, shards: int) -> int:
    """The shard of a request key (a SHA-256 in hex): stable across runs and machines."""
    return int(key[:15], 16) % shards


def split_inputs(
    recipe: Recipe, endpoint: TeacherEndpoint, inputs: pd.DataFrame, shards: int
) -> list[pd.DataFrame]:
    """The inputs of each shard, by a hash of their answer request's key (pure)."""
    keys = [
        build_answer_request(recipe, c, q).key(endpoint)
        for c, q in zip(inputs["user_context"], inputs["question"], strict=True)
    ]
    which = pd.Series([shard_of(k, shards) for k in keys], index=inputs.index)
    return [inputs[which == i].reset_index(drop=True) for i in range(shards)]


@dataclass(frozen=True)
class Sharding:
    """How one run's answers are spread: the parent's plan, the same for every dispatch."""

    shards: int
    folder: str  # URI under the output where the shards' inputs and parts are written
    run_id: str
    limit: str  # the endpoint's global concurrency limit
    slots: int  # its size: shards answering at once
    deployment: str | None  # None: in-process subflows
    attempts: int
    budget_id: str | None  # the spend ledger the shards share (DISTILLERY_BUDGET_ID)
    judge: TeacherEndpoint | None = None  # who scores the answers in the shards (None: off)


def plan_sharding(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    output: str,
    run_id: str,
    shards: int,
    judge: TeacherEndpoint | None = None,
) -> Sharding:
    """Check that the run can be sharded and make sure the endpoint's limit exists; `judge`:
    who scores the answers (the judge stage runs in the shards, with the answers)."""
    settings = EngineSettings()
    if settings.batch:
        raise TeacherError(
            f"--shards {shards} with --batch (DISTILLERY_BATCH): the Batch API already takes the "
            "whole run at once; drop one of them."
        )
    deployed = this_deployment.get_id() is not None
    if deployed and endpoint.embedded:
        raise TeacherError(
            f"--shards {shards} on a work pool needs a teacher endpoint the shard workers can "
            "reach; the embedded teacher runs inside one process: pass --teacher-base-url (or "
            "run from the CLI, where shards run in-process)."
        )
    if deployed and judge is not None and judge.embedded:
        raise TeacherError(
            f"--shards {shards} on a work pool with judge.base_url: embedded: the embedded judge "
            "runs inside one process, which the shard workers cannot reach: give judge.base_url "
            "an endpoint they can reach, or run from the CLI, where shards run in-process."
        )
    name = limit_name(endpoint)
    slots = ensure_limit(name, recipe.scale.max_running or shards)
    if deployed:
        # No such deployment: run_deployed says so when it starts the shards, with the fix.
        with contextlib.suppress(ObjectNotFound):
            ensure_crash_detection(recipe.scale.deployment)
    budget = None
    if deployed:
        # One spend total (and one --max-cost cap) for the parent and its shards, each its own
        # process: the run's id, unless the workers were given a budget of their own. Set in
        # this process before its engine is made (a deployed parent runs in a process of its
        # own; in-process shards share the parent's engine, and so its spend).
        budget = settings.budget_id or run_id
        os.environ["DISTILLERY_BUDGET_ID"] = budget
    return Sharding(
        shards=shards,
        folder=output.rstrip("/") + f"/{recipe.name}/runs/{run_id}/shards",
        run_id=run_id,
        limit=name,
        slots=slots,
        deployment=recipe.scale.deployment if deployed else None,
        attempts=recipe.scale.attempts,
        budget_id=budget,
        judge=judge,
    )


def ensure_limit(name: str, slots: int) -> int:
    """The size of the global concurrency limit `name`, created with `slots` if missing."""
    with get_client(sync_client=True) as client:
        try:
            return int(client.read_global_concurrency_limit_by_name(name).limit)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots)
            )
            return slots


def ensure_crash_detection(deployment: str) -> str:
    """The automation that marks a run of `deployment` Crashed when its heartbeats stop (created
    if missing; Prefect's recipe for "zombie" flow runs, limited to this deployment's runs). A
    worker that dies with its run cannot report the crash, and the run would stay Running for
    ever: the parent would wait on it, and it would hold a slot of the shard pool."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = f"distillery: crash runs of {deployment} whose heartbeats stop"
    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(name):
            return name
        found = client.read_deployment_by_name(deployment)
        ended = ("Completed", "Failed", "Cancelled", "Crashed")
        client.create_automation(
            AutomationCore(
                name=name,
                description=(
                    f"Created by distillery (flows/shard.py): a run of the {deployment} "
                    f"deployment that sent no heartbeat for {CRASHED_AFTER_S} s is marked "
                    "Crashed, and its parent run starts a new run of the shard."
                ),
                trigger=EventTrigger(
                    after={"prefect.flow-run.heartbeat"},
                    expect={
                        "prefect.flow-run.heartbeat",
                        *(f"prefect.flow-run.{s}" for s in ended),
                    },
                    match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
                    match_related=ResourceSpecification(
                        {"prefect.resource.id": f"prefect.deployment.{found.id}"}
                    ),
                    for_each={"prefect.resource.id"},
                    posture=Posture.Proactive,
                    threshold=1,
                    within=timedelta(seconds=CRASHED_AFTER_S),
                ),
                actions=[
                    ChangeFlowRunState(
                        state=StateType.CRASHED,
                        message=(
                            f"no heartbeat for {CRASHED_AFTER_S} s: its worker or machine died "
                            "with it"
                        ),
                    )
                ],
            )
        )
    return name


def dispatch(
    sharding: Sharding,
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    batch_size: int,
    inputs: pd.DataFrame,
    label: str,
    timings: dict[str, float],
) -> Merged:
    """Answer `inputs` in the shards; their rows back in the order of `inputs`. Adds the
    parent's own seconds to plan and to merge to `timings`."""
    s = sharding
    log = get_run_logger()
    started = time.monotonic()
    folder = f"{s.folder}/{label}"
    parts = split_inputs(recipe, endpoint, inputs, s.shards)
    for i, part in enumerate(parts):
        write_frame(f"{folder}/inputs-{i}.parquet", part)
    timings["plan"] = timings.get("plan", 0.0) + time.monotonic() - started
    log.info(
        "%s: %d inputs in %d shards (%s), at most %d at once (limit %s)",
        label, len(inputs), s.shards, ", ".join(str(len(p)) for p in parts), s.slots, s.limit,
    )  # fmt: skip
    wanted = [i for i, part in enumerate(parts) if len(part)]
    shard_params: list[dict[str, Any]] = [
        {
            "recipe": recipe,
            "endpoint": endpoint,
            "folder": folder,
            "shard": i,
            "batch_size": batch_size,
            "limit": s.limit,
            # In-process shards run one at a time: each takes the whole budget.
            "occupy": 1 if s.deployment else s.slots,
            "rate_share": 1 / s.slots if s.deployment else 1.0,
            "budget_id": s.budget_id,
            "judge": s.judge,
        }
        for i in wanted
    ]
    if s.deployment is None:
        for params in shard_params:
            distill_shard(**params)
    else:
        run_deployed(s, label, shard_params)
    started = time.monotonic()
    merged = merge_parts(folder, wanted, inputs, elsewhere=s.deployment is not None)
    timings["merge"] = timings.get("merge", 0.0) + time.monotonic() - started
    return merged


@dataclass
class Merged:
    answers: AnswerResult
    sent_elsewhere: CallStats  # what out-of-process shards sent (the parent's engine did not)
    judge: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # each shard's summary


def merge_parts(folder: str, shards: list[int], inputs: pd.DataFrame, elsewhere: bool) -> Merged:
    """The shards' parts as one answer result, each input once, in the order of `inputs`."""
    frames, stats, sent, rejects = [], CallStats(), CallStats(), Counter[str]()
    judged: list[dict[str, Any]] = []
    for i in shards:
        frames.append(read_frame(f"{folder}/part-{i}.parquet"))
        counters = json.loads(read_bytes(f"{folder}/stats-{i}.json"))
        stats.add(CallStats(**counters["stats"]))
        sent.add(CallStats(**counters["sent"]))
        rejects.update(counters["rejects"])
        if counters.get("judge") is not None:
            judged.append(counters["judge"])
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    rows = rows.drop_duplicates("id") if len(rows) else rows
    missing = set(inputs["id"]) - set(rows["id"] if len(rows) else ())
    if missing:
        raise ShardFailed(
            f"{len(missing)} inputs came back from no shard of {folder} (e.g. {min(missing)}): "
            "a part was overwritten or lost; run the same command again (answers are cached)."
        )
    rows = rows.set_index("id").loc[inputs["id"]].reset_index()
    rows = rows[[*inputs.columns, *(c for c in rows.columns if c not in inputs.columns)]]
    return Merged(
        AnswerResult(rows=rows, stats=stats, rejects=rejects),
        sent if elsewhere else CallStats(),
        judged,
    )


def run_deployed(sharding: Sharding, label: str, shard_params: list[dict[str, Any]]) -> None:
    """Start one run of the shard deployment per shard and wait for all of them; a shard whose
    run crashed (its process died) gets a new run, until it has had `attempts` runs.

    A new run, not the crashed one scheduled again: a worker reports its run crashed when the
    run's process exits, which can come after the parent has seen the crash (the process's own
    report comes first) and would then crash the rescheduled attempt while it runs.
    """
    from prefect.deployments import run_deployment

    log = get_run_logger()

    def start(params: dict[str, Any], attempt: int) -> UUID:
        i = params["shard"]
        again = f"-attempt-{attempt}" if attempt > 1 else ""
        try:
            run = run_deployment(
                sharding.deployment,  # type: ignore[arg-type]
                parameters=params,
                timeout=0,
                flow_run_name=f"{sharding.run_id[:8]}-{label}-shard-{i}{again}",
                # A retried parent finds the shard runs it started, instead of starting more.
                idempotency_key=f"{sharding.run_id}/{label}/shard-{i}{again}",
            )
        except ObjectNotFound:
            raise ShardFailed(
                f"no deployment {sharding.deployment} on this Prefect server to run the shards "
                "on: deploy it (prefect --no-prompt deploy --prefect-file "
                "deployments/prefect.yaml --name shard) or set the recipe's scale.deployment."
            ) from None
        assert isinstance(run, FlowRun)  # called from sync code: the run, not a coroutine
        return run.id

    attempts = {p["shard"]: 1 for p in shard_params}
    pending = {p["shard"]: (start(p, 1), p) for p in shard_params}
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(POLL_S)
            for i, (run_id, params) in list(pending.items()):
                run = client.read_flow_run(run_id)
                state = run.state
                if state is None or not state.is_final():
                    continue
                if state.is_completed():
                    del pending[i]
                elif state.is_crashed() and attempts[i] < sharding.attempts:
                    attempts[i] += 1
                    log.warning(
                        "shard %d (%s) crashed (%s): starting run %d of it",
                        i, run.name, state.message, attempts[i],
                    )  # fmt: skip
                    pending[i] = (start(params, attempts[i]), params)
                else:
                    raise ShardFailed(
                        f"shard {i} of {label} ({run.name}, flow run {run_id}) ended "
                        f"{state.name} in run {attempts[i]} of {sharding.attempts}: "
                        f"{state.message}; nothing was published. Its answers so far are "
                        "cached: run the same command again."
                    )


def write_frame(uri: str, frame: pd.DataFrame) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), f, compression="zstd")


def read_frame(uri: str) -> pd.DataFrame:
    """A part as written: lists and dicts come back as Python objects, not numpy arrays."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    return pd.DataFrame(table.to_pylist(), columns=table.column_names)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return bytes(f.read())


def _use_settings(share: float, budget_id: str | None, *endpoints: TeacherEndpoint | None) -> None:
    """This process's engines for `endpoints` (the teacher's, a judge's) pace to `share` of
    their endpoint's limits and count their spend in the ledger `budget_id` (None: as the
    environment says)."""
    settings = EngineSettings()
    if settings.rate_share == share and budget_id in (None, settings.budget_id):
        return
    # An engine reads its settings from the environment when it is made (tasks/teacher).
    os.environ["DISTILLERY_RATE_SHARE"] = repr(share)
    if budget_id is not None:
        os.environ["DISTILLERY_BUDGET_ID"] = budget_id
    for endpoint in endpoints:
        if endpoint is not None:
            close_engine(endpoint)


def _slots(limit: str | None, occupy: int) -> AbstractContextManager[None]:
    if limit is None:
        return nullcontext()
    return concurrency(limit, occupy=occupy, strict=True, lease_duration=LEASE_S)


@flow(
    name="distill-shard",
    flow_run_name="shard-{shard}",
    task_runner=ThreadPoolTaskRunner(max_workers=4),  # type: ignore[arg-type]
    retries=1,
    retry_delay_seconds=5,
)
def distill_shard(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    folder: Annotated[
        str, Field(description="URI of the dispatch: inputs-<shard>.parquet is read there.")
    ],
    shard: Annotated[int, Field(ge=0, description="Which shard of the dispatch this run answers.")],
    batch_size: Annotated[int, Field(ge=1, description="Inputs per answer task.")] = 500,
    limit: Annotated[
        str | None, Field(description="The endpoint's global concurrency limit (None: unbounded).")
    ] = None,
    occupy: Annotated[
        int, Field(ge=1, description="Slots of `limit` this shard takes while it answers.")
    ] = 1,
    rate_share: Annotated[
        float, Field(gt=0, le=1, description="Share of the endpoint's RPM and TPM it paces to.")
    ] = 1.0,
    budget_id: Annotated[
        str | None,
        Field(description="Spend ledger shared with the parent and the other shards (None: own)."),
    ] = None,
    judge: Annotated[
        TeacherEndpoint | None,
        Field(description="Who scores the answers (the judge stage); None: the judge is off."),
    ] = None,
) -> dict[str, Any]:
    """Answer one shard's inputs (and judge the answers, with the judge on); write the answered
    rows as a Parquet part."""
    inputs = read_frame(f"{folder}/inputs-{shard}.parquet")[INPUT_COLUMNS]
    with _slots(limit, occupy):
        _use_settings(rate_share, budget_id, endpoint, judge)
        sent_now = sent_from_now(endpoint, judge)
        futures: list[PrefectFuture[AnswerResult]] = []
        for start in range(0, len(inputs), batch_size):
            batch = inputs.iloc[start : start + batch_size].reset_index(drop=True)
            label = f"shard-{shard}-batch-{len(futures) + 1}"
            futures.append(submit_answers(recipe, endpoint, judge, batch, label))
        results = [f.result() for f in futures]
        sent = sent_now()
    stats, rejects = CallStats(), Counter[str]()
    for result in results:
        stats.add(result.stats)
        rejects.update(result.rejects)
    rows = pd.concat([r.rows for r in results], ignore_index=True)
    write_frame(f"{folder}/part-{shard}.parquet", rows)
    counters = {
        "stats": dataclasses.asdict(stats),
        "sent": dataclasses.asdict(sent),
        "rejects": dict(rejects),
        # What the judge did here (tasks/judge.py judge_summary); the parent adds the shards'.
        "judge": None
        if judge is None
        else judge_summary(
            [r for r in results if isinstance(r, JudgedAnswers)], str(flow_run.get_id() or "")
        ),
    }
    # After the part: a part without its counters is never read (the parent reads both).
    write_bytes(f"{folder}/stats-{shard}.json", json.dumps(counters).encode())
    get_run_logger().info(
        "shard %d: %d inputs answered (%d sent, %d cached)",
        shard, len(rows), sent.sent, stats.cached,
    )  # fmt: skip
    return {"shard": shard, "rows": len(rows), **counters}
