"""Batch mode of the teacher engine against the fake Batch API, with the real SDK."""

from __future__ import annotations

import json
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import distillery.tasks.teacher.batch
from distillery.tasks.cost import Price
from distillery.tasks.expand import expansion_schema
from distillery.tasks.teacher import (
    BatchesPending,
    BudgetExceeded,
    ChatRequest,
    EngineSettings,
    TeacherEndpoint,
    TeacherEngine,
    TeacherError,
    TeacherInterrupted,
    TeacherUnavailable,
    retry_worthwhile,
)
from fake_openai_batches import FakeOpenAIBatches, Knobs
from fake_teacher import FakeTeacher, chat_requests

KEY = "test-key"
MODEL = "gpt-4o-mini"
MakeEngine = Callable[..., TeacherEngine]


def assert_in_order(results: list[Any], n: int) -> None:
    assert len(results) == n
    for i, result in enumerate(results):
        assert f"Buy {i}?" in result.content  # the fake teacher's answers echo the question
        assert result.finish_reason == "stop" and result.request_id.startswith("req_")


@pytest.fixture
def server() -> Iterator[FakeOpenAIBatches]:
    with FakeOpenAIBatches(Knobs(api_key=KEY, batch_seconds=0.3)) as fake:
        yield fake


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[MakeEngine]:
    engines: list[TeacherEngine] = []

    def make(
        server: FakeOpenAIBatches, price: Price | None = None, **settings: Any
    ) -> TeacherEngine:
        options: dict[str, Any] = {
            "cache_dir": tmp_path / "cache",
            "progress": False,
            "batch": True,
            "batch_poll_interval_s": 0.05,
            "batch_max_poll_interval_s": 0.2,
        }
        endpoint = TeacherEndpoint(model=MODEL, base_url=server.base_url, price=price)
        engine = TeacherEngine(endpoint, EngineSettings(**{**options, **settings}), api_key=KEY)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def ledger(tmp_path: Path) -> list[tuple[str, str | None, int]]:
    with sqlite3.connect(tmp_path / "cache" / "teacher-cache.sqlite") as db:
        return list(db.execute("SELECT chunk, batch_id, collected FROM batches"))


def test_batch_answers_land_in_the_cache_in_order_and_are_not_sent_again(
    server: FakeOpenAIBatches, make_engine: MakeEngine, tmp_path: Path
) -> None:
    engine = make_engine(server)

    results, stats = engine.complete(chat_requests(12), "answers")

    assert_in_order(results, 12)
    assert (stats.requests, stats.sent, stats.cached, stats.retries) == (12, 12, 0, 0)
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    seen = server.stats
    assert (seen.batches_created, seen.files_uploaded, seen.rows_submitted) == (1, 1, 12)
    (batch,) = server.batches()
    assert batch["status"] == "completed"
    assert batch["endpoint"] == "/v1/chat/completions"
    assert batch["completion_window"] == "24h"
    lines = [json.loads(line) for line in server.input_file(batch["id"]).data.splitlines()]
    keys = [r.key(engine.endpoint) for r in chat_requests(12)]
    assert [line["custom_id"] for line in lines] == keys
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    assert lines[0]["body"]["model"] == MODEL and lines[0]["body"]["max_tokens"] == 64
    assert [(b, c) for _, b, c in ledger(tmp_path)] == [(batch["id"], 1)]

    again, stats = engine.complete(chat_requests(12), "answers")

    assert [r.content for r in again] == [r.content for r in results]
    assert (stats.sent, stats.cached) == (0, 12)
    assert server.stats.total == seen.total  # not even a look at the batch


