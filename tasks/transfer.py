"""The transfer report: the judge compares the trained student with the base student and with the
teacher on the held-out evaluation items, each pair in both orders (position swap)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.tasks.answer import student_messages
from distillery.tasks.export import read_text, update_manifest
from distillery.tasks.judge import JudgeError, pairwise_request, parse_pairwise
from distillery.tasks.recipe import AnswerSettings, JudgeSettings, Recipe
from distillery.tasks.teacher import (
    BudgetExceeded,
    CallStats,
    ChatRequest,
    TeacherEndpoint,
    TeacherError,
    TeacherUnavailable,
    get_engine,
)
from distillery.tasks.train import DatasetVersion, eval_items, record_outcome

# Per-item verdicts, beside the evaluation set in the version.
TRANSFER_FILE = "evaluation/transfer.parquet"
# The trained student against whom: the base student (did training help?) and the teacher's
# reference answer (how close is it to the expert?).
COMPARISONS = {"vs_base": "base student", "vs_teacher": "teacher"}
WIN_RATE = (
    "(wins + ties / 2) / pairs judged, from the trained student's side; each pair is judged in "
    "both orders, a pair whose two verdicts disagree counts as a tie, and pairs with a "
    "judge_error are left out of the pairs judged (counted apart)"
)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# Pairs whose answers differ in length by at most this share of the longer one are "of similar
# length": the win rate among them is the length-controlled figure (a judge that favours the
# longer answer cannot lean on length there).
SIMILAR_LENGTH = 0.2
# Under this swap consistency in a comparison, the report warns that the judge's verdicts follow
# the order of the answers more than the answers (MT-Bench's GPT-4 judge: 65% consistent).
MIN_SWAP_CONSISTENCY = 0.5
# Reply cap of a student behind an API (openai backend): the base and the fine-tuned model get
# the same, so that neither wins by length alone.
API_STUDENT_MAX_TOKENS = 512

OUTCOMES = ("win", "tie", "loss", "judge_error")
_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}

TRANSFER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("comparison", pa.string(), nullable=False),  # "vs_base" | "vs_teacher"
        pa.field("question", pa.string(), nullable=False),
        pa.field("trained_answer", pa.string(), nullable=False),
        pa.field("other_answer", pa.string(), nullable=False),
        # The judge's verdict with the trained answer shown first (as A), then second (as B),
        # each from the trained student's side: win | tie | loss | judge_error.
        pa.field("trained_first", pa.string(), nullable=False),
        pa.field("trained_second", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # win | tie | loss | judge_error
        pa.field("consistent", pa.bool_(), nullable=True),  # None: a judge_error
        pa.field("judge_error", pa.string(), nullable=True),  # why a verdict was unusable
        pa.field("trained_chars", pa.int64(), nullable=False),
        pa.field("other_chars", pa.int64(), nullable=False),
        pa.field("request_ids", pa.list_(pa.string()), nullable=False),
    ]
)


# ---- the statistics (pure) ----------------------------------------------------------------------


def win_rate(outcomes: Sequence[str]) -> float | None:
    """(wins + ties / 2) / n over the outcomes that are not judge_error; None when none is."""
    scores = [_SCORE[o] for o in outcomes if o in _SCORE]
    return sum(scores) / len(scores) if scores else None


def bootstrap_interval(
    outcomes: Sequence[str],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the win rate: the pairs resampled with replacement."""
    scores = np.array([_SCORE[o] for o in outcomes if o in _SCORE])
    if not len(scores):
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(scores), size=(resamples, len(scores)))
    rates = scores[draws].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(rates, [tail, 100 - tail])
    return float(low), float(high)


def combine(first: str, second: str) -> tuple[str, bool | None]:
    """One pair's outcome from its two verdicts (trained first, trained second): a judge_error
    in either is a judge_error; two that disagree are a tie. Also: whether they agree."""
    if "judge_error" in (first, second):
        return "judge_error", None
    if first == second:
        return first, True
    return "tie", False


