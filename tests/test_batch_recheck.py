"""Batch mode without a busy worker: a run that outlives DISTILLERY_BATCH_HOLD_S ends waiting for
its batches (nothing published), and the re-check run (the same call, or the run its deployment
scheduled) re-attaches to them and publishes, submitting nothing twice."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from distillery.flows.distill import distill
from distillery.tasks.teacher import close_engines
from fake_openai_batches import FakeOpenAIBatches, Knobs

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "stock-advisor.yaml")
KEY = "test-key"
RECHECK_S = 5.0  # DISTILLERY_BATCH_MAX_POLL_INTERVAL_S: the soonest re-check


@pytest.fixture
def batches(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIBatches]:
    """A Batch API whose batches take 20 s, and an engine that holds 1 s at most."""
    for name, value in {
        "OPENAI_API_KEY": KEY,
        "DISTILLERY_BATCH": "1",
        "DISTILLERY_BATCH_HOLD_S": "1",
        "DISTILLERY_BATCH_POLL_INTERVAL_S": "0.05",
        "DISTILLERY_BATCH_MAX_POLL_INTERVAL_S": str(RECHECK_S),
    }.items():
        monkeypatch.setenv(name, value)
    with FakeOpenAIBatches(Knobs(api_key=KEY, batch_seconds=20.0)) as server:
        yield server


def parameters(server: FakeOpenAIBatches, output: Path) -> dict[str, Any]:
    # The 10 seeds alone: one stage of answers (2 tasks of 5, so 2 batches), no expansion.
    return {
        "recipe": RECIPE,
        "examples": 10,
        "output": str(output),
        "teacher_model": "gpt-4o-mini",
        "teacher_base_url": server.base_url,
        "answer_batch_size": 5,
        "train": False,
    }


def published_rows(output: Path) -> int:
    folder = output / "stock-advisor"
    version = folder / (folder / "LATEST").read_text().strip()
    return len(pd.read_parquet(version / "train.parquet")) + len(
        pd.read_parquet(version / "validation.parquet")
    )


def test_a_run_that_outlives_the_hold_waits_and_the_same_call_later_publishes(
    workdir: Path, batches: FakeOpenAIBatches
) -> None:
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    out = workdir / "out"
    started = time.monotonic()

    summary = distill(**parameters(batches, out))

    assert time.monotonic() - started < 15  # held 1 s; the batches take 20 s
    assert summary["outcome"] == "waiting for batches"
    assert summary["published"] is None and not (out / "stock-advisor" / "LATEST").exists()
    assert summary["recheck_flow_run_id"] is None  # no deployment: the caller runs it again
    assert "run the same command again" in summary["message"]
    seen = batches.stats
    assert (seen.batches_created, seen.rows_submitted, seen.submitted_twice) == (2, 10, 0)
    assert summary["requests_sent"] == 10 and summary["waiting"] == 10
    ids = sorted(b["id"] for b in batches.batches())
    assert sorted(b["id"] for b in summary["batches"]) == ids
    assert [b["total"] for b in summary["batches"]] == [5, 5]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(summary["flow_run_id"])
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["batch-progress"])),
        )
    assert run.state is not None and run.state.is_completed()
    assert run.state.name == "AwaitingBatches" and "waiting for batches" in str(run.state.message)
    (artifact,) = [a for a in progress if a.flow_run_id == run.id]
    assert all(batch_id in str(artifact.data) for batch_id in ids)

    close_engines()  # as a new process would start
    batches.finish_batches()
    again = distill(**parameters(batches, out))

    assert again["outcome"] == "published", again
    assert again["requests_sent"] == 0
    seen = batches.stats
    assert (seen.batches_created, seen.rows_submitted, seen.submitted_twice) == (2, 10, 0)
    assert published_rows(out) == 10


def test_a_deployment_run_schedules_its_recheck_run_which_publishes(
    workdir: Path, batches: FakeOpenAIBatches
) -> None:
    """The flow run executes in this process as a worker's subprocess executes it (run_flow
    on the flow run the deployment created); the re-check it schedules runs the same way."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.flow_engine import run_flow

    out = workdir / "out"
    params = parameters(batches, out)
    deployment = distill.to_deployment(name=f"batch-{uuid.uuid4().hex[:8]}", parameters=params)
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        first = client.create_flow_run_from_deployment(deployment_id)

        summary = run_flow(distill, flow_run=first)

        assert isinstance(summary, dict) and summary["outcome"] == "waiting for batches"
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])
            )
        )
        ended = client.read_flow_run(first.id).state
        assert ended is not None and ended.name == "AwaitingBatches"
        (recheck,) = [r for r in runs if r.id != first.id]
        assert str(recheck.id) == summary["recheck_flow_run_id"]
        assert recheck.state is not None and recheck.state.is_scheduled()
        assert recheck.parameters == first.parameters
        assert "batch-recheck" in recheck.tags
        # Scheduled after the run ended, at least the shortest re-check interval after it began.
        assert recheck.expected_start_time is not None and first.expected_start_time is not None
        assert recheck.expected_start_time > ended.timestamp
        assert recheck.expected_start_time >= first.expected_start_time + timedelta(
            seconds=RECHECK_S
        )
        assert batches.stats.batches_created == 2

        close_engines()  # the re-check runs in a new process on the worker
        batches.finish_batches()
        published = run_flow(distill, flow_run=recheck)  # waits for its scheduled time

        assert isinstance(published, dict) and published["outcome"] == "published", published
        seen = batches.stats
        assert (seen.batches_created, seen.rows_submitted, seen.submitted_twice) == (2, 10, 0)
        assert published_rows(out) == 10
        later = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])
            )
        )
        assert len(later) == 2  # no further re-check