def test_batch_answers_are_the_online_answers_and_the_online_path_finds_them(
    server: FakeOpenAIBatches, make_engine: MakeEngine, tmp_path: Path
) -> None:
    reqs = [
        *chat_requests(3),
        ChatRequest(
            messages=(("user", "Write 2 more examples."),),
            temperature=1.0,
            top_p=1.0,
            max_tokens=512,
            json_schema=expansion_schema(2),
            schema_name="examples",
        ),
    ]
    results, _ = make_engine(server).complete(reqs, "mixed")

    parsed = json.loads(results[3].content)  # structured output answers in the schema's shape
    assert len(parsed["examples"]) >= 1
    with FakeTeacher() as teacher:
        endpoint = TeacherEndpoint(model=MODEL, base_url=teacher.url)
        settings = EngineSettings(cache_dir=tmp_path / "online", progress=False)
        online = TeacherEngine(endpoint, settings, api_key=KEY)
        try:
            answered, _ = online.complete(reqs, "online")
        finally:
            online.close()
        # The same bodies: the online teacher answers exactly what the batch answered.
        assert [r.content for r in answered] == [r.content for r in results]
    # An online engine on the batch engine's cache finds every answer under the same keys.
    cached_engine = make_engine(server, batch=False)
    _, stats = cached_engine.complete(reqs, "online again")
    assert (stats.sent, stats.cached) == (0, 4)


def test_partly_failed_batch_resubmits_only_the_failed_rows(
    server: FakeOpenAIBatches, make_engine: MakeEngine
) -> None:
    server.knobs.row_failure_rate = 0.3

    results, stats = make_engine(server).complete(chat_requests(20), "answers")

    assert_in_order(results, 20)
    seen = server.stats
    assert seen.rows_failed > 0
    assert seen.batches_created >= 2
    assert seen.rows_submitted == 20 + seen.rows_failed
    assert seen.submitted_twice == 0
    for body, n in seen.submitted_by_body.items():
        assert n == 1 + seen.failed_by_body[body]
    # As online, `sent` counts every request put on the wire, resubmissions included.
    assert (stats.sent, stats.retries) == (seen.rows_submitted, seen.rows_failed)


def test_expired_batch_resubmits_only_the_rows_it_never_answered(
    server: FakeOpenAIBatches, make_engine: MakeEngine
) -> None:
    server.knobs.expire_batches = 1

    results, _ = make_engine(server).complete(chat_requests(16), "answers")

    assert_in_order(results, 16)
    second, first = server.batches()
    assert first["status"] == "expired" and second["status"] == "completed"
    seen = server.stats
    assert 0 < seen.rows_expired < 16
    assert first["request_counts"]["completed"] == 16 - seen.rows_expired
    assert second["request_counts"]["total"] == seen.rows_expired
    resubmitted = {
        json.loads(line)["custom_id"] for line in server.input_file(second["id"]).data.splitlines()
    }
    assert len(resubmitted) == seen.rows_expired
    assert seen.submitted_twice == 0


