"""The teacher engine against the fake teacher: limits, retries, fast failures, cache, expansion."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distillery.tasks.expand import run_expansion, seed_inputs
from distillery.tasks.recipe import load_recipe
from distillery.tasks.teacher import (
    ChatRequest,
    EngineSettings,
    TeacherEndpoint,
    TeacherEngine,
    TeacherError,
    TeacherUnavailable,
    close_engines,
)
from fake_teacher import FakeTeacher, Knobs, chat_requests

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-engine-test-key-7f3a"


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[object]:
    engines: list[TeacherEngine] = []

    def make(server: FakeTeacher, **settings: object) -> TeacherEngine:
        config = EngineSettings(cache_dir=tmp_path / "cache", progress=False, **settings)  # type: ignore[arg-type]
        engine = TeacherEngine(
            TeacherEndpoint(model="fake-teacher", base_url=server.url), config, api_key=KEY
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def test_concurrency_is_bounded_and_every_answer_lands_in_the_cache(make_engine) -> None:  # type: ignore[no-untyped-def]
    with FakeTeacher(Knobs(latency=0.02, slots=64)) as server:
        engine = make_engine(server, concurrency=4)
        results, stats = engine.complete(chat_requests(40), "t")
        assert server.stats.max_in_flight <= 4
        assert stats.sent == 40 and stats.cached == 0 and len(results) == 40
        again, stats = engine.complete(chat_requests(40), "t")
        assert stats.sent == 0 and stats.cached == 40
        assert [r.content for r in again] == [r.content for r in results]
        assert server.stats.received == 40


def test_two_servers_on_one_host_with_one_model_alias_never_share_answers(make_engine) -> None:  # type: ignore[no-untyped-def]
    # Two local servers (two ports) serving the same alias: each answers its own requests.
    with FakeTeacher() as first, FakeTeacher() as second:
        make_engine(first).complete(chat_requests(5), "t")
        _, stats = make_engine(second).complete(chat_requests(5), "t")
        assert stats.cached == 0 and second.stats.received == 5
        # The same server again is answered from the cache.
        _, again = make_engine(first).complete(chat_requests(5), "t")
        assert again.cached == 5 and first.stats.received == 5


def test_cache_identity_is_scheme_host_port_and_path_with_stable_names() -> None:
    def key(**endpoint: object) -> str:
        return chat_requests(1)[0].key(TeacherEndpoint(model="m", **endpoint))  # type: ignore[arg-type]

    assert key(base_url="http://gw:4000/v1") != key(base_url="http://gw:4001/v1")
    assert key(base_url="http://gw:4000/v1") != key(base_url="http://gw:4000/team-b/v1")
    assert key(base_url="http://gw:4000/v1") != key(base_url="https://gw:4000/v1")
    assert key(base_url="http://gw:4000/v1") == key(base_url="http://GW:4000/v1/")
    assert key(base_url="http://gw/v1") == key(base_url="http://gw:80/v1")
    # OpenAI's own API and the embedded teacher keep the names older caches were keyed on.
    assert key(base_url=None) == key(base_url="https://api.openai.com/v1/")
    assert TeacherEndpoint(model="m", base_url=None).identity == "api.openai.com"
    embedded = TeacherEndpoint(model="m", base_url=None, embedded=True)
    assert embedded.identity == "embedded"


def test_identical_requests_in_one_call_are_sent_once(make_engine) -> None:  # type: ignore[no-untyped-def]
    with FakeTeacher() as server:
        engine = make_engine(server)
        results, _ = engine.complete(chat_requests(5) * 3, "t")
        assert len(results) == 15 and server.stats.received == 5


def test_429_with_retry_after_and_server_faults_are_retried(make_engine) -> None:  # type: ignore[no-untyped-def]
    knobs = Knobs(fault_rate=0.3, faults=("429", "500", "503", "drop"))
    with FakeTeacher(knobs) as server:
        engine = make_engine(server, concurrency=8)
        results, stats = engine.complete(chat_requests(60), "t")
        assert all(r.content for r in results)
        assert server.stats.faults["429"] > 0 and server.stats.faults["drop"] > 0
        assert stats.retries == sum(server.stats.faults.values())
        assert server.stats.answered == 60 and server.stats.answered_twice == 0


def test_requests_are_paced_under_a_learned_rpm_limit_without_429(make_engine) -> None:  # type: ignore[no-untyped-def]
    with FakeTeacher(Knobs(rpm=240)) as server:
        engine = make_engine(server, concurrency=4)
        started = time.monotonic()
        engine.complete(chat_requests(16), "t")
        elapsed = time.monotonic() - started
        assert server.stats.rate_limited == 0
        # After the first answers teach it 240 RPM (one every 0.25 s), the remaining 12 are paced.
        assert elapsed > 12 * 0.25 * 0.9


def test_requests_are_paced_under_a_learned_tpm_limit_without_429(make_engine) -> None:  # type: ignore[no-untyped-def]
    reqs = chat_requests(16)
    cost = reqs[0].estimated_tokens()  # what the server counts: prompt chars / 4 + max_tokens
    with FakeTeacher(Knobs(tpm=cost * 240)) as server:  # 240 such requests a minute
        engine = make_engine(server, concurrency=8)
        started = time.monotonic()
        engine.complete(reqs, "t")
        assert server.stats.rate_limited == 0
        assert time.monotonic() - started > 12 * 0.25 * 0.9


def test_no_burst_before_the_limits_are_known_when_the_server_enforces_them_per_second(
    make_engine,
) -> None:  # type: ignore[no-untyped-def]
    # 600 a minute, enforced as 10 in any second: a first window of 32 at once would see 22
    # refused; a few probes first, then pacing, see none.
    with FakeTeacher(Knobs(rpm=600, rate_window=1.0)) as server:
        engine = make_engine(server, concurrency=32)
        _, stats = engine.complete(chat_requests(30), "t")
        assert server.stats.rate_limited == 0 and stats.retries == 0


def test_configured_rpm_is_respected_before_any_header(make_engine) -> None:  # type: ignore[no-untyped-def]
    with FakeTeacher() as server:
        engine = make_engine(server, concurrency=8, rpm=600)
        started = time.monotonic()
        engine.complete(chat_requests(11), "t")
        assert time.monotonic() - started > 10 * 0.1 * 0.9


@pytest.mark.parametrize(
    ("status", "hint"), [(401, "OPENAI_API_KEY"), (404, "--teacher-model"), (403, "key")]
)
def test_client_errors_fail_fast_with_the_fix_and_no_retry(
    make_engine, status: int, hint: str
) -> None:  # type: ignore[no-untyped-def]
    with FakeTeacher(Knobs(status=status)) as server:
        engine = make_engine(server, concurrency=2)
        with pytest.raises(TeacherError, match=str(status)) as info:
            engine.complete(chat_requests(10), "t")
        assert hint in str(info.value)
        assert KEY not in str(info.value)  # the key is never echoed
        assert server.stats.received <= 2


def test_persistent_server_errors_give_up_with_a_clear_message(make_engine) -> None:  # type: ignore[no-untyped-def]
    with FakeTeacher(Knobs(fault_rate=1.0, faults=("503",))) as server:
        engine = make_engine(server, concurrency=1, max_attempts=3)
        with pytest.raises(TeacherUnavailable, match="still failed after 3 attempts"):
            engine.complete(chat_requests(1), "t")
        assert server.stats.received == 3


def test_expansion_stops_at_the_round_cap_and_says_how_far_it_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "cache"))
    recipe = load_recipe(str(REPO / "recipes" / "stock-advisor.yaml"))
    # A threshold this low calls nearly everything a near-duplicate of the seeds.
    expansion = recipe.expansion.model_copy(
        update={"near_duplicate_threshold": 0.05, "max_rounds": 2}
    )
    recipe = recipe.model_copy(update={"expansion": expansion})
    with FakeTeacher() as server:
        endpoint = TeacherEndpoint(model="fake-teacher", base_url=server.url)
        try:
            result = run_expansion(recipe, endpoint, seed_inputs(recipe), 50, 1)
        finally:
            close_engines()
    assert result.rounds == 2
    assert len(result.accepted) < 50
    assert result.rejects["near_duplicate"] > 0
    assert result.shortfall is not None
    assert f"with {len(result.accepted)} of 50 new inputs accepted" in result.shortfall
    assert "max_rounds" in result.shortfall
    # The advice points the right way: a higher threshold rejects less and keeps more.
    assert "raise expansion.near_duplicate_threshold" in result.shortfall
    assert "lower expansion.near_duplicate_threshold" not in result.shortfall
    raised = recipe.model_copy(
        update={"expansion": expansion.model_copy(update={"near_duplicate_threshold": 0.9})}
    )
    with FakeTeacher() as server:
        endpoint = TeacherEndpoint(model="fake-teacher", base_url=server.url)
        try:
            kept = run_expansion(raised, endpoint, seed_inputs(raised), 50, 1)
        finally:
            close_engines()
    assert len(kept.accepted) > len(result.accepted)


def test_expansion_rows_carry_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "cache"))
    recipe = load_recipe(str(REPO / "recipes" / "stock-advisor.yaml"))
    seeds = seed_inputs(recipe)
    with FakeTeacher() as server:
        endpoint = TeacherEndpoint(model="fake-teacher", base_url=server.url)
        try:
            result = run_expansion(recipe, endpoint, seeds, 30, 1)
        finally:
            close_engines()
    accepted = result.accepted
    assert len(accepted) == 30 and accepted["id"].is_unique
    assert not set(accepted["id"]) & set(seeds["id"])
    assert all(set(ids) <= set(seeds["id"]) and len(ids) == 3 for ids in accepted["seed_ids"])
    assert accepted["expansion_request_id"].str.len().min() > 0
    assert accepted["max_similarity"].between(0, 0.7, inclusive="left").all()


@pytest.mark.parametrize("status", [400, 500])
def test_auto_structured_output_steps_down_to_json_object(make_engine, status: int) -> None:  # type: ignore[no-untyped-def]
    from distillery.tasks.expand import expansion_schema

    knobs = Knobs(reject_json_schema=True, reject_json_schema_status=status)
    req = ChatRequest(
        messages=(("user", "Can you generate 2 more examples?"),),
        temperature=1.0,
        top_p=1.0,
        max_tokens=256,
        json_schema=expansion_schema(2),
    )
    with FakeTeacher(knobs) as server:
        engine = make_engine(server, concurrency=1)
        (result,), stats = engine.complete([req], "t")
        assert engine.structured_form == "json_object"
        assert '"examples"' in result.content
        assert stats.retries == 0 and server.stats.received == 2


def test_a_bad_round_after_the_first_cycle_is_a_shortfall_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "cache"))
    recipe = load_recipe(str(REPO / "recipes" / "stock-advisor.yaml"))
    expansion = recipe.expansion.model_copy(update={"max_rounds": 2})
    recipe = recipe.model_copy(update={"expansion": expansion})
    with FakeTeacher(Knobs(reply="prose")) as server:
        endpoint = TeacherEndpoint(model="fake-teacher", base_url=server.url)
        try:
            with pytest.raises(TeacherError, match="no parseable examples"):
                run_expansion(recipe, endpoint, seed_inputs(recipe), 5, cycle=1)
            result = run_expansion(recipe, endpoint, seed_inputs(recipe), 5, cycle=2)
        finally:
            close_engines()
    assert result.accepted.empty
    assert result.rejects["unparseable_reply"] == result.requests == 4
    assert result.shortfall is not None and "round cap (2)" in result.shortfall


def test_a_call_of_higher_priority_takes_the_next_free_slots(make_engine) -> None:  # type: ignore[no-untyped-def]
    with FakeTeacher(Knobs(latency=0.1)) as server:
        engine = make_engine(server, concurrency=1, adaptive_concurrency=False)
        low = threading.Thread(target=engine.complete, args=(chat_requests(20, "low"), "low"))
        low.start()
        while server.stats.received < 1:
            time.sleep(0.005)
        results, _ = engine.complete(chat_requests(3, "high"), "high", priority=-1)
        answered = server.stats.answered
        low.join()
    assert [r.content for r in results] and len(results) == 3
    # First come, first served, the 3 would wait for all 20; by priority they go next (the low
    # call's first request was on the wire already, a second may have got the slot meanwhile).
    assert answered <= 3 + 2, answered


def test_a_stream_yields_answers_in_request_order_and_close_stops_sending(make_engine) -> None:  # type: ignore[no-untyped-def]
    requests = chat_requests(40, "s")
    with FakeTeacher(Knobs(latency=0.05)) as server:
        engine = make_engine(server, concurrency=2, adaptive_concurrency=False)
        stream = engine.stream(requests, "stream")
        taken = []
        for reply in stream:
            taken.append(reply.content)
            if len(taken) == 5:
                break
        stream.close()
        stats = stream.stats
        received = server.stats.received
        assert [f"Buy {i}?" in text for i, text in enumerate(taken)] == [True] * 5
        # The 5 taken, the requests on the wire when it closed (at most 2, and 2 more that had
        # been given a slot as those 5 came in), and none of the other 31 or more.
        assert 5 <= received <= 5 + 2 * 2, received
        assert stats.requests == stats.sent == received
        # The answers that landed are cached: a stream of the same requests starts with them.
        again = engine.stream(requests[:received], "again")
        assert [r.content for r in again] == [
            r.content for r in engine.complete(requests[:received], "c")[0]
        ]
        assert again.stats.cached == received and server.stats.received == received


def test_expansion_hands_over_its_accepted_inputs_in_order_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DISTILLERY_CONCURRENCY", "4")
    recipe = load_recipe(str(REPO / "recipes" / "stock-advisor.yaml"))
    seeds = seed_inputs(recipe)
    handed: list[tuple[int, list[str], int]] = []

    def on_accepted(start: int, rows: list[dict[str, object]]) -> None:
        handed.append((start, [str(r["id"]) for r in rows], server.stats.received))

    with FakeTeacher(Knobs(latency=0.02)) as server:
        endpoint = TeacherEndpoint(model="fake-teacher", base_url=server.url)
        try:
            result = run_expansion(recipe, endpoint, seeds, 60, 1, on_accepted=on_accepted)
        finally:
            close_engines()
    ids = [i for _, rows, _ in handed for i in rows]
    assert ids == list(result.accepted["id"]) and len(ids) == 60
    assert [start for start, _, _ in handed] == [
        sum(len(r) for _, r, _ in handed[:k]) for k in range(len(handed))
    ]
    # Handed over while requests were still being sent, not all at the end.
    assert handed[0][2] < server.stats.received
