"""The judge: its requests and parsers, the fake teacher's judge mode, and the judge stage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from distillery.tasks import judge
from distillery.tasks.judge import (
    JudgeError,
    Scores,
    judge_endpoint,
    pairwise_request,
    parse_pairwise,
    parse_scores,
    score_request,
)
from distillery.tasks.recipe import JudgeSettings, Recipe, Seed, TeacherSettings
from distillery.tasks.teacher import ChatRequest, ChatResult, TeacherEndpoint
from fake_teacher import JUDGE_MARKER, FakeTeacher, Knobs

SETTINGS = JudgeSettings(rubric={"uses_context": "Uses the context.", "safe": "Safe advice."})
CTX = "I'm 41, a teacher with $30,000 in savings."
QUESTION = "Should I move my savings into SCHD for dividend income?"


def _result(content: str, finish: str = "stop") -> ChatResult:
    return ChatResult(content, finish, 10, 10, "judge-x", "req-1")


# --------------------------------------------------------------------------------------------
# Requests (pure)
# --------------------------------------------------------------------------------------------


def test_score_request_asks_for_every_criterion_at_temperature_zero() -> None:
    req = score_request(SETTINGS, CTX, QUESTION, "Buy a broad index fund first.")
    assert req.temperature == 0.0
    assert req.max_tokens == SETTINGS.max_tokens
    assert req.schema_name == judge.SCORE_SCHEMA_NAME
    assert req.json_schema is not None
    scores = req.json_schema["properties"]["scores"]
    assert scores["required"] == ["uses_context", "safe"]
    assert scores["properties"]["safe"]["enum"] == list(range(1, 11))
    assert req.json_schema["required"] == ["scores", "reason"]
    system, user = dict(req.messages)["system"], dict(req.messages)["user"]
    assert JUDGE_MARKER in system and f"v{judge.JUDGE_VERSION}" in system
    assert "- uses_context: Uses the context." in system
    assert CTX in user and QUESTION in user and "<answer>\nBuy a broad index fund first." in user


def test_judge_version_is_part_of_the_cache_key(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = TeacherEndpoint(model="m", base_url="http://127.0.0.1:9/v1")
    before = score_request(SETTINGS, CTX, QUESTION, "An answer.").key(endpoint)
    monkeypatch.setattr(judge, "JUDGE_VERSION", "999")
    assert score_request(SETTINGS, CTX, QUESTION, "An answer.").key(endpoint) != before


def test_pairwise_request_shows_answer_a_first() -> None:
    req = pairwise_request(SETTINGS, CTX, QUESTION, "first answer", "second answer")
    user = dict(req.messages)["user"]
    assert user.index("<answer_a>\nfirst answer") < user.index("<answer_b>\nsecond answer")
    assert req.temperature == 0.0
    assert req.json_schema == judge.PAIRWISE_SCHEMA
    assert req.schema_name == judge.PAIRWISE_SCHEMA_NAME
    swapped = pairwise_request(SETTINGS, CTX, QUESTION, "second answer", "first answer")
    assert swapped.messages != req.messages


def test_fake_teacher_knows_the_judge_marker() -> None:
    assert JUDGE_MARKER == judge.JUDGE_MARKER


# --------------------------------------------------------------------------------------------
# Parsers (pure)
# --------------------------------------------------------------------------------------------


def test_parse_scores_json_form() -> None:
    reply = '{"scores": {"uses_context": 9, "safe": 6}, "reason": "uses the salary\\nwell"}'
    parsed = parse_scores(reply, SETTINGS)
    assert parsed == Scores(scores={"uses_context": 9, "safe": 6}, reason="uses the salary well")
    assert isinstance(parsed, Scores) and parsed.mean == 7.5


def test_parse_scores_tolerates_fences_flat_keys_and_raw_newlines() -> None:
    fenced = '```json\n{"uses_context": 10, "safe": "3", "reason": "one\nline"}\n```'
    assert parse_scores(fenced, SETTINGS) == Scores({"uses_context": 10, "safe": 3}, "one line")
    chatty = 'Here is my verdict: {"scores": {"uses_context": 4, "safe": 5.0}, "reason": "ok"}'
    assert parse_scores(chatty, SETTINGS) == Scores({"uses_context": 4, "safe": 5}, "ok")


def test_parse_scores_text_form() -> None:
    reply = "**uses_context**: 8/10\n- safe: 7\nReason: names the risks"
    expected = Scores({"uses_context": 8, "safe": 7}, "names the risks")
    assert parse_scores(reply, SETTINGS) == expected


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        ("The answer is fine.", "no score for uses_context"),
        ('{"scores": {"uses_context": 8}, "reason": "x"}', "no score for safe"),
        ('{"scores": {"uses_context": 8, "safe": 11}, "reason": "x"}', "outside 1-10"),
        ('{"scores": {"uses_context": 0, "safe": 5}, "reason": "x"}', "outside 1-10"),
        ('{"scores": {"uses_context": 7.5, "safe": 5}, "reason": "x"}', "not an integer"),
        ('{"scores": {"uses_context": true, "safe": 5}, "reason": "x"}', "not an integer"),
        ('{"scores": {"uses_context": "high", "safe": 5}, "reason": "x"}', "not an integer"),
        ("", "no score"),
    ],
)
def test_parse_scores_refuses_what_is_no_verdict(reply: str, says: str) -> None:
    parsed = parse_scores(reply, SETTINGS)
    assert isinstance(parsed, JudgeError)
    assert says in parsed.message


def test_parse_scores_refuses_a_truncated_verdict() -> None:
    reply = _result('{"scores": {"uses_context": 8, "safe": 7}, "reason": "x"}', finish="length")
    parsed = parse_scores(reply, SETTINGS)
    assert isinstance(parsed, JudgeError) and "max_tokens" in parsed.message
    assert parse_scores(_result(reply.content), SETTINGS) == Scores(
        {"uses_context": 8, "safe": 7}, "x"
    )


@pytest.mark.parametrize(
    ("reply", "winner"),
    [
        ('{"winner": "A", "reason": "more concrete"}', "A"),
        ('{"winner": "b", "reason": "x"}', "B"),
        ('{"winner": "tie", "reason": "x"}', "tie"),
        ("Winner: B\nReason: it uses the context", "B"),
        ("**Winner**: Tie", "tie"),
        ('```json\n{"winner": "Answer A", "reason": "x"}\n```', "A"),
    ],
)
def test_parse_pairwise(reply: str, winner: str) -> None:
    assert parse_pairwise(reply) == winner


@pytest.mark.parametrize(
    "reply",
    ["Both are good.", '{"winner": "C", "reason": "x"}', '{"reason": "x"}', '{"winner": 1}'],
)
def test_parse_pairwise_refuses_what_is_no_verdict(reply: str) -> None:
    assert isinstance(parse_pairwise(reply), JudgeError)


# --------------------------------------------------------------------------------------------
# The judge's endpoint
# --------------------------------------------------------------------------------------------


def _recipe(**judge_fields: Any) -> Recipe:
    return Recipe(
        name="r",
        seeds=(Seed(user_context=CTX, question=QUESTION),),
        teacher=TeacherSettings(model="teacher-x"),
        judge=JudgeSettings(**judge_fields),
    )


TEACHER = TeacherEndpoint(
    model="teacher-x", base_url="http://127.0.0.1:9/v1", structured_output="json_object"
)


def test_judge_endpoint_defaults_to_the_teacher() -> None:
    assert judge_endpoint(_recipe(), TEACHER) == TEACHER
    other_model = judge_endpoint(_recipe(model="judge-x"), TEACHER)
    assert other_model == TEACHER.model_copy(update={"model": "judge-x"})


def test_judge_endpoint_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    own = judge_endpoint(_recipe(base_url="http://127.0.0.1:8/v1", model="judge-x"), TEACHER)
    assert (own.model, own.base_url, own.structured_output) == (
        "judge-x",
        "http://127.0.0.1:8/v1",
        "auto",
    )
    assert own.identity != TEACHER.identity
    embedded = TeacherEndpoint(model="smol", base_url=None, embedded=True)
    assert judge_endpoint(_recipe(), embedded) == embedded
    assert judge_endpoint(_recipe(base_url="embedded"), embedded) == embedded
    assert judge_endpoint(_recipe(base_url="embedded"), TEACHER).embedded


def test_judge_endpoint_refuses_a_model_for_the_embedded_judge() -> None:
    embedded = TeacherEndpoint(model="smol", base_url=None, embedded=True)
    with pytest.raises(ValueError, match=r"remove judge\.model"):
        judge_endpoint(_recipe(model="gpt-4o"), embedded)


# --------------------------------------------------------------------------------------------
# The fake teacher's judge mode (through the real SDK)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[FakeTeacher]:
    with FakeTeacher() as server:
        yield server


def _send(srv: FakeTeacher, req: ChatRequest, form: str) -> ChatResult:
    """The request as the engine sends it in `form` (tasks/teacher/engine.py TeacherEngine.wire)."""
    kwargs: dict[str, Any] = {}
    if form == "json_schema":
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": req.schema_name, "schema": req.json_schema, "strict": True},
        }
    elif form == "json_object":
        kwargs["response_format"] = {"type": "json_object", "schema": req.json_schema}
    with openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=10) as client:
        reply = client.chat.completions.create(
            model="judge-x",
            messages=[{"role": r, "content": c} for r, c in req.messages],  # type: ignore[misc]
            temperature=req.temperature,
            max_tokens=req.max_tokens,
            **kwargs,
        )
    choice = reply.choices[0]
    return _result(choice.message.content or "", choice.finish_reason)


@pytest.mark.parametrize("form", ["json_schema", "json_object", "text"])
def test_fake_judge_scores_by_rule_in_every_form(srv: FakeTeacher, form: str) -> None:
    srv.knobs = Knobs(judge_score=9, judge_low_marker="BADANSWER", judge_low_score=2)
    good = _send(srv, score_request(SETTINGS, CTX, QUESTION, "A fine answer."), form)
    if form != "text":
        assert json.loads(good.content)["scores"] == {"uses_context": 9, "safe": 9}
    assert parse_scores(good, SETTINGS) == Scores({"uses_context": 9, "safe": 9}, "a fair answer")
    bad = _send(srv, score_request(SETTINGS, CTX, QUESTION, "BADANSWER, buy now"), form)
    parsed = parse_scores(bad, SETTINGS)
    assert isinstance(parsed, Scores) and parsed.mean == 2
    # Only the answer counts: the marker in the question is not a marked answer.
    asked = _send(srv, score_request(SETTINGS, CTX, "BADANSWER?", "A fine answer."), form)
    assert parse_scores(asked, SETTINGS) == parse_scores(good, SETTINGS)
    assert srv.stats.judged["score"] == 3


def test_fake_judge_garbage_verdict(srv: FakeTeacher) -> None:
    srv.knobs = Knobs(judge_garbage_marker="NOVERDICT")
    for form in ("json_schema", "text"):
        reply = _send(srv, score_request(SETTINGS, CTX, QUESTION, "NOVERDICT here"), form)
        assert isinstance(parse_scores(reply, SETTINGS), JudgeError)
        pair = pairwise_request(SETTINGS, CTX, QUESTION, "NOVERDICT", "other")
        assert isinstance(parse_pairwise(_send(srv, pair, form)), JudgeError)


@pytest.mark.parametrize(
    ("rule", "long_first", "long_second"),
    [
        ("longer", "A", "B"),
        ("first", "A", "A"),
        ("longer_if_first", "A", "tie"),
        ("tie", "tie", "tie"),
    ],
)
def test_fake_judge_pairwise_rules(
    srv: FakeTeacher, rule: str, long_first: str, long_second: str
) -> None:
    srv.knobs = Knobs(judge_pairwise=rule)
    long, short = "A long and careful answer that uses the context.", "Buy."
    for form in ("json_schema", "text"):
        first = _send(srv, pairwise_request(SETTINGS, CTX, QUESTION, long, short), form)
        second = _send(srv, pairwise_request(SETTINGS, CTX, QUESTION, short, long), form)
        assert (parse_pairwise(first), parse_pairwise(second)) == (long_first, long_second)
    assert srv.stats.judged["pairwise"] == 4


def test_fake_teacher_answers_other_requests_as_before(srv: FakeTeacher) -> None:
    plain = ChatRequest(
        messages=(("system", "You are an expert."), ("user", f"# QUESTION\n{QUESTION}")),
        temperature=0.7,
        top_p=1.0,
        max_tokens=256,
    )
    reply = _send(srv, plain, "text")
    assert "SCHD" in reply.content and isinstance(parse_scores(reply, SETTINGS), JudgeError)
    assert srv.stats.judged == {}


def test_rubric_refuses_a_criterion_named_reason() -> None:
    with pytest.raises(ValueError, match="reasoning"):
        JudgeSettings(rubric={"reason": "Well reasoned."})
