"""The teacher engine's pacing: rate limits (RPM, TPM, resets) and requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any

logger = logging.getLogger("distillery.teacher")

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

    def __init__(self, rpm: int | None, tpm: int | None, share: float = 1.0) -> None:
        # `share`: of the endpoint's limits (configured or learned from its headers, which
        # report the whole endpoint's), the part this process may use: several processes (the
        # shards of a run) share one budget.
        self.share = share
        rpm, tpm = self._part(rpm), self._part(tpm)
        self.configured_rpm, self.configured_tpm = rpm, tpm
        self.rpm, self.tpm = rpm, tpm
        self._next_request = 0.0
        self._next_token = 0.0
        self._paused_until = 0.0
        self._probes = 0
        self._started = 0.0
        self._heard: asyncio.Event | None = None  # made on the loop, at first use
        self._turn: asyncio.Lock | None = None

    def _part(self, limit: int | None) -> int | None:
        return None if limit is None else max(1, int(limit * self.share))

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
                learned = self._part(int(limit))
                assert learned is not None
                value = min(learned, configured) if configured else learned
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


class Slots:
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
