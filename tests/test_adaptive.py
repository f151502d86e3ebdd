"""Adaptive concurrency: the limit follows the endpoint's latency, `concurrency` the ceiling."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distillery.tasks.teacher import (
    ConcurrencyLimit,
    EngineSettings,
    TeacherEndpoint,
    TeacherEngine,
)
from fake_teacher import FakeTeacher, Knobs, chat_requests


def simulate(limit: ConcurrencyLimit, slots: int, service: float, answers: int) -> list[int]:
    """Feed `limit` the latencies of a server with `slots` slots (a request in flight with N
    others waits N / slots service times); the limits it went through."""
    seen = [limit.limit]
    for _ in range(answers):
        in_flight = limit.limit
        latency = service * max(1.0, in_flight / slots)
        if limit.answered(limit.epoch, latency, in_flight):
            seen.append(limit.limit)
    return seen


def test_the_limit_comes_down_to_the_slots_of_a_queueing_server_and_stays_near_them() -> None:
    limit = ConcurrencyLimit(64)
    limit.answered(0, 0.1, 1)  # a probe: the no-load latency
    seen = simulate(limit, slots=4, service=0.1, answers=2000)
    assert seen[:3] == [64, 16, 4]  # 16x the baseline: cut by the gradient, at most 4x a step
    assert min(seen[2:]) >= 4 and max(seen[2:]) <= 8  # between S and 2S, never back to 64


def test_flat_latency_keeps_the_ceiling_even_with_a_slower_busy_client() -> None:
    limit = ConcurrencyLimit(64)
    limit.answered(0, 0.2, 1)
    for i in range(5000):  # up to 1.9x the baseline: a loaded client's own CPU, not a queue
        assert not limit.answered(limit.epoch, 0.2 * (1.0 + 0.9 * (i % 7) / 6), 64)
    assert limit.limit == 64


def test_a_busy_clients_own_delay_is_no_queue_of_the_endpoint() -> None:
    limit = ConcurrencyLimit(64)
    limit.answered(0, 0.05, 1)
    for _ in range(1024):  # 4x the baseline, but 0.15 s of it the client's loop running late
        assert not limit.answered(limit.epoch, 0.2, 64, lag=0.15)
    assert limit.limit == 64
    changed = [limit.answered(limit.epoch, 0.2, 64) for _ in range(64)]  # the endpoint's queue
    assert sum(changed) == 1
    assert limit.limit == 16


def test_slower_work_is_no_queue_the_limit_comes_back() -> None:
    limit = ConcurrencyLimit(32)
    limit.answered(0, 0.1, 1)
    for _ in range(3000):  # answers got 5x longer whatever the concurrency (longer outputs)
        limit.answered(limit.epoch, 0.5, limit.limit)
    assert limit.limit == 32 and limit.baseline == 0.5
    limit.answered(limit.epoch, 0.1, 32)  # a short answer later: no new descent from it
    assert limit.baseline == 0.5


def test_overload_answers_halve_the_limit_scattered_ones_do_not() -> None:
    limit = ConcurrencyLimit(64)
    limit.answered(0, 0.1, 1)
    for i in range(640):  # 1 in 50 answers a 503 (bench item 3's faults): no overload
        if i % 50 == 0:
            limit.overloaded(limit.epoch, 64)
        else:
            limit.answered(limit.epoch, 0.1, 64)
    assert limit.limit == 64
    for _ in range(8):
        limit.overloaded(limit.epoch, 64)
    for _ in range(56):
        limit.answered(limit.epoch, 0.1, 64)
    assert limit.limit == 32


def test_off_the_limit_never_moves() -> None:
    limit = ConcurrencyLimit(64, adaptive=False)
    limit.answered(0, 0.1, 1)
    assert simulate(limit, slots=4, service=0.1, answers=500) == [64]
    for _ in range(100):
        limit.overloaded(limit.epoch, 64)
    assert limit.limit == 64


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[object]:
    engines: list[TeacherEngine] = []

    def make(server: FakeTeacher, **settings: object) -> TeacherEngine:
        cache = tmp_path / f"cache{len(engines)}"
        config = EngineSettings(cache_dir=cache, progress=False, **settings)  # type: ignore[arg-type]
        engine = TeacherEngine(
            TeacherEndpoint(model="fake-teacher", base_url=server.url), config, api_key="k"
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def run_twice(engine: TeacherEngine, server: FakeTeacher) -> float:
    """A first call to learn the endpoint, a second one measured (server counters reset)."""
    requests = chat_requests(380)
    engine.complete(requests[:260], "learn")
    server.reset_stats()
    started = time.monotonic()
    engine.complete(requests[260:], "measure")
    return time.monotonic() - started


def test_against_a_queueing_server_the_limit_drops_to_its_slots_at_the_same_throughput(
    make_engine,
) -> None:  # type: ignore[no-untyped-def]
    # 4 slots x 0.1 s: 64 requests in flight wait up to 16 service times for 40 answers a second.
    with FakeTeacher(Knobs(latency=0.1, slots=4)) as server:
        fixed = make_engine(server, concurrency=64, adaptive_concurrency=False)
        fixed_s = run_twice(fixed, server)
        assert fixed.concurrency_limit == 64
        assert server.stats.max_queued >= 40  # the fixed engine keeps the queue full
        adaptive = make_engine(server, concurrency=64)
        adaptive_s = run_twice(adaptive, server)
        assert 4 <= adaptive.concurrency_limit <= 10
        assert server.stats.max_queued <= 8
        assert server.stats.max_in_flight == 4  # the server's slots still all busy
        assert server.stats.answered == 120
    # The server is the bottleneck either way (3 s for 120); generous for a loaded machine.
    assert adaptive_s < fixed_s * 1.5


def test_with_flat_latency_the_limit_stays_at_the_ceiling(make_engine) -> None:  # type: ignore[no-untyped-def]
    with FakeTeacher(Knobs(latency=0.1, slots=64)) as server:
        engine = make_engine(server, concurrency=16)
        run_twice(engine, server)
        assert engine.concurrency_limit == 16
        assert server.stats.max_in_flight == 16 and server.stats.max_queued == 0
