"""The teacher engine: all teacher traffic (concurrency, rate limits, retries, durable cache)."""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import openai
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

logger = logging.getLogger("distillery.teacher")

T = TypeVar("T")

StructuredForm = Literal["auto", "json_schema", "json_object", "text"]


class EngineSettings(BaseSettings):
    """Runtime knobs of the engine, from DISTILLERY_* variables; none of them changes results."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_")

    cache_dir: Path = Field(
        Path.home() / ".cache" / "distillery",
        description="Folder of the durable request cache (teacher-cache.sqlite).",
    )
    concurrency: int = Field(32, ge=1, description="Teacher requests in flight at once.")
    request_timeout_s: float = Field(180.0, gt=0, description="Timeout of one teacher request.")
    max_attempts: int = Field(8, ge=1, description="Tries per request on 429, 5xx and timeouts.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute cap (else learned).")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute cap (else learned).")
    progress: bool = Field(True, description="Show a progress bar on the terminal.")


class TeacherEndpoint(BaseModel):
    """Which teacher answers: part of the flow's parameters and of every cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Teacher model name, as the endpoint knows it.")
    base_url: str | None = Field(
        description="OpenAI-compatible base URL; None: OpenAI's own API (needs OPENAI_API_KEY)."
    )
    structured_output: StructuredForm = Field(
        "auto", description="How structured output is requested (see the recipe's teacher field)."
    )
    embedded: bool = Field(
        False,
        description=(
            "The embedded SmolLM2 teacher served by this process on 127.0.0.1; its port changes "
            "from run to run, so it is not part of the endpoint (nor of any cache key)."
        ),
    )

    @property
    def host(self) -> str:
        if self.embedded:
            return "embedded"
        return urlsplit(self.base_url).hostname or "" if self.base_url else "api.openai.com"

    def url(self) -> str | None:
        """The base URL to send to now (the embedded server's current address, if embedded)."""
        if self.embedded:
            from tasks.embedded import running_url

            return running_url()
        return self.base_url


class TeacherError(RuntimeError):
    """The teacher refused the work for a reason a retry cannot fix; the message names the fix."""


class TeacherUnavailable(RuntimeError):
    """A request still failed after every retry (the endpoint is down or overloaded)."""


@dataclass(frozen=True)
class ChatRequest:
    """One logical chat request; its key ignores the wire form chosen for structured output."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    temperature: float
    top_p: float
    max_tokens: int
    json_schema: dict[str, Any] | None = None
    schema_name: str = "output"

    def key(self, endpoint: TeacherEndpoint) -> str:
        payload = {
            "host": endpoint.host,
            "model": endpoint.model,
            "messages": self.messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "schema": self.json_schema,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def estimated_tokens(self) -> int:
        return sum(len(c) for _, c in self.messages) // 4 + self.max_tokens


@dataclass(frozen=True)
class ChatResult:
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    request_id: str
    refusal: str | None = None


@dataclass
class CallStats:
    """What one `complete` call cost: sent vs cached requests, retries, tokens of sent requests."""

    requests: int = 0
    cached: int = 0
    sent: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: CallStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class RequestCache:
    """Durable, content-addressed store of teacher answers; one row is committed per answer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Autocommit + WAL + synchronous=NORMAL: each insert is durable against a killed process
        # (it is in the WAL) without an fsync per answer.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, result TEXT NOT NULL, "
            "created_at REAL NOT NULL)"
        )
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, ChatResult]:
        found: dict[str, ChatResult] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, result FROM responses WHERE key IN ({marks})", chunk
                )
                for key, blob in rows:
                    found[key] = ChatResult(**json.loads(blob))
        return found

    def put(self, key: str, result: ChatResult) -> None:
        blob = json.dumps(asdict(result))
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, blob, time.time())
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """Seconds in OpenAI's reset header form ("1s", "6m0s", "250ms") or a bare number."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts) if parts else None


def retry_after(headers: Any) -> float | None:
    """The server's requested wait, from retry-after-ms or Retry-After (seconds)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    return parse_reset(headers.get("retry-after"))


