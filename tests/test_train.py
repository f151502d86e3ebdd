"""The training stage: which versions it accepts, and the openai and prefect backends end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distillery.flows.train import TrainParams, train
from distillery.tasks.recipe import TrainingSettings
from distillery.tasks.train import resolve_version, run_training
from fake_openai_jobs import FakeOpenAIJobs, Knobs

REPO = Path(__file__).resolve().parent.parent
VERSION = "20260101T000000Z-abcdef12"


def chat(i: int) -> str:
    messages = [
        {"role": "system", "content": "You are an expert for stock markets."},
        {"role": "user", "content": f"# USER CONTEXT\nInvestor {i}\n\n# QUESTION\nBuy {i}?"},
        {"role": "assistant", "content": f"Answer {i}: diversify with index funds."},
    ]
    return json.dumps({"messages": messages}) + "\n"


def publish_fake_version(
    root: Path, *, success: bool = True, training: dict[str, Any] | None = None
) -> Path:
    """A version folder as tasks/export.py writes it (the parts training reads)."""
    folder = root / "demo" / VERSION
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(chat(i) for i in range(12)))
    (folder / "validation.jsonl").write_text("".join(chat(i) for i in range(100, 102)))
    manifest = {
        "dataset": "demo",
        "version": VERSION,
        "uri": str(folder),
        "validation": {"success": success},
        "training_config": training or {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (root / "demo" / "LATEST").write_text(VERSION)
    return folder


def test_a_dataset_folder_resolves_to_its_latest_version(tmp_path: Path) -> None:
    folder = publish_fake_version(tmp_path)
    version = resolve_version(str(tmp_path / "demo"))
    assert version.uri == str(folder) and version.version == VERSION


def test_training_refuses_a_folder_with_no_published_version(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no published dataset version at .*nowhere"):
        resolve_version(str(tmp_path / "nowhere"))


def test_training_refuses_a_run_that_failed_validation(tmp_path: Path) -> None:
    run = tmp_path / "demo" / "runs" / "run-1"
    run.mkdir(parents=True)
    (run / "validation_result.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="failed validation: nothing was published"):
        resolve_version(str(run))


def test_training_refuses_a_version_whose_validation_failed(tmp_path: Path) -> None:
    folder = publish_fake_version(tmp_path, success=False)
    with pytest.raises(ValueError, match="did not pass validation"):
        resolve_version(str(folder))


def test_cli_train_with_a_bad_version_submits_nothing(tmp_path: Path) -> None:
    with FakeOpenAIJobs() as jobs:
        env = {**os.environ, "OPENAI_API_KEY": "test-key"}
        proc = subprocess.run(
            [sys.executable, "-m", "distillery.flows.cli", "train", str(tmp_path / "missing")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert jobs.stats.total == 0
    assert proc.returncode == 2
    assert "no published dataset version" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_backend_is_refused_by_the_parameters() -> None:
    with pytest.raises(ValueError, match="backend"):
        TrainParams(version="x", backend="gpu-cluster")  # type: ignore[arg-type]


def openai_training(jobs: FakeOpenAIJobs) -> dict[str, Any]:
    return {
        "backend": "openai",
        "openai": {"base_url": jobs.base_url, "poll_interval_s": 0.05, "max_poll_interval_s": 0.2},
    }


@pytest.fixture
def openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


def test_train_flow_with_openai_backend_records_the_job_in_the_version(
    workdir: Path, openai_key: None
) -> None:
    from prefect.client.orchestration import get_client

    with FakeOpenAIJobs(Knobs(job_seconds=0.5)) as jobs:
        folder = publish_fake_version(workdir / "out", training=openai_training(jobs))
        outcome = train(TrainParams(version=str(folder)))
        assert jobs.stats.jobs_created == 1
    assert outcome["status"] == "succeeded" and outcome["fine_tuned_model"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["training"]["job_id"] == outcome["job_id"]
    assert json.loads((folder / "training" / "outcome.json").read_text())["status"] == "succeeded"
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts(limit=50)
    reports = [a for a in artifact if a.key == "training-report"]
    assert reports and outcome["job_id"] in str(reports[0].data)


def test_failed_openai_job_is_recorded_as_failed(workdir: Path, openai_key: None) -> None:
    with FakeOpenAIJobs(Knobs(job_seconds=0.5, outcome="failed")) as jobs:
        folder = publish_fake_version(workdir / "out", training=openai_training(jobs))
        version = resolve_version(str(folder))
        settings = TrainingSettings.model_validate(openai_training(jobs))
        outcome = run_training(version, settings, log=lambda line: None)
    assert outcome["status"] == "failed" and outcome["error"]["code"]
    assert json.loads((folder / "manifest.json").read_text())["training"]["status"] == "failed"


@pytest.mark.slow
def test_prefect_backend_runs_the_training_deployment_and_records_its_run(
    workdir: Path, openai_key: None, prefect_api: str
) -> None:
    """A real served deployment of the train flow picks up the run; its child trains via openai."""
    with FakeOpenAIJobs(Knobs(job_seconds=0.5)) as jobs:
        folder = publish_fake_version(workdir / "out", training=openai_training(jobs))
        env = {
            **os.environ,
            "PREFECT_API_URL": prefect_api,
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "served-results"),
        }
        log = (workdir / "serve.log").open("wb")  # the served run's log, for a failure
        server = subprocess.Popen(
            [sys.executable, "-c",
             "from distillery.flows.train import train; train.serve(name='training')"],
            cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            settings = TrainingSettings.model_validate(
                {
                    **openai_training(jobs),
                    "backend": "prefect",
                    "timeout_s": 300,
                    "prefect": {"deployment": "train/training", "backend": "openai"},
                }
            )
            version = resolve_version(str(folder))
            outcome = _wait_for_deployment(lambda: run_training(version, settings, print))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
            log.close()
        assert jobs.stats.jobs_created == 1
    assert outcome["backend"] == "prefect" and outcome["state"] == "Completed"
    assert outcome["status"] == "succeeded" and outcome["flow_run_id"]
    assert outcome["child"]["backend"] == "openai" and outcome["child"]["job_id"]
    recorded = json.loads((folder / "manifest.json").read_text())["training"]
    assert recorded["flow_run_id"] == outcome["flow_run_id"]


def _wait_for_deployment(call: Any) -> dict[str, Any]:
    """`serve` registers the deployment a few seconds after it starts: retry until it exists."""
    import time

    deadline = time.monotonic() + 120
    while True:
        try:
            return dict(call())
        except ValueError as exc:
            if "no Prefect deployment" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)
