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
from typing import TYPE_CHECKING, Any, Final

import openai
from openai.types import Batch
from openai.types.chat import ChatCompletion

from tasks.teacher import (
    ChatRequest,
    ChatResult,
    TeacherError,
    TeacherUnavailable,
    _describe_refusal,
    _Run,
    _to_result,
)

if TYPE_CHECKING:
    from tasks.teacher import TeacherEngine

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
    """The batches submitted from one cache folder, in the request cache's sqlite file.

    A chunk is recorded before its upload and updated as its file and batch are created, so a
    restarted process re-attaches to every batch whose answers it has not yet cached.
    """

    def __init__(self, path: Path) -> None:
        # Used on the engine's loop thread only; closed from the thread that closes the engine.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batches (chunk TEXT PRIMARY KEY, keys TEXT NOT NULL, "
            "created_at REAL NOT NULL, input_file_id TEXT, batch_id TEXT, status TEXT, "
            "collected INTEGER NOT NULL DEFAULT 0)"
        )

    def open_chunks(self) -> list[Chunk]:
        """Chunks whose answers are not all cached yet (or were never submitted)."""
        rows = self._db.execute(
            "SELECT chunk, keys, created_at, input_file_id, batch_id FROM batches "
            "WHERE collected = 0 ORDER BY created_at"
        )
        return [Chunk(c, json.loads(k), t, f, b) for c, k, t, f, b in rows]

    def add(self, chunk: Chunk) -> None:
        # Replaces only a collected chunk of the same keys: an open one would have been attached.
        self._db.execute(
            "INSERT OR REPLACE INTO batches (chunk, keys, created_at) VALUES (?, ?, ?)",
            (chunk.id, json.dumps(chunk.keys), chunk.created_at),
        )

    def set(self, chunk: str, column: str, value: str) -> None:
        assert column in ("input_file_id", "batch_id", "status")
        self._db.execute(f"UPDATE batches SET {column} = ? WHERE chunk = ?", (value, chunk))

    def collected(self, chunk: str, status: str) -> None:
        self._db.execute(
            "UPDATE batches SET collected = 1, status = ? WHERE chunk = ?", (status, chunk)
        )

    def drop(self, chunk: str) -> None:
        self._db.execute("DELETE FROM batches WHERE chunk = ?", (chunk,))

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


