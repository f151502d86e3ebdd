"""Fake OpenAI files and Batch API: a local server the real SDK submits chat batches to."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

import fake_openai_jobs as jobs
import fake_teacher
from fake_openai_jobs import FakeOpenAIJobs, StoredFile, _error, _int, _page

TERMINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = ("/v1/chat/completions",)
# Shares of batch_seconds spent validating and finalizing; the rest is in_progress.
_VALIDATING, _FINALIZING = 0.1, 0.9

# --------------------------------------------------------------------------------------------
# Knobs and counters
# --------------------------------------------------------------------------------------------


@dataclass
class Knobs(jobs.Knobs):
    """How the server behaves; mutable at runtime. A batch keeps the knobs it was created under."""

    batch_seconds: float = 0.5  # from creation to a terminal status
    # Share of rows answered with a 500 in the error file; drawn per body and per submission of
    # that body, so a resubmitted row gets a fresh draw.
    row_failure_rate: float = 0.0
    expire_batches: int = 0  # the next N batches created end "expired" (counts down)
    expired_share: float = 0.5  # rows of an expired batch left unanswered (in no file)
    max_requests: int = 50_000  # OpenAI's limits for one input file
    max_bytes: int = 200_000_000
    seed: int = 0


@dataclass
class Stats(jobs.Stats):
    """Counters of what the server saw (a snapshot when read through FakeOpenAIBatches.stats)."""

    batches_created: int = 0
    batch_polls: int = 0  # GET /v1/batches/{batch_id}
    rows_submitted: int = 0
    rows_answered: int = 0
    rows_failed: int = 0
    rows_expired: int = 0
    # By sha256 of the row's body (sorted keys), as the fake teacher counts bodies.
    submitted_by_body: collections.Counter[str] = field(default_factory=collections.Counter)
    failed_by_body: collections.Counter[str] = field(default_factory=collections.Counter)
    expired_by_body: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def submitted_twice(self) -> int:
        """Bodies submitted more often than they failed or expired plus once: duplicated work."""
        return sum(
            1
            for body, n in self.submitted_by_body.items()
            if n > 1 + self.failed_by_body[body] + self.expired_by_body[body]
        )

    def copy(self) -> Stats:
        base = super().copy()
        return Stats(
            **{name: getattr(base, name) for name in jobs.Stats.__dataclass_fields__},
            batches_created=self.batches_created,
            batch_polls=self.batch_polls,
            rows_submitted=self.rows_submitted,
            rows_answered=self.rows_answered,
            rows_failed=self.rows_failed,
            rows_expired=self.rows_expired,
            submitted_by_body=collections.Counter(self.submitted_by_body),
            failed_by_body=collections.Counter(self.failed_by_body),
            expired_by_body=collections.Counter(self.expired_by_body),
        )

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "batches_created": self.batches_created,
            "batch_polls": self.batch_polls,
            "rows_submitted": self.rows_submitted,
            "rows_answered": self.rows_answered,
            "rows_failed": self.rows_failed,
            "rows_expired": self.rows_expired,
            "submitted_twice": self.submitted_twice,
        }


def body_digest(body: Any) -> str:
    """How the server names a request body in its counters (as the fake teacher does)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    custom_id: str
    body: dict[str, Any]
    digest: str
    fate: str  # "answer" | "fail" | "expire": decided at creation, from the knobs then


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    started: float  # time.monotonic() at creation
    seconds: float
    rows: list[_Row]
    expires: bool
    errors: list[dict[str, Any]] | None = None  # validation errors: the batch fails
    status: str = "validating"
    stamps: dict[str, int] = field(default_factory=dict)  # "<status>_at" -> unix seconds
    output_file_id: str | None = None
    error_file_id: str | None = None
    processed: int = 0  # rows run so far (in order)
    completed: int = 0
    failed: int = 0

    def obj(self) -> dict[str, Any]:
        stamps = {
            f"{name}_at": self.stamps.get(name)
            for name in (
                "in_progress",
                "finalizing",
                "completed",
                "failed",
                "expired",
                "cancelling",
                "cancelled",
            )
        }
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 24 * 3600,
            **stamps,
            "request_counts": {
                "total": len(self.rows),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


def _parse_rows(data: bytes, endpoint: str) -> tuple[list[tuple[str, dict[str, Any]]], list[Any]]:
    """The (custom_id, body) rows of a batch input file and OpenAI-worded validation errors."""
    rows: list[tuple[str, dict[str, Any]]] = []
    errors: list[dict[str, Any]] = []
    ids: set[str] = set()
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            errors.append({"code": "invalid_json_line", "line": number, "message": "Invalid JSON"})
            continue
        custom_id = row.get("custom_id") if isinstance(row, dict) else None
        body = row.get("body") if isinstance(row, dict) else None
        if not isinstance(custom_id, str) or not isinstance(body, dict):
            message = "Each line needs a string custom_id and an object body."
            errors.append({"code": "invalid_request", "line": number, "message": message})
        elif row.get("method") != "POST" or row.get("url") != endpoint:
            message = f"The url must be {endpoint} and the method POST, as the batch's endpoint."
            errors.append({"code": "mismatched_endpoint", "line": number, "message": message})
        elif custom_id in ids:
            message = f"The custom_id {custom_id!r} is used more than once."
            errors.append({"code": "duplicate_custom_id", "line": number, "message": message})
        else:
            ids.add(custom_id)
            rows.append((custom_id, body))
    return rows, errors


class _Core(jobs._Core):
    """The files and fine-tuning server, plus /v1/batches over the same files."""

    knobs: Knobs
    stats: Stats

    def __init__(self, knobs: Knobs) -> None:
        super().__init__(knobs)
        self.stats = Stats()
        self.batches: dict[str, _Batch] = {}
        self._teacher_knobs = fake_teacher.Knobs()

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)
        return app

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if endpoint not in ENDPOINTS:
            return _error(400, f"Invalid value for 'endpoint': {endpoint!r}.", "endpoint")
        if window != "24h":
            return _error(400, f"Invalid value for 'completion_window': {window!r}.", "window")
        metadata = body.get("metadata")
        if metadata is not None and not jobs._valid_metadata(metadata):
            return _error(400, "metadata: at most 16 string pairs (keys 64, values 512 chars)")
        knobs = self.knobs
        with self.lock:
            file_id = body.get("input_file_id")
            stored = self.files.get(file_id) if isinstance(file_id, str) else None
            if stored is None:
                return _error(400, f"invalid input_file_id: {file_id}", "input_file_id")
            if stored.purpose != "batch":
                message = f"File {file_id} has purpose {stored.purpose!r}, not 'batch'."
                return _error(400, message, "input_file_id", "invalid_file_purpose")
            if len(stored.data) > knobs.max_bytes:
                message = f"The input file is larger than {knobs.max_bytes} bytes."
                return _error(400, message, "input_file_id", "file_too_large")
            parsed, errors = _parse_rows(stored.data, endpoint)
            if len(parsed) > knobs.max_requests:
                errors.append(
                    {
                        "code": "too_many_requests",
                        "line": None,
                        "message": f"A batch may hold at most {knobs.max_requests} requests.",
                    }
                )
            expires = knobs.expire_batches > 0
            if expires:
                knobs.expire_batches -= 1
            rows = [self._row(custom_id, b, expires) for custom_id, b in parsed]
            batch = _Batch(
                id=self._new_id("batch_"),
                input_file_id=stored.id,
                endpoint=endpoint,
                completion_window=window,
                metadata=metadata,
                created_at=int(time.time()),
                started=time.monotonic(),
                seconds=max(0.0, knobs.batch_seconds),
                rows=rows,
                expires=expires,
                errors=errors or None,
            )
            self.batches[batch.id] = batch
            self.stats.batches_created += 1
            if not errors:
                self.stats.rows_submitted += len(rows)
                self.stats.submitted_by_body.update(row.digest for row in rows)
            return web.json_response(batch.obj())

    def _row(self, custom_id: str, body: dict[str, Any], expires: bool) -> _Row:
        """A row and its fate, drawn from its body and how often that body came before."""
        digest = body_digest(body)
        attempt = self.stats.submitted_by_body[digest]
        knobs = self.knobs
        fate = "answer"
        draw, _ = fake_teacher._uniform(bytes.fromhex(digest), f"{knobs.seed}/expire/{attempt}")
        if expires and draw < knobs.expired_share:
            fate = "expire"
        else:
            draw, _ = fake_teacher._uniform(bytes.fromhex(digest), f"{knobs.seed}/fail/{attempt}")
            if draw < knobs.row_failure_rate:
                fate = "fail"
        return _Row(custom_id, body, digest, fate)

    def _advance_batch(self, batch: _Batch) -> None:
        """Bring a batch up to now: its status follows the clock, its files appear at the end."""
        if batch.status == "cancelling":
            self._end_batch(batch, "cancelled", batch.processed)
        if batch.status in TERMINAL:
            return
        elapsed = (time.monotonic() - batch.started) / batch.seconds if batch.seconds else math.inf
        now = int(time.time())
        if batch.status == "validating" and elapsed >= _VALIDATING:
            if batch.errors:
                batch.status = "failed"
                batch.stamps["failed"] = now
                return
            batch.status = "in_progress"
            batch.stamps["in_progress"] = now
        if batch.status == "in_progress":
            # Rows finish in order through the running stage (only counted until the end).
            share = (min(elapsed, _FINALIZING) - _VALIDATING) / (_FINALIZING - _VALIDATING)
            batch.processed = done = int(len(batch.rows) * share)
            batch.completed = sum(1 for r in batch.rows[:done] if r.fate == "answer")
            batch.failed = sum(1 for r in batch.rows[:done] if r.fate == "fail")
            if elapsed >= _FINALIZING:
                batch.status = "finalizing"
                batch.stamps["finalizing"] = now
        if batch.status == "finalizing" and elapsed >= 1.0:
            self._end_batch(batch, "expired" if batch.expires else "completed", len(batch.rows))

    def _end_batch(self, batch: _Batch, status: str, done: int) -> None:
        """End a batch: its first `done` rows are answered or failed (as fated), the rest not."""
        outputs: list[bytes] = []
        errors: list[bytes] = []
        for row in batch.rows[:done]:
            if row.fate == "expire":
                self.stats.rows_expired += 1
                self.stats.expired_by_body[row.digest] += 1
            elif row.fate == "fail":
                errors.append(self._error_line(batch, row))
                self.stats.rows_failed += 1
                self.stats.failed_by_body[row.digest] += 1
            else:
                outputs.append(self._output_line(batch, row))
                self.stats.rows_answered += 1
        for row in batch.rows[done:]:  # cancelled before they ran: as if expired
            self.stats.rows_expired += 1
            self.stats.expired_by_body[row.digest] += 1
        batch.completed, batch.failed = len(outputs), len(errors)
        if outputs:
            name = f"batch_{batch.id}_output.jsonl"
            batch.output_file_id = self.files.add(name, "batch_output", b"".join(outputs)).id
        if errors:
            name = f"batch_{batch.id}_error.jsonl"
            batch.error_file_id = self.files.add(name, "batch_output", b"".join(errors)).id
        batch.status = status
        batch.stamps[status] = int(time.time())

    def _output_line(self, batch: _Batch, row: _Row) -> bytes:
        body = row.body
        digest = bytes.fromhex(row.digest)
        response_format = body.get("response_format")
        form = response_format.get("type") if isinstance(response_format, dict) else None
        content, finish = fake_teacher._Core._content(
            body, form, response_format, digest, self._teacher_knobs
        )
        messages = body.get("messages")
        prompt_chars = (
            sum(
                len(fake_teacher._content_text(m.get("content")))
                for m in messages
                if isinstance(m, dict)
            )
            if isinstance(messages, list)
            else 0
        )
        prompt_tokens = max(1, prompt_chars // 4)
        completion_tokens = max(1, len(content) // 4)
        completion = {
            "id": f"chatcmpl-{row.digest[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or "fake-teacher",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake_batch",
        }
        line = {
            "id": self._new_id("batch_req_"),
            "custom_id": row.custom_id,
            "response": {
                "status_code": 200,
                "request_id": f"req_{row.digest[:24]}",
                "body": completion,
            },
            "error": None,
        }
        return json.dumps(line).encode() + b"\n"

    def _error_line(self, batch: _Batch, row: _Row) -> bytes:
        error = {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        line = {
            "id": self._new_id("batch_req_"),
            "custom_id": row.custom_id,
            "response": {
                "status_code": 500,
                "request_id": f"req_{row.digest[:24]}",
                "body": {"error": error},
            },
            "error": None,
        }
        return json.dumps(line).encode() + b"\n"

    def _batch_or_404(self, request: web.Request) -> _Batch | web.Response:
        batch_id = request.match_info["batch_id"]
        batch = self.batches.get(batch_id)
        if batch is None:
            return _error(404, f"No batch found with id '{batch_id}'.", "batch_id")
        self._advance_batch(batch)
        return batch

    async def get_batch(self, request: web.Request) -> web.Response:
        with self.lock:
            self.stats.batch_polls += 1
            batch = self._batch_or_404(request)
            return batch if isinstance(batch, web.Response) else web.json_response(batch.obj())

    async def list_batches(self, request: web.Request) -> web.Response:
        limit = _int(request.query.get("limit"), 20)
        with self.lock:
            batches = list(self.batches.values())[::-1]
            for batch in batches:
                self._advance_batch(batch)
            return _page([b.obj() for b in batches], request.query.get("after"), limit)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        with self.lock:
            batch = self._batch_or_404(request)
            if isinstance(batch, web.Response):
                return batch
            if batch.status in TERMINAL:
                return _error(400, f"Batch {batch.id} is {batch.status}; it cannot be cancelled.")
            batch.status = "cancelling"
            batch.stamps["cancelling"] = int(time.time())
            return web.json_response(batch.obj())


class FakeOpenAIBatches(FakeOpenAIJobs):
    """The fake files, fine-tuning and Batch API in a background thread with its own loop."""

    def __init__(self, knobs: Knobs | None = None, port: int = 0) -> None:
        super().__init__(port=port)
        self._core: _Core = _Core(knobs if knobs is not None else Knobs())

    @property  # type: ignore[override]  # the batch knobs extend the jobs knobs
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

    def batches(self) -> list[dict[str, Any]]:
        """Every batch as the API shows it now, newest first."""
        with self._core.lock:
            found = list(self._core.batches.values())[::-1]
            for batch in found:
                self._core._advance_batch(batch)
            return [batch.obj() for batch in found]

    def finish_batches(self) -> None:
        """Let every running batch reach its end now, as if its batch_seconds had passed."""
        with self._core.lock:
            for batch in self._core.batches.values():
                if batch.status not in TERMINAL:
                    batch.started = time.monotonic() - batch.seconds

    def input_file(self, batch_id: str) -> StoredFile:
        with self._core.lock:
            stored = self._core.files.get(self._core.batches[batch_id].input_file_id)
        assert stored is not None
        return stored

    def __enter__(self) -> FakeOpenAIBatches:
        self.start()
        return self