def from_trained_side(verdict: str, trained_is: str) -> str:
    """A verdict ("A" | "B" | "tie") as win / tie / loss of the answer shown as `trained_is`."""
    if verdict == "tie":
        return "tie"
    return "win" if verdict == trained_is else "loss"


def similar_length(trained: int, other: int) -> bool:
    longer = max(trained, other)
    return longer == 0 or abs(trained - other) <= SIMILAR_LENGTH * longer


def first_shown_share(rows: pd.DataFrame) -> float | None:
    """Of the judge's decisive verdicts (not a tie, not a judge_error), the share that went to
    the answer shown first: about 0.5 for a judge without a position bias; None: no decisive
    verdict."""
    first = int((rows["trained_first"] == "win").sum() + (rows["trained_second"] == "loss").sum())
    decisive = int(rows["trained_first"].isin(("win", "loss")).sum())
    decisive += int(rows["trained_second"].isin(("win", "loss")).sum())
    return first / decisive if decisive else None


def caution(comparisons: dict[str, dict[str, Any]]) -> str | None:
    """A warning for a reader of the report when the judge contradicts itself on most pairs
    when the answers swap places: then its verdicts say little about the students."""
    weak = {
        name: f
        for name, f in comparisons.items()
        if f["swap_consistency"] is not None and f["swap_consistency"] < MIN_SWAP_CONSISTENCY
    }
    if not weak:
        return None
    flips = sum(f["swap_inconsistent"] for f in weak.values())
    judged = sum(f["pairs_judged"] for f in weak.values())
    shares = [f["first_shown_wins"] for f in weak.values() if f["first_shown_wins"] is not None]
    bias = ""
    if shares:
        first = sum(shares) / len(shares)
        side = "first" if first >= 0.5 else "second"
        share = _pct(max(first, 1 - first))
        bias = f"; of its decisive verdicts, {share} went to the answer shown {side}"
    return (
        f"the judge gave opposite verdicts on {flips} of {judged} pairs when the two answers "
        f"swapped places{bias}: with a position bias this strong its verdicts say little about "
        "the students (those pairs count as ties). A stronger judge (judge.base_url, "
        "judge.model) gives a report worth reading."
    )


def comparison_report(rows: pd.DataFrame) -> dict[str, Any]:
    """The figures of one comparison from its per-item rows (TRANSFER_SCHEMA columns)."""
    outcomes = list(rows["outcome"])
    judged = [o for o in outcomes if o != "judge_error"]
    interval = bootstrap_interval(outcomes)
    consistent = rows["consistent"].dropna()
    similar = [
        o
        for o, t, c in zip(outcomes, rows["trained_chars"], rows["other_chars"], strict=True)
        if o != "judge_error" and similar_length(int(t), int(c))
    ]
    rate = win_rate(outcomes)
    return {
        "items": len(outcomes),
        "pairs_judged": len(judged),
        "wins": judged.count("win"),
        "ties": judged.count("tie"),
        "losses": judged.count("loss"),
        "judge_errors": outcomes.count("judge_error"),
        "win_rate": _round(rate),
        "interval_95": [_round(interval[0]), _round(interval[1])] if interval else None,
        "swap_consistency": _round(float(consistent.mean())) if len(consistent) else None,
        "swap_inconsistent": int((~consistent.astype(bool)).sum()),
        "first_shown_wins": _round(first_shown_share(rows)),
        "mean_chars": {
            "trained": _round(_mean(rows["trained_chars"])),
            "other": _round(_mean(rows["other_chars"])),
        },
        "similar_length": {
            "max_difference": SIMILAR_LENGTH,
            "pairs": len(similar),
            "win_rate": _round(win_rate(similar)),
        },
    }


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def gate(report: dict[str, Any], minimum: float | None) -> dict[str, Any] | None:
    """The recipe's evaluation.min_win_rate_vs_base against the report; None without a gate. A
    report without a win rate vs base (no callable model, every verdict a judge_error) fails."""
    if minimum is None:
        return None
    rate = (report.get("comparisons", {}).get("vs_base") or {}).get("win_rate")
    passed = rate is not None and rate >= minimum
    if rate is None:
        why = report.get("reason") or "no pair against the base student was judged"
        message = f"no win rate vs the base student ({why}) to hold against the gate {minimum:g}"
    else:
        relation = "at or above" if passed else "below"
        message = (
            f"win rate vs the base student {rate:.2f} is {relation} the gate "
            f"evaluation.min_win_rate_vs_base {minimum:g}"
        )
    return {
        "min_win_rate_vs_base": minimum,
        "win_rate_vs_base": rate,
        "passed": passed,
        "message": message,
    }


