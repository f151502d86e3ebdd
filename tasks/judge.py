"""LLM-as-judge: the judge's endpoint, its requests (rubric scores, pairwise verdicts) and their
parsers; pure, shared by the judge stage and the transfer report."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Literal

import pandas as pd
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from distillery.tasks.answer import ANSWER_VERSION, AnswerResult, answer_inputs, run_answers
from distillery.tasks.recipe import JudgeSettings, Recipe
from distillery.tasks.record import JUDGE_COLUMNS
from distillery.tasks.teacher import (
    CallStats,
    ChatRequest,
    ChatResult,
    TeacherEndpoint,
    TeacherError,
    api_key_for,
    get_engine,
    retry_worthwhile,
)

# Bump when a judge prompt, schema or parser changes: the version is part of every judge
# request's text, so the request cache (and Prefect's cache of the stage) turns over.
JUDGE_VERSION = "2"  # 2: no example scores in the prompt; a copied reason format is no verdict

# In the system prompt of every judge request: how a judge request is told apart (the fake
# teacher in tests/fake_teacher.py looks for it).
JUDGE_MARKER = "distillery-judge"
SCORE_SCHEMA_NAME = "judge_scores"
PAIRWISE_SCHEMA_NAME = "judge_pairwise"

SCORE_MIN, SCORE_MAX = 1, 10

Winner = Literal["A", "B", "tie"]

_REASON_CHARS = 300
# What the score prompt tells the judge to put in "reason": a reply whose reason is this text
# (with or without the angle brackets) copied the reply format instead of judging. Measured on
# the embedded SmolLM2-135M: 30 of 30 demo rows came back with the format's text as the reason.
_REASON_FORMAT = "one line: the main strength or flaw"


@dataclass(frozen=True)
class Scores:
    """The judge's verdict on one answer: 1-10 per rubric criterion, and its one-line reason."""

    scores: dict[str, int]
    reason: str

    @property
    def mean(self) -> float:
        return round(fmean(self.scores.values()), 4)


@dataclass(frozen=True)
class JudgeError:
    """A judge reply that says nothing usable (reason `judge_error`): never a 0, never a pass."""

    message: str


def judge_endpoint(recipe: Recipe, teacher: TeacherEndpoint) -> TeacherEndpoint:
    """Who judges: the teacher's endpoint unless `judge.base_url` / `judge.model` say otherwise;
    an OpenAI-compatible endpoint is checked for a key, as the teacher's is."""
    cfg = recipe.judge
    if cfg.base_url == "embedded" or (cfg.base_url is None and teacher.embedded):
        if cfg.model is not None:
            raise TeacherError(
                f"judge.model {cfg.model!r}: the embedded judge serves the embedded teacher's "
                "GGUF file, under its own name; remove judge.model, or set judge.base_url to "
                "the endpoint that serves that model."
            )
        if teacher.embedded:
            return teacher
        from distillery.tasks import embedded  # llama.cpp's helpers, only when asked for

        return embedded.endpoint()
    if cfg.base_url is None:
        if cfg.model is None or cfg.model == teacher.model:
            return teacher
        return teacher.model_copy(update={"model": cfg.model})
    endpoint = TeacherEndpoint(
        model=cfg.model or teacher.model,
        base_url=cfg.base_url,
        # Another server: its structured output is learned (json_schema, stepping down on a 4xx).
        structured_output="auto",
        price=teacher.price if cfg.base_url == teacher.base_url else None,
    )
    api_key_for(endpoint)
    return endpoint


def score_schema(settings: JudgeSettings) -> dict[str, Any]:
    """JSON schema of a score reply: an integer 1-10 per criterion, and a one-line reason."""
    # An enum, not minimum/maximum: OpenAI's strict mode and llama.cpp's grammars both take it.
    score = {"type": "integer", "enum": list(range(SCORE_MIN, SCORE_MAX + 1))}
    return {
        "type": "object",
        "properties": {
            "scores": {
                "type": "object",
                "properties": {name: score for name in settings.rubric},
                "required": list(settings.rubric),
                "additionalProperties": False,
            },
            "reason": {"type": "string"},
        },
        "required": ["scores", "reason"],
        "additionalProperties": False,
    }


