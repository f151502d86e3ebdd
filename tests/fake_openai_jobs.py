"""Fake OpenAI files and fine-tuning API: a local server the real SDK trains against, for tests."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

TERMINAL = ("succeeded", "failed", "cancelled")
# Shares of job_seconds spent validating the files and queued; the rest is the running stage.
_VALIDATING, _QUEUED = 0.1, 0.2
_ROLES = ("system", "developer", "user", "assistant", "tool")
_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")

# --------------------------------------------------------------------------------------------
# Knobs and counters
# --------------------------------------------------------------------------------------------


@dataclass
class Knobs:
    """How the server behaves; mutable at runtime. A job keeps the knobs it was created under."""

    api_key: str = "test-key"  # any other bearer token gets OpenAI's 401
    job_seconds: float = 1.0  # from creation to a terminal status (validating, queued, running)
    outcome: str = "succeeded"  # "succeeded" | "failed": jobs fail half-way through running
    metric_events: int = 10  # metrics events per job, spread over the running stage
    min_examples: int = 10  # OpenAI refuses a training file with fewer examples
    server_errors: int = 0  # the next N requests answer 500 (counts down), as a flaky API does


@dataclass
class Stats:
    """Counters of what the server saw (a snapshot when read through FakeOpenAIJobs.stats)."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)  # by route
    unauthorized: int = 0  # 401s sent
    server_errors: int = 0  # 500s sent by the server_errors knob
    files_uploaded: int = 0
    jobs_created: int = 0
    job_polls: int = 0  # GET /v1/fine_tuning/jobs/{job_id}
    chats: collections.Counter[str] = field(default_factory=collections.Counter)  # by model

    @property
    def total(self) -> int:
        """Every request that reached the server, refused ones included."""
        return sum(self.requests.values())

    def copy(self) -> Stats:
        return Stats(
            requests=collections.Counter(self.requests),
            unauthorized=self.unauthorized,
            server_errors=self.server_errors,
            files_uploaded=self.files_uploaded,
            jobs_created=self.jobs_created,
            job_polls=self.job_polls,
            chats=collections.Counter(self.chats),
        )

    def summary(self) -> dict[str, Any]:
        """Plain counters, as the standalone server prints them on exit."""
        return {
            "requests": dict(self.requests),
            "unauthorized": self.unauthorized,
            "server_errors": self.server_errors,
            "files_uploaded": self.files_uploaded,
            "jobs_created": self.jobs_created,
            "job_polls": self.job_polls,
            "chats": dict(self.chats),
        }


# --------------------------------------------------------------------------------------------
# State: the files store (shared by every route that reads uploads) and the jobs
# --------------------------------------------------------------------------------------------


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


class FileStore:
    """Uploaded files by id, in memory; fine-tuning reads them here (and batches will)."""

    def __init__(self, new_id: Callable[[str], str]) -> None:
        self._files: dict[str, StoredFile] = {}
        self._new_id = new_id

    def add(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        stored = StoredFile(self._new_id("file-"), filename, purpose, data, int(time.time()))
        self._files[stored.id] = stored
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        return self._files.get(file_id)

    def delete(self, file_id: str) -> bool:
        return self._files.pop(file_id, None) is not None

    def newest_first(self, purpose: str | None = None) -> list[StoredFile]:
        # Insertion order is creation order; created_at alone ties within a second.
        found = [f for f in self._files.values() if purpose is None or f.purpose == purpose]
        return found[::-1]


@dataclass
class _Job:
    id: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    metadata: dict[str, str] | None
    hyperparameters: dict[str, Any]  # resolved: no "auto" left
    seed: int
    created_at: int
    started: float  # time.monotonic() at creation
    seconds: float
    outcome: str
    metric_events: int
    total_steps: int
    trained_tokens: int
    problem: dict[str, Any] | None  # the file-validation error it will fail with
    status: str = "validating_files"
    reported: int = 0  # metrics events emitted so far
    events: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    result_files: list[str] = field(default_factory=list)

    def obj(self) -> dict[str, Any]:
        running = self.status not in TERMINAL
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "created_at": self.created_at,
            "model": self.model,
            "organization_id": "org-distillery",
            "status": self.status,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "user_provided_suffix": self.suffix,
            "metadata": self.metadata,
            "hyperparameters": self.hyperparameters,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": self.hyperparameters},
            },
            "seed": self.seed,
            "fine_tuned_model": self.fine_tuned_model,
            "finished_at": self.finished_at,
            "trained_tokens": self.trained_tokens if self.status == "succeeded" else None,
            "result_files": self.result_files,
            "error": self.error,
            "estimated_finish": self.created_at + math.ceil(self.seconds) if running else None,
            "integrations": [],
        }


