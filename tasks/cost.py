"""Teacher prices: USD per million tokens for each model, and what a request costs."""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("distillery.cost")


class Price(BaseModel):
    """What one model costs at one endpoint, in USD per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_usd_per_1m: float = Field(ge=0, description="USD per 1M input (prompt) tokens.")
    output_usd_per_1m: float = Field(ge=0, description="USD per 1M output (completion) tokens.")
    batch_discount: float = Field(
        0.5, ge=0, le=1, description="Share taken off in batch mode (OpenAI's Batch API: half)."
    )

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        """USD for one request's tokens."""
        usd = (
            prompt_tokens * self.input_usd_per_1m + completion_tokens * self.output_usd_per_1m
        ) / 1e6
        return usd * (1 - self.batch_discount) if batch else usd


FREE = Price(input_usd_per_1m=0, output_usd_per_1m=0)

OPENAI_HOST = "api.openai.com"
# TeacherEndpoint.host of the embedded teacher (its loopback port changes from run to run).
EMBEDDED_HOST = "embedded"

# OpenAI's standard-tier list prices, USD per 1M (input, output) tokens, from
# https://platform.openai.com/docs/pricing as summarised in 2026. Cached-input discounts are not
# modelled, so a cost is an upper bound. A dated snapshot (gpt-4o-mini-2024-07-18, gpt-4-0613)
# takes its family's price unless listed itself; any other name is unknown: a "-pro" or
# "-audio" variant must never borrow a cheaper family's price.
OPENAI_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5.5": (5.00, 30.00),
    "gpt-5.5-pro": (30.00, 180.00),
    "gpt-5.4": (2.50, 15.00),
    "gpt-5.4-mini": (0.75, 4.50),
    "gpt-5.4-nano": (0.20, 1.25),
    "gpt-5.1": (1.25, 10.00),
    "gpt-5": (1.25, 10.00),
    "gpt-5-pro": (15.00, 120.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "o1": (15.00, 60.00),
    "o1-pro": (150.00, 600.00),
    "o3": (2.00, 8.00),
    "o3-pro": (20.00, 80.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}

_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def price_for(model: str, host: str, override: Price | None = None) -> Price | None:
    """The price of `model` at `host`: the override, OpenAI's list price, 0 for the embedded
    teacher, else None (unknown).

    A private or dot-less host is not assumed free: a paid gateway (`http://litellm:4000`, a
    10.x proxy) looks just like a local vLLM. A server nobody bills for is marked free by the
    user with a zero `teacher.price` in the recipe.
    """
    if override is not None:
        return override
    if host == EMBEDDED_HOST:
        return FREE
    if host == OPENAI_HOST:
        listed = OPENAI_PRICES.get(model) or OPENAI_PRICES.get(_SNAPSHOT.sub("", model))
        if listed is not None:
            return Price(input_usd_per_1m=listed[0], output_usd_per_1m=listed[1])
    with _warned_lock:
        first = (host, model) not in _warned
        _warned.add((host, model))
    if first:
        # Tokens are still counted; the cost is reported as unknown, never as 0.
        logger.warning(
            "no price known for model %r at %s: its cost is reported as unknown; set "
            "teacher.price in the recipe (USD per 1M input and output tokens; zeros for a "
            "server nobody bills for) to count it",
            model,
            host,
        )
    return None


def format_usd(value: float | None) -> str:
    """A cost for people: "$0.0123", "$12.50", or "unknown" when a price was missing."""
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if value >= 1 else f"${value:.4f}"


class Store(Protocol):
    """What the spend ledger needs of a store (tasks/teacher/cache.py SharedStore)."""

    def write(self, name: str, data: bytes) -> None: ...

    def read_many(self, names: Sequence[str]) -> dict[str, bytes]: ...

    def names(self, folder: str) -> list[str]: ...


class SpendLedger:
    """One spend total for every worker of a budget (DISTILLERY_BUDGET_ID), in a shared store.

    Each writer (one engine in one process) owns one object, `spend/<budget>/<writer>.json`,
    holding its own running total; only it ever writes there, so concurrent workers never
    overwrite each other, and the total is the sum over the folder, read on demand. (One object
    per writer, not one per charge: a sum reads as many objects as there were workers.)
    """

    def __init__(self, store: Store, budget: str, own: Callable[[], dict[str, float]]) -> None:
        self._store = store
        self.folder = f"spend/{budget}"
        self.writer = uuid.uuid4().hex
        self._own = own  # this writer's totals now: usd, prompt_tokens, completion_tokens
        self._others_usd = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float) -> None:
        """Sync now, then every `interval_s` on a daemon thread until close()."""
        self.sync()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.sync()
                except OSError as exc:  # the store is down a while: the next sync catches up
                    logger.warning("spend ledger %s: sync failed (%s)", self.folder, exc)

        self._thread = threading.Thread(target=loop, name="distillery-spend", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop syncing, after writing this writer's final totals."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.sync()
        except OSError as exc:  # closing must go on (the engine closes its cache next)
            logger.warning("spend ledger %s: final sync failed (%s)", self.folder, exc)

    def sync(self) -> float:
        """Write this writer's totals, read everyone else's; the others' USD."""
        own = self._own()
        self._store.write(f"{self.folder}/{self.writer}.json", json.dumps(own).encode())
        names = [
            n for n in self._store.names(self.folder) if not n.endswith(f"/{self.writer}.json")
        ]
        others = sum(json.loads(b)["usd"] for b in self._store.read_many(names).values())
        with self._lock:
            self._others_usd = others
        return others

    @property
    def others_usd(self) -> float:
        """The other writers' USD at the last sync."""
        with self._lock:
            return self._others_usd

    def total(self) -> dict[str, float]:
        """Every writer's totals summed, as stored now (this one's as of its last sync)."""
        summed = {"usd": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0, "writers": 0.0}
        names = self._store.names(self.folder)
        for blob in self._store.read_many(names).values():
            for field, value in json.loads(blob).items():
                summed[field] = summed.get(field, 0.0) + value
            summed["writers"] += 1
        return summed
