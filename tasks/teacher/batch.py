"""Batch mode of the teacher engine: uncached requests through OpenAI's Batch API (half price)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import openai
from openai.types import Batch

from distillery.tasks.teacher.base import (
    BatchesPending,
    Call,
    ChatRequest,
    ChatResult,
    EngineSettings,
    TeacherEndpoint,
    TeacherError,
    TeacherUnavailable,
)
from distillery.tasks.teacher.cache import RequestCache, SharedStore
from distillery.tasks.teacher.replies import chat_completion, describe_refusal, result_from_body

logger = logging.getLogger("distillery.batch")

# OpenAI's limits for one batch input file (https://platform.openai.com/docs/guides/batch).
MAX_REQUESTS = 50_000
MAX_BYTES = 200_000_000
ENDPOINT: Final = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# A 200 MB upload or download takes longer than one chat request's timeout.
FILE_TIMEOUT_S = 900.0
# The SDK retries the Batch API's own calls (408, 409, 429, 5xx, dropped connections) with its
# jittered backoff: a handful of calls per batch, so its retries are cheap, unlike chat requests.
API_RETRIES = 5
# With a hold (DISTILLERY_BATCH_HOLD_S), the next look at batches still running is suggested
# after half their age (a backoff across runs), at least the longest poll interval, at most this.
RECHECK_MAX_S = 3600.0


@dataclass
class Chunk:
    """One batch: the requests of one input file, as the ledger records them."""

    id: str  # sha256 of its request keys; also in the batch's metadata
    keys: list[str]
    created_at: float
    input_file_id: str | None = None
    batch_id: str | None = None


def chunk_id(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def split(lines: Sequence[tuple[str, bytes]], max_requests: int, max_bytes: int) -> list[Any]:
    """(key, JSONL line) pairs cut into files of at most `max_requests` lines and `max_bytes`."""
    files: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for key, line in lines:
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            files.append(current)
            current, size = [], 0
        current.append((key, line))
        size += len(line)
    if current:
        files.append(current)
    return files


class BatchLedger:
    """The batches submitted from one cache folder, in the request cache's sqlite file, and,
    with a shared cache (DISTILLERY_CACHE=s3://...), in the shared store too.

    A chunk is recorded before its upload and updated as its file and batch are created, so a
    restarted process re-attaches to every batch whose answers it has not yet cached.

    In the shared store each submission is a folder `batches/<chunk>/<created_at>/` of
    create-only objects: `record.json` (its keys and input file, written once the file is
    uploaded: a chunk still being uploaded stays this worker's own), `batch_id`, and
    `collected` (the final status) once its answers are cached. A worker on another machine
    re-attaches to every submission without `collected` instead of paying for it again. How
    often a row was resubmitted (`tries`) stays per worker.
    """

    def __init__(self, path: Path, shared: SharedStore | None = None) -> None:
        self._shared = shared
        # Used on the engine's loop thread only; closed from the thread that closes the engine.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batches (chunk TEXT PRIMARY KEY, keys TEXT NOT NULL, "
            "created_at REAL NOT NULL, input_file_id TEXT, batch_id TEXT, status TEXT, "
            "collected INTEGER NOT NULL DEFAULT 0)"
        )
        # How often each request without an answer was submitted, across processes: a run that
        # re-attaches later (a re-check) must not resubmit a failing row forever.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batch_tries (key TEXT PRIMARY KEY, n INTEGER NOT NULL)"
        )

    def open_chunks(self) -> list[Chunk]:
        """Chunks whose answers are not all cached yet (or were never submitted)."""
        rows = self._db.execute(
            "SELECT chunk, keys, created_at, input_file_id, batch_id FROM batches "
            "WHERE collected = 0 ORDER BY created_at"
        )
        chunks = {c: Chunk(c, json.loads(k), t, f, b) for c, k, t, f, b in rows}
        for chunk in self._shared_open():
            mine = chunks.get(chunk.id)
            if mine is None or (mine.batch_id is None and chunk.created_at >= mine.created_at):
                chunks[chunk.id] = chunk  # another worker's, or further along than ours
        return sorted(chunks.values(), key=lambda c: c.created_at)

    def _shared_open(self) -> list[Chunk]:
        """The shared store's submissions without `collected`: every worker's open batches."""
        if self._shared is None:
            return []
        folders: dict[str, set[str]] = collections.defaultdict(set)
        for name in self._shared.names("batches"):
            folder, _, item = name.rpartition("/")
            folders[folder].add(item)
        wanted = [f for f, items in folders.items() if "record.json" in items]
        wanted = [f for f in wanted if "collected" not in folders[f]]
        blobs = self._shared.read_many(
            [f"{f}/{item}" for f in wanted for item in ("record.json", "batch_id")]
        )
        chunks = []
        for folder in wanted:
            record = json.loads(blobs[f"{folder}/record.json"])
            batch_id = blobs.get(f"{folder}/batch_id")
            chunks.append(
                Chunk(
                    record["chunk"],
                    record["keys"],
                    record["created_at"],
                    record["input_file_id"],
                    batch_id.decode() if batch_id is not None else None,
                )
            )
        return chunks

    def _folder(self, chunk: str) -> str | None:
        """The shared folder of this chunk's newest local submission (None: no shared store)."""
        if self._shared is None:
            return None
        row = self._db.execute("SELECT created_at FROM batches WHERE chunk = ?", (chunk,))
        found = row.fetchone()
        return None if found is None else f"batches/{chunk}/{found[0]:.6f}"

    def _share(self, chunk: str, column: str, value: str) -> None:
        folder = self._folder(chunk)
        if folder is None or self._shared is None:
            return
        if column == "input_file_id":
            ((keys, created_at),) = self._db.execute(
                "SELECT keys, created_at FROM batches WHERE chunk = ?", (chunk,)
            )
            record = {
                "chunk": chunk,
                "keys": json.loads(keys),
                "created_at": created_at,
                "input_file_id": value,
            }
            self._shared.create(f"{folder}/record.json", json.dumps(record).encode())
        elif column in ("batch_id", "collected"):
            self._shared.create(f"{folder}/{column}", value.encode())

    def add(self, chunk: Chunk) -> None:
        # Replaces only a collected chunk of the same keys: an open one would have been attached.
        self._db.execute(
            "INSERT OR REPLACE INTO batches (chunk, keys, created_at) VALUES (?, ?, ?)",
            (chunk.id, json.dumps(chunk.keys), chunk.created_at),
        )

    def set(self, chunk: str, column: str, value: str) -> None:
        assert column in ("input_file_id", "batch_id", "status")
        self._adopt(chunk)
        self._db.execute(f"UPDATE batches SET {column} = ? WHERE chunk = ?", (value, chunk))
        self._share(chunk, column, value)

    def collected(self, chunk: str, status: str) -> None:
        self._adopt(chunk)
        self._db.execute(
            "UPDATE batches SET collected = 1, status = ? WHERE chunk = ?", (status, chunk)
        )
        self._share(chunk, "collected", status)

    def _adopt(self, chunk: str) -> None:
        """A shared submission re-attached by this worker: recorded locally too, under the same
        created_at, so that its updates reach the same shared folder."""
        if self._shared is None:
            return
        row = self._db.execute(
            "SELECT created_at, collected FROM batches WHERE chunk = ?", (chunk,)
        ).fetchone()
        if row is not None and not row[1]:
            return  # ours, open
        for found in self._shared_open():
            if found.id == chunk and (row is None or found.created_at > row[0]):
                self._db.execute(
                    "INSERT OR REPLACE INTO batches (chunk, keys, created_at, input_file_id, "
                    "batch_id) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        chunk,
                        json.dumps(found.keys),
                        found.created_at,
                        found.input_file_id,
                        found.batch_id,
                    ),
                )
                return

    def drop(self, chunk: str) -> None:
        self._db.execute("DELETE FROM batches WHERE chunk = ?", (chunk,))

    def tries(self, keys: Sequence[str]) -> dict[str, int]:
        """How often each of `keys` was submitted without an answer yet (absent: never)."""
        found: dict[str, int] = {}
        for start in range(0, len(keys), 500):
            part = list(keys[start : start + 500])
            marks = ",".join("?" * len(part))
            rows = self._db.execute(f"SELECT key, n FROM batch_tries WHERE key IN ({marks})", part)
            found.update(rows)
        return found

    def tried(self, keys: Sequence[str]) -> None:
        self._many(
            "INSERT INTO batch_tries VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET n = n + 1", keys
        )

    def forget(self, keys: Sequence[str]) -> None:
        """Answered, or given up on (so that a later run starts their count again)."""
        self._many("DELETE FROM batch_tries WHERE key = ?", keys)

    def _many(self, sql: str, keys: Sequence[str]) -> None:
        if keys:
            self._db.execute("BEGIN")  # one commit, not one per key
            try:
                self._db.executemany(sql, ((k,) for k in keys))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def batches(self) -> list[dict[str, Any]]:
        """Every recorded chunk, oldest first (for tests and inspection)."""
        rows = self._db.execute(
            "SELECT chunk, keys, batch_id, input_file_id, status, collected FROM batches "
            "ORDER BY created_at"
        )
        names = ("chunk", "keys", "batch_id", "input_file_id", "status", "collected")
        return [dict(zip(names, row, strict=True)) | {"keys": json.loads(row[1])} for row in rows]

    def close(self) -> None:
        self._db.close()


class Engine(Protocol):
    """What the sender uses of the engine (TeacherEngine): its public interface for batch mode."""

    endpoint: TeacherEndpoint
    settings: EngineSettings
    cache: RequestCache

    @property
    def stopping(self) -> bool: ...

    def sdk_client(self) -> openai.AsyncOpenAI: ...

    def wire(self, req: ChatRequest) -> dict[str, Any]: ...

    def estimate(self, req: ChatRequest, batch: bool = False) -> float: ...

    def may_send(self, run: Call, estimate: float) -> None: ...

    def count(self, run: Call, **deltas: float | None) -> None: ...

    def charge(
        self, run: Call, req: ChatRequest, usage: tuple[int, int] | None, batch: bool = False
    ) -> None: ...

    def advance(self, run: Call, answers: int = 1) -> None: ...

    def hold(self, task: asyncio.Task[Any], estimate: float) -> None: ...


class BatchSender:
    """Answers a `complete` call's uncached requests through the Batch API, into the cache."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ledger = BatchLedger(engine.cache.path, engine.cache.shared)
        self._client = engine.sdk_client().with_options(max_retries=API_RETRIES)
        # Chunks being submitted or waited for by this process: a second call that needs some
        # of their requests waits for the same task instead of submitting them again.
        self._in_hand: dict[str, tuple[frozenset[str], asyncio.Task[Batch]]] = {}
        self._why: dict[str, str] = {}  # key -> why its last batch row brought no answer
        self._keys: dict[str, list[str]] = {}  # batch id -> the request keys it answers
        self._running: dict[str, Batch] = {}  # batch id -> the batch at its last look (progress)

    async def complete(
        self, todo: dict[str, ChatRequest], run: Call, done: dict[str, ChatResult]
    ) -> None:
        """Answer `todo` (key -> request) into the cache and `done`, resubmitting what failed.

        With a hold (DISTILLERY_BATCH_HOLD_S), batches still running when it ends raise
        BatchesPending: they stay recorded, and a later call re-attaches to them.
        """
        engine = self.engine
        pending = dict(todo)
        batch_ids: list[str] = []
        rounds = engine.settings.max_attempts
        hold = engine.settings.batch_hold_s
        deadline = None if hold is None else time.monotonic() + hold
        while pending:  # left by a return, a raise, or (giving up) a break
            started = self._start(pending, run, deadline)
            if started is None:
                break  # rows submitted `rounds` times (in this run or earlier ones): give up
            tasks, own = started
            finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if engine.stopping:
                return  # the batches stay recorded: the next run re-attaches
            failed = [t for t in finished if not t.cancelled() and t.exception() is not None]
            if failed:
                for task in own:
                    task.cancel()  # recorded: a later run re-attaches to them
                error = failed[0].exception()
                assert error is not None
                raise error
            # A task cancelled by another call's failure: its chunk is attached next round.
            ended = [t.result() for t in tasks if not t.cancelled()]
            batch_ids += [b.id for b in ended]
            landed = await engine.cache.aget_many(list(pending))
            self.ledger.forget(list(landed))
            self._land(landed, pending, run, done)
            pending = {k: r for k, r in pending.items() if k not in done}
            if not pending:
                return
            running = [b for b in ended if b.status not in TERMINAL]
            in_flight = {k for b in running for k in self._keys[b.id]}
            if running and pending.keys() <= in_flight:
                raise self._still_running(run.label, running, len(pending))
            # Rows of batches that ended without an answer are resubmitted, also when others are
            # still running after the hold: the next round submits them, looks once at every
            # batch and raises, so that the re-check finds them in flight too.
            logger.warning(
                "%s: %d requests came back without an answer from batches %s; resubmitting them",
                run.label,
                sum(1 for k in pending if k not in in_flight),
                ", ".join(b.id for b in ended if b.status in TERMINAL),
            )
        if not pending:
            return
        self.ledger.forget(list(pending))  # the same command later starts their count again
        reasons = collections.Counter(self._why.get(k, "no answer") for k in pending)
        why = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3))
        ids = ", ".join(dict.fromkeys(batch_ids))
        raise TeacherUnavailable(
            f"{run.label}: {len(pending)} requests still had no answer after {rounds} batch "
            f"rounds (batches {ids}; {why}); every answer received is cached: "
            "run the same command again, or raise DISTILLERY_MAX_ATTEMPTS."
        )

    def _start(
        self, pending: dict[str, ChatRequest], run: Call, deadline: float | None
    ) -> tuple[list[asyncio.Task[Batch]], list[asyncio.Task[Batch]]] | None:
        """Tasks that answer `pending`: in hand, recorded (re-attached), or new; and the new.

        None, having started nothing, when a request that would be submitted again already was
        submitted max_attempts times.
        """
        engine = self.engine
        tasks: list[asyncio.Task[Batch]] = []
        covered: set[str] = set()
        for held, task in self._in_hand.values():
            if not pending.keys().isdisjoint(held):
                tasks.append(task)
                covered |= held
        attach: list[Chunk] = []
        for chunk in self.ledger.open_chunks():
            if chunk.id in self._in_hand or pending.keys().isdisjoint(chunk.keys):
                continue
            if chunk.batch_id is None and chunk.input_file_id is None:
                self.ledger.drop(chunk.id)  # stopped before its upload: nothing was submitted
                continue
            attach.append(chunk)
            covered.update(chunk.keys)
        lines = [(k, self._line(k, r)) for k, r in pending.items() if k not in covered]
        tries = self.ledger.tries([k for k, _ in lines])
        if any(n >= engine.settings.max_attempts for n in tries.values()):
            return None
        own: list[asyncio.Task[Batch]] = []
        for chunk in attach:
            logger.info(
                "%s: re-attaching to batch %s (%d requests)",
                run.label,
                chunk.batch_id or f"of file {chunk.input_file_id}",
                len(chunk.keys),
            )
            own.append(self._spawn(chunk, None, 0.0, deadline))
        for part in split(lines, MAX_REQUESTS, MAX_BYTES):
            keys = [k for k, _ in part]
            estimate = sum(engine.estimate(pending[k], batch=True) for k in keys)
            engine.may_send(run, estimate)  # stopping, or the spending cap
            # A row submitted before (in this run or an earlier one) is a retry.
            engine.count(run, sent=len(keys), retries=sum(1 for k in keys if k in tries))
            chunk = Chunk(chunk_id(keys), keys, time.time())
            self.ledger.add(chunk)
            self.ledger.tried(keys)
            own.append(self._spawn(chunk, b"".join(line for _, line in part), estimate, deadline))
        return tasks + own, own

    def _line(self, key: str, req: ChatRequest) -> bytes:
        row = {"custom_id": key, "method": "POST", "url": ENDPOINT, "body": self.engine.wire(req)}
        return json.dumps(row).encode() + b"\n"

    def _spawn(
        self, chunk: Chunk, data: bytes | None, estimate: float, deadline: float | None
    ) -> asyncio.Task[Batch]:
        task = asyncio.create_task(self._run_chunk(chunk, data, deadline))
        self._in_hand[chunk.id] = (frozenset(chunk.keys), task)
        self.engine.hold(task, estimate)  # stop() cancels it; the batch itself stays recorded

        def gone(task: asyncio.Task[Batch]) -> None:
            self._in_hand.pop(chunk.id, None)

        task.add_done_callback(gone)
        return task

    async def _run_chunk(self, chunk: Chunk, data: bytes | None, deadline: float | None) -> Batch:
        """Submit (or find) the chunk's batch, wait for it until `deadline` (monotonic; None: its
        end), cache its answers if it ended; the batch as last seen."""
        host = self.engine.endpoint.host
        try:
            batch = await self._submitted(chunk, data)
            self._keys[batch.id] = chunk.keys
            batch = await self._wait(chunk, batch, deadline)
            if batch.status in TERMINAL:
                await self._collect(chunk, batch)
        except openai.APIStatusError as exc:
            if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                raise TeacherUnavailable(
                    f"the Batch API at {host} still failed after {API_RETRIES + 1} tries "
                    f"({exc.status_code}: {str(exc.message)[:200]}); submitted batches are "
                    "recorded: run the same command again once it recovers."
                ) from None
            raise TeacherError(describe_refusal(exc, self.engine.endpoint)) from None
        except openai.APIConnectionError as exc:
            raise TeacherUnavailable(
                f"the Batch API at {host} could not be reached after {API_RETRIES + 1} tries "
                f"({exc}); submitted batches are recorded: run the same command again."
            ) from exc
        return batch

    async def _submitted(self, chunk: Chunk, data: bytes | None) -> Batch:
        client = self._client
        if chunk.batch_id is not None:
            return await client.batches.retrieve(chunk.batch_id)
        if chunk.input_file_id is not None:
            # Stopped between upload and record: the batch may exist (its metadata says so).
            found = await self._find(chunk)
            if found is not None:
                self.ledger.set(chunk.id, "batch_id", found.id)
                return found
            file_id = chunk.input_file_id
        else:
            assert data is not None
            uploaded = await client.files.create(
                file=(f"distillery-{chunk.id[:16]}.jsonl", data),
                purpose="batch",
                timeout=FILE_TIMEOUT_S,
            )
            file_id = uploaded.id
            self.ledger.set(chunk.id, "input_file_id", file_id)
        batch = await client.batches.create(
            input_file_id=file_id,
            endpoint=ENDPOINT,
            completion_window="24h",
            metadata=self._metadata(chunk),
        )
        self.ledger.set(chunk.id, "batch_id", batch.id)
        logger.info("submitted batch %s (%d requests, file %s)", batch.id, len(chunk.keys), file_id)
        return batch

    @staticmethod
    def _metadata(chunk: Chunk) -> dict[str, str]:
        return {"distillery_chunk": chunk.id, "distillery_created": f"{chunk.created_at:.6f}"}

    async def _find(self, chunk: Chunk) -> Batch | None:
        wanted = self._metadata(chunk)
        async for batch in self._client.batches.list(limit=100):  # newest first
            if batch.created_at < chunk.created_at - 600:
                break
            if batch.metadata and all(batch.metadata.get(k) == v for k, v in wanted.items()):
                return batch
        return None

    async def _wait(self, chunk: Chunk, batch: Batch, deadline: float | None) -> Batch:
        """Poll with backoff until the batch ends, or until `deadline` passes (then as it is)."""
        settings = self.engine.settings
        delay = settings.batch_poll_interval_s
        status = ""
        try:
            while batch.status not in TERMINAL:
                if batch.status != status:
                    status = batch.status
                    self.ledger.set(chunk.id, "status", status)
                    counts = batch.request_counts
                    logger.info(
                        "batch %s is %s%s",
                        batch.id,
                        status,
                        f" ({counts.completed + counts.failed} of {counts.total} done)"
                        if counts
                        else "",
                    )
                self._running[batch.id] = batch
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return batch  # still running: the call reports it (BatchesPending)
                await asyncio.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 1.5, settings.batch_max_poll_interval_s)
                batch = await self._client.batches.retrieve(batch.id)
        finally:
            self._running.pop(batch.id, None)  # ended, held long enough, or stopped
        return batch

    async def _collect(self, chunk: Chunk, batch: Batch) -> None:
        """Cache every answer of a finished batch; note why the other rows have none."""
        if batch.status == "failed":
            errors = batch.errors.data if batch.errors and batch.errors.data else []
            why = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no reason given"
            self.ledger.collected(chunk.id, batch.status)
            raise TeacherError(
                f"the Batch API at {self.engine.endpoint.host} refused batch {batch.id} ({why}); "
                "check the recipe's teacher settings (model, max_tokens, structured_output)."
            )
        seen: set[str] = set()
        answers: dict[str, ChatResult] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._client.files.content(file_id, timeout=FILE_TIMEOUT_S)
            for line in content.content.splitlines():
                if line.strip():
                    seen.add(self._take(json.loads(line), answers))
        # At once: with a shared store, its create-only writes go out concurrently.
        await self.engine.cache.aput_many(answers)
        for key in set(chunk.keys) - seen:
            self._why[key] = f"batch {batch.status} before answering it"
        self.ledger.collected(chunk.id, batch.status)
        logger.info("batch %s %s: answers cached", batch.id, batch.status)

    def _take(self, row: dict[str, Any], answers: dict[str, ChatResult]) -> str:
        """Put one output-file row into `answers` if it is an answer; its key."""
        key = str(row.get("custom_id"))
        response = row.get("response") or {}
        if response.get("status_code") == 200:
            body = chat_completion(response["body"])
            answers[key] = result_from_body(body, response.get("request_id"))
            self._why.pop(key, None)
            return key
        error = row.get("error") or (response.get("body") or {}).get("error") or {}
        status = response.get("status_code")
        self._why[key] = (
            f"{status or error.get('code') or 'error'}: {str(error.get('message'))[:120]}"
        )
        return key

    def _still_running(self, label: str, running: list[Batch], waiting: int) -> BatchesPending:
        """What a call whose hold ended reports: each batch's progress, and when to look again."""
        settings = self.engine.settings
        now = time.time()
        batches = []
        for batch in running:
            counts = batch.request_counts
            batches.append(
                {
                    "id": batch.id,
                    "status": batch.status,
                    "completed": counts.completed if counts else 0,
                    "failed": counts.failed if counts else 0,
                    "total": counts.total if counts and counts.total else len(self._keys[batch.id]),
                    "created_at": batch.created_at,
                }
            )
        # Half the youngest batch's age: a backoff across re-checks, as polling backs off.
        age = min(max(0.0, now - batch.created_at) for batch in running)
        delay = min(max(age / 2, settings.batch_max_poll_interval_s), RECHECK_MAX_S)
        return BatchesPending.of(label, batches, waiting, now + delay)

    def _land(
        self,
        landed: dict[str, ChatResult],
        pending: dict[str, ChatRequest],
        run: Call,
        done: dict[str, ChatResult],
    ) -> None:
        """Count the answers a round brought (at the batch price) and hand them to the call."""
        engine = self.engine
        for key, result in landed.items():
            done[key] = result
            usage = (result.prompt_tokens, result.completion_tokens)
            engine.charge(run, pending[key], usage, batch=True)
        if landed:
            engine.advance(run, len(landed))

    def counts(self) -> tuple[int, int, int] | None:
        """(batches, requests answered, requests) of the batches being waited for; None: none.

        Read from other threads (the UI's progress): a copy, taken in one step."""
        batches = list(self._running.values())
        if not batches:
            return None
        answered = sum(b.request_counts.completed for b in batches if b.request_counts)
        total = sum(
            b.request_counts.total if b.request_counts else len(self._keys.get(b.id, ()))
            for b in batches
        )
        return len(batches), answered, total

    def close(self) -> None:
        self.ledger.close()
