"""The fake teacher speaks the OpenAI chat API (as the real SDK sees it) and its knobs work."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from fake_teacher import FakeTeacher, Knobs

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "examples": {
            "type": "array",
            "minItems": 4,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"user_context": {"type": "string"}, "question": {"type": "string"}},
                "required": ["user_context", "question"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["examples"],
    "additionalProperties": False,
}

EXPANSION_PROMPT = (
    "I will give you a sample prompt with a user context section and a question. "
    "Can you generate {n} more examples following the same pattern?\n\n"
    "# USER CONTEXT 1\nI'm 35 and work as a nurse.\n\n# QUESTION 1\nShould I buy VTI?"
)
ANSWER_USER = (
    "# USER CONTEXT\nI'm 41, a teacher with $30,000 in savings.\n\n"
    "# QUESTION\nShould I move my savings into SCHD for dividend income?"
)


@pytest.fixture
def srv() -> Iterator[FakeTeacher]:
    with FakeTeacher() as server:
        yield server


_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close each test's clients: a pool left to the garbage collector warns of open sockets."""
    yield
    while _clients:
        _clients.pop().close()


def _client(srv: FakeTeacher) -> openai.OpenAI:
    client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=10)
    _clients.append(client)
    return client


def _structured(client: openai.OpenAI, form: str, tag: str = "") -> Any:
    if form == "json_schema":
        response_format: Any = {
            "type": "json_schema",
            "json_schema": {"name": "examples", "schema": SCHEMA, "strict": True},
        }
    else:
        response_format = {"type": "json_object", "schema": SCHEMA}
    return client.chat.completions.create(
        model="teacher-x",
        messages=[{"role": "user", "content": EXPANSION_PROMPT.format(n=4) + tag}],
        max_tokens=2000,
        response_format=response_format,
    )


def _check_examples(content: str) -> list[dict[str, str]]:
    """Validate the reply against SCHEMA by hand (no jsonschema dependency)."""
    data = json.loads(content)
    assert set(data) == {"examples"}
    examples = data["examples"]
    assert isinstance(examples, list) and len(examples) == 4
    for item in examples:
        assert set(item) == {"user_context", "question"}
        ctx, q = item["user_context"], item["question"]
        assert isinstance(ctx, str) and isinstance(q, str)
        assert 60 <= len(ctx) <= 400 and 20 <= len(q) <= 200
        assert q.endswith("?")
        assert "#" not in ctx + q
    return examples


@pytest.mark.parametrize("form", ["json_schema", "json_object"])
def test_structured_reply_matches_schema(srv: FakeTeacher, form: str) -> None:
    completion = _structured(_client(srv), form)
    assert completion.model == "teacher-x"
    assert completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert completion.usage is not None and completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    examples = _check_examples(choice.message.content or "")
    assert len({e["user_context"] for e in examples}) == 4


def test_same_body_same_content_other_body_other_content(srv: FakeTeacher) -> None:
    client = _client(srv)
    first = _structured(client, "json_schema").choices[0].message.content
    again = _structured(client, "json_schema").choices[0].message.content
    other = _structured(client, "json_schema", tag=" ").choices[0].message.content
    assert first == again
    assert first != other
    stats = srv.stats
    assert stats.received == stats.answered == 3
    assert stats.answered_twice == 1 and stats.resent_after_answer == 1
    assert sorted(stats.answered_by_body.values()) == [1, 2]
    # Another server process (same knobs) gives the same content: runs are repeatable.
    with FakeTeacher() as other_srv:
        assert _structured(_client(other_srv), "json_schema").choices[0].message.content == first


def test_text_form_for_expansion_prompt(srv: FakeTeacher) -> None:
    completion = _client(srv).chat.completions.create(
        model="m", messages=[{"role": "user", "content": EXPANSION_PROMPT.format(n=5)}]
    )
    content = completion.choices[0].message.content or ""
    contexts = re.findall(r"^# USER CONTEXT (\d+)\n(.+)$", content, re.MULTILINE)
    questions = re.findall(r"^# QUESTION (\d+)\n(.+\?)$", content, re.MULTILINE)
    assert [n for n, _ in contexts] == [n for n, _ in questions] == ["1", "2", "3", "4", "5"]
    assert all(60 <= len(ctx) <= 400 for _, ctx in contexts)


def test_answer_request(srv: FakeTeacher) -> None:
    client = _client(srv)
    messages: Any = [
        {"role": "system", "content": "You are an expert for stock markets."},
        {"role": "user", "content": ANSWER_USER},
    ]
    raw = client.chat.completions.with_raw_response.create(model="m", messages=messages)
    assert raw.headers.get("x-request-id")
    completion = raw.parse()
    answer = completion.choices[0].message.content or ""
    assert completion.choices[0].finish_reason == "stop"
    assert 300 <= len(answer) <= 900 and "#" not in answer
    assert "SCHD" in answer
    assert (
        client.chat.completions.create(model="m", messages=messages).choices[0].message.content
        == answer
    )


def test_refusal_and_truncation_rates(srv: FakeTeacher) -> None:
    client = _client(srv)
    srv.knobs.refusal_rate = 1.0
    refused = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": ANSWER_USER}]
    )
    assert refused.choices[0].message.content == "I'm sorry, but I can't help with that request."
    srv.knobs.refusal_rate, srv.knobs.truncate_rate = 0.0, 1.0
    cut = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": ANSWER_USER}]
    )
    assert cut.choices[0].finish_reason == "length"
    assert not (cut.choices[0].message.content or "").endswith(".")