def interrupt_while_in_progress(engine: TeacherEngine, server: FakeOpenAIBatches) -> list[Any]:
    """Run `complete` in a thread and close the engine once its batch is being waited for."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(engine.complete(chat_requests(8), "answers"))
        except TeacherInterrupted as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 30
    while server.stats.batch_polls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.close()
    thread.join(30)
    return outcome


def test_restarted_engine_reattaches_to_its_batch_and_submits_nothing_new(
    server: FakeOpenAIBatches, make_engine: MakeEngine, tmp_path: Path
) -> None:
    server.knobs.batch_seconds = 2.0

    (stopped,) = interrupt_while_in_progress(make_engine(server), server)

    assert isinstance(stopped, TeacherInterrupted)
    assert "re-attaches" in str(stopped)
    (batch,) = server.batches()
    assert batch["status"] not in ("completed", "expired")
    assert [(b, c) for _, b, c in ledger(tmp_path)] == [(batch["id"], 0)]

    results, stats = make_engine(server).complete(chat_requests(8), "answers")

    assert_in_order(results, 8)
    assert stats.sent == 0  # nothing new submitted; the answers still came in (and count)
    assert stats.completion_tokens > 0
    seen = server.stats
    assert (seen.batches_created, seen.files_uploaded, seen.rows_submitted) == (1, 1, 8)
    assert [(b, c) for _, b, c in ledger(tmp_path)] == [(batch["id"], 1)]


def test_restart_before_the_batch_id_was_recorded_finds_the_batch_by_its_metadata(
    server: FakeOpenAIBatches, make_engine: MakeEngine, tmp_path: Path
) -> None:
    server.knobs.batch_seconds = 2.0
    interrupt_while_in_progress(make_engine(server), server)
    # As if the process had died between creating the batch and recording its id.
    with sqlite3.connect(tmp_path / "cache" / "teacher-cache.sqlite") as db:
        db.execute("UPDATE batches SET batch_id = NULL")

    results, _ = make_engine(server).complete(chat_requests(8), "answers")

    assert_in_order(results, 8)
    seen = server.stats
    assert (seen.batches_created, seen.files_uploaded) == (1, 1)
    assert seen.requests["GET /v1/batches"] == 1


@pytest.mark.parametrize("limit", ["requests", "bytes"])
def test_requests_are_split_into_files_at_the_api_limits(
    server: FakeOpenAIBatches,
    make_engine: MakeEngine,
    monkeypatch: pytest.MonkeyPatch,
    limit: str,
) -> None:
    engine = make_engine(server)
    if limit == "requests":
        monkeypatch.setattr(distillery.tasks.teacher.batch, "MAX_REQUESTS", 4)
    else:
        line = len(engine._batches._line("k" * 64, chat_requests(1)[0]))  # type: ignore[union-attr]
        monkeypatch.setattr(distillery.tasks.teacher.batch, "MAX_BYTES", 4 * line + 3)

    results, stats = engine.complete(chat_requests(10), "answers")

    assert_in_order(results, 10)
    assert stats.sent == 10
    sizes = sorted(b["request_counts"]["total"] for b in server.batches())
    assert sizes == [2, 4, 4]
    assert server.stats.rows_submitted == 10 and server.stats.submitted_twice == 0


def test_batch_answers_are_priced_at_the_batch_discount(
    server: FakeOpenAIBatches, make_engine: MakeEngine
) -> None:
    price = Price(input_usd_per_1m=2.0, output_usd_per_1m=8.0)
    engine = make_engine(server, price=price)

    results, stats = engine.complete(chat_requests(6), "answers")

    online = sum(price.cost(r.prompt_tokens, r.completion_tokens) for r in results)
    assert stats.cost_usd == pytest.approx(online / 2)
    assert engine.totals.cost_usd == pytest.approx(online / 2)
    estimate = sum(price.cost(r.estimated_prompt_tokens(), r.max_tokens) for r in chat_requests(6))
    assert stats.estimated_cost_usd == pytest.approx(estimate / 2)


def test_spending_cap_submits_no_batch_that_could_pass_it(
    server: FakeOpenAIBatches, make_engine: MakeEngine
) -> None:
    price = Price(input_usd_per_1m=2.0, output_usd_per_1m=8.0)
    engine = make_engine(server, price=price, max_cost_usd=1e-5)

    with pytest.raises(BudgetExceeded, match="spending cap"):
        engine.complete(chat_requests(6), "answers")
    assert server.stats.total == 0


def test_server_errors_of_the_batch_api_are_retried_without_duplicate_work(
    server: FakeOpenAIBatches, make_engine: MakeEngine
) -> None:
    server.knobs.server_errors = 3

    results, _ = make_engine(server).complete(chat_requests(5), "answers")

    assert_in_order(results, 5)
    seen = server.stats
    assert seen.server_errors == 3
    assert (seen.batches_created, seen.files_uploaded, seen.submitted_twice) == (1, 1, 0)


def test_rows_that_keep_failing_stop_with_the_batch_ids(
    server: FakeOpenAIBatches, make_engine: MakeEngine
) -> None:
    server.knobs.row_failure_rate = 1.0

    with pytest.raises(TeacherUnavailable, match="after 2 batch rounds") as info:
        make_engine(server, max_attempts=2).complete(chat_requests(3), "answers")

    ids = [b["id"] for b in server.batches()]
    assert len(ids) == 2
    assert all(batch_id in str(info.value) for batch_id in ids)
    assert "500" in str(info.value)
    assert server.stats.rows_submitted == 6


def test_batch_mode_refuses_the_embedded_teacher(tmp_path: Path) -> None:
    endpoint = TeacherEndpoint(model="smollm2", base_url=None, embedded=True)
    settings = EngineSettings(cache_dir=tmp_path, progress=False, batch=True)

    with pytest.raises(TeacherError, match="DISTILLERY_BATCH"):
        TeacherEngine(endpoint, settings, api_key=KEY)


def test_batch_mode_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_BATCH", "1")
    monkeypatch.setenv("DISTILLERY_BATCH_POLL_INTERVAL_S", "5")

    settings = EngineSettings()

    assert settings.batch is True and settings.batch_poll_interval_s == 5.0


def test_a_hold_ends_the_call_with_its_running_batches_and_a_later_call_reattaches(
    server: FakeOpenAIBatches, make_engine: MakeEngine, tmp_path: Path
) -> None:
    server.knobs.batch_seconds = 20.0
    engine = make_engine(server, batch_hold_s=2.0)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            engine.complete(chat_requests(8), "answers")
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=call)
    thread.start()
    while server.stats.batch_polls == 0 and time.monotonic() - started < 30:
        time.sleep(0.01)
    assert engine.batch_counts() == (1, 0, 8)  # what the UI's progress shows while it holds
    thread.join(30)

    assert time.monotonic() - started < 15  # held 2 s, not the batch's 20 s
    assert engine.batch_counts() is None
    (pending,) = outcome
    assert isinstance(pending, BatchesPending)
    (batch,) = server.batches()
    (seen,) = pending.batches
    assert seen["id"] == batch["id"] and seen["status"] in ("validating", "in_progress")
    assert seen["total"] == 8 and seen["completed"] + seen["failed"] < 8
    assert pending.waiting == 8 and pending.recheck_at > time.time()
    assert batch["id"] in str(pending) and "re-attaches" in str(pending)
    copy = pickle.loads(pickle.dumps(pending))  # as Prefect stores a task's exception
    assert (copy.batches, copy.waiting, copy.recheck_at) == (
        pending.batches,
        pending.waiting,
        pending.recheck_at,
    )
    assert [(b, c) for _, b, c in ledger(tmp_path)] == [(batch["id"], 0)]
    engine.close()

    # The next look suggests half the batch's age (a backoff across runs), here 500 s.
    server._core.batches[batch["id"]].created_at -= 1000
    with pytest.raises(BatchesPending) as info:
        make_engine(server, batch_hold_s=0).complete(chat_requests(8), "answers")
    assert info.value.recheck_at - time.time() == pytest.approx(500, abs=10)

    server.finish_batches()
    results, stats = make_engine(server, batch_hold_s=0.3).complete(chat_requests(8), "answers")

    assert_in_order(results, 8)
    assert stats.sent == 0
    seen_by_server = server.stats
    assert (seen_by_server.batches_created, seen_by_server.rows_submitted) == (1, 8)
    assert [(b, c) for _, b, c in ledger(tmp_path)] == [(batch["id"], 1)]


def test_rows_that_keep_failing_are_given_up_across_rechecks_too(
    server: FakeOpenAIBatches, make_engine: MakeEngine
) -> None:
    """Each re-check run re-attaches and resubmits; the tries are counted in the ledger, so a
    chain of re-checks stops after max_attempts submissions, and a new command starts again."""
    server.knobs.row_failure_rate = 1.0
    server.knobs.batch_seconds = 20.0

    def call(**settings: Any) -> Exception:
        engine = make_engine(server, max_attempts=2, **settings)
        try:
            with pytest.raises((BatchesPending, TeacherUnavailable)) as info:
                engine.complete(chat_requests(3), "answers")
        finally:
            engine.close()
        return info.value

    assert isinstance(call(batch_hold_s=0), BatchesPending)  # submitted once
    server.finish_batches()
    assert isinstance(call(batch_hold_s=0), BatchesPending)  # failed; submitted again
    assert server.stats.rows_submitted == 6
    server.finish_batches()

    gave_up = call(batch_hold_s=0)

    assert isinstance(gave_up, TeacherUnavailable) and "after 2 batch rounds" in str(gave_up)
    assert server.stats.rows_submitted == 6 and server.stats.batches_created == 2
    # Given up: the same command starts their count again (2 more submissions, no hold).
    server.knobs.batch_seconds = 0.3
    assert isinstance(call(), TeacherUnavailable)
    assert server.stats.rows_submitted == 12


def test_the_hold_is_read_from_the_environment_and_no_teacher_task_retries_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.states import Failed

    assert EngineSettings().batch_hold_s is None  # default: wait in the process
    monkeypatch.setenv("DISTILLERY_BATCH_HOLD_S", "1.5")
    assert EngineSettings().batch_hold_s == 1.5
    pending = BatchesPending("waiting", [], 0, time.time())
    assert not retry_worthwhile(None, None, Failed(data=pending))
