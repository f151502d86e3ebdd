"""The judge: its requests and parsers, the fake teacher's judge mode, and the judge stage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pandas as pd
import pytest
import yaml

from distillery.flows.distill import distill
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
from distillery.tasks.teacher import ChatRequest, ChatResult, TeacherEndpoint, TeacherError
from distillery.tasks.validate import ValidationFailed
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
    # The reply's form has placeholders, never example scores that would anchor the judge's.
    assert '{"scores": {"uses_context": <1-10>, "safe": <1-10>}, "reason": "<one line:' in system
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
    chatty = 'Here is my verdict: {"scores": {"Uses Context": 4, "SAFE": 5.0}, "reason": "ok"}'
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
        # What the embedded SmolLM2-135M replied for every demo row: the format, copied.
        (
            '{"scores": {"uses_context": 7, "safe": 7}, "reason": "one line: The main strength '
            'or flaw"}',
            "the judge copied the format instead of judging",
        ),
        (
            '{"scores": {"uses_context": 7, "safe": 7}, "reason": "<the main strength or flaw>"}',
            "the judge copied the format",
        ),
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
    with pytest.raises(TeacherError, match=r"remove judge\.model"):
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


# --------------------------------------------------------------------------------------------
# The judge stage in the distill flow, against the fake teacher
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "stock-advisor.yaml"
# A word of about one in fifteen of the fake teacher's questions, which its answers echo.
MARKED = "switching"
FIRST_SEED_QUESTION = "Should I start buying individual stocks like Apple"


def judged_recipe(tmp_path: Path, **judge_fields: Any) -> str:
    """The shipped recipe with the judge on (and room for its rejects), plus `judge_fields`."""
    data = yaml.safe_load(RECIPE.read_text())
    data["seeds_file"] = str(REPO / "recipes" / data["seeds_file"])
    data["judge"] = {"enabled": True, "min_score": 5, "max_low_share": 0.5, **judge_fields}
    data["validation"] = {**data.get("validation", {}), "max_rejected_share": 0.5}
    path = tmp_path / "judged.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run_flow(teacher: FakeTeacher, out: Path, recipe: str, examples: int, **options: Any) -> Any:
    return distill(
        recipe=recipe,
        examples=examples,
        output=str(out),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=25,
        train=False,
        **options,
    )


def published(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    base = out / "stock-advisor"
    folder = base / (base / "LATEST").read_text().strip()
    rows = pd.concat(pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation"))
    manifest = json.loads((folder / "manifest.json").read_text())
    return rows, pd.read_parquet(folder / "rejected.parquet"), manifest


def test_judge_rejects_low_scores_with_reason_and_a_rerun_sends_nothing(
    workdir: Path, teacher: FakeTeacher
) -> None:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    teacher.knobs.judge_score = 8
    teacher.knobs.judge_low_marker = MARKED
    recipe = judged_recipe(workdir)
    summary = run_flow(teacher, workdir / "out", recipe, examples=40)
    rows, rejected, manifest = published(workdir / "out")

    assert len(rows) == 40
    assert not rows["answer"].str.contains(MARKED).any()
    assert (rows["judge_score"] == 8).all()
    criteria = list(JudgeSettings().rubric)
    assert all([s["criterion"] for s in scores] == criteria for scores in rows["judge_scores"])
    assert all({s["score"] for s in scores} == {8} for scores in rows["judge_scores"])
    assert (rows["judge_reason"] == "a fair answer").all()

    low = rejected[rejected["reason"] == "low_score"]
    assert len(low) > 0 and set(low["stage"]) == {"answer"}
    assert low["answer"].str.contains(MARKED).all()
    assert (low["judge_score"] == 2).all()
    assert low["detail"].str.contains("under judge.min_score 5: marked as a poor answer").all()

    entry = manifest["judge"]
    answered = manifest["counts"]["answers"]["answered"]
    # One judge request per answer the filters kept, none more.
    assert entry["requests"] == teacher.stats.judged["score"] == entry["scored"] <= answered
    assert entry["rejected"] == {"low_score": len(low), "judge_error": 0}
    assert manifest["counts"]["answers"]["rejected"]["low_score"] == len(low)
    assert entry["requests_sent"] == entry["requests"] and entry["requests_cached"] == 0
    assert entry["mean_score"] == 8 and entry["scored_rows"] == 40
    assert entry["mean_scores"] == dict.fromkeys(criteria, 8)
    assert entry["model"] == "fake-teacher" and entry["version"] == judge.JUDGE_VERSION
    assert summary["judge"] == entry
    assert manifest["tokens"]["requests_sent"] == teacher.stats.answered
    checked = {(r["expectation"], r["column"]) for r in manifest["validation"]["failed"]}
    assert checked == set()
    assert manifest["validation"]["evaluated"] > 20

    # Prefect's task cache gone, from scratch: every answer and verdict comes from the cache.
    before = teacher.stats.received
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: workdir / "other-results"}):
        again = run_flow(teacher, workdir / "out", recipe, examples=40, refresh=False)
    assert teacher.stats.received == before
    assert again["requests_sent"] == 0
    assert again["judge"]["requests_sent"] == 0
    assert again["judge"]["requests_cached"] == entry["requests"]


def test_judge_falls_back_from_json_schema_and_rejects_unparseable_verdicts(
    workdir: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.reject_json_schema = True
    # The first seed's answer echoes its question: its verdict is garbage.
    teacher.knobs.judge_garbage_marker = FIRST_SEED_QUESTION
    summary = run_flow(teacher, workdir / "out", judged_recipe(workdir), examples=30)
    rows, rejected, manifest = published(workdir / "out")
    assert len(rows) == 30 and rows["judge_score"].notna().all()
    errors = rejected[rejected["reason"] == "judge_error"]
    assert len(errors) == 1
    assert errors["question"].iloc[0].startswith(FIRST_SEED_QUESTION)
    assert errors["detail"].iloc[0].startswith("the judge's verdict is unusable: no score for")
    assert errors["judge_score"].isna().all()
    assert summary["judge"]["rejected"] == {"low_score": 0, "judge_error": 1}
    assert manifest["teacher"]["structured_output"] == "json_object"
    # Judge requests went out as json_object once json_schema was refused.
    assert teacher.stats.judged["score"] == manifest["judge"]["requests"]
    assert teacher.stats.received_by_form["json_object"] >= manifest["judge"]["requests"]


def test_validation_fails_when_the_mean_score_is_under_the_recipe_floor(
    workdir: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.judge_score = 6
    recipe = judged_recipe(workdir, min_mean_score=7)
    with pytest.raises(ValidationFailed, match="expect_column_mean_to_be_between"):
        run_flow(teacher, workdir / "out", recipe, examples=30)
    assert not (workdir / "out" / "stock-advisor" / "LATEST").exists()


# --------------------------------------------------------------------------------------------
# The GX suite's checks of the scores, and how the judge's counts are shown
# --------------------------------------------------------------------------------------------


def scored_rows(n: int, score: int) -> pd.DataFrame:
    from test_validate import make_rows

    frame = make_rows(n)
    frame["judge_scores"] = [
        [{"criterion": "uses_context", "score": score}, {"criterion": "safe", "score": 8}]
        for _ in range(n)
    ]
    frame["judge_score"] = (score + 8) / 2
    frame["judge_reason"] = "fine"
    return frame


def judge_on(**fields: Any) -> JudgeSettings:
    return JudgeSettings(enabled=True, rubric={"uses_context": "x", "safe": "y"}, **fields)


def test_suite_checks_the_scores_when_the_judge_is_on(tmp_path: Path) -> None:
    from test_validate import SETTINGS

    from distillery.expectations.runner import run_suite

    settings = judge_on(min_mean_score=7.5, min_score=5, max_low_share=0.1)
    report = run_suite(scored_rows(12, 9), SETTINGS, 10, tmp_path / "a", settings)
    assert report.success, report.to_markdown()
    checked = {(r.expectation, r.column) for r in report.results}
    assert ("expect_column_mean_to_be_between", "judge_score") in checked
    assert ("expect_column_values_to_be_between", "judge_scores_max") in checked
    assert ("expect_column_values_to_not_be_null", "judge_scores") in checked

    frame = scored_rows(12, 9)  # every mean 8.5
    frame.at[2, "judge_scores"] = [
        {"criterion": "uses_context", "score": 0},
        frame.at[2, "judge_scores"][1],
    ]
    frame.at[3, "judge_scores"] = [
        {"criterion": "uses_context", "score": 11},
        frame.at[3, "judge_scores"][1],
    ]
    frame.at[4, "judge_reason"] = None
    frame.loc[5:, "judge_score"] = 6.0  # the mean (5 x 8.5 + 7 x 6) / 12 = 7.04 < 7.5
    report = run_suite(frame, SETTINGS, 8, tmp_path / "b", settings)
    assert {(r.expectation, r.column) for r in report.failed} == {
        ("expect_column_values_to_be_between", "judge_scores_min"),
        ("expect_column_values_to_be_between", "judge_scores_max"),
        ("expect_column_values_to_not_be_null", "judge_reason"),
        ("expect_column_mean_to_be_between", "judge_score"),
    }

    # Two rejected rows of 12 under min_score: 17% of the judged rows, over max_low_share.
    frame = scored_rows(12, 9)
    frame.loc[10:, ["status", "reason", "judge_score"]] = ["rejected", "low_score", 3.0]
    report = run_suite(frame, SETTINGS, 8, tmp_path / "c", settings)
    assert [(r.expectation, r.column, r.observed) for r in report.failed] == [
        ("expect_column_values_to_be_between", "judge_score", "2 unexpected of 12 (16.7%)")
    ]
    report = run_suite(frame, SETTINGS, 8, tmp_path / "d", judge_on(max_low_share=0.2))
    assert report.success, report.to_markdown()


def test_judge_line_and_summary_rows() -> None:
    from distillery.flows.artifacts import judge_rows

    entry = {
        "enabled": True,
        "model": "judge-x",
        "min_score": 5,
        "mean_score": 7.25,
        "scored_rows": 40,
        "requests": 48,
        "requests_sent": 30,
        "requests_cached": 18,
        "rejected": {"low_score": 6, "judge_error": 2},
    }
    line = judge.judge_line(entry)
    assert line.startswith("40 published rows scored by judge-x, mean 7.25 of 10; 48 requests")
    assert "low_score 6 (under 5), judge_error 2" in line
    rows = judge_rows(entry)
    assert "| judge | requests sent / from cache | 30 / 18 |" in rows
    assert "| judge | rejected: judge_error (no usable verdict) | 2 |" in rows
    assert judge_rows({"enabled": False}) == []


def test_refresh_keeps_kept_rows_scores_and_rejudges_when_the_rubric_changes(
    workdir: Path, teacher: FakeTeacher
) -> None:
    recipe = judged_recipe(workdir)
    run_flow(teacher, workdir / "out", recipe, examples=30)
    first, _, _ = published(workdir / "out")
    teacher.knobs.judge_score = 9  # a verdict asked again now would say 9

    judged = teacher.stats.judged["score"]
    summary = run_flow(teacher, workdir / "out", recipe, examples=40)
    rows, _, manifest = published(workdir / "out")
    assert manifest["refresh"]["kept"] == 30 and len(rows) == 40
    kept = rows.set_index("id").loc[first["id"]]
    assert (kept["judge_score"] == 8).all() and (kept["judge_reason"] == "a fair answer").all()
    new = rows[~rows["id"].isin(first["id"])]
    assert len(new) == 10 and (new["judge_score"] == 9).all()
    # Only the new answers were judged.
    assert teacher.stats.judged["score"] - judged == summary["judge"]["requests_sent"] >= 10
    assert manifest["judge"]["mean_score"] == pytest.approx((30 * 8 + 10 * 9) / 40)

    # Another rubric: every kept row is judged again; its answer comes from the request cache.
    rubric = {**JudgeSettings().rubric, "concise": "No padding."}
    other = judged_recipe(workdir, rubric=rubric)
    received, judged = teacher.stats.received, teacher.stats.judged["score"]
    summary = run_flow(teacher, workdir / "out", other, examples=40)
    rows, _, manifest = published(workdir / "out")
    assert manifest["refresh"]["reanswered"] == 40
    assert teacher.stats.judged["score"] - judged == teacher.stats.received - received == 40
    assert summary["judge"]["requests_sent"] == 40
    assert all(len(scores) == 6 for scores in rows["judge_scores"])
    assert (rows["judge_score"] == 9).all()


def test_a_version_from_before_the_judge_reads_as_not_judged(tmp_path: Path) -> None:
    from test_validate import make_rows

    from distillery.tasks.record import JUDGE_COLUMNS, RECORD_COLUMNS
    from distillery.tasks.refresh import read_latest

    folder = tmp_path / "stock-advisor" / "v1"
    folder.mkdir(parents=True)
    rows = make_rows(4)
    old = [c for c in RECORD_COLUMNS if c not in JUDGE_COLUMNS]
    for split in ("train", "validation"):
        rows[old].to_parquet(folder / f"{split}.parquet")
    (folder / "manifest.json").write_text("{}")
    (tmp_path / "stock-advisor" / "LATEST").write_text("v1")
    previous = read_latest(str(tmp_path), "stock-advisor")
    assert previous is not None
    assert list(previous.rows.columns) == RECORD_COLUMNS
    assert previous.rows[JUDGE_COLUMNS].isna().all().all()
    assert previous.rows["judge_scores"].map(lambda s: s is None).all()


def test_judge_requests_go_through_the_batch_api_in_batch_mode(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fake_openai_batches import FakeOpenAIBatches
    from fake_openai_batches import Knobs as BatchKnobs

    for name, value in {
        "OPENAI_API_KEY": "test-key",
        "DISTILLERY_BATCH": "1",
        "DISTILLERY_BATCH_POLL_INTERVAL_S": "0.05",
        "DISTILLERY_BATCH_MAX_POLL_INTERVAL_S": "0.2",
    }.items():
        monkeypatch.setenv(name, value)
    with FakeOpenAIBatches(BatchKnobs(api_key="test-key", batch_seconds=0.3)) as server:
        summary = distill(
            recipe=judged_recipe(workdir),
            examples=10,  # the 10 seeds: answers, then their verdicts, no expansion
            output=str(workdir / "out"),
            teacher_model="gpt-4o-mini",
            teacher_base_url=server.base_url,
            answer_batch_size=5,
            train=False,
        )
        stats = server.stats
    rows, _, manifest = published(workdir / "out")
    assert len(rows) == 10 and (rows["judge_score"] == 8).all()
    assert stats.rows_submitted == stats.rows_answered == 20  # 10 answers + 10 verdicts
    assert summary["judge"]["requests_sent"] == 10
    assert manifest["tokens"]["requests_sent"] == 20