# ---- the student's answers ----------------------------------------------------------------------


@dataclass(frozen=True)
class StudentAnswers:
    """The base and the trained student's answers to the evaluation items, by item id."""

    base: dict[str, str]
    trained: dict[str, str]
    base_model: str
    trained_model: str
    stats: CallStats = field(default_factory=CallStats)  # requests behind them (API students)


def student_prompt(
    answer: AnswerSettings, user_context: str, question: str
) -> list[dict[str, str]]:
    """The turns a student is asked an evaluation item with (as it was trained)."""
    return student_messages(answer, user_context, question)


def recorded_answers(outcome: dict[str, Any]) -> StudentAnswers | None:
    """The answers a training run recorded (the local student answers in its subprocess)."""
    recorded = outcome.get("eval_answers")
    if not recorded:
        return None
    return StudentAnswers(
        base=dict(zip(recorded["ids"], recorded["base"], strict=True)),
        trained=dict(zip(recorded["ids"], recorded["trained"], strict=True)),
        base_model=str(recorded.get("base_model")),
        trained_model=str(recorded.get("trained_model")),
    )


def api_student_answers(
    items: pd.DataFrame,
    answer: AnswerSettings,
    base_url: str | None,
    base_model: str,
    trained_model: str,
) -> StudentAnswers:
    """The base and the fine-tuned model answer at the fine-tuning endpoint, through the engine
    (cached: a re-run asks nothing again); temperature 0, the same reply cap for both."""
    requests = [
        ChatRequest(
            messages=tuple(
                (m["role"], m["content"]) for m in student_prompt(answer, str(c), str(q))
            ),
            temperature=0.0,
            top_p=1.0,
            max_tokens=API_STUDENT_MAX_TOKENS,
        )
        for c, q in zip(items["user_context"], items["question"], strict=True)
    ]
    stats = CallStats()
    out: dict[str, dict[str, str]] = {}
    for side, model in (("base", base_model), ("trained", trained_model)):
        endpoint = TeacherEndpoint(model=model, base_url=base_url)
        replies, call = get_engine(endpoint).complete(requests, f"transfer {side} student")
        stats.add(call)
        out[side] = {str(i): r.content.strip() for i, r in zip(items["id"], replies, strict=True)}
    return StudentAnswers(out["base"], out["trained"], base_model, trained_model, stats)


def student_answers(
    outcome: dict[str, Any], items: pd.DataFrame, answer: AnswerSettings
) -> StudentAnswers | str:
    """The students' answers for a training outcome, or why the backend yielded none: the local
    student's recorded ones; an openai job's base and fine-tuned model, asked now; a prefect
    run's child, either way."""
    recorded = recorded_answers(outcome)
    if recorded is not None:
        return recorded
    backend = outcome.get("backend")
    if backend == "prefect":
        child = outcome.get("child") or {}
        if child:
            return student_answers(child, items, answer)
        return (
            "the training deployment recorded no outcome (no answers, no endpoint): the prefect "
            "backend yielded no model this run can call"
        )
    if backend == "openai" and outcome.get("fine_tuned_model") and outcome.get("model"):
        return api_student_answers(
            items,
            answer,
            outcome.get("base_url"),
            str(outcome["model"]),
            str(outcome["fine_tuned_model"]),
        )
    if backend == "openai":
        return "the fine-tuning job produced no fine_tuned_model to call"
    return (
        f"the {backend} training recorded no evaluation answers (was it run without the "
        "recipe's answer settings?)"
    )