def test_the_cli_says_when_to_run_again_and_exits_75(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], prefect_api: str
) -> None:
    # prefect_api: the session's Prefect server, so that main() starts no ephemeral one here.
    import distillery.flows.distill
    from distillery.flows.cli import EXIT_WAITING, main
    from distillery.flows.prefect_env import PREFECT_DEFAULTS

    note = "waiting for batches: 2 batches of the Batch API running (3 of 10 requests answered)"
    # main() sets these in the environment: through monkeypatch, so that they are undone.
    for name, value in {**PREFECT_DEFAULTS, "DISTILLERY_BATCH": "1"}.items():
        monkeypatch.setenv(name, os.environ.get(name, value))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setattr(
        distillery.flows.distill,
        "distill",
        lambda **params: {"outcome": "waiting for batches", "message": note, "published": None},
    )
    args = ["run", RECIPE, "--batch", "--no-train", "--teacher-base-url", "http://127.0.0.1:9/v1"]

    assert main(args) == EXIT_WAITING == 75
    assert note in capsys.readouterr().out


def test_the_seeds_batches_and_the_expansion_batch_run_side_by_side_and_all_are_waited_for(
    workdir: Path, batches: FakeOpenAIBatches
) -> None:
    """Beyond the seeds: their answers and the expansion go out together, the run waits for
    both; the next run answers the new inputs (their own batches); the one after publishes."""
    out = workdir / "out"
    first = distill(**{**parameters(batches, out), "examples": 20})

    assert first["outcome"] == "waiting for batches"
    # 2 answer batches of the seeds (5 each) and the expansion's (3 requests for 10 inputs)
    assert sorted(b["total"] for b in first["batches"]) == [3, 5, 5]
    assert batches.stats.batches_created == 3

    close_engines()
    batches.finish_batches()
    second = distill(**{**parameters(batches, out), "examples": 20})
    assert second["outcome"] == "waiting for batches"
    assert sorted(b["total"] for b in second["batches"]) == [5, 5]  # the 10 new inputs

    close_engines()
    batches.finish_batches()
    third = distill(**{**parameters(batches, out), "examples": 20})
    assert third["outcome"] == "published", third
    assert third["requests_sent"] == 0 and published_rows(out) == 20
    seen = batches.stats
    assert (seen.batches_created, seen.submitted_twice) == (5, 0)
