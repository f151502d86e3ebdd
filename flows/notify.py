"""Failure notification: one message naming the failed stage and its cause, through a Prefect block.

`notify_failure` is an `on_failure` flow hook. The user picks any Prefect notification block
(Slack, Microsoft Teams, e-mail, a custom webhook...) by its slug `<block-type-slug>/<name>`, in
the flow parameter `notify` or else the environment variable DISTILLERY_NOTIFY_BLOCK on the
machine that runs the flow. Nothing configured: nothing is sent. A notification that cannot be
sent is logged as a warning and never replaces the run's own failure.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

# Imported for its side effect too: Block.load("slack-webhook/...") finds the classes it registers.
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock  # noqa: F401
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType, TaskRun
from prefect.flows import Flow
from prefect.logging.loggers import flow_run_logger
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.urls import url_for

ENV_BLOCK = "DISTILLERY_NOTIFY_BLOCK"
PARAMETER = "notify"
MAX_CAUSE_CHARS = 400

# Task run states reach the server as events, recorded a moment after they happen: the hook
# waits for them (at most SETTLE_TIMEOUT_S) before it decides which stage failed.
SETTLE_TIMEOUT_S = 10.0
SETTLED_FOR_S = 1.0  # no failed and no unfinished task run for this long: the flow itself failed
POLL_S = 0.2

_FAILED = [StateType.FAILED, StateType.CRASHED]
_UNFINISHED = [
    StateType.SCHEDULED,
    StateType.PENDING,
    StateType.RUNNING,
    StateType.PAUSED,
    StateType.CANCELLING,
]
_FLOW_PREFIX = re.compile(r"^(Flow|Task) run encountered an exception:?\s*")
_SECRETS = [
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),  # OpenAI-style keys
    re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"(?i)\b(api[_-]?key|token|secret|password)([\"']?\s*[=:]\s*[\"']?)[^\s\"',;&]+"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in URLs
]
_SECRET_ENV = re.compile(r"(?i)(KEY|TOKEN|SECRET|PASSWORD)$")


def notify_failure(flow: Flow[Any, Any], flow_run: FlowRun, state: State) -> None:
    """on_failure hook: tell the configured notification block which stage failed, and why."""
    logger = flow_run_logger(flow_run, flow)
    slug = block_slug(flow_run.parameters)
    if not slug:
        logger.debug(
            "no failure notification: neither the %r parameter nor %s names a block",
            PARAMETER,
            ENV_BLOCK,
        )
        return
    try:
        subject, body = failure_message(flow, flow_run, state)
    except Exception as exc:  # the API may be what broke the run: still say it failed
        logger.debug("could not read the failed task runs: %s", exc, exc_info=True)
        subject, body = failure_message(flow, flow_run, state, failed_tasks=[])
    try:
        send(slug, subject, body)
    except NotificationFailed as exc:
        logger.warning(
            "could not send the failure notification through block %r: %s. The run's own "
            "failure stands. Fix: %s.",
            slug,
            exc.cause,
            exc.fix,
        )
        return
    logger.info("failure notification sent through block %r: %s", slug, subject)


def block_slug(parameters: dict[str, Any]) -> str | None:
    """The block chosen by the run's `notify` parameter, else by DISTILLERY_NOTIFY_BLOCK."""
    value = _parameter(parameters, PARAMETER) or os.environ.get(ENV_BLOCK) or ""
    return str(value).strip() or None


def failure_message(
    flow: Flow[Any, Any],
    flow_run: FlowRun,
    state: State,
    failed_tasks: list[TaskRun] | None = None,
) -> tuple[str, str]:
    """The subject (which run, which stage) and body (cause, inputs, link) of the message."""
    if failed_tasks is None:
        failed_tasks = find_failed_tasks(flow_run.id)
    if failed_tasks:
        first = failed_tasks[0]
        stage = first.name  # every task of the flows has its own run name
        if len(failed_tasks) > 1:
            stage += f" (and {len(failed_tasks) - 1} more failed task runs)"
        cause = cause_of(state) or cause_of(first.state)
    else:
        stage = f"flow {flow.name}"
        cause = cause_of(state)
    subject = f"{flow.name} run {flow_run.name} failed at {stage}"
    lines = [f"Stage: {stage}", f"Cause: {cause or 'unknown (see the run logs)'}"]
    for key in ("recipe", "version", "output"):
        value = _parameter(flow_run.parameters, key)
        if value:
            lines.append(f"{key.capitalize()}: {redact(str(value))}")
    lines.append(f"Flow run: {flow_run.name} ({flow_run.id})")
    url = url_for("flow-run", obj_id=flow_run.id)
    if url:
        lines.append(f"URL: {url}")
    return subject, "\n".join(lines)