# ---- the judge ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One comparison of one item: the trained answer against the other side's."""

    id: str
    comparison: str
    user_context: str
    question: str
    trained: str
    other: str


def pairs(items: pd.DataFrame, answers: StudentAnswers) -> list[Pair]:
    """Every item against the base student's answer, and against the teacher's reference where
    the reference was accepted (a rejected one, truncated or a refusal, is no yardstick)."""
    out: list[Pair] = []
    for item in items.to_dict("records"):
        rid = str(item["id"])
        if rid not in answers.trained or rid not in answers.base:
            continue
        common = (rid, str(item["user_context"]), str(item["question"]))
        trained = answers.trained[rid]
        out.append(Pair(common[0], "vs_base", *common[1:], trained, answers.base[rid]))
        if item.get("status") == "accepted":
            out.append(Pair(common[0], "vs_teacher", *common[1:], trained, str(item["answer"])))
    return out


def pair_requests(settings: JudgeSettings, pair: Pair) -> tuple[ChatRequest, ChatRequest]:
    """The pair in both orders: trained answer as A, then as B."""
    return (
        pairwise_request(settings, pair.user_context, pair.question, pair.trained, pair.other),
        pairwise_request(settings, pair.user_context, pair.question, pair.other, pair.trained),
    )


def _verdict(reply: Any, trained_is: str) -> tuple[str, str | None]:
    parsed = parse_pairwise(reply)
    if isinstance(parsed, JudgeError):
        return "judge_error", parsed.message
    return from_trained_side(parsed, trained_is), None


def judge_pairs(
    settings: JudgeSettings, judge: TeacherEndpoint, todo: list[Pair]
) -> tuple[pd.DataFrame, CallStats]:
    """Ask the judge about every pair in both orders (2 requests a pair: 4 an item); the rows
    of TRANSFER_SCHEMA."""
    requests = [r for pair in todo for r in pair_requests(settings, pair)]
    replies, stats = get_engine(judge).complete(requests, "transfer judge")
    rows: list[dict[str, Any]] = []
    for i, pair in enumerate(todo):
        first_reply, second_reply = replies[2 * i], replies[2 * i + 1]
        first, first_error = _verdict(first_reply, "A")
        second, second_error = _verdict(second_reply, "B")
        outcome, consistent = combine(first, second)
        errors = [e for e in (first_error, second_error) if e]
        rows.append(
            {
                "id": pair.id,
                "comparison": pair.comparison,
                "question": pair.question,
                "trained_answer": pair.trained,
                "other_answer": pair.other,
                "trained_first": first,
                "trained_second": second,
                "outcome": outcome,
                "consistent": consistent,
                "judge_error": "; ".join(errors) if errors else None,
                "trained_chars": len(pair.trained),
                "other_chars": len(pair.other),
                "request_ids": [first_reply.request_id, second_reply.request_id],
            }
        )
    return pd.DataFrame(rows, columns=TRANSFER_SCHEMA.names), stats


def transfer_report(
    frame: pd.DataFrame,
    judge: TeacherEndpoint,
    answers: StudentAnswers,
    judge_stats: CallStats,
    minimum: float | None,
) -> dict[str, Any]:
    """The report: per comparison the figures, then how it was measured and what it cost."""
    report: dict[str, Any] = {
        "available": True,
        "file": TRANSFER_FILE,
        "judge": {"model": judge.model, "host": judge.host},
        "students": {"base": answers.base_model, "trained": answers.trained_model},
        "win_rate": WIN_RATE,
        "bootstrap": {
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": BOOTSTRAP_SEED,
            "interval": "percentile, 95%, items resampled",
        },
        "comparisons": {
            name: comparison_report(frame[frame["comparison"] == name])
            for name in COMPARISONS
            if (frame["comparison"] == name).any()
        },
        "judge_requests": _requests(judge_stats),
        "student_requests": _requests(answers.stats),
    }
    report["caution"] = caution(report["comparisons"])
    report["gate"] = gate(report, minimum)
    return report


