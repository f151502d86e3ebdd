"""What a run leaves in the Prefect UI: artifacts, task run names, the dataset's asset lineage."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distillery.flows.distill import distill
from fake_teacher import FakeTeacher

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "stock-advisor.yaml"


def artifacts_of(flow_run_id: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def asset_events(asset: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Materializations of an asset, read back from the server's events."""
    from prefect.client.orchestration import get_client

    body = {
        "filter": {
            "event": {"name": ["prefect.asset.materialization.succeeded"]},
            "resource": {"id": [asset]},
            "occurred": {"since": "2020-01-01T00:00:00Z"},
        }
    }
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:  # events are recorded a moment after they are emitted
            events: list[dict[str, Any]] = client._client.post("/events/filter", json=body).json()[
                "events"
            ]
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_run_shows_summary_sample_validation_progress_link_and_lineage(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    summary = distill(
        recipe=str(RECIPE),
        examples=40,
        output=str(out),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=25,
        train=False,
    )
    found = artifacts_of(summary["flow_run_id"])

    assert {"dataset-summary", "dataset-sample", "validation-report", "teacher-progress"} <= set(
        found
    )
    text = found["dataset-summary"].data
    assert f"`{summary['version']}`: published" in text
    for line in ("| expand | requests |", "| answer | accepted |", "| requests sent |"):
        assert line in text
    assert f"Published to `{summary['uri']}`" in text
    sample = found["dataset-sample"].data
    rows = json.loads(sample) if isinstance(sample, str) else sample
    assert len(rows) == 20
    assert {"id", "source", "seed_ids", "question", "answer"} <= set(rows[0])
    assert {r["source"] for r in rows} == {"seed", "generated"}
    assert "| expectation | column | observed | result |" in found["validation-report"].data
    assert found["teacher-progress"].data == 100.0
    assert Path(summary["uri"]).as_uri() in found["dataset-version"].data

    lineage = asset_events((out / "stock-advisor").resolve().as_uri())
    assert len(lineage) == 1
    related = {r["prefect.resource.id"] for r in lineage[0]["related"]}
    assert RECIPE.as_uri() in related

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[summary["flow_run_id"]]))
        )
    names = {r.name for r in runs}
    assert {
        "load-recipe",
        "read-latest",
        "validate",
        "data-docs",
        "publish",
        "expand-cycle-1",
    } <= names
    assert "answer-cycle-0-batch-1" in names
