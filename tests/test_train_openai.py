"""The openai training backend against the fake files and fine-tuning API, with the real SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from distillery.tasks.train_openai import RECORD, train_openai
from fake_openai_jobs import FakeOpenAIJobs, Knobs, spawn

DATASET, VERSION, MODEL = "stock-advisor", "20261128T021500Z-1a2b3c4d", "gpt-4o-mini-2024-07-18"
KEY = "test-key"


def example(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "You are a careful financial advisor."},
            {"role": "user", "content": f"I'm {30 + i} years old. Should I buy index funds?"},
            {"role": "assistant", "content": f"At {30 + i}, a broad index fund is a sound core."},
        ]
    }


def write_version(root: Path, train: int = 12, validation: int = 3, bad_line: bool = False) -> Path:
    """A version folder as export.publish leaves it (the parts training reads)."""
    folder = root / DATASET / VERSION
    folder.mkdir(parents=True)
    lines = [json.dumps(example(i)) for i in range(train)]
    if bad_line:
        lines[4] = json.dumps({"messages": [{"role": "robot", "content": "beep"}]})
    (folder / "train.jsonl").write_text("".join(line + "\n" for line in lines))
    (folder / "validation.jsonl").write_text(
        "".join(json.dumps(example(100 + i)) + "\n" for i in range(validation))
    )
    manifest = {
        "dataset": DATASET,
        "version": VERSION,
        "uri": str(folder),
        "validation": {"success": True},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def server() -> Iterator[FakeOpenAIJobs]:
    with FakeOpenAIJobs(Knobs(api_key=KEY, job_seconds=0.5)) as fake:
        yield fake


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


def train(
    folder: Path, server: FakeOpenAIJobs, logs: list[str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    options: dict[str, Any] = {"poll_interval_s": 0.05, "max_poll_interval_s": 0.2}
    return train_openai(
        str(folder),
        DATASET,
        VERSION,
        MODEL,
        server.base_url,
        kwargs.pop("hyperparameters", None),
        log=(logs if logs is not None else []).append,
        **{**options, **kwargs},
    )


def test_training_succeeds_and_records_its_job(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    folder = write_version(tmp_path)
    logs: list[str] = []

    outcome = train(folder, server, logs, hyperparameters={"n_epochs": 2})

    assert outcome["backend"] == "openai"
    assert outcome["status"] == "succeeded"
    assert outcome["job_id"].startswith("ftjob-")
    assert outcome["fine_tuned_model"].startswith(f"ft:{MODEL}:distillery:{DATASET}:")
    assert outcome["model"] == MODEL
    assert outcome["trained_tokens"] > 0
    assert outcome["metrics"]["step"] == outcome["metrics"]["total_steps"] == 2 * 12
    assert outcome["metrics"]["train_loss"] > 0 and outcome["metrics"]["valid_loss"] > 0
    assert outcome["error"] is None
    assert outcome["reattached"] is False
    assert outcome["seconds"] > 0
    files = {f.id: f for f in server.files()}
    train_file, valid_file = files[outcome["training_file"]], files[outcome["validation_file"]]
    assert train_file.filename == f"{DATASET}-{VERSION}-train.jsonl"
    assert train_file.data == (folder / "train.jsonl").read_bytes()
    assert valid_file.filename == f"{DATASET}-{VERSION}-validation.jsonl"
    (job,) = server.jobs()
    assert job["metadata"] == {"distillery_dataset": DATASET, "distillery_version": VERSION}
    assert job["user_provided_suffix"] == DATASET
    assert job["hyperparameters"]["n_epochs"] == 2
    record = json.loads((folder / RECORD).read_text())
    assert record["job_id"] == outcome["job_id"]
    assert record["training_file"] == outcome["training_file"]
    assert record["model"] == MODEL and record["created_at"] > 0
    stats = server.stats
    assert (stats.files_uploaded, stats.jobs_created) == (2, 1)
    assert any("created fine-tuning job" in line for line in logs)
    assert any("succeeded" in line and "train loss" in line for line in logs)


def test_failed_job_is_an_outcome_not_an_exception(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    server.knobs.outcome = "failed"
    logs: list[str] = []

    outcome = train(write_version(tmp_path), server, logs)

    assert outcome["status"] == "failed"
    assert outcome["fine_tuned_model"] is None
    assert outcome["error"] == {
        "code": "server_error",
        "message": "The job failed due to an internal error.",
        "param": None,
    }
    assert "train_loss" in outcome["metrics"]  # it ran half-way before failing
    assert any("failed: server_error" in line for line in logs)


def test_invalid_training_file_fails_the_job_as_openai_does(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    outcome = train(write_version(tmp_path, bad_line=True), server)

    assert outcome["status"] == "failed"
    assert outcome["error"]["code"] == "invalid_training_file"
    assert outcome["error"]["param"] == "training_file"
    assert "Line 5" in outcome["error"]["message"]
    assert outcome["metrics"] == {}


def test_restarted_training_reattaches_to_its_job(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    server.knobs.job_seconds = 2.0
    folder = write_version(tmp_path)

    with pytest.raises(TimeoutError) as timed_out:
        train(folder, server, timeout_s=0.3)
    (job,) = server.jobs()
    assert job["id"] in str(timed_out.value)
    assert "re-attach" in str(timed_out.value)
    assert job["status"] not in ("succeeded", "failed", "cancelled")

    logs: list[str] = []
    outcome = train(folder, server, logs)

    assert outcome["reattached"] is True
    assert outcome["status"] == "succeeded"
    assert outcome["job_id"] == job["id"]
    stats = server.stats
    assert (stats.files_uploaded, stats.jobs_created) == (2, 1)
    assert any("re-attached" in line for line in logs)


def test_training_reattaches_through_job_metadata_when_its_record_is_missing(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    server.knobs.job_seconds = 2.0
    folder = write_version(tmp_path)
    with pytest.raises(TimeoutError):
        train(folder, server, timeout_s=0.3)
    # As if the process had died after creating the job and before writing its record.
    (folder / RECORD).unlink()

    outcome = train(folder, server)

    assert outcome["reattached"] is True
    assert outcome["status"] == "succeeded"
    assert json.loads((folder / RECORD).read_text())["job_id"] == outcome["job_id"]
    stats = server.stats
    assert (stats.files_uploaded, stats.jobs_created) == (2, 1)
    assert stats.requests["GET /v1/fine_tuning/jobs"] == 2  # each call looked once


def test_restart_between_upload_and_create_reuses_the_uploaded_files(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    folder = write_version(tmp_path)
    with openai.OpenAI(api_key=key, base_url=server.base_url) as client:
        earlier = {
            split: client.files.create(
                file=(
                    f"{DATASET}-{VERSION}-{split}.jsonl",
                    (folder / f"{split}.jsonl").read_bytes(),
                ),
                purpose="fine-tune",
            ).id
            for split in ("train", "validation")
        }

    outcome = train(folder, server)

    assert outcome["status"] == "succeeded"
    assert (outcome["training_file"], outcome["validation_file"]) == (
        earlier["train"],
        earlier["validation"],
    )
    assert (server.stats.files_uploaded, server.stats.jobs_created) == (2, 1)


def test_transient_server_errors_are_retried(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    server.knobs.server_errors = 2

    outcome = train(write_version(tmp_path), server)

    assert outcome["status"] == "succeeded"
    assert server.stats.server_errors == 2
    assert server.stats.jobs_created == 1


def test_missing_key_fails_before_any_request(
    tmp_path: Path, server: FakeOpenAIJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    with pytest.raises(ValueError, match="OPENAI_API_KEY is not set"):
        train(write_version(tmp_path), server)
    assert server.stats.total == 0


def test_rejected_key_fails_with_a_message_that_omits_the_key(
    tmp_path: Path, server: FakeOpenAIJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "sk-wrong-0123456789abcdefWXYZ"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)

    with pytest.raises(PermissionError) as refused:
        train(write_version(tmp_path), server)

    message = str(refused.value)
    assert "rejected the API key (401)" in message
    assert f"127.0.0.1:{server.port}" in message
    assert "set OPENAI_API_KEY to a valid key" in message
    assert wrong not in message and "WXYZ" not in message
    assert refused.value.__suppress_context__  # the SDK's error, which echoes part of the key
    assert server.stats.unauthorized == 1
    assert server.stats.jobs_created == 0


def test_refused_request_reports_the_api_message(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    with pytest.raises(ValueError, match=r"refused the request \(400\): .*n_epochs"):
        train(write_version(tmp_path), server, hyperparameters={"n_epochs": 0})
    assert server.stats.jobs_created == 0


def test_folder_without_train_jsonl_fails_before_any_request(
    tmp_path: Path, server: FakeOpenAIJobs, key: str
) -> None:
    folder = tmp_path / DATASET / "not-a-version"
    folder.mkdir(parents=True)

    with pytest.raises(FileNotFoundError, match="published version folder") as missing:
        train(folder, server)
    assert str(folder / "train.jsonl") in str(missing.value)
    assert server.stats.total == 0


def test_fake_server_runs_as_its_own_process() -> None:
    proc, base_url = spawn("--api-key", KEY)
    with proc:
        try:
            with openai.OpenAI(api_key=KEY, base_url=base_url) as client:
                uploaded = client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
                assert [f.id for f in client.files.list()] == [uploaded.id]
        finally:
            proc.terminate()
        assert proc.wait(10) == 0
