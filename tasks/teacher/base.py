"""The teacher engine's leaf: its settings, endpoint, requests, results, stats and errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from distillery.tasks.cost import EMBEDDED_HOST, OPENAI_HOST, Price

StructuredForm = Literal["auto", "json_schema", "json_object", "text"]


class EngineSettings(BaseSettings):
    """Runtime knobs of the engine, from DISTILLERY_* variables; none of them changes results."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_")

    cache_dir: Path = Field(
        Path.home() / ".cache" / "distillery",
        description="Folder of the durable request cache (teacher-cache.sqlite).",
    )
    cache: str | None = Field(
        None,
        description=(
            "Where teacher answers are cached: a local folder (instead of cache_dir) or an "
            "fsspec URI such as s3://bucket/prefix that workers on many machines share (one "
            "create-only object per request; the sqlite file in cache_dir stays as a local "
            "first level). CLI: --cache."
        ),
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
    rate_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "Share of the endpoint's RPM and TPM (set or learned) this process paces to: a shard "
            "of a sharded run gets 1 / (shards running at once) (flows/shard.py)."
        ),
    )
    progress: bool = Field(True, description="Show a progress bar on the terminal.")
    max_cost_usd: float | None = Field(
        None,
        gt=0,
        description=(
            "Spending cap in USD for this process's teacher requests: nothing is sent that could "
            "pass it (CLI: --max-cost)."
        ),
    )
    budget_id: str | None = Field(
        None,
        description=(
            "Workers with the same budget id share one spend total (a ledger beside the request "
            "cache) and so one max_cost_usd cap; a sharded run sets it to its run id. None: "
            "this process's spend only."
        ),
    )
    spend_sync_s: float = Field(
        5.0,
        gt=0,
        description="With a budget id: seconds between two syncs of the shared spend total.",
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
            "The embedded teacher (a GGUF file on llama.cpp) served by this process on "
            "127.0.0.1; its port changes from run to run, so it is not part of the endpoint "
            "(nor of any cache key)."
        ),
    )
    gguf_sha256: str | None = Field(
        None,
        description=(
            "The embedded teacher's GGUF file, by content (SHA-256), when it is not the shipped "
            "SmolLM2: part of the cache identity, so that two files never replay each other's "
            "answers. None: the shipped file (or another teacher)."
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
        the port and path were part of the key stay valid for them. The embedded teacher on any
        GGUF file but the shipped one adds the file's content hash (not its path: a copy of a
        file is the same teacher)."""
        if self.embedded:
            if self.gguf_sha256 is None:
                return EMBEDDED_HOST
            return f"{EMBEDDED_HOST}:{self.gguf_sha256[:16]}"
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
            if _embedded is None:
                raise TeacherError(
                    "the embedded teacher is not running in this process: start it with "
                    "`with embedded_teacher():` (tasks/embedded.py; the distill flow does), or "
                    "pass a teacher endpoint."
                )
            return _embedded[0]
        return self.base_url

    def failure(self) -> str | None:
        """Why the endpoint can answer no more, when that is known: the embedded server died."""
        if self.embedded and _embedded is not None:
            return _embedded[1]()
        return None


# The embedded teacher's server while it runs: its base URL, and why it died (None while it
# runs). tasks/embedded.py registers it, so that the engine never imports the server's module.
_embedded: tuple[str, Callable[[], str | None]] | None = None


def register_embedded(url: str, failure: Callable[[], str | None]) -> None:
    """The embedded teacher's server answers at `url` now; `failure()` says why it died."""
    global _embedded
    _embedded = (url, failure)


def unregister_embedded() -> None:
    """The embedded teacher's server has stopped: an embedded endpoint has no URL any more."""
    global _embedded
    _embedded = None


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


def plus(a: float | None, b: float | None) -> float | None:
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
            setattr(self, f.name, plus(mine, theirs))

    def since(self, earlier: CallStats) -> CallStats:
        """What was added after `earlier` (a copy of the same running totals) was taken."""
        out = CallStats()
        for f in fields(self):
            now, then = getattr(self, f.name), getattr(earlier, f.name)
            setattr(out, f.name, None if now is None or then is None else now - then)
        return out


@dataclass(eq=False)
class Call:
    """One `complete` call on the engine's loop: its fetch tasks and how it ends.

    The engine's record of the call; the batch sender hands it back to the engine's methods.
    """

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