class RateLimiter:
    """Paces request starts evenly under RPM and TPM budgets, configured or learned from headers."""

    # Pace a little under the advertised limit so a sliding-window server never sees a burst.
    MARGIN = 0.97

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.configured_rpm, self.configured_tpm = rpm, tpm
        self.rpm, self.tpm = rpm, tpm
        self._next_request = 0.0
        self._next_token = 0.0
        self._paused_until = 0.0

    async def wait(self, tokens: int) -> None:
        now = time.monotonic()
        start = max(now, self._next_request, self._next_token, self._paused_until)
        if self.rpm:
            self._next_request = start + 60.0 / (self.rpm * self.MARGIN)
        if self.tpm:
            self._next_token = start + tokens * 60.0 / (self.tpm * self.MARGIN)
        if start > now:
            await asyncio.sleep(start - now)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def observe(self, headers: Any) -> None:
        for kind in ("requests", "tokens"):
            limit = headers.get(f"x-ratelimit-limit-{kind}")
            if limit and limit.isdigit():
                configured = self.configured_rpm if kind == "requests" else self.configured_tpm
                value = min(int(limit), configured) if configured else int(limit)
                if kind == "requests":
                    self.rpm = value
                else:
                    self.tpm = value
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining == "0":
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.pause(reset)