PAIRWISE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["A", "B", "tie"]},
        "reason": {"type": "string"},
    },
    "required": ["winner", "reason"],
    "additionalProperties": False,
}


def _system(task: str) -> str:
    return (
        "You are an impartial expert judge of answers given to users of a financial advisor. "
        f"{task} Judge only what the answer says; do not reward length or style for their "
        f"own sake. [{JUDGE_MARKER} v{JUDGE_VERSION}]"
    )


def _case(user_context: str, question: str) -> str:
    return (
        f"<user_context>\n{user_context.strip()}\n</user_context>\n\n"
        f"<question>\n{question.strip()}\n</question>"
    )


def score_request(
    settings: JudgeSettings, user_context: str, question: str, answer: str
) -> ChatRequest:
    """The judge's scores of one answer, on the rubric (pure)."""
    rubric = "\n".join(f"- {name}: {text}" for name, text in settings.rubric.items())
    # Placeholders, not example numbers: a score shown in the prompt anchors the judge's own.
    form = ", ".join(f'"{name}": <{SCORE_MIN}-{SCORE_MAX}>' for name in settings.rubric)
    system = _system(
        f"Score the answer from {SCORE_MIN} (worst) to {SCORE_MAX} (best) on each criterion; "
        f"a {SCORE_MAX} means:\n{rubric}\n"
        'Reply with only a JSON object: {"scores": {'
        + form
        + '}, "reason": "<'
        + _REASON_FORMAT
        + '>"}.'
    )
    user = f"{_case(user_context, question)}\n\n<answer>\n{answer.strip()}\n</answer>"
    return ChatRequest(
        messages=(("system", system), ("user", user)),
        temperature=0.0,  # deterministic, so a verdict is worth caching
        top_p=1.0,
        max_tokens=settings.max_tokens,
        json_schema=score_schema(settings),
        schema_name=SCORE_SCHEMA_NAME,
    )


def pairwise_request(
    settings: JudgeSettings, user_context: str, question: str, answer_a: str, answer_b: str
) -> ChatRequest:
    """Which of two answers is better; answer A is shown first (pure)."""
    rubric = "\n".join(f"- {text}" for text in settings.rubric.values())
    system = _system(
        "Compare two answers to the same question and say which is better on these criteria:\n"
        f"{rubric}\n"
        "The order in which the answers are shown must not matter. Reply with only a JSON "
        'object: {"winner": "A" or "B" or "tie", "reason": "one line"}.'
    )
    user = (
        f"{_case(user_context, question)}\n\n"
        f"<answer_a>\n{answer_a.strip()}\n</answer_a>\n\n"
        f"<answer_b>\n{answer_b.strip()}\n</answer_b>"
    )
    return ChatRequest(
        messages=(("system", system), ("user", user)),
        temperature=0.0,
        top_p=1.0,
        max_tokens=settings.max_tokens,
        json_schema=PAIRWISE_SCHEMA,
        schema_name=PAIRWISE_SCHEMA_NAME,
    )


def _content(reply: str | ChatResult) -> str | JudgeError:
    if isinstance(reply, str):
        return reply
    if reply.finish_reason == "length":
        return JudgeError(f"the verdict stopped at the max_tokens cap ({reply.completion_tokens})")
    if reply.refusal:
        return JudgeError(f"the judge refused: {reply.refusal[:200]}")
    return reply.content


def _json_object(text: str) -> dict[str, Any] | None:
    """The reply's JSON object: the whole reply, a fenced block, or its outermost {...}."""
    stripped = re.sub(r"^```\w*\s*|\s*```$", "", text.strip())
    candidates = [stripped]
    start, end = stripped.find("{"), stripped.rfind("}")
    if 0 <= start < end:
        candidates.append(stripped[start : end + 1])
    for candidate in candidates:
        try:
            # strict=False: llama.cpp's grammar can let a raw newline into a string.
            data = json.loads(candidate, strict=False)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _REASON_CHARS else line[: _REASON_CHARS - 3] + "..."