def check_chat_jsonl(data: bytes) -> tuple[int, str | None]:
    """Examples in a chat fine-tuning file and the first format problem, worded as OpenAI's."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return 0, "Invalid file format. The file must be UTF-8 encoded."
    lines = [line for line in text.splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            example = json.loads(line)
        except json.JSONDecodeError:
            return len(lines), f"Invalid file format. Line {number} is not valid JSON."
        messages = example.get("messages") if isinstance(example, dict) else None
        if not isinstance(messages, list) or not messages:
            return len(lines), (
                f'Invalid file format. Line {number}, key "messages": must be a non-empty list.'
            )
        for index, message in enumerate(messages, 1):
            ok = (
                isinstance(message, dict)
                and message.get("role") in _ROLES
                and isinstance(message.get("content"), str | list)
            )
            if not ok:
                return len(lines), (
                    f"Invalid file format. Line {number}, message {index}: each message needs a "
                    f"role ({', '.join(_ROLES)}) and a content."
                )
        if not any(m["role"] == "assistant" for m in messages):
            return len(lines), f"Invalid file format. Line {number}: no assistant message."
    return len(lines), None


def _valid_metadata(metadata: Any) -> bool:
    return (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())
    )


def _hyperparameters_problem(requested: Any) -> str | None:
    """What OpenAI would refuse in supervised hyperparameters ("auto" or a positive number)."""
    if not isinstance(requested, dict):
        return "hyperparameters must be an object"
    for name, value in requested.items():
        if name not in ("n_epochs", "batch_size", "learning_rate_multiplier"):
            return f"Unknown parameter: 'hyperparameters.{name}'."
        number = float | int if name == "learning_rate_multiplier" else int
        if value != "auto" and not (isinstance(value, number) and value > 0):
            return f"Invalid value for 'hyperparameters.{name}': {value!r}."
    return None


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> web.Response:
    """One page of a cursor-paginated list: the items after the one whose id is `after`."""
    ids = [item["id"] for item in items]
    start = 0 if not after else ids.index(after) + 1 if after in ids else len(ids)
    data = items[start : start + limit]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start + limit < len(items),
        }
    )


def _int(value: str | None, default: int) -> int:
    return int(value) if value and value.lstrip("-").isdigit() else default


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _Core:
    """Request handling on one event loop; state guarded by a lock for readers elsewhere."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.lock = threading.Lock()
        self.stats = Stats()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self.files = FileStore(self._new_id)
        self.jobs: dict[str, _Job] = {}

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{self._prefix}{next(self._ids):016d}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024 * 1024, middlewares=[self._gate])
        app.router.add_post("/v1/files", self.upload_file)
        app.router.add_get("/v1/files", self.list_files)
        app.router.add_get("/v1/files/{file_id}", self.get_file)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_delete("/v1/files/{file_id}", self.delete_file)
        app.router.add_post("/v1/fine_tuning/jobs", self.create_job)
        app.router.add_get("/v1/fine_tuning/jobs", self.list_jobs)
        app.router.add_get("/v1/fine_tuning/jobs/{job_id}", self.get_job)
        app.router.add_get("/v1/fine_tuning/jobs/{job_id}/events", self.list_events)
        app.router.add_post("/v1/fine_tuning/jobs/{job_id}/cancel", self.cancel_job)
        app.router.add_post("/v1/chat/completions", self.chat_completion)
        return app

    @web.middleware
    async def _gate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = f"{request.method} {resource.canonical if resource is not None else request.path}"
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        with self.lock:
            self.stats.requests[route] += 1
            denied = token != self.knobs.api_key
            flaky = not denied and self.knobs.server_errors > 0
            if denied:
                self.stats.unauthorized += 1
            elif flaky:
                self.knobs.server_errors -= 1
                self.stats.server_errors += 1
        if denied:
            # OpenAI echoes a masked key; the client under test must not pass even that on.
            masked = f"{token[:3]}{'*' * max(0, len(token) - 7)}{token[-4:]}" if token else ""
            message = (
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
            )
            response: web.StreamResponse = _error(401, message, code="invalid_api_key")
        elif flaky:
            response = _error(500, "The server had an error while processing your request.")
        else:
            response = await handler(request)
        response.headers["x-request-id"] = f"req_{self._new_id('')}"
        return response

    # Chat completions -----------------------------------------------------------------------

    async def chat_completion(self, request: web.Request) -> web.Response:
        """What a user of a fine-tuned model calls next: the base model of a job and its
        fine-tuned model answer (the fine-tuned one at more length, which a judge that prefers
        the longer answer rewards); any other model is OpenAI's 404."""
        body = await request.json()
        model = str(body.get("model"))
        with self.lock:
            for job in self.jobs.values():
                self._advance(job)
            tuned = {j.fine_tuned_model for j in self.jobs.values() if j.fine_tuned_model}
            bases = {j.model for j in self.jobs.values()}
            known = model in tuned or model in bases
            if known:
                self.stats.chats[model] += 1
        if not known:
            return _error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        asked = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
        lines = str(asked[-1]).strip().splitlines() if asked else []
        question = lines[-1] if lines else ""  # the student's turn ends with the question
        if model in tuned:
            text = (
                f"Fine-tuned answer to '{question}': start from your own situation, keep an "
                "emergency fund, spread the money over broad index funds, and revisit the plan "
                "once a year or when your goals change."
            )
        else:
            text = f"Base answer to '{question}': it depends."
        return web.json_response(
            {
                "id": f"chatcmpl-{self._new_id('')}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 50,
                    "completion_tokens": len(text) // 4,
                    "total_tokens": 50 + len(text) // 4,
                },
            }
        )

    # Files ----------------------------------------------------------------------------------

    async def upload_file(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField):
            return _error(400, "Missing required parameter: 'file'.", "file")
        if purpose not in _PURPOSES:
            return _error(400, f"Invalid value for 'purpose': {purpose!r}.", "purpose")
        filename = upload.filename or "upload"
        if purpose == "fine-tune" and not filename.endswith(".jsonl"):
            return _error(400, "Invalid file format for Fine-Tuning API. Must be .jsonl", "file")
        data = upload.file.read()
        with self.lock:
            stored = self.files.add(filename, purpose, data)
            self.stats.files_uploaded += 1
        return web.json_response(stored.obj())

    async def list_files(self, request: web.Request) -> web.Response:
        query = request.query
        limit = _int(query.get("limit"), 10000)
        with self.lock:
            found = self.files.newest_first(query.get("purpose"))
        if query.get("order") == "asc":
            found.reverse()
        return _page([f.obj() for f in found], query.get("after"), limit)

    def _file_or_404(self, request: web.Request) -> StoredFile | web.Response:
        file_id = request.match_info["file_id"]
        with self.lock:
            stored = self.files.get(file_id)
        return stored or _error(404, f"No such File object: {file_id}", "id")

    async def get_file(self, request: web.Request) -> web.Response:
        stored = self._file_or_404(request)
        return stored if isinstance(stored, web.Response) else web.json_response(stored.obj())

    async def file_content(self, request: web.Request) -> web.Response:
        stored = self._file_or_404(request)
        if isinstance(stored, web.Response):
            return stored
        return web.Response(body=stored.data, content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        with self.lock:
            deleted = self.files.delete(file_id)
        if not deleted:
            return _error(404, f"No such File object: {file_id}", "id")
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # Fine-tuning jobs -----------------------------------------------------------------------

    async def create_job(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        for name in ("model", "training_file"):
            if not isinstance(body.get(name), str) or not body[name]:
                return _error(400, f"Missing required parameter: '{name}'.", name)
        suffix, metadata = body.get("suffix"), body.get("metadata")
        if suffix is not None and not (
            isinstance(suffix, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", suffix)
        ):
            return _error(400, "suffix must be 1 to 64 letters, digits, '-', '_' or '.'", "suffix")
        if metadata is not None and not _valid_metadata(metadata):
            return _error(400, "metadata: at most 16 string pairs (keys 64, values 512 chars)")
        method = body.get("method")
        supervised = method.get("supervised") if isinstance(method, dict) else None
        requested = (supervised or {}).get("hyperparameters") or body.get("hyperparameters") or {}
        problem = _hyperparameters_problem(requested)
        if problem is not None:
            return _error(400, problem, "method.supervised.hyperparameters")
        with self.lock:
            files: dict[str, StoredFile] = {}
            for param in ("training_file", "validation_file"):
                file_id = body.get(param)
                if file_id is None:
                    continue
                stored = self.files.get(file_id) if isinstance(file_id, str) else None
                if stored is None:
                    return _error(400, f"invalid {param}: {file_id}", param, "invalid_file_id")
                if stored.purpose != "fine-tune":
                    message = f"File {file_id} has purpose {stored.purpose!r}, not 'fine-tune'."
                    return _error(400, message, param, "invalid_file_purpose")
                files[param] = stored
            job = self._new_job(
                body, files["training_file"], files.get("validation_file"), requested
            )
            self.jobs[job.id] = job
            self.stats.jobs_created += 1
            return web.json_response(job.obj())

    def _new_job(
        self,
        body: dict[str, Any],
        train: StoredFile,
        valid: StoredFile | None,
        requested: dict[str, Any],
    ) -> _Job:
        examples, problem_text = check_chat_jsonl(train.data)
        problem: dict[str, Any] | None = None
        if problem_text is None and examples < self.knobs.min_examples:
            problem_text = (
                f"Training file has {examples} example(s), but must have at least "
                f"{self.knobs.min_examples} examples"
            )
        if problem_text is not None:
            problem = {
                "code": "invalid_training_file",
                "message": f"The job failed due to an invalid training file. {problem_text}",
                "param": "training_file",
            }
        if problem is None and valid is not None:
            _, valid_text = check_chat_jsonl(valid.data)
            if valid_text is not None:
                problem = {
                    "code": "invalid_validation_file",
                    "message": f"The job failed due to an invalid validation file. {valid_text}",
                    "param": "validation_file",
                }
        auto = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 2.0}
        hyper = {k: v if (v := requested.get(k, "auto")) != "auto" else d for k, d in auto.items()}
        tokens = sum(max(1, len(line) // 4) for line in train.data.splitlines() if line.strip())
        total_steps = int(hyper["n_epochs"]) * math.ceil(max(1, examples) / hyper["batch_size"])
        job_id = self._new_id("ftjob-")
        job = _Job(
            id=job_id,
            model=body["model"],
            training_file=train.id,
            validation_file=valid.id if valid is not None else None,
            suffix=body.get("suffix"),
            metadata=body.get("metadata"),
            hyperparameters=hyper,
            seed=body["seed"] if isinstance(body.get("seed"), int) else 42,
            created_at=int(time.time()),
            started=time.monotonic(),
            seconds=max(0.0, self.knobs.job_seconds),
            outcome=self.knobs.outcome,
            metric_events=max(1, min(self.knobs.metric_events, total_steps)),
            total_steps=total_steps,
            trained_tokens=tokens * int(hyper["n_epochs"]),
            problem=problem,
        )
        self._event(job, f"Created fine-tuning job: {job_id}")
        names = f"training file: {train.id}"
        if valid is not None:
            names += f" and validation file: {valid.id}"
        self._event(job, f"Validating {names}")
        return job

    def _event(
        self, job: _Job, message: str, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        job.events.append(
            {
                "id": self._new_id("ftevent-"),
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": data or {},
                "type": "metrics" if data else "message",
            }
        )

    def _finish(self, job: _Job, status: str, error: dict[str, Any] | None = None) -> None:
        job.status, job.error, job.finished_at = status, error, int(time.time())
        if error is not None:
            self._event(job, error["message"], "error")

    def _advance(self, job: _Job) -> None:
        """Bring a job up to now: its status, metrics events and outcome follow the clock."""
        if job.status in TERMINAL:
            return
        elapsed = (time.monotonic() - job.started) / job.seconds if job.seconds else math.inf
        if job.status == "validating_files" and elapsed >= _VALIDATING:
            if job.problem is not None:
                self._finish(job, "failed", job.problem)
                return
            job.status = "queued"
            self._event(job, "Files validated, moving job to queued state")
        if job.status == "queued" and elapsed >= _QUEUED:
            job.status = "running"
            self._event(job, "Fine-tuning job started")
        if job.status != "running":
            return
        fails = job.outcome == "failed"
        # A failing job stops half-way through running; a succeeding one at the end.
        stop = _QUEUED + (1 - _QUEUED) * (0.5 if fails else 1.0)
        due = int(job.metric_events * (min(elapsed, stop) - _QUEUED) / (1 - _QUEUED) + 1e-9)
        while job.reported < due:
            job.reported += 1
            self._metrics_event(job)
        if elapsed < stop:
            return
        if fails:
            error = {
                "code": "server_error",
                "message": "The job failed due to an internal error.",
                "param": None,
            }
            self._finish(job, "failed", error)
            return
        suffix = job.suffix or ""
        job.fine_tuned_model = f"ft:{job.model}:distillery:{suffix}:{job.id[-8:]}"
        rows = ["step,train_loss,valid_loss"] + [
            f"{e['data']['step']},{e['data']['train_loss']},{e['data'].get('valid_loss', '')}"
            for e in job.events
            if e["type"] == "metrics"
        ]
        results = self.files.add("step_metrics.csv", "fine-tune-results", "\n".join(rows).encode())
        job.result_files = [results.id]
        self._event(job, f"New fine-tuned model created: {job.fine_tuned_model}")
        self._event(job, "The job has successfully completed")
        self._finish(job, "succeeded")

    def _metrics_event(self, job: _Job) -> None:
        step = max(1, round(job.total_steps * job.reported / job.metric_events))
        train_loss = round(0.3 + 1.9 * math.exp(-3.0 * job.reported / job.metric_events), 4)
        data: dict[str, Any] = {
            "step": step,
            "total_steps": job.total_steps,
            "train_loss": train_loss,
            "train_mean_token_accuracy": round(1.0 - train_loss / 3.0, 4),
        }
        message = f"Step {step}/{job.total_steps}: training loss={train_loss:.4f}"
        if job.validation_file is not None:
            data["valid_loss"] = round(train_loss + 0.05, 4)
            data["valid_mean_token_accuracy"] = round(1.0 - data["valid_loss"] / 3.0, 4)
            message += f", validation loss={data['valid_loss']:.4f}"
        self._event(job, message, data=data)

    def _job_or_404(self, request: web.Request) -> _Job | web.Response:
        job_id = request.match_info["job_id"]
        job = self.jobs.get(job_id)
        if job is None:
            return _error(404, f"Could not find fine-tuning job: {job_id}", "fine_tuning_job_id")
        self._advance(job)
        return job

    async def get_job(self, request: web.Request) -> web.Response:
        with self.lock:
            self.stats.job_polls += 1
            job = self._job_or_404(request)
            return job if isinstance(job, web.Response) else web.json_response(job.obj())

    async def list_jobs(self, request: web.Request) -> web.Response:
        query = request.query
        limit = _int(query.get("limit"), 20)
        wanted = {
            found.group(1): value
            for key, value in query.items()
            if (found := re.fullmatch(r"metadata\[(.+)\]", key))
        }
        with self.lock:
            jobs = list(self.jobs.values())[::-1]
            for job in jobs:
                self._advance(job)
            shown = [
                job.obj()
                for job in jobs
                if all((job.metadata or {}).get(k) == v for k, v in wanted.items())
            ]
            return _page(shown, query.get("after"), limit)

    async def list_events(self, request: web.Request) -> web.Response:
        limit = _int(request.query.get("limit"), 20)
        with self.lock:
            job = self._job_or_404(request)
            if isinstance(job, web.Response):
                return job
            return _page(job.events[::-1], request.query.get("after"), limit)

    async def cancel_job(self, request: web.Request) -> web.Response:
        with self.lock:
            job = self._job_or_404(request)
            if isinstance(job, web.Response):
                return job
            if job.status in TERMINAL:
                return _error(
                    400, f"Job {job.id} has already {job.status}; it cannot be cancelled."
                )
            self._finish(job, "cancelled")
            self._event(job, "Fine-tuning job cancelled")
            return web.json_response(job.obj())

    async def serve(self, port: int, ready: Callable[[int], None], stop: asyncio.Event) -> None:
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
            ready(int(runner.addresses[0][1]))
            await stop.wait()
        finally:
            await runner.cleanup()


class FakeOpenAIJobs:
    """The fake files and fine-tuning API in a background thread with its own event loop."""

    def __init__(self, knobs: Knobs | None = None, port: int = 0) -> None:
        self._core = _Core(knobs if knobs is not None else Knobs())
        self.port = port
        self.base_url = ""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def knobs(self) -> Knobs:
        return self._core.knobs

    @knobs.setter
    def knobs(self, value: Knobs) -> None:
        self._core.knobs = value

    @property
    def stats(self) -> Stats:
        """A consistent snapshot of the counters."""
        with self._core.lock:
            return self._core.stats.copy()

    def jobs(self) -> list[dict[str, Any]]:
        """Every job as the API shows it now, newest first."""
        with self._core.lock:
            jobs = list(self._core.jobs.values())[::-1]
            for job in jobs:
                self._core._advance(job)
            return [job.obj() for job in jobs]

    def files(self) -> list[StoredFile]:
        """Every stored file, newest first (uploads and result files)."""
        with self._core.lock:
            return self._core.files.newest_first()

    def start(self) -> FakeOpenAIJobs:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._error, self.base_url = None, ""
        self._thread = threading.Thread(target=self._run, name="fake-openai-jobs", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"fake OpenAI jobs server failed to start: {self._error}")
        if not self.base_url:
            raise RuntimeError("fake OpenAI jobs server did not start within 30 s")
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self._core.serve(self.port, self._on_ready, self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to start()
            self._error = exc
        finally:
            self._ready.set()

    def _on_ready(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        self._thread = self._loop = self._stop = None

    def __enter__(self) -> FakeOpenAIJobs:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Standalone process
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> tuple[Knobs, int]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--job-seconds", type=float, default=1.0)
    parser.add_argument("--outcome", choices=("succeeded", "failed"), default="succeeded")
    parser.add_argument("--metric-events", type=int, default=10)
    parser.add_argument("--min-examples", type=int, default=10)
    parser.add_argument("--server-errors", type=int, default=0)
    args = parser.parse_args(argv)
    knobs = Knobs(
        api_key=args.api_key,
        job_seconds=args.job_seconds,
        outcome=args.outcome,
        metric_events=args.metric_events,
        min_examples=args.min_examples,
        server_errors=args.server_errors,
    )
    return knobs, args.port


def spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start the server as its own process (command-line flags); returns it and its base URL."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--port", "0", *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"the fake OpenAI jobs server did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def main(argv: list[str] | None = None) -> int:
    knobs, port = _parse_args(argv)
    core = _Core(knobs)

    def ready(bound: int) -> None:
        print(f"READY http://127.0.0.1:{bound}/v1", flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await core.serve(port, ready, stop)

    asyncio.run(run())
    with core.lock:
        print(json.dumps(core.stats.summary()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