class _LoopThread:
    """One asyncio loop in a daemon thread: the engine's clients live there, tasks call in."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="teacher", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def _describe_refusal(exc: openai.APIStatusError, endpoint: TeacherEndpoint) -> str:
    where = f"the teacher at {endpoint.host} (model {endpoint.model!r})"
    if exc.status_code == 401:
        # The server's own message can echo part of the key: never repeat it.
        return (
            f"{where} rejected the API key (401 Unauthorized); set OPENAI_API_KEY to a valid key "
            "for this endpoint."
        )
    if exc.status_code == 403:
        return (
            f"{where} denied access (403 Forbidden); use a key whose project may call this model, "
            "or pick another model with --teacher-model."
        )
    if exc.status_code == 404:
        return (
            f"{where} answered 404 Not Found; check --teacher-model (teacher.model in the recipe) "
            "and --teacher-base-url / OPENAI_BASE_URL (it usually ends in /v1)."
        )
    detail = str(exc.message)[:300]
    return (
        f"{where} rejected a request ({exc.status_code}: {detail}); check the recipe's teacher "
        "settings (model, max_tokens, temperature, structured_output)."
    )


def _backoff(attempt: int) -> float:
    """Exponential backoff with full jitter, capped at 30 s."""
    return random.uniform(0, min(30.0, 0.25 * 2**attempt))


@dataclass
class _Run:
    stats: CallStats = field(default_factory=CallStats)
    task_id: Any = None
    failed: bool = False


class TeacherEngine:
    """Sends chat requests to one endpoint: bounded concurrency, pacing, retries, durable cache."""

    def __init__(self, endpoint: TeacherEndpoint, settings: EngineSettings, api_key: str | None):
        self.endpoint = endpoint
        self.settings = settings
        self.cache = RequestCache(settings.cache_dir / "teacher-cache.sqlite")
        self._api_key = api_key
        self._form: StructuredForm = (
            "json_schema" if endpoint.structured_output == "auto" else endpoint.structured_output
        )
        self._limiter = RateLimiter(settings.rpm, settings.tpm)
        self._loop = _LoopThread()
        self._client: openai.AsyncOpenAI = self._loop.run(self._make_client())
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        # One progress display per engine (rich allows one live display); each call is a row.
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            # Off the terminal (CI, a worker's log) the per-call log line says the same.
            disable=not (settings.progress and console.is_terminal),
        )
        self._progress_rows = 0
        # Everything this engine did in this process: what a run really sent, whatever Prefect's
        # task cache replayed.
        self.totals = CallStats()

    def _progress_add(self, label: str, total: int, completed: int) -> Any:
        """Called on the loop thread only, so the row count needs no lock."""
        if self._progress_rows == 0:
            self._progress.start()
        self._progress_rows += 1
        return self._progress.add_task(label, total=total, completed=completed)

    def _progress_remove(self, task_id: Any) -> None:
        self._progress_rows -= 1
        if self._progress_rows == 0:
            self._progress.stop()
            for task in list(self._progress.task_ids):
                self._progress.remove_task(task)

    async def _make_client(self) -> openai.AsyncOpenAI:
        # The aiohttp transport is ~1.5x faster than the default one on 2 cores (STACK-NOTES),
        # and the engine does the retrying, so the SDK's own retries are off.
        return openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=self.endpoint.url(),
            max_retries=0,
            timeout=self.settings.request_timeout_s,
            http_client=openai.DefaultAioHttpClient(),
        )

    @property
    def structured_form(self) -> StructuredForm:
        return self._form

    def complete(
        self, requests: Sequence[ChatRequest], label: str
    ) -> tuple[list[ChatResult], CallStats]:
        """Answer every request (cache first), in order; blocks the calling thread."""
        return self._loop.run(self._complete(requests, label))

    async def _complete(
        self, requests: Sequence[ChatRequest], label: str
    ) -> tuple[list[ChatResult], CallStats]:
        started = time.monotonic()
        keys = [r.key(self.endpoint) for r in requests]
        unique: dict[str, ChatRequest] = dict(zip(keys, requests, strict=True))
        done = self.cache.get_many(list(unique))
        run = _Run()
        run.stats.requests = len(requests)
        run.stats.cached = sum(1 for k in keys if k in done)
        todo = [(k, r) for k, r in unique.items() if k not in done]
        run.task_id = self._progress_add(label, total=len(unique), completed=len(done))
        # A bounded window of tasks, not one per request: 100k prompts must not mean 100k
        # coroutines. Each task frees its place itself (asyncio.wait over the window would
        # cost O(window) per answer).
        window = asyncio.Semaphore(self.settings.concurrency * 4)
        pending: set[asyncio.Task[tuple[str, ChatResult]]] = set()
        failures: list[BaseException] = []

        def finished(task: asyncio.Task[tuple[str, ChatResult]]) -> None:
            pending.discard(task)
            window.release()
            if task.cancelled():
                return
            error = task.exception()
            if error is not None:
                failures.append(error)
                return
            key, result = task.result()
            done[key] = result

        try:
            for key, req in todo:
                await window.acquire()
                if failures:
                    break
                task = asyncio.create_task(self._fetch(key, req, run))
                pending.add(task)
                task.add_done_callback(finished)
            while pending and not failures:
                await asyncio.wait(set(pending), return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in list(pending):
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            self._progress_remove(run.task_id)
            self.totals.add(run.stats)
        if failures:
            raise failures[0]
        run.stats.seconds = time.monotonic() - started
        logger.info(
            "%s: %d requests, %d cached, %d sent, %d retried, %.1f s",
            label,
            run.stats.requests,
            run.stats.cached,
            run.stats.sent,
            run.stats.retries,
            run.stats.seconds,
        )
        return [done[k] for k in keys], run.stats

    def _wire(self, req: ChatRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": [{"role": role, "content": content} for role, content in req.messages],
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": req.max_tokens,
        }
        if req.json_schema is not None and self._form == "json_schema":
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": req.schema_name, "schema": req.json_schema, "strict": True},
            }
        elif req.json_schema is not None and self._form == "json_object":
            # llama.cpp's server takes the schema beside type json_object (it builds a grammar).
            kwargs["response_format"] = {"type": "json_object", "schema": req.json_schema}
        return kwargs

    def _learn_form(
        self, exc: openai.APIStatusError, req: ChatRequest, used: StructuredForm
    ) -> bool:
        """In auto mode, step down json_schema -> json_object -> text when the endpoint refuses."""
        if self.endpoint.structured_output != "auto" or req.json_schema is None:
            return False
        # llama-cpp-python's server (0.3.36) answers its own request-validation errors with a
        # 500 that names response_format; anything else that is a 5xx is a real server fault.
        refused = exc.status_code in (400, 422) or (
            exc.status_code == 500 and "response_format" in str(exc.message)
        )
        if not refused or used == "text":
            return False
        if self._form == used:
            self._form = "json_object" if used == "json_schema" else "text"
            logger.warning(
                "%s refused structured output as %s (%s); switching to %s",
                self.endpoint.host,
                used,
                str(exc.message)[:120],
                self._form,
            )
        return True

    async def _fetch(self, key: str, req: ChatRequest, run: _Run) -> tuple[str, ChatResult]:
        attempt = 0
        while True:
            delay: float | None = None
            error: Exception
            used = self._form
            async with self._semaphore:
                # Pace inside the slot: a request waiting for its turn must not have been
                # scheduled before the limits were learned.
                await self._limiter.wait(req.estimated_tokens())
                if run.failed:
                    raise asyncio.CancelledError  # another request hit a fatal error: send no more
                run.stats.sent += 1
                try:
                    raw = await self._client.chat.completions.with_raw_response.create(
                        **self._wire(req)
                    )
                    completion = raw.parse()
                except openai.APIStatusError as exc:
                    if self._learn_form(exc, req, used):
                        run.stats.sent -= 1
                        continue
                    status = exc.status_code
                    if status not in (408, 409, 429) and status < 500:
                        run.failed = True
                        raise TeacherError(_describe_refusal(exc, self.endpoint)) from None
                    error = exc
                    delay = retry_after(exc.response.headers)
                    if status == 429:
                        self._limiter.observe(exc.response.headers)
                        self._limiter.pause(delay if delay is not None else _backoff(attempt))
                except openai.APIConnectionError as exc:  # includes timeouts and dropped sockets
                    error = exc
                else:
                    self._limiter.observe(raw.headers)
                    result = _to_result(completion, raw.headers.get("x-request-id"))
                    self.cache.put(key, result)
                    if completion.usage is not None:
                        run.stats.prompt_tokens += completion.usage.prompt_tokens
                        run.stats.completion_tokens += completion.usage.completion_tokens
                    self._progress.advance(run.task_id)
                    return key, result
            attempt += 1
            if attempt >= self.settings.max_attempts:
                raise TeacherUnavailable(
                    f"the teacher at {self.endpoint.host} still failed after "
                    f"{self.settings.max_attempts} attempts ({type(error).__name__}: {error}); "
                    "finished answers are cached, so run the same command again once it recovers, "
                    "or raise DISTILLERY_MAX_ATTEMPTS."
                )
            run.stats.retries += 1
            await asyncio.sleep(delay if delay is not None else _backoff(attempt))

    def close(self) -> None:
        self._loop.run(self._client.close())
        self._loop.stop()
        self.cache.close()


def _to_result(completion: Any, request_id: str | None) -> ChatResult:
    choice = completion.choices[0]
    usage = completion.usage
    return ChatResult(
        content=choice.message.content or "",
        finish_reason=choice.finish_reason or "",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        model=completion.model or "",
        request_id=request_id or completion.id or "",
        refusal=choice.message.refusal,
    )


_engines: dict[TeacherEndpoint, TeacherEngine] = {}
_engines_lock = threading.Lock()


def get_engine(endpoint: TeacherEndpoint) -> TeacherEngine:
    """The process's engine for an endpoint (one client, one cache, one concurrency budget)."""
    with _engines_lock:
        engine = _engines.get(endpoint)
        if engine is None:
            settings = EngineSettings()
            if endpoint.embedded and "concurrency" not in settings.model_fields_set:
                # llama.cpp's server answers one request at a time; more in flight only queue
                # there and run into the request timeout (STACK-NOTES).
                settings = settings.model_copy(update={"concurrency": 1})
            engine = TeacherEngine(endpoint, settings, api_key=api_key_for(endpoint))
            _engines[endpoint] = engine
        return engine


def api_key_for(endpoint: TeacherEndpoint) -> str:
    """The key to send; raises TeacherError, naming the settings, when there is no teacher."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if endpoint.base_url is None and not endpoint.embedded:
        raise TeacherError(
            "no teacher endpoint: pass --teacher-base-url URL (parameter teacher_base_url), set "
            "OPENAI_BASE_URL, or set OPENAI_API_KEY to use OpenAI's API."
        )
    # Local OpenAI-compatible servers (vLLM, llama.cpp, Ollama) accept any key.
    return "no-key"


def close_engine(endpoint: TeacherEndpoint) -> None:
    """Close one endpoint's engine (the embedded teacher's, when its server stops)."""
    with _engines_lock:
        engine = _engines.pop(endpoint, None)
    if engine is not None:
        engine.close()


@atexit.register
def close_engines() -> None:
    """Close every engine's client and cache (end of a run, and at exit)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.close()
        _engines.clear()