class BatchSender:
    """Answers a `complete` call's uncached requests through the Batch API, into the cache."""

    def __init__(self, engine: TeacherEngine) -> None:
        self.engine = engine
        self.ledger = BatchLedger(engine.cache.path)
        self._client = engine._client.with_options(max_retries=API_RETRIES)
        # Chunks being submitted or waited for by this process: a second call that needs some
        # of their requests waits for the same task instead of submitting them again.
        self._in_hand: dict[str, tuple[frozenset[str], asyncio.Task[str]]] = {}
        self._why: dict[str, str] = {}  # key -> why its last batch row brought no answer

    async def complete(
        self, todo: dict[str, ChatRequest], run: _Run, done: dict[str, ChatResult]
    ) -> None:
        """Answer `todo` (key -> request) into the cache and `done`, resubmitting what failed."""
        engine = self.engine
        pending = dict(todo)
        batch_ids: list[str] = []
        rounds = engine.settings.max_attempts
        for attempt in range(rounds):
            if not pending:
                return
            if attempt:
                engine._count(run, retries=len(pending))
            tasks, own = self._start(pending, run)
            finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if engine._stopping:
                return  # the batches stay recorded: the next run re-attaches
            failed = [t for t in finished if not t.cancelled() and t.exception() is not None]
            if failed:
                for task in own:
                    task.cancel()  # recorded: a later run re-attaches to them
                error = failed[0].exception()
                assert error is not None
                raise error
            # A task cancelled by another call's failure: its chunk is attached next round.
            batch_ids += [t.result() for t in tasks if not t.cancelled()]
            self._land(engine.cache.get_many(list(pending)), pending, run, done)
            pending = {k: r for k, r in pending.items() if k not in done}
            if not pending:
                return
            logger.warning(
                "%s: %d requests came back without an answer from batches %s; resubmitting them",
                run.label,
                len(pending),
                ", ".join(batch_ids[-len(tasks) :]),
            )
        reasons = collections.Counter(self._why.get(k, "no answer") for k in pending)
        why = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3))
        raise TeacherUnavailable(
            f"{run.label}: {len(pending)} requests still had no answer after {rounds} batch "
            f"rounds (batches {', '.join(batch_ids)}; {why}); every answer received is cached: "
            "run the same command again, or raise DISTILLERY_MAX_ATTEMPTS."
        )

    def _start(
        self, pending: dict[str, ChatRequest], run: _Run
    ) -> tuple[list[asyncio.Task[str]], list[asyncio.Task[str]]]:
        """Tasks that answer `pending`: in hand, recorded (re-attached), or new; and the new."""
        engine = self.engine
        tasks: list[asyncio.Task[str]] = []
        covered: set[str] = set()
        for held, task in self._in_hand.values():
            if not pending.keys().isdisjoint(held):
                tasks.append(task)
                covered |= held
        own: list[asyncio.Task[str]] = []
        for chunk in self.ledger.open_chunks():
            if chunk.id in self._in_hand or pending.keys().isdisjoint(chunk.keys):
                continue
            if chunk.batch_id is None and chunk.input_file_id is None:
                self.ledger.drop(chunk.id)  # stopped before its upload: nothing was submitted
                continue
            logger.info(
                "%s: re-attaching to batch %s (%d requests)",
                run.label,
                chunk.batch_id or f"of file {chunk.input_file_id}",
                len(chunk.keys),
            )
            own.append(self._spawn(chunk, None, 0.0))
            covered.update(chunk.keys)
        lines = [(k, self._line(k, r)) for k, r in pending.items() if k not in covered]
        for part in split(lines, MAX_REQUESTS, MAX_BYTES):
            keys = [k for k, _ in part]
            estimate = sum(engine._estimate(pending[k], batch=True) for k in keys)
            engine._may_send(run, estimate)  # stopping, or the spending cap
            engine._count(run, sent=len(keys))
            chunk = Chunk(chunk_id(keys), keys, time.time())
            self.ledger.add(chunk)
            own.append(self._spawn(chunk, b"".join(line for _, line in part), estimate))
        return tasks + own, own

    def _line(self, key: str, req: ChatRequest) -> bytes:
        row = {"custom_id": key, "method": "POST", "url": ENDPOINT, "body": self.engine._wire(req)}
        return json.dumps(row).encode() + b"\n"

    def _spawn(self, chunk: Chunk, data: bytes | None, estimate: float) -> asyncio.Task[str]:
        engine = self.engine
        engine._in_flight_usd += estimate
        task = asyncio.create_task(self._run_chunk(chunk, data))
        self._in_hand[chunk.id] = (frozenset(chunk.keys), task)
        engine._tasks.add(task)  # stop() cancels it; the batch itself stays recorded

        def gone(task: asyncio.Task[str]) -> None:
            engine._tasks.discard(task)
            engine._in_flight_usd -= estimate
            self._in_hand.pop(chunk.id, None)

        task.add_done_callback(gone)
        return task

    async def _run_chunk(self, chunk: Chunk, data: bytes | None) -> str:
        """Submit (or find) the chunk's batch, wait for it, cache its answers; its batch id."""
        host = self.engine.endpoint.host
        try:
            batch = await self._submitted(chunk, data)
            batch = await self._wait(chunk, batch)
            await self._collect(chunk, batch)
        except openai.APIStatusError as exc:
            if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                raise TeacherUnavailable(
                    f"the Batch API at {host} still failed after {API_RETRIES + 1} tries "
                    f"({exc.status_code}: {str(exc.message)[:200]}); submitted batches are "
                    "recorded: run the same command again once it recovers."
                ) from None
            raise TeacherError(_describe_refusal(exc, self.engine.endpoint)) from None
        except openai.APIConnectionError as exc:
            raise TeacherUnavailable(
                f"the Batch API at {host} could not be reached after {API_RETRIES + 1} tries "
                f"({exc}); submitted batches are recorded: run the same command again."
            ) from exc
        return batch.id

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

    async def _wait(self, chunk: Chunk, batch: Batch) -> Batch:
        settings = self.engine.settings
        delay = settings.batch_poll_interval_s
        status = ""
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
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, settings.batch_max_poll_interval_s)
            batch = await self._client.batches.retrieve(batch.id)
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
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._client.files.content(file_id, timeout=FILE_TIMEOUT_S)
            for line in content.content.splitlines():
                if line.strip():
                    seen.add(self._take(json.loads(line)))
        for key in set(chunk.keys) - seen:
            self._why[key] = f"batch {batch.status} before answering it"
        self.ledger.collected(chunk.id, batch.status)
        logger.info("batch %s %s: answers cached", batch.id, batch.status)

    def _take(self, row: dict[str, Any]) -> str:
        """Cache one output-file row if it is an answer; its key."""
        key = str(row.get("custom_id"))
        response = row.get("response") or {}
        if response.get("status_code") == 200:
            completion = ChatCompletion.model_validate(response["body"])
            self.engine.cache.put(key, _to_result(completion, response.get("request_id")))
            self._why.pop(key, None)
            return key
        error = row.get("error") or (response.get("body") or {}).get("error") or {}
        status = response.get("status_code")
        self._why[key] = (
            f"{status or error.get('code') or 'error'}: {str(error.get('message'))[:120]}"
        )
        return key

    def _land(
        self,
        landed: dict[str, ChatResult],
        pending: dict[str, ChatRequest],
        run: _Run,
        done: dict[str, ChatResult],
    ) -> None:
        """Count the answers a round brought (at the batch price) and hand them to the call."""
        engine = self.engine
        for key, result in landed.items():
            done[key] = result
            usage = (result.prompt_tokens, result.completion_tokens)
            engine._charge(run, pending[key], usage, batch=True)
        if run.active and landed:
            engine._progress.advance(run.task_id, len(landed))

    def close(self) -> None:
        self.ledger.close()