def find_failed_tasks(flow_run_id: UUID) -> list[TaskRun]:
    """The failed task runs of the flow run, earliest first; [] when the flow itself failed."""
    _flush_events()
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    settled_since: float | None = None
    with get_client(sync_client=True) as client:

        def read(types: list[StateType]) -> list[TaskRun]:
            return client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]),
                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=types)),
                ),
                limit=200,
            )

        while True:
            failed = read(_FAILED)
            if failed:
                return sorted(failed, key=_ended)
            now = time.monotonic()
            if read(_UNFINISHED):
                settled_since = None
            elif settled_since is None:
                settled_since = now
            elif now - settled_since >= SETTLED_FOR_S:
                return []
            if now >= deadline:
                return []
            time.sleep(POLL_S)


class NotificationFailed(Exception):
    """The notification could not be sent: why, and what the user should do."""

    def __init__(self, cause: BaseException | str, fix: str) -> None:
        if isinstance(cause, BaseException):
            cause = f"{type(cause).__name__}: {cause}"
        self.cause, self.fix = one_line(cause), fix
        super().__init__(f"{self.cause} (fix: {fix})")


def send(slug: str, subject: str, body: str) -> None:
    """Load the notification block `slug` and send the message; NotificationFailed if not."""
    choose = (
        f"set the {PARAMETER!r} flow parameter or {ENV_BLOCK} to an existing notification "
        "block as '<block-type-slug>/<block-name>' (`prefect block ls` lists them)"
    )
    if "/" not in slug:
        raise NotificationFailed("not a block slug", choose)
    try:
        block = Block.load(slug)
    except Exception as exc:
        block_type = slug.split("/", 1)[0]
        raise NotificationFailed(
            exc,
            f"create the block (`prefect block create {block_type}`, or save it from Python) "
            f"on this Prefect server, or {choose}",
        ) from exc
    if not isinstance(block, NotificationBlock):
        raise NotificationFailed(f"a {type(block).__name__} block cannot send messages", choose)
    try:
        with block.raise_on_failure():  # Apprise blocks only log a failed send otherwise
            result: Any = block.notify(body, subject)
            if inspect.iscoroutine(result):  # an async caller's loop: run it to the end here
                run_coro_as_sync(result)
    except Exception as exc:
        raise NotificationFailed(
            exc, "check the block's URL and settings and that its receiver is reachable"
        ) from exc


def cause_of(state: State | None) -> str:
    """The failed state's message on one line, without Prefect's prefix or any secret."""
    if state is None or not state.message:
        return ""
    return one_line(_FLOW_PREFIX.sub("", state.message.strip()))


def one_line(text: str, limit: int = MAX_CAUSE_CHARS) -> str:
    text = redact(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def redact(text: str) -> str:
    """Text with API keys, tokens and URL passwords replaced by `***`."""
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and len(value) >= 8:
            text = text.replace(value, "***")
    text = _SECRETS[0].sub("***", text)
    text = _SECRETS[1].sub(r"\1 ***", text)
    text = _SECRETS[2].sub(r"\1\2***", text)
    return _SECRETS[3].sub("***", text)


def _parameter(parameters: dict[str, Any], key: str) -> Any:
    """A flat flow parameter, or a field of a single model parameter `params` (train flow)."""
    if parameters.get(key) is not None:
        return parameters[key]
    nested = parameters.get("params")
    return nested.get(key) if isinstance(nested, dict) else getattr(nested, key, None)


def _ended(run: TaskRun) -> datetime:
    when = run.end_time or (run.state.timestamp if run.state else None) or run.created
    return when or datetime.min.replace(tzinfo=UTC)


def _flush_events() -> None:
    """Let the events already emitted by this process (task run states) reach the server."""
    from prefect.events.worker import EventsWorker

    if not getattr(EventsWorker, "_instances", None):  # nothing emitted: do not start one
        return
    worker = threading.Thread(
        target=lambda: EventsWorker.instance().wait_until_empty(), daemon=True
    )
    worker.start()
    worker.join(timeout=5)
