"""The teacher engine: all teacher traffic (concurrency, rate limits, retries, durable cache)."""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import contextvars
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx2
import openai
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distillery.tasks.cost import EMBEDDED_HOST, OPENAI_HOST, Price, format_usd, price_for

if TYPE_CHECKING:
    from distillery.tasks.batch import BatchSender

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
    adaptive_concurrency: bool = Field(
        True,
        description=(
            "Lower the requests in flight (concurrency is the ceiling) while the endpoint's "
            "latency shows it queueing, raise them again when it recovers (ConcurrencyLimit)."
        ),
    )
    request_timeout_s: float = Field(180.0, gt=0, description="Timeout of one teacher request.")
    max_attempts: int = Field(8, ge=1, description="Tries per request on 429, 5xx and timeouts.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute cap (else learned).")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute cap (else learned).")
    progress: bool = Field(True, description="Show a progress bar on the terminal.")
    max_cost_usd: float | None = Field(
        None,
        gt=0,
        description=(
            "Spending cap in USD for this process's teacher requests: nothing is sent that could "
            "pass it (CLI: --max-cost)."
        ),
    )
    drain_grace_s: float = Field(
        10.0,
        ge=0,
        description="On Ctrl-C or close: seconds to wait for answers in flight, to cache them.",
    )
    batch: bool = Field(
        False,
        description=(
            "Send uncached requests through OpenAI's Batch API (half price, answered within 24 h) "
            "instead of chat completions; a restarted run re-attaches to its batches."
        ),
    )
    batch_poll_interval_s: float = Field(
        30.0, gt=0, description="Batch mode: first wait between two looks at a batch."
    )
    batch_max_poll_interval_s: float = Field(
        300.0, gt=0, description="Batch mode: longest wait between two looks at a batch."
    )
    batch_hold_s: float | None = Field(
        None,
        ge=0,
        description=(
            "Batch mode: how long a teacher call waits for its batches; still running after "
            "that, it raises BatchesPending (the batches stay recorded) instead of polling on. "
            "None: wait until they end."
        ),
    )


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
    price: Price | None = Field(
        None,
        description=(
            "USD per 1M input and output tokens; None: OpenAI's list price on OpenAI's API, 0 "
            "for the embedded teacher, unknown elsewhere (tasks/cost.py)."
        ),
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
            return EMBEDDED_HOST
        return urlsplit(self.base_url).hostname or "" if self.base_url else OPENAI_HOST

    @property
    def identity(self) -> str:
        """Which server answers, as cache keys name it: scheme, host, port and path of the base
        URL, so that two servers on one host (two local ports, two gateway routes) serving the
        same model alias never replay each other's answers. OpenAI's own API and the embedded
        teacher (whose port changes from run to run) keep their plain names: caches made before
        the port and path were part of the key stay valid for them."""
        if self.embedded:
            return EMBEDDED_HOST
        if not self.base_url:
            return OPENAI_HOST
        url = urlsplit(self.base_url.strip())
        scheme = url.scheme.lower()
        host = (url.hostname or "").lower()
        port = url.port or {"http": 80, "https": 443}.get(scheme)
        path = url.path.rstrip("/")
        if (scheme, host, port, path) == ("https", OPENAI_HOST, 443, "/v1"):
            return OPENAI_HOST
        return f"{scheme}://{host}:{port}{path}"

    def url(self) -> str | None:
        """The base URL to send to now (the embedded server's current address, if embedded)."""
        if self.embedded:
            from distillery.tasks.embedded import running_url

            return running_url()
        return self.base_url

    def failure(self) -> str | None:
        """Why the endpoint can answer no more, when that is known: the embedded server died."""
        if self.embedded:
            from distillery.tasks.embedded import server_failure

            return server_failure()
        return None


class TeacherError(RuntimeError):
    """The teacher refused the work for a reason a retry cannot fix; the message names the fix."""


class TeacherUnavailable(RuntimeError):
    """A request still failed after every retry (the endpoint is down or overloaded)."""


class BudgetExceeded(RuntimeError):
    """The next request could pass the spending cap: nothing more was sent."""

    def __init__(self, message: str, spent_usd: float, cap_usd: float, undone: int) -> None:
        super().__init__(message)
        self.spent_usd, self.cap_usd, self.undone = spent_usd, cap_usd, undone

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles task exceptions into results; the default reduce passes only args.
        return (type(self), (str(self), self.spent_usd, self.cap_usd, self.undone))


class BatchesPending(RuntimeError):
    """Batch mode with a hold (DISTILLERY_BATCH_HOLD_S): batches were still running after it.

    Nothing is lost: the batches stay recorded in the request cache's database and the same
    call later (the same command, or a scheduled re-check run) re-attaches to them.
    `batches`: one dict per running batch (id, status, and the Batch API's request_counts:
    completed, failed, total); `waiting`: requests still without an answer; `recheck_at`: unix
    time after which another look is worth it.
    """

    def __init__(
        self, message: str, batches: list[dict[str, Any]], waiting: int, recheck_at: float
    ) -> None:
        super().__init__(message)
        self.batches, self.waiting, self.recheck_at = batches, waiting, recheck_at

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles task exceptions into results; the default reduce passes only args.
        return (type(self), (str(self), self.batches, self.waiting, self.recheck_at))

    @classmethod
    def of(
        cls, label: str, batches: list[dict[str, Any]], waiting: int, recheck_at: float
    ) -> BatchesPending:
        what = cls._describe(batches, waiting, recheck_at)
        return cls(f"{label}: {what}", batches, waiting, recheck_at)

    @classmethod
    def combine(cls, errors: Sequence[BatchesPending]) -> BatchesPending:
        """One for several calls (answer tasks side by side): their batches, the soonest look."""
        if len(errors) == 1:
            return errors[0]
        batches = list({b["id"]: b for e in errors for b in e.batches}.values())
        waiting = sum(e.waiting for e in errors)
        recheck_at = min(e.recheck_at for e in errors)
        return cls(cls._describe(batches, waiting, recheck_at), batches, waiting, recheck_at)

    @staticmethod
    def _describe(batches: list[dict[str, Any]], waiting: int, recheck_at: float) -> str:
        listed = "; ".join(
            f"{b['id']} {b['status']}, {b['completed']} of {b['total']} answered"
            + (f", {b['failed']} failed" if b["failed"] else "")
            for b in batches[:5]
        )
        more = f"; {len(batches) - 5} more" if len(batches) > 5 else ""
        when = datetime.fromtimestamp(recheck_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (
            f"{waiting} requests are waiting for {_batches(len(batches))} ({listed}{more}); they "
            f"stay recorded, and the next run of the same work re-attaches to them: look again "
            f"after {when}."
        )


def _batches(n: int) -> str:
    return f"{n} batch" if n == 1 else f"{n} batches"


class TeacherInterrupted(KeyboardInterrupt):
    """The engine was stopped (Ctrl-C or close) before every request of a call was answered.

    A KeyboardInterrupt, so that Prefect records the task as crashed instead of retrying it
    while the run is shutting down.
    """


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
            "host": endpoint.identity,
            "model": endpoint.model,
            "messages": self.messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "schema": self.json_schema,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def estimated_prompt_tokens(self) -> int:
        """About four characters a token: OpenAI's own rule for counting a request's TPM."""
        return sum(len(c) for _, c in self.messages) // 4

    def estimated_tokens(self) -> int:
        """What a TPM limit counts for this request before it is answered."""
        return self.estimated_prompt_tokens() + self.max_tokens


@dataclass(frozen=True)
class ChatResult:
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    request_id: str
    refusal: str | None = None


def _plus(a: float | None, b: float | None) -> float | None:
    """Sum of two costs; unknown (None) if either is."""
    return None if a is None or b is None else a + b


@dataclass
class CallStats:
    """What `complete` calls cost: sent vs cached requests, retries, tokens and USD of answers."""

    requests: int = 0
    cached: int = 0
    sent: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    # USD of the answers received, from their usage; None: sent to a model of unknown price.
    cost_usd: float | None = 0.0
    # USD estimated before sending the same requests (prompt chars / 4 + max_tokens): what the
    # spending cap is checked against; above cost_usd unless a prompt has many tokens per char.
    estimated_cost_usd: float | None = 0.0

    def add(self, other: CallStats) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, _plus(mine, theirs))

    def since(self, earlier: CallStats) -> CallStats:
        """What was added after `earlier` (a copy of the same running totals) was taken."""
        out = CallStats()
        for f in fields(self):
            now, then = getattr(self, f.name), getattr(earlier, f.name)
            setattr(out, f.name, None if now is None or then is None else now - then)
        return out


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
    # Requests sent before the first reply shows whether (and how) the endpoint limits: a full
    # window of `concurrency` at once would be refused by a server that enforces its per-minute
    # limit per second, as providers do.
    PROBE = 4

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.configured_rpm, self.configured_tpm = rpm, tpm
        self.rpm, self.tpm = rpm, tpm
        self._next_request = 0.0
        self._next_token = 0.0
        self._paused_until = 0.0
        self._probes = 0
        self._started = 0.0
        self._heard: asyncio.Event | None = None  # made on the loop, at first use
        self._turn: asyncio.Lock | None = None

    async def wait(self, tokens: int) -> None:
        if self._heard is None:
            self._heard, self._turn = asyncio.Event(), asyncio.Lock()
            # The budget starts now, with nothing banked.
            self._next_request = self._next_token = self._started = time.monotonic()
        assert self._turn is not None
        if not self._heard.is_set():
            if self._probes >= self.PROBE:
                await self._heard.wait()
            else:
                self._probes += 1
        if not (self.rpm or self.tpm) and self._paused_until <= time.monotonic():
            return  # no limit known: no pacing, no lock
        # One waiter at a time (FIFO), so a slot freed by a stall goes to one request, not to
        # every request that was sleeping until then.
        async with self._turn:
            while True:
                now = time.monotonic()
                start = max(self._next_request, self._next_token, self._paused_until)
                if start <= now:
                    break
                await asyncio.sleep(start - now)
            # A bucket one request deep: a request that wakes a little late (sleep overshoots on
            # a busy machine) keeps the schedule, but a longer stall banks at most one request,
            # so the requests that waited it out still go one interval apart.
            if self.rpm:
                step = 60.0 / (self.rpm * self.MARGIN)
                self._next_request = max(self._next_request, now - step) + step
            if self.tpm:
                step = tokens * 60.0 / (self.tpm * self.MARGIN)
                self._next_token = max(self._next_token, now - step) + step

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def settle(self) -> None:
        """An attempt came back (answer, error or dropped connection): stop probing."""
        if self._heard is not None:
            self._heard.set()

    def observe(self, headers: Any) -> None:
        for kind in ("requests", "tokens"):
            limit = headers.get(f"x-ratelimit-limit-{kind}")
            if limit and limit.isdigit():
                configured = self.configured_rpm if kind == "requests" else self.configured_tpm
                value = min(int(limit), configured) if configured else int(limit)
                if kind == "requests":
                    if self.rpm is None and self._heard is not None:
                        # The probes went out before the limit was known: they spent budget.
                        step = 60.0 / (value * self.MARGIN)
                        self._next_request = max(
                            self._next_request, self._started + self._probes * step
                        )
                    self.rpm = value
                else:
                    self.tpm = value
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining == "0":
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.pause(reset)


class ConcurrencyLimit:
    """How many requests may be in flight: the ceiling (`concurrency`), less while the endpoint
    queues. Additive increase, multiplicative decrease on a latency threshold, once a window.

    - Baseline b: the lowest latency seen (send to response headers, so the SDK's own CPU time
      is not in it), the endpoint's no-load latency; the rate limiter sends the first few
      requests alone, so it is seen early. In flight: requests on the wire (not those holding
      a slot while the rate limiter paces them).
    - A busy client (2 cores, the SDK's CPU at a few hundred answers a second) delays every
      answer it has not yet got round to: that is its own queue, which fewer requests in
      flight would only starve. Each latency counts less the loop's current lag (how late a
      timer fires on the engine's loop, peak-held), so only the endpoint's queue is acted on.
    - Window: `max(8, limit)` outcomes (answers, and 503/529 overload answers) of requests sent
      under the current limit; those sent before a change still carry the old queue and only
      feed the baseline. m: the window's median latency. The first window decides nothing:
      it is the start (the rate limiter's probes, then a burst), before the lag is known.
    - Decrease when m > TOLERANCE x b and m - b > MIN_EXCESS_S: to the requests that were in
      flight (at most the limit) times b / m, the gradient of Netflix's concurrency-limits; but
      to no less than MAX_CUT of them in one window, so one noisy window cannot empty the pipe.
      A server with S slots answers N > S requests in flight in about N / S service times, so
      N * b / m is about S. Only twice the baseline (and MIN_EXCESS_S) counts: on a loaded
      client its own CPU inflates measured latency by tens of percent, and a flat-latency
      endpoint must keep the full ceiling.
    - Still m > TOLERANCE x b with 1 in flight: the latency is the work's (longer answers,
      other clients' load), not a queue of ours. The baseline moves up to m, for good (a
      shorter answer later does not lower it again), and the limit goes back to what it was
      before the cuts. Answers of very different lengths (an LLM's latency grows with its
      output) can thus cost one descent per engine before the baseline fits the work.
    - Halve the requests in flight when at least OVERLOAD_SHARE of the window were overload
      answers (503, 529); scattered faults do not count. 429s are left to the RateLimiter: a
      rate budget is paced (and Retry-After honoured); fewer requests in flight do not fix it.
    - Increase by sqrt(limit) (at least 1; concurrency-limits' queue allowance), up to the
      ceiling, when m <= RECOVERED x b (or m - b <= MIN_EXCESS_S). In between: hold. Against a
      server with S slots the limit thus settles between about S and 2S.
    """

    TOLERANCE = 2.0
    RECOVERED = 1.5
    MIN_EXCESS_S = 0.05
    OVERLOAD_SHARE = 0.1
    MAX_CUT = 0.25
    MIN_WINDOW = 8

    def __init__(self, ceiling: int, adaptive: bool = True) -> None:
        self.ceiling, self.adaptive = ceiling, adaptive
        self.value = float(ceiling)
        self.epoch = 0  # bumped on every change: which limit a request was sent under
        self.baseline: float | None = None
        self._latencies: list[float] = []
        self._overloads = 0
        self._peak = 0  # most requests in flight during the window
        self._descent: float | None = None  # the limit before a run of latency cuts
        self._started = False  # the first window has passed
        self._floor = 0.0  # the baseline never goes below the latency of the work at 1 in flight

    @property
    def limit(self) -> int:
        return max(1, int(self.value))

    def answered(self, epoch: int, latency: float, in_flight: int, lag: float = 0.0) -> bool:
        """An answer's latency (seconds), and how late the client's own loop runs now (`lag`:
        part of the latency, but no queue of the endpoint's); True when the limit changed."""
        if not self.adaptive:
            return False
        if self.baseline is None or latency < self.baseline:
            self.baseline = max(latency, self._floor)
        if epoch != self.epoch:
            return False
        self._latencies.append(max(0.0, latency - lag))
        return self._decide(in_flight)

    def overloaded(self, epoch: int, in_flight: int) -> bool:
        """A 503/529 answer (the server is overloaded); True when the limit changed."""
        if not self.adaptive or epoch != self.epoch:
            return False
        self._overloads += 1
        return self._decide(in_flight)

    def _decide(self, in_flight: int) -> bool:
        self._peak = max(self._peak, in_flight)
        seen = len(self._latencies) + self._overloads
        if seen < max(self.MIN_WINDOW, self.limit):
            return False
        latencies, overloads, peak = sorted(self._latencies), self._overloads, self._peak
        self._latencies, self._overloads, self._peak = [], 0, 0
        if not self._started:
            self._started = True
            return False
        before = self.value
        if overloads >= self.OVERLOAD_SHARE * seen:
            self.value = max(1.0, min(self.value, peak) / 2)
            return self._changed(before, f"{overloads} of {seen} answers were 503/529")
        if not latencies or self.baseline is None:
            return False
        median, base = latencies[len(latencies) // 2], self.baseline
        if median > self.TOLERANCE * base and median - base > self.MIN_EXCESS_S:
            why = f"median latency {median:.3f} s, baseline {base:.3f} s"
            if self.limit == 1:
                # Still slow with one request in flight: the work got slower (longer answers,
                # other clients), it is no queue of ours. New baseline, back to before the cuts.
                self.baseline = self._floor = median
                self.value, self._descent = self._descent or float(self.ceiling), None
                return self._changed(before, f"{why} with 1 in flight: new baseline")
            if self._descent is None:
                self._descent = self.value
            # The gradient: N in flight at m = N / S service times each is S, plus a little.
            gradient = max(self.MAX_CUT, base / median)
            self.value = max(1.0, min(self.value, peak) * gradient)
            return self._changed(before, why)
        if median <= self.RECOVERED * base or median - base <= self.MIN_EXCESS_S:
            self._descent = None
            self.value = min(float(self.ceiling), self.value + max(1.0, math.sqrt(self.value)))
            return self._changed(before, f"median latency {median:.3f} s, baseline {base:.3f} s")
        return False

    def _changed(self, before: float, why: str) -> bool:
        if max(1, int(before)) == self.limit:
            return False
        self.epoch += 1
        logger.debug("concurrency limit %d -> %d (%s)", max(1, int(before)), self.limit, why)
        return True


class _Slots:
    """A semaphore whose size can change (requests in flight under ConcurrencyLimit), granted by
    priority, then first come first served.

    Lower priority values go first: expansion requests, whose replies make more work, pass the
    answers queued before them, so the answers only fill the slots expansion leaves free.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def resize(self, size: int) -> None:
        self.size = size
        self._wake()

    @contextlib.asynccontextmanager
    async def take(self, priority: int = 0) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self.release()

    async def _acquire(self, priority: int) -> None:
        if self.in_use < self.size and not self._waiters:
            self.in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), waiter))
        self._wake()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, then cancelled before it could run: pass it on
            # else: still queued; _wake skips a cancelled waiter
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.size:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)


# When the request being sent by the current task went out and its response headers came in
# (monotonic), set by the HTTP client's event hooks: latency without the SDK's own CPU time.
_TIMING: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "distillery_timing", default=None
)


async def _on_request(request: Any) -> None:
    if (box := _TIMING.get()) is not None:
        box[0] = time.monotonic()


async def _on_response(response: Any) -> None:
    if (box := _TIMING.get()) is not None:
        box[1] = time.monotonic()


class _LoopThread:
    """One asyncio loop in a daemon thread: the engine's clients live there, tasks call in."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="teacher", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, callback: Any) -> None:
        """Run `callback` on the loop; safe from any thread and from a signal handler."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing to do
            self.loop.call_soon_threadsafe(callback)

    def stop(self) -> None:
        self.call_soon(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
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


class _Stopped(Exception):
    """Raised on the loop when the engine stops; `complete` turns it into TeacherInterrupted."""


class _MalformedReply(Exception):
    """A 2xx answer whose body is not a chat completion."""


class _OverBudget(Exception):
    """A request that could pass the spending cap was not sent."""


@dataclass(eq=False)
class _Run:
    """One `complete` call on the loop: its fetch tasks and how it ends."""

    label: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stats: CallStats = field(default_factory=CallStats)
    tasks: set[asyncio.Task[tuple[str, ChatResult]]] = field(default_factory=set)
    task_id: Any = None
    error: BaseException | None = None
    failed: bool = False  # send nothing more for this call
    active: bool = True  # its progress row still exists
    priority: int = 0  # of its requests for a slot: lower goes first
    # Called on the loop with each answer as it is known (cached ones first): ReplyStream.
    on_result: Callable[[str, ChatResult], None] | None = None
    halted: bool = False  # its caller needs no more answers: send nothing more, no error


def check_settings(endpoint: TeacherEndpoint, settings: EngineSettings) -> Price | None:
    """The endpoint's price, once the settings are known to work with it (else TeacherError).

    The CLI calls it before a run starts, the engine when it is made.
    """
    price = price_for(endpoint.model, endpoint.host, endpoint.price)
    if settings.max_cost_usd is not None and price is None:
        raise TeacherError(
            f"a spending cap is set (--max-cost / DISTILLERY_MAX_COST_USD) but the price of "
            f"model {endpoint.model!r} at {endpoint.host} is unknown; set teacher.price in the "
            "recipe (input_usd_per_1m, output_usd_per_1m; both 0 for a server nobody bills for)."
        )
    if settings.batch and endpoint.embedded:
        raise TeacherError(
            "--batch (DISTILLERY_BATCH) needs an endpoint with OpenAI's Batch API; the embedded "
            "teacher has none: pass --teacher-base-url, or set OPENAI_API_KEY."
        )
    return price


class TeacherEngine:
    """Sends chat requests to one endpoint: bounded concurrency, pacing, retries, durable cache."""

    def __init__(self, endpoint: TeacherEndpoint, settings: EngineSettings, api_key: str | None):
        self.endpoint = endpoint
        self.settings = settings
        self.price = check_settings(endpoint, settings)
        self.cache = RequestCache(settings.cache_dir / "teacher-cache.sqlite")
        self._api_key = api_key
        self._form: StructuredForm = (
            "json_schema" if endpoint.structured_output == "auto" else endpoint.structured_output
        )
        self._limiter = RateLimiter(settings.rpm, settings.tpm)
        self._loop = _LoopThread()
        # Made on the loop while the caller goes on (about 0.1 s: the CA bundle is loaded even
        # for http://); the first request waits for it (_client_now).
        self._client_made = self._loop.submit(self._make_client())
        self._client: openai.AsyncOpenAI | None = None
        self._concurrency = ConcurrencyLimit(settings.concurrency, settings.adaptive_concurrency)
        self._slots = _Slots(settings.concurrency)
        self._lag = 0.0  # how late the loop runs a timer (peak-held): the client's own delay
        self._lag_watch: asyncio.Task[None] | None = None
        # State below is touched on the loop thread only (stop() hops onto it).
        self._runs: set[_Run] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  # fetches, and batches being waited for
        self._sending: set[asyncio.Task[Any]] = set()  # requests on the wire right now
        self._in_flight_usd = 0.0  # estimates of the requests on the wire
        self._over_budget = False
        self._stopping = False
        self._drained = 0  # answers that landed after the stop
        self._closed = False
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
        # task cache replayed. Updated as answers land, so it also counts a call that was stopped.
        self.totals = CallStats()
        self.planned = 0  # unique requests of every call so far (progress)
        self.finished = 0  # of which answered, from the cache or the teacher
        self._batches: BatchSender | None = None
        if settings.batch:
            from distillery.tasks.batch import BatchSender

            self._batches = BatchSender(self)

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

    def sdk_client(self) -> openai.AsyncOpenAI:
        """The SDK client, once made (waits for it; never call it on the engine's loop)."""
        return self._client_made.result()

    async def _client_now(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = await asyncio.wrap_future(self._client_made)
        return self._client

    async def _make_client(self) -> openai.AsyncOpenAI:
        # The aiohttp transport is ~1.5x faster than the default one on 2 cores (measured against
        # a loopback server: ~92 req/s with the default transport, 139-159 with aiohttp),
        # and the engine does the retrying, so the SDK's own retries are off.
        return openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=self.endpoint.url(),
            max_retries=0,
            timeout=self.settings.request_timeout_s,
            http_client=openai.DefaultAioHttpClient(
                event_hooks={"request": [_on_request], "response": [_on_response]}
            ),
        )

    @property
    def structured_form(self) -> StructuredForm:
        return self._form

    @property
    def concurrency_limit(self) -> int:
        """Requests allowed in flight now (DISTILLERY_CONCURRENCY, or less: ConcurrencyLimit)."""
        return self._slots.size

    def _adapt(self, changed: bool) -> None:
        if changed:
            self._slots.resize(self._concurrency.limit)

    async def _watch_lag(self) -> None:
        """Keep `_lag`: how late a 20 ms timer fires on this loop, the peak decaying by a tenth a
        tick; an answer that came in waits about that long before its latency is taken."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.02
            await asyncio.sleep(0.02)
            self._lag = max(loop.time() - due, self._lag * 0.9)

    def batch_counts(self) -> tuple[int, int, int] | None:
        """Batch mode: (batches, requests answered, requests) of the batches being waited for,
        as the Batch API counted them at the last look; None when none is."""
        return self._batches.counts() if self._batches is not None else None

    def complete(
        self, requests: Sequence[ChatRequest], label: str, priority: int = 0
    ) -> tuple[list[ChatResult], CallStats]:
        """Answer every request (cache first), in order; blocks the calling thread.

        `priority`: of these requests for a slot against other calls' (lower goes first).
        """
        future = self._submit(requests, _Run(label=label, priority=priority))
        return self._wait(future)

    def stream(self, requests: Sequence[ChatRequest], label: str, priority: int = 0) -> ReplyStream:
        """The answers to `requests` in order, each as soon as it and those before it are in;
        `close()` the stream to send nothing more (the requests on the wire still land)."""
        return ReplyStream(self, requests, label, priority)

    def _submit(
        self, requests: Sequence[ChatRequest], run: _Run
    ) -> concurrent.futures.Future[tuple[list[ChatResult], CallStats]]:
        if self._closed:
            raise TeacherInterrupted(
                f"{run.label}: the teacher engine is closed; nothing was sent."
            )
        return self._loop.submit(self._complete(requests, run))

    def _wait(self, future: concurrent.futures.Future[T]) -> T:
        try:
            return future.result()
        except KeyboardInterrupt:
            # Ctrl-C in the thread waiting here: stop sending; what is in flight still lands.
            self.stop()
            raise
        except _Stopped as exc:
            raise TeacherInterrupted(str(exc)) from None

    def _halt(self, run: _Run) -> None:
        """On the loop: the call's caller needs no more answers (ReplyStream.close)."""
        run.halted = True
        run.failed = True  # _may_send refuses the rest
        for task in run.tasks - self._sending:
            task.cancel()  # waiting for a slot: never sent
        run.wake.set()

    async def _complete(
        self, requests: Sequence[ChatRequest], run: _Run
    ) -> tuple[list[ChatResult], CallStats]:
        started = time.monotonic()
        label = run.label
        keys = [r.key(self.endpoint) for r in requests]
        unique: dict[str, ChatRequest] = dict(zip(keys, requests, strict=True))
        done = self.cache.get_many(list(unique))
        if run.on_result is not None:
            for key, result in done.items():
                run.on_result(key, result)
        run.stats.requests = len(requests)
        run.stats.cached = sum(1 for k in keys if k in done)
        self.totals.requests += run.stats.requests
        self.totals.cached += run.stats.cached
        todo = [(k, r) for k, r in unique.items() if k not in done]
        if todo and self._stopping:
            raise _Stopped(self._stopped_message(label, len(done), len(unique), 0))
        run.task_id = self._progress_add(label, total=len(unique), completed=len(done))
        if self.settings.adaptive_concurrency and self._lag_watch is None:
            self._lag_watch = asyncio.create_task(self._watch_lag())
        self.planned += len(unique)
        self.finished += len(done)
        self._runs.add(run)
        # A bounded window of tasks, not one per request: 100k prompts must not mean 100k
        # coroutines. Each task frees its place itself (asyncio.wait over the window would
        # cost O(window) per answer).
        window = asyncio.Semaphore(self.settings.concurrency * 4)

        def finished(task: asyncio.Task[tuple[str, ChatResult]]) -> None:
            run.tasks.discard(task)
            self._tasks.discard(task)
            window.release()
            if task.cancelled():
                pass
            elif (error := task.exception()) is not None:
                if run.error is None:
                    run.error = error
                run.wake.set()
            else:
                key, result = task.result()
                done[key] = result
                if run.on_result is not None:
                    run.on_result(key, result)
            if not run.tasks:
                run.wake.set()

        try:
            if self._batches is not None:
                known = set(done)
                try:
                    await self._batches.complete(dict(todo), run, done)
                except _Stopped:
                    pass  # raised below, saying what was answered
                except _OverBudget as exc:
                    run.error = exc
                if run.on_result is not None:
                    for key in done.keys() - known:
                        run.on_result(key, done[key])
                todo = []
            for key, req in todo:
                await window.acquire()
                if run.error is not None or self._stopping or run.halted:
                    break
                task = asyncio.create_task(self._fetch(key, req, run))
                run.tasks.add(task)
                self._tasks.add(task)
                task.add_done_callback(finished)
            while run.tasks and run.error is None and not self._stopping and not run.halted:
                run.wake.clear()
                await run.wake.wait()
            if (run.error is not None or run.halted) and not self._stopping:
                # Send nothing more for this call, but let the requests on the wire finish into
                # the cache: they are paid for, and a retry of this call must not send them again.
                run.failed = True
                for task in run.tasks - self._sending:
                    task.cancel()
                while run.tasks and not self._stopping:
                    run.wake.clear()
                    await run.wake.wait()
        finally:
            self._runs.discard(run)
            run.active = False
            self._progress_remove(run.task_id)
        if self._stopping:
            # What is still on the wire keeps running: close() waits for it and caches it.
            in_flight = len(run.tasks & self._sending)
            message = self._stopped_message(label, len(done), len(unique), in_flight)
            if self._batches is not None:
                message += " Submitted batches run on: the same command re-attaches to them."
            raise _Stopped(message)
        if isinstance(run.error, _OverBudget):
            raise self._budget_error(label, len(unique) - len(done)) from None
        if run.error is not None:
            raise run.error
        unsent = ""
        if run.halted:
            # Only what was answered counts as this call's requests; the rest was never sent.
            answered = sum(1 for k in keys if k in done)
            self.totals.requests -= run.stats.requests - answered
            self.planned -= len(unique) - sum(1 for k in unique if k in done)
            unsent = f", {run.stats.requests - answered} not sent (enough answers)"
            run.stats.requests = answered
        run.stats.seconds = time.monotonic() - started
        self.totals.seconds += run.stats.seconds
        logger.info(
            "%s: %d requests, %d cached, %d sent, %d retried, %.1f s%s%s",
            label,
            run.stats.requests,
            run.stats.cached,
            run.stats.sent,
            run.stats.retries,
            run.stats.seconds,
            "" if run.stats.cost_usd is None else f", {format_usd(run.stats.cost_usd)}",
            unsent,
        )
        return [done[k] for k in keys if k in done], run.stats

    def _stopped_message(self, label: str, answered: int, total: int, in_flight: int) -> str:
        return (
            f"{label}: the teacher engine was stopped (Ctrl-C or shutdown): {answered} of {total} "
            f"requests answered, {in_flight} in flight (cached as they land), "
            f"{total - answered - in_flight} not sent; answers are cached, so the same command "
            "resumes where this one stopped."
        )

    def _budget_error(self, label: str, undone: int) -> BudgetExceeded:
        cap = self.settings.max_cost_usd or 0.0
        spent = self.totals.cost_usd or 0.0
        return BudgetExceeded(
            f"{label}: stopped at the spending cap of {format_usd(cap)} (DISTILLERY_MAX_COST_USD / "
            f"--max-cost): {format_usd(spent)} spent, and the next request could pass the cap; "
            f"{undone} requests left unsent. Every answer received is cached: raise the cap and "
            "run the same command again to continue.",
            spent_usd=spent,
            cap_usd=cap,
            undone=undone,
        )

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

    def _may_send(self, run: _Run, estimate: float) -> None:
        """Raise unless this request may go out now (stop, a failed call, the spending cap)."""
        if self._stopping:
            raise _Stopped
        if run.failed:
            raise asyncio.CancelledError  # another request of this call failed: send no more
        cap = self.settings.max_cost_usd
        if cap is not None:
            spent = self.totals.cost_usd or 0.0
            # Spent + what is on the wire + this request, all at their upper bounds: once that
            # could pass the cap, nothing more is sent (a smaller request later would only
            # trickle on to the cap).
            if self._over_budget or spent + self._in_flight_usd + estimate > cap:
                self._over_budget = True
                raise _OverBudget

    def _estimate(self, req: ChatRequest, batch: bool = False) -> float:
        """The request's worst case in USD (prompt chars / 4 + max_tokens); 0 if unpriced."""
        price = self.price
        return price.cost(req.estimated_prompt_tokens(), req.max_tokens, batch) if price else 0.0

    def _charge(
        self, run: _Run, req: ChatRequest, usage: tuple[int, int] | None, batch: bool = False
    ) -> None:
        """Count an answer's tokens (prompt, completion) and USD into the call and the totals.

        An answer without usage counts at its worst case; an unpriced model, as unknown (None).
        """
        price = self.price
        estimate = self._estimate(req, batch) if price else None
        cost = estimate if price is None or usage is None else price.cost(*usage, batch)
        prompt, completion = usage or (0, 0)
        self._count(
            run,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
            estimated_cost_usd=estimate,
        )

    def _count(self, run: _Run, **deltas: float | None) -> None:
        for name, value in deltas.items():
            for stats in (run.stats, self.totals):
                setattr(stats, name, _plus(getattr(stats, name), value))

    async def _fetch(self, key: str, req: ChatRequest, run: _Run) -> tuple[str, ChatResult]:
        me = asyncio.current_task()
        assert me is not None
        estimate = self._estimate(req)
        attempt = 0
        while True:
            delay: float | None = None
            error: Exception
            used = self._form
            async with self._slots.take(run.priority):
                # Pace inside the slot: a request waiting for its turn must not have been
                # scheduled before the limits were learned.
                await self._limiter.wait(req.estimated_tokens())
                self._may_send(run, estimate)
                self._count(run, sent=1)
                self._sending.add(me)
                self._in_flight_usd += estimate
                epoch, timing = self._concurrency.epoch, [0.0, 0.0]
                _TIMING.set(timing)  # this task's context: the client's hooks fill it in
                try:
                    # The SDK's post() with the body as plain JSON and the response as it came
                    # (its documented form for raw requests): chat.completions.create would walk
                    # the TypedDict annotations of every message (~0.9 ms a request) and build a
                    # typed ChatCompletion (~0.4 ms), on the engine's one thread (py-spy, 1b).
                    client = self._client or await self._client_now()
                    raw = await client.post(
                        "/chat/completions", cast_to=httpx2.Response, body=self._wire(req)
                    )
                    if timing[0] and timing[1]:
                        latency, in_flight = timing[1] - timing[0], len(self._sending)
                        changed = self._concurrency.answered(epoch, latency, in_flight, self._lag)
                        self._adapt(changed)
                    body = _json_body(raw.content)
                except openai.APIStatusError as exc:
                    if self._learn_form(exc, req, used):
                        self._count(run, sent=-1)
                        continue
                    status = exc.status_code
                    if status not in (408, 409, 429) and status < 500:
                        run.failed = True
                        raise TeacherError(_describe_refusal(exc, self.endpoint)) from None
                    error = exc
                    delay = retry_after(exc.response.headers)
                    if status in (503, 529):  # overloaded (529: Anthropic's form)
                        in_flight = len(self._sending)
                        self._adapt(self._concurrency.overloaded(epoch, in_flight))
                    if status == 429:
                        self._limiter.observe(exc.response.headers)
                        self._limiter.pause(delay if delay is not None else _backoff(attempt))
                except openai.APIConnectionError as exc:  # includes timeouts and dropped sockets
                    error = exc
                    if (why := self.endpoint.failure()) is not None:
                        raise TeacherUnavailable(why) from exc  # retrying cannot help
                except _MalformedReply as exc:  # a proxy's error page, a cut-off body
                    error = exc
                else:
                    self._limiter.observe(raw.headers)
                    result = _result_from_body(body, raw.headers.get("x-request-id"))
                    self.cache.put(key, result)
                    self._charge(
                        run,
                        req,
                        (result.prompt_tokens, result.completion_tokens)
                        if body.get("usage")
                        else None,
                    )
                    if self._stopping:
                        self._drained += 1
                    self.finished += 1
                    if run.active:
                        self._progress.advance(run.task_id)
                    return key, result
                finally:
                    self._sending.discard(me)
                    self._in_flight_usd -= estimate
                    self._limiter.settle()
            attempt += 1
            if attempt >= self.settings.max_attempts:
                raise TeacherUnavailable(
                    f"the teacher at {self.endpoint.host} still failed after "
                    f"{self.settings.max_attempts} attempts ({type(error).__name__}: {error}); "
                    "finished answers are cached, so run the same command again once it recovers, "
                    "or raise DISTILLERY_MAX_ATTEMPTS."
                )
            self._count(run, retries=1)
            await asyncio.sleep(delay if delay is not None else _backoff(attempt))

    def stop(self) -> None:
        """Send nothing more: calls in progress raise TeacherInterrupted, answers in flight land.

        Safe from any thread and from a signal handler (it only schedules work on the loop).
        """
        self._loop.call_soon(self._stop_now)

    def _stop_now(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for run in self._runs:
            run.wake.set()
        for task in self._tasks - self._sending:
            task.cancel()  # waiting for a slot, the rate limiter or a backoff: never sent

    def close(self, deadline: float | None = None) -> None:
        """Stop sending, wait until `deadline` (monotonic; default: drain_grace_s from now) for
        the answers in flight to land in the cache, then close. Ctrl-C while waiting forces."""
        if self._closed:
            return
        self._closed = True
        if deadline is None:
            deadline = time.monotonic() + self.settings.drain_grace_s
        limit = [deadline]  # a box, so a forced close can move the deadline of the running drain
        future = self._loop.submit(self._shutdown(limit))
        try:
            future.result()
        except KeyboardInterrupt:
            # A second Ctrl-C: give up on what is still in flight (it was never answered, so a
            # re-run sends it again), close what can be closed in a moment, and go.
            self._loop.call_soon(lambda: limit.__setitem__(0, 0.0))
            with contextlib.suppress(concurrent.futures.TimeoutError, KeyboardInterrupt):
                future.result(timeout=2)
            raise
        finally:
            self._loop.stop()
            self.cache.close()
            if self._batches is not None:
                self._batches.close()

    async def _shutdown(self, deadline: list[float]) -> None:
        self._stop_now()
        in_flight = len(self._sending)
        while self._sending and time.monotonic() < deadline[0]:
            await asyncio.sleep(0.02)
        abandoned = len(self._sending)
        tasks = list(self._tasks)
        if self._lag_watch is not None:
            tasks.append(self._lag_watch)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._runs:  # calls in progress raise as soon as they wake: let them, then close
            await asyncio.sleep(0.01)
        await (await self._client_now()).close()
        if in_flight:
            logger.warning(
                "teacher at %s stopped: %d answers in flight were cached, %d abandoned after the "
                "%.0f s grace period (they will be sent again by the next run)",
                self.endpoint.host,
                self._drained,
                abandoned,
                self.settings.drain_grace_s,
            )


class ReplyStream:
    """One engine call's answers in request order, each as soon as it and those before it are
    in (TeacherEngine.stream): a caller can work on the first replies while the rest are on the
    wire, and stop the call once it has enough."""

    _END = None  # queued when the call is over

    def __init__(
        self, engine: TeacherEngine, requests: Sequence[ChatRequest], label: str, priority: int
    ) -> None:
        self._engine = engine
        self._keys = [r.key(engine.endpoint) for r in requests]
        self._ready: dict[str, ChatResult] = {}  # answers in, dropped once yielded for good
        self._uses = collections.Counter(self._keys)  # identical requests share one answer
        # Filled on the loop thread, read by the caller's.
        self._queue: queue.SimpleQueue[tuple[str, ChatResult] | None] = queue.SimpleQueue()
        self._run = _Run(label=label, priority=priority, on_result=self._arrived)
        self._future = engine._submit(requests, self._run)
        self._future.add_done_callback(lambda _: self._queue.put(self._END))
        self._stats: CallStats | None = None

    def _arrived(self, key: str, result: ChatResult) -> None:
        self._queue.put((key, result))

    def __iter__(self) -> Iterator[ChatResult]:
        for key in self._keys:
            while key not in self._ready:
                item = self._queue.get()
                if item is self._END:
                    self.stats  # noqa: B018  (raises the call's error, if it failed)
                    if key not in self._ready:
                        return  # closed before this answer came
                    break
                self._ready[item[0]] = item[1]
            self._uses[key] -= 1
            yield self._ready[key] if self._uses[key] else self._ready.pop(key)

    def close(self) -> None:
        """Send nothing more for this call; what is on the wire lands in the cache."""
        if not self._future.done():
            self._engine._loop.call_soon(lambda: self._engine._halt(self._run))

    @property
    def stats(self) -> CallStats:
        """The call's stats, once it is over (waits for it; raises its error)."""
        if self._stats is None:
            _, self._stats = self._engine._wait(self._future)
        return self._stats


def _json_body(content: bytes) -> dict[str, Any]:
    """A chat completion's JSON body; a body that is not one is the endpoint's fault (retried)."""
    try:
        return _completion(json.loads(content))
    except ValueError:
        raise _MalformedReply(f"not a chat completion: {content[:120]!r}") from None


def _completion(body: Any) -> dict[str, Any]:
    """`body` if it has the shape of a chat completion (what _result_from_body reads)."""
    try:
        if isinstance(body, dict) and isinstance(body["choices"][0]["message"], dict):
            return body
    except (KeyError, IndexError, TypeError):
        pass
    raise _MalformedReply(f"not a chat completion: {str(body)[:120]!r}")


def _result_from_body(body: dict[str, Any], request_id: str | None) -> ChatResult:
    """The cached form of a chat completion's JSON body (online, or a batch output row's)."""
    choice = body["choices"][0]
    message = choice["message"]
    usage = body.get("usage") or {}
    return ChatResult(
        content=message.get("content") or "",
        finish_reason=choice.get("finish_reason") or "",
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        model=body.get("model") or "",
        request_id=request_id or body.get("id") or "",
        refusal=message.get("refusal"),
    )


_engines: dict[TeacherEndpoint, TeacherEngine] = {}
_engines_lock = threading.Lock()
# Set by the first Ctrl-C until close_engines(): no engine may start sending again meanwhile
# (a Prefect worker thread could otherwise ask for a fresh one while the run shuts down).
_interrupted = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C: every engine stops sending at once, then the usual KeyboardInterrupt.

    Without this, the flow's thread pool would wait for its running tasks, which would go on
    sending their whole batch, before the CLI's `finally` could close the engines.
    """
    global _interrupted
    _interrupted = True
    for engine in list(_engines.values()):  # no lock: the interrupted thread may hold it
        engine.stop()
    raise KeyboardInterrupt


def get_engine(endpoint: TeacherEndpoint) -> TeacherEngine:
    """The process's engine for an endpoint (one client, one cache, one concurrency budget)."""
    with _engines_lock:
        if _interrupted:
            raise TeacherInterrupted(
                "the run was interrupted (Ctrl-C); no teacher request is sent until it has closed."
            )
        engine = _engines.get(endpoint)
        if engine is None:
            settings = EngineSettings()
            if endpoint.embedded and "concurrency" not in settings.model_fields_set:
                # llama.cpp's server answers one request at a time; more in flight only queue
                # there and run into the request timeout (README, "The embedded teacher").
                settings = settings.model_copy(update={"concurrency": 1})
            engine = TeacherEngine(endpoint, settings, api_key=api_key_for(endpoint))
            _engines[endpoint] = engine
    # Only over Python's own handler, and only where signals can be handled (the main thread).
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, _on_sigint)
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
    """Stop every engine, wait up to drain_grace_s for answers in flight (cached), close them.

    Called at the end of a run, after Ctrl-C, and at exit; a second Ctrl-C while it waits
    raises KeyboardInterrupt at once.
    """
    global _interrupted
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:  # all stop sending at once; then one shared grace period
        engine.stop()
    deadline = time.monotonic() + max((e.settings.drain_grace_s for e in engines), default=0.0)
    try:
        for engine in engines:
            engine.close(deadline)
    finally:
        _interrupted = False
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is _on_sigint
        ):
            signal.signal(signal.SIGINT, signal.default_int_handler)


def retry_worthwhile(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a teacher task unless a retry cannot help."""
    # BatchesPending: a retry would only hold the worker longer; the flow schedules a re-check.
    return not isinstance(state.data, (TeacherError, BudgetExceeded, BatchesPending))
