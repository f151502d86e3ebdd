"""Prices, cost accounting and the spending cap, against the fake teacher (which reports usage)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from distillery.tasks.cost import FREE, Price, price_for
from distillery.tasks.teacher import (
    BudgetExceeded,
    ChatRequest,
    EngineSettings,
    TeacherEndpoint,
    TeacherEngine,
    TeacherError,
    TeacherUnavailable,
    retry_worthwhile,
)
from fake_teacher import FakeTeacher, Knobs, chat_requests

# Round numbers so expected costs are easy to read: $1 per 1M input, $2 per 1M output tokens.
PRICE = Price(input_usd_per_1m=1.0, output_usd_per_1m=2.0)

MakeEngine = Callable[..., TeacherEngine]


def requests(n: int, tag: str = "q", max_tokens: int = 200) -> list[ChatRequest]:
    return chat_requests(n, tag, max_tokens)


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[MakeEngine]:
    engines: list[TeacherEngine] = []

    def make(server: FakeTeacher, price: Price | None = PRICE, **settings: object) -> TeacherEngine:
        config = EngineSettings(cache_dir=tmp_path / "cache", progress=False, **settings)  # type: ignore[arg-type]
        endpoint = TeacherEndpoint(model="fake-teacher", base_url=server.url, price=price)
        engine = TeacherEngine(endpoint, config, api_key="sk-test")
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def test_openai_models_have_list_prices_and_snapshots_take_their_familys() -> None:
    mini = price_for("gpt-4o-mini", "api.openai.com")
    assert mini == Price(input_usd_per_1m=0.15, output_usd_per_1m=0.60)
    assert price_for("gpt-4o-mini-2024-07-18", "api.openai.com") == mini
    assert price_for("gpt-4-0613", "api.openai.com") == price_for("gpt-4", "api.openai.com")
    # A snapshot listed on its own keeps its own price.
    old = price_for("gpt-4o-2024-05-13", "api.openai.com")
    assert old is not None and old.input_usd_per_1m == 5.0
    assert mini.cost(1_000_000, 1_000_000) == pytest.approx(0.75)
    assert mini.cost(1_000_000, 1_000_000, batch=True) == pytest.approx(0.375)


def test_only_the_embedded_teacher_costs_nothing_without_a_price() -> None:
    assert price_for("whatever-model", "embedded") == FREE


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "litellm", "vllm"])
def test_a_private_or_dotless_host_is_not_assumed_free(host: str) -> None:
    # A paid gateway (http://litellm:4000, a 10.x proxy) looks like a local server: its price is
    # unknown until the recipe says it (zeros for a server nobody bills for).
    assert price_for("whatever-model", host) is None
    assert price_for("whatever-model", host, FREE) == FREE


def test_a_cap_on_a_gateway_of_unknown_price_is_refused_before_any_call(tmp_path: Path) -> None:
    settings = EngineSettings(cache_dir=tmp_path, progress=False, max_cost_usd=5.0)
    with FakeTeacher() as server:
        endpoint = TeacherEndpoint(model="gpt-4o", base_url=server.url)
        with pytest.raises(TeacherError, match=r"teacher\.price") as info:
            TeacherEngine(endpoint, settings, api_key="sk-test")
        assert "127.0.0.1" in str(info.value) and "--max-cost" in str(info.value)
        assert server.stats.received == 0
        # Marked free by the user, the same cap is accepted.
        free = TeacherEndpoint(model="gpt-4o", base_url=server.url, price=FREE)
        TeacherEngine(free, settings, api_key="sk-test").close()


def test_unknown_model_on_a_paid_host_is_unknown_not_free_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="distillery.cost"):
        assert price_for("gpt-9-ultra", "api.openai.com") is None
        assert price_for("gpt-9-ultra", "api.openai.com") is None
        # A "-pro" variant never borrows its cheaper family's price.
        assert price_for("gpt-4o-pro", "api.openai.com") is None
        assert price_for("llama-3-70b", "api.together.xyz") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("gpt-9-ultra" in w for w in warnings) == 1
    assert "teacher.price" in warnings[0]


def test_a_given_price_overrides_the_table() -> None:
    assert price_for("gpt-4o-mini", "api.openai.com", PRICE) == PRICE
    assert price_for("my-model", "api.together.xyz", PRICE) == PRICE


def test_engine_counts_actual_cost_from_usage_and_an_upper_bound_estimate(
    make_engine: MakeEngine,
) -> None:
    with FakeTeacher() as server:
        engine = make_engine(server, concurrency=4)
        results, stats = engine.complete(requests(20), "t")
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        assert stats.prompt_tokens == prompt and stats.completion_tokens == completion
        assert stats.cost_usd == pytest.approx(PRICE.cost(prompt, completion))
        assert stats.estimated_cost_usd is not None and stats.cost_usd is not None
        assert stats.estimated_cost_usd >= stats.cost_usd > 0
        # A cached answer costs nothing again.
        _, again = engine.complete(requests(20), "t")
        assert again.cost_usd == 0 and again.cached == 20
        assert engine.totals.cost_usd == pytest.approx(stats.cost_usd)
        assert engine.totals.since(engine.totals).cost_usd == 0


def test_unknown_price_counts_tokens_and_reports_cost_unknown(make_engine: MakeEngine) -> None:
    with FakeTeacher() as server:
        engine = make_engine(server, price=None)
        engine.price = None  # as for a model the table does not know on a paid host
        _, stats = engine.complete(requests(3), "t")
        assert stats.cost_usd is None and stats.estimated_cost_usd is None
        assert stats.completion_tokens > 0
        assert engine.totals.cost_usd is None


def test_a_cap_with_an_unknown_price_refuses_to_start(tmp_path: Path) -> None:
    settings = EngineSettings(cache_dir=tmp_path, progress=False, max_cost_usd=1.0)
    endpoint = TeacherEndpoint(model="llama-3-70b", base_url="https://api.together.xyz/v1")
    with pytest.raises(TeacherError, match=r"teacher\.price"):
        TeacherEngine(endpoint, settings, api_key="sk-test")


def test_spending_cap_stops_sending_lets_in_flight_answers_land_and_says_so(
    make_engine: MakeEngine,
) -> None:
    # Each request is estimated at ~18 prompt + 200 output tokens = ~$0.000418 at PRICE, and
    # really costs far less (short answers); a cap of $0.004 lets about ten through at once.
    cap = 0.004
    with FakeTeacher(Knobs(latency=0.2)) as server:
        engine = make_engine(server, concurrency=8, max_cost_usd=cap)
        with pytest.raises(BudgetExceeded) as info:
            engine.complete(requests(200), "answer batch")
        error = info.value
        stats = server.stats
        assert 0 < stats.answered < 200
        # Nothing was cut: every request sent was answered, and cached.
        assert stats.received == stats.answered
        assert error.spent_usd <= cap and error.cap_usd == cap
        assert error.undone == 200 - stats.answered
        message = str(error)
        assert "$0.0040" in message and f"{error.undone} requests left unsent" in message
        assert "--max-cost" in message
        # The cap holds for the engine's lifetime: a later call sends nothing either.
        with pytest.raises(BudgetExceeded):
            engine.complete(requests(5, tag="other"), "later")
        assert server.stats.received == stats.received

        # With a higher cap the same work resumes from the cache: nothing is sent twice.
        engine.close()
        resumed = make_engine(server, concurrency=64, max_cost_usd=1.0)
        _, resumed_stats = resumed.complete(requests(200), "answer batch")
        assert resumed_stats.cached == stats.answered
        assert server.stats.resent_after_answer == 0 and server.stats.answered_twice == 0


def test_budget_exceeded_pickles_and_is_not_worth_a_prefect_retry() -> None:
    from prefect.states import Failed

    error = BudgetExceeded("over", spent_usd=1.5, cap_usd=2.0, undone=7)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.spent_usd, copy.cap_usd, copy.undone) == ("over", 1.5, 2.0, 7)
    assert not retry_worthwhile(None, None, Failed(data=error))
    assert not retry_worthwhile(None, None, Failed(data=TeacherError("401")))
    assert retry_worthwhile(None, None, Failed(data=TeacherUnavailable("503 after 8 tries")))
