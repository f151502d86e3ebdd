"""The teacher engine: all teacher traffic (concurrency, rate limits, retries, durable cache)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import logging
import queue
import random
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import httpx2
import openai
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distillery.tasks.cost import Price, format_usd, price_for
from distillery.tasks.teacher.base import (
    BudgetExceeded,
    Call,
    CallStats,
    ChatRequest,
    ChatResult,
    EngineSettings,
    StructuredForm,
    TeacherEndpoint,
    TeacherError,
    TeacherInterrupted,
    TeacherUnavailable,
    plus,
)
from distillery.tasks.teacher.batch import BatchSender
from distillery.tasks.teacher.cache import open_cache, spend_ledger
from distillery.tasks.teacher.pacing import ConcurrencyLimit, RateLimiter, Slots, retry_after
from distillery.tasks.teacher.replies import (
    MalformedReply,
    describe_refusal,
    json_body,
    result_from_body,
)

logger = logging.getLogger("distillery.teacher")

T = TypeVar("T")


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


def _backoff(attempt: int) -> float:
    """Exponential backoff with full jitter, capped at 30 s."""
    return random.uniform(0, min(30.0, 0.25 * 2**attempt))


class _Stopped(Exception):
    """Raised on the loop when the engine stops; `complete` turns it into TeacherInterrupted."""


class _OverBudget(Exception):
    """A request that could pass the spending cap was not sent."""


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
    """Sends chat requests to one endpoint: bounded concurrency, pacing, retries, durable cache.

    Its batch mode (batch.BatchSender) uses only its public members (batch.Engine lists them).
    """

    def __init__(self, endpoint: TeacherEndpoint, settings: EngineSettings, api_key: str | None):
        self.endpoint = endpoint
        self.settings = settings
        self.price = check_settings(endpoint, settings)
        self.cache = open_cache(settings)
        self._api_key = api_key
        self._form: StructuredForm = (
            "json_schema" if endpoint.structured_output == "auto" else endpoint.structured_output
        )
        self._limiter = RateLimiter(settings.rpm, settings.tpm, settings.rate_share)
        self._loop = _LoopThread()
        # Made on the loop (its aiohttp session belongs there).
        self._client = self._loop.submit(self._make_client()).result()
        self._concurrency = ConcurrencyLimit(settings.concurrency, settings.adaptive_concurrency)
        self._slots = Slots(settings.concurrency)
        self._lag = 0.0  # how late the loop runs a timer (peak-held): the client's own delay
        self._lag_watch: asyncio.Task[None] | None = None
        # State below is touched on the loop thread only (stop() hops onto it).
        self._runs: set[Call] = set()
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
        # With DISTILLERY_BUDGET_ID, the other workers' spend counts against the cap too.
        self.spend = spend_ledger(settings, self.cache, self.totals)
        self._batches: BatchSender | None = None
        if settings.batch:
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
        """The SDK client (its aiohttp session runs on the engine's loop)."""
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
        future = self._submit(requests, Call(label=label, priority=priority))
        return self._wait(future)

    def stream(self, requests: Sequence[ChatRequest], label: str, priority: int = 0) -> ReplyStream:
        """The answers to `requests` in order, each as soon as it and those before it are in;
        `close()` the stream to send nothing more (the requests on the wire still land)."""
        return ReplyStream(self, requests, label, priority)

    def _submit(
        self, requests: Sequence[ChatRequest], run: Call
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

    def _halt(self, run: Call) -> None:
        """On the loop: the call's caller needs no more answers (ReplyStream.close)."""
        run.halted = True
        run.failed = True  # may_send refuses the rest
        for task in run.tasks - self._sending:
            task.cancel()  # waiting for a slot: never sent
        run.wake.set()

    async def _complete(
        self, requests: Sequence[ChatRequest], run: Call
    ) -> tuple[list[ChatResult], CallStats]:
        started = time.monotonic()
        label = run.label
        keys = [r.key(self.endpoint) for r in requests]
        unique: dict[str, ChatRequest] = dict(zip(keys, requests, strict=True))
        done = await self.cache.aget_many(list(unique))
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
        spent = self.spent_usd()
        return BudgetExceeded(
            f"{label}: stopped at the spending cap of {format_usd(cap)} (DISTILLERY_MAX_COST_USD / "
            f"--max-cost): {format_usd(spent)} spent, and the next request could pass the cap; "
            f"{undone} requests left unsent. Every answer received is cached: raise the cap and "
            "run the same command again to continue.",
            spent_usd=spent,
            cap_usd=cap,
            undone=undone,
        )

    def wire(self, req: ChatRequest) -> dict[str, Any]:
        """The request's body for /chat/completions, in the structured-output form in use."""
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

    def may_send(self, run: Call, estimate: float) -> None:
        """Raise unless this request may go out now (stop, a failed call, the spending cap)."""
        if self._stopping:
            raise _Stopped
        if run.failed:
            raise asyncio.CancelledError  # another request of this call failed: send no more
        cap = self.settings.max_cost_usd
        if cap is not None:
            spent = self.spent_usd()
            # Spent + what is on the wire + this request, all at their upper bounds: once that
            # could pass the cap, nothing more is sent (a smaller request later would only
            # trickle on to the cap).
            if self._over_budget or spent + self._in_flight_usd + estimate > cap:
                self._over_budget = True
                raise _OverBudget

    def spent_usd(self) -> float:
        """USD spent by this engine, plus by the budget's other workers (DISTILLERY_BUDGET_ID)."""
        others = self.spend.others_usd if self.spend is not None else 0.0
        return (self.totals.cost_usd or 0.0) + others

    def estimate(self, req: ChatRequest, batch: bool = False) -> float:
        """The request's worst case in USD (prompt chars / 4 + max_tokens); 0 if unpriced."""
        price = self.price
        return price.cost(req.estimated_prompt_tokens(), req.max_tokens, batch) if price else 0.0

    def charge(
        self, run: Call, req: ChatRequest, usage: tuple[int, int] | None, batch: bool = False
    ) -> None:
        """Count an answer's tokens (prompt, completion) and USD into the call and the totals.

        An answer without usage counts at its worst case; an unpriced model, as unknown (None).
        """
        price = self.price
        estimate = self.estimate(req, batch) if price else None
        cost = estimate if price is None or usage is None else price.cost(*usage, batch)
        prompt, completion = usage or (0, 0)
        self.count(
            run,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
            estimated_cost_usd=estimate,
        )

    def count(self, run: Call, **deltas: float | None) -> None:
        """Add `deltas` (CallStats fields) to the call's stats and to the engine's totals."""
        for name, value in deltas.items():
            for stats in (run.stats, self.totals):
                setattr(stats, name, plus(getattr(stats, name), value))

    @property
    def stopping(self) -> bool:
        """The engine was stopped (Ctrl-C or close): nothing more is sent."""
        return self._stopping

    def advance(self, run: Call, answers: int = 1) -> None:
        """Move the call's progress row on by `answers` (none once the call is over)."""
        if run.active:
            self._progress.advance(run.task_id, answers)

    def hold(self, task: asyncio.Task[Any], estimate: float) -> None:
        """Count `task` (a batch being submitted or waited for) as in flight until it is done:
        its worst case in USD (`estimate`) against the spending cap, and stop() cancels it."""
        self._in_flight_usd += estimate
        self._tasks.add(task)

        def gone(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            self._in_flight_usd -= estimate

        task.add_done_callback(gone)

    async def _fetch(self, key: str, req: ChatRequest, run: Call) -> tuple[str, ChatResult]:
        me = asyncio.current_task()
        assert me is not None
        estimate = self.estimate(req)
        attempt = 0
        while True:
            delay: float | None = None
            error: Exception
            used = self._form
            async with self._slots.take(run.priority):
                # Pace inside the slot: a request waiting for its turn must not have been
                # scheduled before the limits were learned.
                await self._limiter.wait(req.estimated_tokens())
                self.may_send(run, estimate)
                self.count(run, sent=1)
                self._sending.add(me)
                self._in_flight_usd += estimate
                epoch, timing = self._concurrency.epoch, [0.0, 0.0]
                _TIMING.set(timing)  # this task's context: the client's hooks fill it in
                try:
                    # The SDK's post() with the body as plain JSON and the response as it came
                    # (its documented form for raw requests): chat.completions.create would walk
                    # the TypedDict annotations of every message (~0.9 ms a request) and build a
                    # typed ChatCompletion (~0.4 ms), on the engine's one thread (py-spy, 1b).
                    raw = await self._client.post(
                        "/chat/completions", cast_to=httpx2.Response, body=self.wire(req)
                    )
                    if timing[0] and timing[1]:
                        latency, in_flight = timing[1] - timing[0], len(self._sending)
                        changed = self._concurrency.answered(epoch, latency, in_flight, self._lag)
                        self._adapt(changed)
                    body = json_body(raw.content)
                except openai.APIStatusError as exc:
                    if self._learn_form(exc, req, used):
                        self.count(run, sent=-1)
                        continue
                    status = exc.status_code
                    if status not in (408, 409, 429) and status < 500:
                        run.failed = True
                        raise TeacherError(describe_refusal(exc, self.endpoint)) from None
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
                except MalformedReply as exc:  # a proxy's error page, a cut-off body
                    error = exc
                else:
                    self._limiter.observe(raw.headers)
                    result = result_from_body(body, raw.headers.get("x-request-id"))
                    result = await self.cache.aput(key, result)  # another worker's if first
                    self.charge(
                        run,
                        req,
                        (result.prompt_tokens, result.completion_tokens)
                        if body.get("usage")
                        else None,
                    )
                    if self._stopping:
                        self._drained += 1
                    self.finished += 1
                    self.advance(run)
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
            self.count(run, retries=1)
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
            if self.spend is not None:
                self.spend.close()
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
        await self._client.close()
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
        self._run = Call(label=label, priority=priority, on_result=self._arrived)
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
