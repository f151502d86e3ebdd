"""The `openai` training backend: fine-tune a model on a published version and wait for the job."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import random
import re
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import fsspec
import openai
from fsspec import AbstractFileSystem
from openai.types.fine_tuning import FineTuningJob
from openai.types.fine_tuning.job_create_params import Method

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RECORD = "training/openai-job.json"
_logger = logging.getLogger(__name__)


def train_openai(
    version_uri: str,
    dataset: str,
    version: str,
    model: str,
    base_url: str | None,
    hyperparameters: dict[str, Any] | None,
    poll_interval_s: float = 10.0,
    max_poll_interval_s: float = 300.0,
    timeout_s: float | None = None,
    log: Callable[[str], None] = _logger.info,
) -> dict[str, Any]:
    """Fine-tune `model` on a version folder (or re-attach to its job), wait, return the outcome."""
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise ValueError(
            "OPENAI_API_KEY is not set: export the key of the fine-tuning endpoint to train "
            "with the openai backend"
        )
    fs, root = fsspec.core.url_to_fs(version_uri)
    if not fs.exists(posixpath.join(root, "train.jsonl")):
        raise FileNotFoundError(
            f"{version_uri.rstrip('/')}/train.jsonl does not exist: pass a published version "
            "folder ({output}/{dataset}/{version})"
        )
    started = time.monotonic()
    deadline = None if timeout_s is None else started + timeout_s
    # The SDK retries 408, 409, 429, 5xx and dropped connections with its own jittered backoff.
    with openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=5) as client:
        host = urlsplit(str(client.base_url)).netloc
        try:
            job = _find_job(client, fs, root, dataset, version, host)
            reattached = job is not None
            if job is None:
                job = _create_job(client, fs, root, dataset, version, model, hyperparameters)
                log(f"created fine-tuning job {job.id} at {host} ({job.model})")
            else:
                log(f"re-attached to fine-tuning job {job.id} at {host} ({job.status})")
                if job.model != model:
                    log(f"job {job.id} fine-tunes {job.model}, not {model}: one version, one job")
            _write_record(fs, root, job, dataset, version, host)
            job, metrics = _wait(
                client, job, log, poll_interval_s, max_poll_interval_s, deadline, host
            )
        except openai.AuthenticationError:
            raise PermissionError(
                f"the fine-tuning endpoint at {host} rejected the API key (401): set "
                "OPENAI_API_KEY to a valid key"
            ) from None  # the SDK's error echoes part of the key
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                raise
            body = exc.body if isinstance(exc.body, dict) else {}
            raise ValueError(
                f"the fine-tuning endpoint at {host} refused the request ({exc.status_code}): "
                f"{body.get('message') or exc.message}"
            ) from exc
    return {
        "backend": "openai",
        "status": job.status,
        "job_id": job.id,
        "fine_tuned_model": job.fine_tuned_model,
        "model": job.model,
        # Where both models answer (the transfer report asks the base and the fine-tuned one).
        "base_url": base_url,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "trained_tokens": job.trained_tokens,
        "metrics": metrics,
        "error": job.error.model_dump() if job.error is not None else None,
        "reattached": reattached,
        "seconds": round(time.monotonic() - started, 3),
    }


def _metadata(dataset: str, version: str) -> dict[str, str]:
    return {"distillery_dataset": dataset, "distillery_version": version}


def _find_job(
    client: openai.OpenAI,
    fs: AbstractFileSystem,
    root: str,
    dataset: str,
    version: str,
    host: str,
) -> FineTuningJob | None:
    record = posixpath.join(root, RECORD)
    if fs.exists(record):
        job_id = json.loads(fs.cat_file(record))["job_id"]
        try:
            return client.fine_tuning.jobs.retrieve(job_id)
        except openai.NotFoundError:
            raise ValueError(
                f"{record} names job {job_id}, which the endpoint at {host} does not know: "
                "delete that file to start a new job there"
            ) from None
    # No record: the process may have died between creating the job and writing it.
    wanted = _metadata(dataset, version)
    for job in client.fine_tuning.jobs.list(metadata=wanted, limit=100):
        # Some compatible servers ignore the metadata filter; check it here too.
        if job.metadata and all(job.metadata.get(k) == v for k, v in wanted.items()):
            return job
    return None


def _create_job(
    client: openai.OpenAI,
    fs: AbstractFileSystem,
    root: str,
    dataset: str,
    version: str,
    model: str,
    hyperparameters: dict[str, Any] | None,
) -> FineTuningJob:
    # Reuse uploads of the same name and size: a restart between upload and create sends none.
    uploaded = {(f.filename, f.bytes): f.id for f in client.files.list(purpose="fine-tune")}
    file_ids: dict[str, str | None] = {}
    for split in ("train", "validation"):
        path = posixpath.join(root, f"{split}.jsonl")
        data = fs.cat_file(path) if fs.exists(path) else b""
        name = f"{dataset}-{version}-{split}.jsonl"
        if not data:
            file_ids[split] = None
        elif (name, len(data)) in uploaded:
            file_ids[split] = uploaded[name, len(data)]
        else:
            created = client.files.create(file=(name, data), purpose="fine-tune")
            file_ids[split] = created.id
    train_id = file_ids["train"]
    assert train_id is not None  # train.jsonl was checked before any request
    method: Method | openai.Omit = openai.omit
    if hyperparameters:
        method = cast(
            Method, {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
        )
    return client.fine_tuning.jobs.create(
        model=model,
        training_file=train_id,
        validation_file=file_ids["validation"],
        suffix=_suffix(dataset),
        metadata=_metadata(dataset, version),
        method=method,
    )


def _suffix(dataset: str) -> str:
    # OpenAI puts the suffix into the model name: at most 64 characters, no ':'.
    return re.sub(r"[^a-z0-9-]+", "-", dataset.lower()).strip("-")[:64] or "distillery"


def _write_record(
    fs: AbstractFileSystem,
    root: str,
    job: FineTuningJob,
    dataset: str,
    version: str,
    host: str,
) -> None:
    record = {
        "job_id": job.id,
        "endpoint": host,
        "model": job.model,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "created_at": job.created_at,
        "dataset": dataset,
        "version": version,
    }
    fs.makedirs(posixpath.join(root, posixpath.dirname(RECORD)), exist_ok=True)
    fs.pipe_file(posixpath.join(root, RECORD), json.dumps(record, indent=2).encode())


def _wait(
    client: openai.OpenAI,
    job: FineTuningJob,
    log: Callable[[str], None],
    poll_interval_s: float,
    max_poll_interval_s: float,
    deadline: float | None,
    host: str,
) -> tuple[FineTuningJob, dict[str, float]]:
    delay = poll_interval_s
    metrics: dict[str, float] = {}
    shown: tuple[str, float | None] | None = None
    while True:
        if job.status in ("running", *TERMINAL):
            events = client.fine_tuning.jobs.list_events(job.id, limit=50).data
            metrics = _latest_metrics(events) or metrics
        if (job.status, metrics.get("step")) != shown:
            shown = (job.status, metrics.get("step"))
            log(f"fine-tuning job {job.id}: {job.status}{_describe(metrics)}")
        if job.status in TERMINAL:
            if job.error is not None:
                log(f"fine-tuning job {job.id} failed: {job.error.code}: {job.error.message}")
            return job, metrics
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise TimeoutError(
                f"fine-tuning job {job.id} is still {job.status} at {host} after the timeout; "
                "it keeps running there, and a re-run re-attaches to it"
            )
        pause = delay * random.uniform(1.0, 1.25)
        time.sleep(min(pause, deadline - now) if deadline is not None else pause)
        delay = min(max_poll_interval_s, delay * 1.5)
        job = client.fine_tuning.jobs.retrieve(job.id)


def _latest_metrics(events: list[Any]) -> dict[str, float]:
    """The newest step and losses from a job's metrics events (listed newest first)."""
    metrics: dict[str, float] = {}
    for event in events:
        if event.type == "metrics" and isinstance(event.data, dict):
            for key in ("step", "total_steps", "train_loss", "valid_loss"):
                if isinstance(event.data.get(key), int | float):
                    metrics.setdefault(key, event.data[key])
    return metrics


def _describe(metrics: dict[str, float]) -> str:
    if "step" not in metrics:
        return ""
    text = f", step {metrics['step']:g}"
    if "total_steps" in metrics:
        text += f"/{metrics['total_steps']:g}"
    for key in ("train_loss", "valid_loss"):
        if key in metrics:
            text += f", {key.replace('_', ' ')} {metrics[key]:.4f}"
    return text
