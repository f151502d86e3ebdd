"""The review gate: a run pauses before LATEST moves and a student is trained, until answered."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillery.flows.distill import distill
from distillery.flows.review import answer_review
from fake_openai_jobs import FakeOpenAIJobs
from fake_openai_jobs import Knobs as JobKnobs
from fake_teacher import FakeTeacher

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-review-test"


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIJobs]:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("DISTILLERY_REVIEW_POLL_S", "1")
    with FakeOpenAIJobs(JobKnobs(api_key=KEY, job_seconds=0.2)) as fake:
        yield fake


def reviewed_recipe(tmp_path: Path, jobs: FakeOpenAIJobs, timeout_hours: float = 1.0) -> str:
    data = yaml.safe_load((REPO / "recipes" / "stock-advisor.yaml").read_text())
    data["seeds_file"] = str(REPO / "recipes" / data["seeds_file"])
    data["review"] = {"enabled": True, "timeout_hours": timeout_hours}
    data["training"] = {
        "backend": "openai",
        "openai": {"base_url": jobs.base_url, "poll_interval_s": 0.05, "max_poll_interval_s": 0.2},
    }
    path = tmp_path / "reviewed.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


class Background:
    """The flow in a thread, as a worker would run it; the test plays the reviewer."""

    def __init__(self, **kwargs: Any) -> None:
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, **kwargs: Any) -> None:
        try:
            self.result = distill(**kwargs)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 300) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the flow did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def paused_run(timeout: float = 240) -> Any:
    """The one paused flow run of this test, once it has paused."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    paused = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs:
                assert len(runs) == 1
                return runs[0]
            time.sleep(0.5)
    raise AssertionError("no flow run paused for review")


def start(teacher: FakeTeacher, recipe: str, out: Path) -> Background:
    return Background(
        recipe=recipe,
        examples=30,
        output=str(out),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=25,
        train=True,
    )


def version_of(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(
        (out / "stock-advisor" / summary["version"] / "manifest.json").read_text()
    )
    return manifest


def test_approved_version_becomes_latest_and_is_trained(
    workdir: Path, teacher: FakeTeacher, jobs: FakeOpenAIJobs
) -> None:
    out = workdir / "out"
    flow = start(teacher, reviewed_recipe(workdir, jobs), out)

    run = paused_run()
    # Paused with the version written but not yet LATEST, and nothing trained.
    assert not (out / "stock-advisor" / "LATEST").exists()
    assert jobs.stats.jobs_created == 0
    assert run.state.state_details.pause_key == "review"
    answer_review(str(run.id), "approve", "spot-checked 20 rows")

    summary = flow.join()
    assert summary["outcome"] == "published"
    assert (out / "stock-advisor" / "LATEST").read_text() == summary["version"]
    review = version_of(out, summary)["review"]
    assert review["decision"] == "approved" and review["comment"] == "spot-checked 20 rows"
    assert summary["training"]["status"] == "succeeded"
    assert jobs.stats.jobs_created == 1


def test_rejected_version_is_marked_and_not_trained(
    workdir: Path, teacher: FakeTeacher, jobs: FakeOpenAIJobs
) -> None:
    out = workdir / "out"
    flow = start(teacher, reviewed_recipe(workdir, jobs), out)

    answer_review(str(paused_run().id), "reject", "answers ignore the user's age")

    summary = flow.join()
    assert summary["outcome"] == "rejected in review"
    assert "training" not in summary and jobs.stats.jobs_created == 0
    assert not (out / "stock-advisor" / "LATEST").exists()  # LATEST never pointed at it
    review = version_of(out, summary)["review"]
    assert review == {**review, "decision": "rejected", "comment": "answers ignore the user's age"}
    # `distillery train` refuses a rejected version too.
    from distillery.tasks.train import resolve_version

    with pytest.raises(ValueError, match="rejected in review"):
        resolve_version(summary["uri"])


def test_unanswered_review_times_out_to_rejected(
    workdir: Path, teacher: FakeTeacher, jobs: FakeOpenAIJobs
) -> None:
    out = workdir / "out"
    # 0.001 h: the gate waits 4 s (rounded), then takes the safe default.
    flow = start(teacher, reviewed_recipe(workdir, jobs, timeout_hours=0.001), out)

    summary = flow.join()

    assert summary["outcome"] == "rejected in review"
    assert summary["review"]["timed_out"] is True
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # not left Paused on the server
        state = client.read_flow_run(summary["flow_run_id"]).state
    assert state is not None and state.is_completed()
    assert "training" not in summary and jobs.stats.jobs_created == 0
    assert version_of(out, summary)["review"]["decision"] == "rejected"