def _requests(stats: CallStats) -> dict[str, Any]:
    return {
        "requests": stats.requests,
        "sent": stats.sent,
        "cached": stats.cached,
        "cost_usd": stats.cost_usd,
    }


def unavailable(reason: str, minimum: float | None) -> dict[str, Any]:
    """The report of a run whose training yielded no model to ask."""
    report: dict[str, Any] = {"available": False, "reason": reason, "caution": None}
    report["gate"] = gate(report, minimum)
    return report


def write_verdicts(version_uri: str, frame: pd.DataFrame) -> None:
    """The per-item verdicts as Parquet (TRANSFER_SCHEMA, zstd) in the version's evaluation/."""
    fs, root = fsspec.core.url_to_fs(version_uri)
    path = posixpath.join(root, TRANSFER_FILE)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    frame = frame.astype(object).where(frame.notna(), None)
    table = pa.Table.from_pandas(frame, schema=TRANSFER_SCHEMA, preserve_index=False)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")


def record_report(version_uri: str, report: dict[str, Any], outcome: dict[str, Any]) -> None:
    """The report into the manifest's `evaluation` entry, and `promoted` into the training
    outcome (false when the gate failed) in the manifest and training/outcome.json."""
    manifest = json.loads(read_text(version_uri.rstrip("/") + "/manifest.json") or "{}")
    update_manifest(
        version_uri, "evaluation", {**manifest.get("evaluation", {}), "transfer": report}
    )
    version = DatasetVersion(
        uri=version_uri,
        dataset=str(manifest.get("dataset")),
        version=str(manifest.get("version")),
        manifest=manifest,
    )
    gate_result = report.get("gate")
    outcome["promoted"] = gate_result is None or bool(gate_result["passed"])
    record_outcome(version, outcome)


def judge_students(
    recipe: Recipe,
    judge: TeacherEndpoint,
    version_uri: str,
    outcome: dict[str, Any],
    items: pd.DataFrame,
) -> dict[str, Any]:
    """The students' answers, judged; the verdicts written beside the evaluation set."""
    minimum = recipe.evaluation.min_win_rate_vs_base
    answers = student_answers(outcome, items, recipe.answer)
    if isinstance(answers, str):
        return unavailable(answers, minimum)
    frame, stats = judge_pairs(recipe.judge, judge, pairs(items, answers))
    write_verdicts(version_uri, frame)
    return transfer_report(frame, judge, answers, stats, minimum)