def _excerpt(text: str) -> str:
    return repr(_one_line(text)[:120])


def _score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _text_fields(text: str) -> dict[str, str]:
    """`name: value` lines of a reply in text form (markdown bold and bullets ignored)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^[\s*\-#`]*([A-Za-z][\w ]*?)[*`]*\s*[:=]\s*(.+?)\s*$", line)
        if m:
            found.setdefault(m.group(1).strip().lower().replace(" ", "_"), m.group(2))
    return found


def parse_scores(reply: str | ChatResult, settings: JudgeSettings) -> Scores | JudgeError:
    """The scores in a judge reply (JSON, else `criterion: n` lines); a reply without a valid
    1-10 score for every criterion is a JudgeError (pure)."""
    text = _content(reply)
    if isinstance(text, JudgeError):
        return text
    data = _json_object(text)
    raw: dict[str, Any]
    reason: Any
    if data is not None:
        nested = data.get("scores")
        found = nested if isinstance(nested, dict) else data
        # "Uses Context" or "USES_CONTEXT" name the criterion uses_context too.
        raw = {str(k).strip().lower().replace(" ", "_"): v for k, v in found.items()}
        reason = data.get("reason", "")
    else:
        fields = _text_fields(text)
        raw = {k: re.sub(r"(?:/\s*10|out of 10)\s*$", "", v).strip() for k, v in fields.items()}
        reason = fields.get("reason", "")
    scores: dict[str, int] = {}
    for name in settings.rubric:
        if name not in raw:
            return JudgeError(f"no score for {name} in the verdict {_excerpt(text)}")
        value = _score(raw[name])
        if value is None:
            return JudgeError(f"{name} score {raw[name]!r} is not an integer")
        if not SCORE_MIN <= value <= SCORE_MAX:
            return JudgeError(f"{name} score {value} is outside {SCORE_MIN}-{SCORE_MAX}")
        scores[name] = value
    reason = _one_line(reason) if isinstance(reason, str) else ""
    if reason.strip("<>\"' .").casefold() in (_REASON_FORMAT, _REASON_FORMAT.split(": ")[1]):
        return JudgeError(
            f"the verdict's reason is the reply format's own text ({reason!r}): the judge copied "
            "the format instead of judging; use a stronger judge (judge.base_url, judge.model)"
        )
    return Scores(scores=scores, reason=reason)


_WINNERS: dict[str, Winner] = {
    "a": "A",
    "answer_a": "A",
    "answer a": "A",
    "b": "B",
    "answer_b": "B",
    "answer b": "B",
    "tie": "tie",
    "draw": "tie",
    "equal": "tie",
}


def parse_pairwise(reply: str | ChatResult) -> Winner | JudgeError:
    """The winner in a pairwise reply (JSON, else a `winner: A` line): "A", "B" or "tie";
    anything else is a JudgeError (pure)."""
    text = _content(reply)
    if isinstance(text, JudgeError):
        return text
    data = _json_object(text)
    raw = data.get("winner") if data is not None else _text_fields(text).get("winner")
    if not isinstance(raw, str):
        return JudgeError(f"no winner in the verdict {_excerpt(text)}")
    winner = _WINNERS.get(raw.strip().strip("\"'*.").lower())
    if winner is None:
        return JudgeError(f"winner {raw!r} is none of A, B, tie")
    return winner


# --------------------------------------------------------------------------------------------
# The judge stage: each accepted answer scored, through the engine (cache, limits, cost, batches)
# --------------------------------------------------------------------------------------------


@dataclass
class JudgeOutcome:
    """What judging a batch of answered rows did: the rows with JUDGE_COLUMNS (and the verdict
    of the rows it rejected), what its requests cost, and its rejects by reason."""

    rows: pd.DataFrame
    stats: CallStats = field(default_factory=CallStats)
    rejects: Counter[str] = field(default_factory=Counter)


def run_judge(
    settings: JudgeSettings, endpoint: TeacherEndpoint, rows: pd.DataFrame, label: str
) -> JudgeOutcome:
    """Score every accepted row of an answered batch; reject those under min_score (low_score)
    and those without a usable verdict (judge_error). Rows already rejected are not judged."""
    out = rows.copy()
    for column in JUDGE_COLUMNS:
        out[column] = None
    todo = out.index[out["status"] == "accepted"]
    if len(todo) == 0:
        return JudgeOutcome(rows=out)
    part = out.loc[todo]
    requests = [
        score_request(settings, c, q, a)
        for c, q, a in zip(part["user_context"], part["question"], part["answer"], strict=True)
    ]
    replies, stats = get_engine(endpoint).complete(requests, f"judge {label}")
    rejects: Counter[str] = Counter()
    scores: list[Any] = []
    means: list[float | None] = []
    reasons: list[str | None] = []
    for index, reply in zip(todo, replies, strict=True):
        verdict = parse_scores(reply, settings)
        if isinstance(verdict, JudgeError):
            rejects["judge_error"] += 1
            out.loc[index, ["status", "reason", "detail"]] = [
                "rejected",
                "judge_error",
                f"the judge's verdict is unusable: {verdict.message}",
            ]
            scores.append(None)
            means.append(None)
            reasons.append(None)
            continue
        scores.append([{"criterion": k, "score": v} for k, v in verdict.scores.items()])
        means.append(verdict.mean)
        reasons.append(verdict.reason)
        if verdict.mean < settings.min_score:
            rejects["low_score"] += 1
            out.loc[index, ["status", "reason", "detail"]] = [
                "rejected",
                "low_score",
                f"mean judge score {verdict.mean:g} under judge.min_score {settings.min_score:g}"
                f": {verdict.reason}",
            ]
    out["judge_scores"] = pd.Series(scores, index=todo, dtype=object).reindex(out.index)
    out["judge_score"] = pd.Series(means, index=todo, dtype="float64").reindex(out.index)
    out["judge_reason"] = pd.Series(reasons, index=todo, dtype=object).reindex(out.index)
    return JudgeOutcome(rows=out, stats=stats, rejects=rejects)


@dataclass
class JudgedAnswers(AnswerResult):
    """An answer batch whose accepted answers were judged: `rows` carry JUDGE_COLUMNS and the
    judge's rejects, `stats` and `rejects` count answers and verdicts together; `judge_stats`
    and `judge_rejects` the judge's part; `run_id`: the flow run that judged them (a result
    Prefect's cache replays is another run's, which sent nothing now)."""

    judge_stats: CallStats = field(default_factory=CallStats)
    judge_rejects: Counter[str] = field(default_factory=Counter)
    run_id: str = ""


def answer_and_judge_batch(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    judge: TeacherEndpoint,
    inputs: pd.DataFrame,
    label: str,
) -> JudgedAnswers:
    """Answer a batch of inputs, then judge the accepted answers."""
    answered = run_answers(recipe, endpoint, inputs, label)
    judged = run_judge(recipe.judge, judge, answered.rows, label)
    stats = CallStats()
    stats.add(answered.stats)
    stats.add(judged.stats)
    return JudgedAnswers(
        rows=judged.rows,
        stats=stats,
        rejects=answered.rejects + judged.rejects,
        judge_stats=judged.stats,
        judge_rejects=judged.rejects,
        run_id=str(flow_run.get_id() or ""),
    )


@task(
    name="answer-and-judge",
    task_run_name="answer-and-judge-{label}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_worthwhile,
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
)
def answer_and_judge(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    judge: TeacherEndpoint,
    inputs: pd.DataFrame,
    label: str,
    version: str = f"{ANSWER_VERSION}/{JUDGE_VERSION}",
) -> JudgedAnswers:
    """Answer a batch of inputs with the teacher and score the answers with the judge."""
    return answer_and_judge_batch(recipe, endpoint, judge, inputs, label)


def judge_summary(batches: list[JudgedAnswers], run_id: str) -> dict[str, Any]:
    """What the judge did for a run's answer batches: its requests (sent now or cached), the
    rows it judged, its rejects by reason."""
    stats, sent, rejects, judged = CallStats(), 0, Counter[str](), 0
    for batch in batches:
        stats.add(batch.judge_stats)
        rejects.update(batch.judge_rejects)
        judged += int(batch.rows["judge_score"].notna().sum())
        if batch.run_id == run_id:  # judged by this run, not replayed from Prefect's cache
            sent += batch.judge_stats.sent - batch.judge_stats.retries
    return {
        "requests": stats.requests,
        "requests_sent": sent,
        "requests_cached": stats.requests - sent,
        "scored": judged,
        "rejected": {"low_score": rejects["low_score"], "judge_error": rejects["judge_error"]},
        "seconds": round(stats.seconds, 2),
    }


def add_judge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """judge_summary()s of parts of one run (a sharded run's parent and shards) as one."""

    def add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {
            k: add(v, b[k]) if isinstance(v, dict) else round(v + b[k], 2) for k, v in a.items()
        }

    total = judge_summary([], "")
    for part in summaries:
        total = add(total, part)
    return total


def submit_answers(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    judge: TeacherEndpoint | None,
    inputs: pd.DataFrame,
    label: str,
) -> PrefectFuture[AnswerResult]:
    """One answer task for `inputs`: answer-and-judge with the judge on (a JudgedAnswers, which
    is an AnswerResult), else answer only."""
    if judge is None:
        return answer_inputs.submit(recipe, endpoint, inputs, label)
    judged = answer_and_judge.submit(recipe, endpoint, judge, inputs, label)
    return judged  # type: ignore[return-value]  # a JudgedAnswers is an AnswerResult


def sent_from_now(
    endpoint: TeacherEndpoint, judge: TeacherEndpoint | None
) -> Callable[[], CallStats]:
    """What this process's teacher engine, and a judge's own engine (judge.base_url), send from
    now on: call the result for the total so far."""
    engines = [get_engine(endpoint)]
    if judge is not None and judge != endpoint:
        engines.append(get_engine(judge))
    before = [dataclasses.replace(e.totals) for e in engines]

    def since() -> CallStats:
        total = CallStats()
        for engine, start in zip(engines, before, strict=True):
            total.add(engine.totals.since(start))
        return total

    return since


def judge_manifest(
    settings: JudgeSettings,
    endpoint: TeacherEndpoint | None,
    published: pd.DataFrame,
    this_run: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest's `judge` entry: who judged on which rubric, the published rows' mean
    scores (overall and per criterion), and what the judge stage did in this run."""
    if not settings.enabled or endpoint is None:
        return {"enabled": False}
    means = published["judge_score"].dropna() if "judge_score" in published else pd.Series()
    per: dict[str, list[int]] = {name: [] for name in settings.rubric}
    if "judge_scores" in published:
        for scores in published["judge_scores"].dropna():
            for item in scores:
                per.setdefault(item["criterion"], []).append(int(item["score"]))
    return {
        "enabled": True,
        "model": endpoint.model,
        "host": endpoint.host,
        "version": JUDGE_VERSION,
        "rubric": dict(settings.rubric),
        "min_score": settings.min_score,
        "mean_score": round(float(means.mean()), 4) if len(means) else None,
        "mean_scores": {k: round(fmean(v), 4) if v else None for k, v in per.items()},
        "scored_rows": len(means),
        **(this_run or judge_summary([], "")),
    }


def judge_line(entry: dict[str, Any]) -> str:
    """The judge's line of the terminal summary (entry: the manifest's `judge`)."""
    mean = entry.get("mean_score")
    rejected = entry.get("rejected", {})
    return (
        f"{entry.get('scored_rows', 0)} published rows scored by {entry.get('model')}, mean "
        f"{'n/a' if mean is None else f'{mean:.2f}'} of 10; {entry.get('requests', 0)} requests "
        f"({entry.get('requests_sent', 0)} sent, {entry.get('requests_cached', 0)} cached); "
        f"rejected: low_score {rejected.get('low_score', 0)} (under "
        f"{entry.get('min_score', 0):g}), judge_error {rejected.get('judge_error', 0)} (no "
        "usable verdict)"
    )
