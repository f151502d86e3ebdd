"""Batch mode without a busy worker: the run ends while its batches run, a re-check run follows.

With DISTILLERY_BATCH_HOLD_S set, a teacher call whose batches are still running after that long
raises BatchesPending (tasks/teacher/batch.py). The distill flow then publishes nothing, shows the
batches' progress (`batch-progress` artifact), schedules a run of its own deployment with the
same parameters for when another look is worth it, and ends Completed (state name
AwaitingBatches), so the worker is free. The re-check run finds the batches recorded in the
request cache (the local database under DISTILLERY_CACHE_DIR, which the workers must then
share, or the shared store of DISTILLERY_CACHE=s3://...) and re-attaches to
them; once every stage's batches have ended, a run publishes the dataset.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment

from distillery.tasks.teacher import BatchesPending

logger = logging.getLogger("distillery.recheck")

WAITING = "waiting for batches"  # the summary's outcome
STATE_NAME = "AwaitingBatches"  # the final state's name (type Completed)
TAG = "batch-recheck"  # on every re-check run


def when(pending: BatchesPending) -> datetime:
    return datetime.fromtimestamp(pending.recheck_at, UTC)


def schedule_recheck(pending: BatchesPending) -> FlowRun | None:
    """A run of this flow run's deployment, with its parameters, at the suggested time.

    None when the run has no deployment (the CLI, a direct call). A re-check already scheduled
    for the same deployment and parameters (a nightly run that met the chain of an earlier one)
    is used instead of a second one.
    """
    context = FlowRunContext.get()
    this = context.flow_run if context is not None else None
    if this is None or this.deployment_id is None:
        return None
    parameters: dict[str, Any] = dict(this.parameters)
    with get_client(sync_client=True) as client:
        scheduled = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[this.deployment_id]),
                tags=FlowRunFilterTags(all_=[TAG]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
            ),
            limit=50,
        )
    for run in scheduled:
        if run.id != this.id and run.parameters == parameters:
            logger.info("a re-check is already scheduled: flow run %s", run.id)
            return run
    rerun = run_deployment(
        this.deployment_id,
        parameters=parameters,
        scheduled_time=when(pending),
        timeout=0,  # scheduled, not waited for
        as_subflow=False,  # a run of its own, not a child of this one
        tags=[TAG],
        idempotency_key=f"{this.id}-{TAG}",  # this run, retried, schedules no second one
        job_variables=this.job_variables or None,
    )
    assert isinstance(rerun, FlowRun)  # called from sync code: the run, not a coroutine
    return rerun


def _batches(n: int) -> str:
    return f"{n} batch" if n == 1 else f"{n} batches"


def message(pending: BatchesPending, recheck: FlowRun | None) -> str:
    """One line for the log, the final state and the terminal."""
    answered = sum(b["completed"] for b in pending.batches)
    total = sum(b["total"] for b in pending.batches)
    at = f"{when(pending):%Y-%m-%d %H:%M:%S} UTC"
    head = (
        f"{WAITING}: {_batches(len(pending.batches))} of the Batch API running ({answered} of "
        f"{total} requests answered); nothing published"
    )
    if recheck is not None:
        return f"{head}; re-check run {recheck.name} ({recheck.id}) scheduled for {at}"
    return (
        f"{head}; run the same command again after {at}: it re-attaches to the batches recorded "
        "in the request cache (DISTILLERY_CACHE_DIR, or the shared DISTILLERY_CACHE)"
    )