def test_prose_and_malformed_json_replies(srv: FakeTeacher) -> None:
    client = _client(srv)
    srv.knobs.reply = "prose"
    prose = _structured(client, "json_schema").choices[0].message.content or ""
    assert "#" not in prose and "{" not in prose and len(prose) > 100
    srv.knobs.reply = "malformed_json"
    broken = _structured(client, "json_object").choices[0].message.content or ""
    assert broken.startswith('{"examples": [')
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken)


def test_rpm_limit_gives_429_with_retry_after(srv: FakeTeacher) -> None:
    srv.knobs.rpm = 2
    client = _client(srv)
    messages: Any = [{"role": "user", "content": ANSWER_USER}]
    for remaining in ("1", "0"):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=messages)
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == remaining
        assert re.fullmatch(
            r"\d+(ms|s)|\d+m[\d.]+s|[\d.]+s", raw.headers["x-ratelimit-reset-requests"]
        )
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=messages)
    headers = caught.value.response.headers
    assert 0 < float(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
    assert body["type"] == "requests"
    stats = srv.stats
    assert stats.received == 3 and stats.answered == 2 and stats.rate_limited == 1


def test_tpm_limit_gives_429(srv: FakeTeacher) -> None:
    srv.knobs.tpm = 1500
    client = _client(srv)
    messages: Any = [{"role": "user", "content": ANSWER_USER}]
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=messages, max_tokens=1000
    )
    assert raw.headers["x-ratelimit-limit-tokens"] == "1500"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 500
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=messages, max_tokens=1000)
    assert float(caught.value.response.headers["retry-after"]) > 0
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "tokens"


def test_status_override_401(srv: FakeTeacher) -> None:
    srv.knobs.status = 401
    with pytest.raises(openai.AuthenticationError) as caught:
        _structured(_client(srv), "json_schema")
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "invalid_api_key"
    assert srv.stats.received == 1 and srv.stats.answered == 0


def test_reject_json_schema(srv: FakeTeacher) -> None:
    srv.knobs.reject_json_schema = True
    client = _client(srv)
    with pytest.raises(openai.BadRequestError, match="json_schema is not supported"):
        _structured(client, "json_schema")
    _check_examples(_structured(client, "json_object").choices[0].message.content or "")


def test_drop_fault_is_a_connection_error(srv: FakeTeacher) -> None:
    srv.knobs.fault_rate, srv.knobs.faults = 1.0, ("drop",)
    with pytest.raises(openai.APIConnectionError):
        _structured(_client(srv), "json_schema")
    assert srv.stats.faults["drop"] == 1 and srv.stats.answered == 0


def test_faults_are_deterministic_and_retries_can_succeed(srv: FakeTeacher) -> None:
    srv.knobs.fault_rate, srv.knobs.faults = 0.5, ("500", "503")
    client = _client(srv)

    def outcomes() -> list[str]:
        seen = []
        for i in range(20):
            messages: Any = [{"role": "user", "content": f"{ANSWER_USER} ({i})"}]
            for _ in range(10):  # retry until answered
                try:
                    client.chat.completions.create(model="m", messages=messages)
                except openai.InternalServerError as exc:
                    seen.append(str(exc.status_code))
                else:
                    seen.append("ok")
                    break
        return seen

    first = outcomes()
    assert first.count("ok") == 20  # every request eventually succeeded
    assert {"500", "503"} & set(first)
    stats = srv.stats
    assert stats.answered == 20 and sum(stats.faults.values()) == len(first) - 20
    assert stats.received == len(first)
    srv.reset_stats()
    with FakeTeacher(Knobs(fault_rate=0.5, faults=("500", "503"))) as again:
        client = _client(again)
        assert outcomes() == first
    assert srv.stats.received == 0


def test_slots_cap_concurrency(srv: FakeTeacher) -> None:
    srv.knobs.slots, srv.knobs.latency = 2, 0.15
    client = _client(srv)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"{ANSWER_USER} {i}"}]
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert not errors
    assert srv.stats.max_in_flight == 2
    assert srv.stats.answered == 8
    assert elapsed >= 4 * 0.15 * 0.9  # 8 requests through 2 slots: at least 4 rounds


def test_models_endpoint(srv: FakeTeacher) -> None:
    models = _client(srv).models.list()
    assert [m.id for m in models.data] == ["fake-teacher"]
    assert httpx.get(srv.url + "/models").status_code == 200


def test_rate_window_enforces_the_per_minute_limit_pro_rata(srv: FakeTeacher) -> None:
    srv.knobs.rpm, srv.knobs.rate_window = 120, 1.0  # 120 a minute = 2 in any second
    client = _client(srv)
    messages: Any = [{"role": "user", "content": ANSWER_USER}]
    for remaining in ("1", "0"):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=messages)
        assert raw.headers["x-ratelimit-limit-requests"] == "120"
        assert raw.headers["x-ratelimit-remaining-requests"] == remaining
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=messages)
    assert 0 < float(caught.value.response.headers["retry-after"]) <= 1.0
    time.sleep(1.05)
    client.chat.completions.create(model="m", messages=messages)  # the window moved on
    assert srv.stats.rate_limited == 1 and srv.stats.answered == 3


def test_stats_endpoint_reports_the_counters(srv: FakeTeacher) -> None:
    client = _client(srv)
    for _ in range(2):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    stats = httpx.get(srv.url.removesuffix("/v1") + "/_stats").json()
    assert stats["received"] == 2 and stats["answered"] == 2
    assert stats["distinct_bodies"] == 1 and stats["resent_after_answer"] == 1