def run_transfer(
    recipe: Recipe,
    judge: TeacherEndpoint,
    version_uri: str,
    outcome: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Answer the evaluation items with both students, judge, write and record the report."""
    minimum = recipe.evaluation.min_win_rate_vs_base
    items = eval_items(version_uri)
    if items is None or not len(items):
        report = unavailable("the version has no evaluation set (evaluation/eval.parquet)", minimum)
    else:
        try:
            report = judge_students(recipe, judge, version_uri, outcome, items)
        except (TeacherError, TeacherUnavailable, BudgetExceeded) as exc:
            # After publishing and training: the report says what failed, the version stays.
            report = unavailable(f"{type(exc).__name__}: {exc}", minimum)
    record_report(version_uri, report, outcome)
    for line in report_lines(report):
        log(line)
    return report


@task(name="transfer-report", task_run_name="transfer-report", cache_policy=NO_CACHE)
def report_transfer(
    recipe: Recipe, judge: TeacherEndpoint, version_uri: str, outcome: dict[str, Any]
) -> dict[str, Any]:
    """Judge the trained student against the base student and the teacher."""
    return run_transfer(recipe, judge, version_uri, outcome, get_run_logger().info)


# ---- how it reads -------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def comparison_line(name: str, figures: dict[str, Any]) -> str:
    """One comparison in one line, for the terminal and the log."""
    interval = figures["interval_95"]
    ci = f" (95% CI {_pct(interval[0])}-{_pct(interval[1])})" if interval else ""
    errors = f", {figures['judge_errors']} judge_error" if figures["judge_errors"] else ""
    chars = figures["mean_chars"]
    similar = figures["similar_length"]
    return (
        f"trained {name.replace('_', ' ')}: win {figures['wins']} / tie {figures['ties']} / "
        f"loss {figures['losses']}{errors} of {figures['items']} items; win rate "
        f"{_pct(figures['win_rate'])}{ci}; swap consistency {_pct(figures['swap_consistency'])}; "
        f"mean chars {chars['trained']:.0f} vs {chars['other']:.0f}; similar length "
        f"{similar['pairs']} pairs, win rate {_pct(similar['win_rate'])}"
    )


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report for a terminal: one line per comparison, the gate's verdict."""
    if not report.get("available"):
        lines = [f"transfer report: none ({report.get('reason')})"]
    else:
        judge = report["judge"]
        sent = report["judge_requests"]
        lines = [
            f"transfer report (judge {judge['model']} at {judge['host']}; "
            f"{sent['requests']} judge requests, {sent['sent']} sent, {sent['cached']} cached):"
        ]
        lines += [
            "  " + comparison_line(name, figures) for name, figures in report["comparisons"].items()
        ]
        if report.get("caution"):
            lines.append(f"  caution: {report['caution']}")
    if report.get("gate"):
        verdict = "passed" if report["gate"]["passed"] else "FAILED"
        lines.append(f"gate {verdict}: {report['gate']['message']}")
    return lines


def _bar(figures: dict[str, Any], width: int = 30) -> str:
    judged = figures["pairs_judged"]
    if not judged:
        return ""
    cells = [round(width * figures[k] / judged) for k in ("wins", "ties")]
    cells.append(max(0, width - sum(cells)))
    return "`" + "█" * cells[0] + "▒" * cells[1] + "░" * cells[2] + "`"


def report_markdown(report: dict[str, Any], title: str) -> str:
    """The transfer-report artifact: a table, bars of win / tie / loss, how it was measured."""
    lines = [f"# Transfer report: {title}", ""]
    if not report.get("available"):
        lines.append(f"No transfer report: {report.get('reason')}.")
    else:
        judge = report["judge"]
        lines += [
            f"Judge `{judge['model']}` at `{judge['host']}`; trained student "
            f"`{report['students']['trained']}`, base `{report['students']['base']}`.",
            "",
            "| trained student vs | items | win | tie | loss | judge_error | win rate | 95% CI "
            "| swap consistency | mean chars (trained / other) | similar length: pairs, win rate |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, f in report["comparisons"].items():
            ci = f["interval_95"]
            chars = f["mean_chars"]
            similar = f["similar_length"]
            lines.append(
                f"| {COMPARISONS[name]} | {f['items']} | {f['wins']} | {f['ties']} | "
                f"{f['losses']} | {f['judge_errors']} | {_pct(f['win_rate'])} | "
                f"{f'{_pct(ci[0])}-{_pct(ci[1])}' if ci else 'n/a'} | "
                f"{_pct(f['swap_consistency'])} | {chars['trained']:.0f} / {chars['other']:.0f} "
                f"| {similar['pairs']}, {_pct(similar['win_rate'])} |"
            )
        lines += ["", "Win (█), tie (▒), loss (░) of the trained student:", ""]
        for name, f in report["comparisons"].items():
            lines.append(f"- vs {COMPARISONS[name]}: {_bar(f)}")
        sent = report["judge_requests"]
        lines += [
            "",
            f"Win rate: {report['win_rate']}. Interval: {report['bootstrap']['interval']}, "
            f"{report['bootstrap']['resamples']} resamples, seed {report['bootstrap']['seed']}. "
            f"Similar length: answers within {100 * SIMILAR_LENGTH:.0f}% of each other's "
            "length. Judge requests: "
            f"{sent['requests']} ({sent['sent']} sent, {sent['cached']} from the cache).",
        ]
        if report.get("caution"):
            lines += ["", f"**Caution:** {report['caution']}"]
    if report.get("gate"):
        verdict = "passed" if report["gate"]["passed"] else "**failed**"
        lines += ["", f"Gate {verdict}: {report['gate']['message']}."]
    return "\n".join(lines)
