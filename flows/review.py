"""The human review gate: a run pauses with a typed input until a reviewer approves or rejects.

A reviewer answers in the Prefect UI (the paused run shows the form next to its sample table) or
from a terminal: `distillery review FLOW_RUN_ID approve|reject --comment "..."`. With no answer
within the recipe's `review.timeout_hours` the version counts as rejected: nothing is trained on
a dataset nobody looked at.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run

from distillery.tasks.recipe import Recipe


class ReviewDecision(RunInput):
    """What a reviewer answers."""

    decision: Literal["approve", "reject"]
    comment: str = ""


def _description(recipe: Recipe, uri: str, summary: dict[str, Any]) -> str:
    counts = summary.get("published") or {}
    run = flow_run.get_id()
    return "\n".join(
        [
            f"## Review {recipe.name} `{summary.get('version')}`",
            "",
            f"{counts.get('total', 0)} rows (train {counts.get('train', 0)}, validation "
            f"{counts.get('validation', 0)}) written to `{uri}`. Read the **dataset-sample** "
            "table and the **dataset-summary** and **validation-report** artifacts of this run, "
            "then approve (LATEST moves to this version and the student is trained) or reject "
            "(LATEST stays, no training; say why in the comment).",
            "",
            f"From a terminal: `distillery review {run} approve` or "
            f'`distillery review {run} reject --comment "..."`.',
        ]
    )


def review_gate(recipe: Recipe, uri: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Pause the flow run for a decision; the safe default (rejected) when it times out."""
    timeout = max(1, round(recipe.review.timeout_hours * 3600))
    log = get_run_logger()
    log.info("waiting up to %d s for a review of %s", timeout, uri)
    asked = datetime.now(UTC)
    try:
        answer = pause_flow_run(
            wait_for_input=ReviewDecision.with_initial_data(
                description=_description(recipe, uri, summary)
            ),
            timeout=timeout,
            poll_interval=int(os.environ.get("DISTILLERY_REVIEW_POLL_S", "10")),
            key="review",
        )
    except FlowPauseTimeout:
        _resume_after_timeout()
        return {
            "decision": "rejected",
            "comment": f"no review within {recipe.review.timeout_hours:g} h: the safe default",
            "timed_out": True,
            "asked_at": asked.isoformat(),
            "answered_at": datetime.now(UTC).isoformat(),
        }
    return {
        "decision": "approved" if answer.decision == "approve" else "rejected",
        "comment": answer.comment,
        "timed_out": False,
        "asked_at": asked.isoformat(),
        "answered_at": datetime.now(UTC).isoformat(),
    }


def _resume_after_timeout() -> None:
    """After a timed-out pause the run is still Paused on the server: set it Running again."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
        if state is not None and state.is_paused():
            client.set_flow_run_state(UUID(run_id), Running(), force=True)


def answer_review(run_id: str, decision: Literal["approve", "reject"], comment: str) -> None:
    """Resume a paused run with a reviewer's decision (what the CLI's `review` does)."""
    resume_flow_run(UUID(run_id), run_input={"decision": decision, "comment": comment})
