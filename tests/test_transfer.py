"""The transfer report: its statistics, pairwise judging in both orders against the fake
teacher's judge rules, what a run writes of it, and the gate (one real, tiny training via the
CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from distillery.tasks.evaluation import EVAL_FILE, eval_table
from distillery.tasks.recipe import AnswerSettings, JudgeSettings, Recipe, load_recipe
from distillery.tasks.record import record_id
from distillery.tasks.teacher import TeacherEndpoint, close_engines
from distillery.tasks.transfer import (
    BOOTSTRAP_RESAMPLES,
    TRANSFER_FILE,
    TRANSFER_SCHEMA,
    StudentAnswers,
    bootstrap_interval,
    caution,
    combine,
    comparison_report,
    gate,
    judge_pairs,
    pairs,
    report_lines,
    report_markdown,
    run_transfer,
    student_answers,
    student_prompt,
    transfer_report,
    win_rate,
)
from fake_openai_jobs import FakeOpenAIJobs
from fake_openai_jobs import Knobs as JobKnobs
from fake_teacher import FakeTeacher, Knobs

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "stock-advisor.yaml"
SEEDS: list[dict[str, str]] = yaml.safe_load(
    (REPO / "recipes" / "stock-advisor-seeds.yaml").read_text()
)
EVAL_ITEMS = [
    {
        "user_context": "I am 47, a dentist in Denver with $820,000 across a 401(k) and a "
        "brokerage account, two children in high school and no debt apart from the mortgage.",
        "question": "How much should I set aside for college without slowing my retirement saving?",
    },
    {
        "user_context": "I am 31 and inherited $120,000 of a single utility stock from my "
        "grandmother; it pays a 4% dividend and I have no other investments yet.",
        "question": "Should I keep the inherited utility stock for its dividend or diversify it?",
    },
    {
        "user_context": "I am 52, a lawyer who maxes out every retirement account, with $300,000 "
        "in cash I keep for a down payment on a beach house in two years.",
        "question": "Where can I park cash for two years without risking the down payment?",
    },
    {
        "user_context": "I am 26, a nurse in Ohio with $15,000 in savings, a $9,000 car loan at "
        "7% and a 401(k) match of 4% that I do not take yet.",
        "question": "Should I pay off the car loan before I start taking the 401(k) match?",
    },
]


# ---- the statistics, without a network ---------------------------------------------------------


def test_win_rate_counts_a_tie_as_half_and_leaves_judge_errors_out() -> None:
    assert win_rate(["win", "win", "tie", "loss", "judge_error"]) == pytest.approx(2.5 / 4)
    assert win_rate(["tie", "tie"]) == 0.5
    assert win_rate(["judge_error"]) is None
    assert win_rate([]) is None


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method), by hand."""
    position = q / 100 * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def test_bootstrap_interval_matches_a_computation_by_hand() -> None:
    outcomes = ["win"] * 5 + ["tie"] * 3 + ["loss"] * 4 + ["judge_error"] * 2
    scores = [1.0] * 5 + [0.5] * 3 + [0.0] * 4  # the judge errors are no pair
    # The same draws (numpy's generator, seed 0, items resampled with replacement), each
    # resample's win rate summed in plain Python.
    draws = np.random.default_rng(0).integers(0, len(scores), size=(BOOTSTRAP_RESAMPLES, 12))
    rates = sorted(sum(scores[int(i)] for i in row) / len(row) for row in draws)
    expected = (_percentile(rates, 2.5), _percentile(rates, 97.5))

    low, high = bootstrap_interval(outcomes) or (None, None)

    assert low == pytest.approx(expected[0]) and high == pytest.approx(expected[1])
    rate = win_rate(outcomes)
    assert rate == pytest.approx(6.5 / 12)
    assert low is not None and high is not None and low < rate < high
    assert low > 0.2 and high < 0.85  # 12 pairs: a wide interval, as it should be
    assert bootstrap_interval(["win"] * 6) == (1.0, 1.0)
    assert bootstrap_interval(["judge_error"]) is None


def test_two_verdicts_that_disagree_are_a_tie_and_a_judge_error_is_never_a_tie() -> None:
    assert combine("win", "win") == ("win", True)
    assert combine("loss", "loss") == ("loss", True)
    assert combine("tie", "tie") == ("tie", True)
    assert combine("win", "loss") == ("tie", False)
    assert combine("win", "tie") == ("tie", False)
    assert combine("win", "judge_error") == ("judge_error", None)
    assert combine("judge_error", "tie") == ("judge_error", None)


# Two verdicts (trained shown first, then second) that combine into each (outcome, consistent).
_VERDICTS = {
    ("win", True): ("win", "win"),
    ("loss", True): ("loss", "loss"),
    ("tie", True): ("tie", "tie"),
    ("tie", False): ("win", "loss"),
    ("judge_error", None): ("judge_error", "win"),
}


def _rows(outcomes: list[str], consistent: list[bool | None], lengths: list[tuple[int, int]]):
    verdicts = [_VERDICTS[o, c] for o, c in zip(outcomes, consistent, strict=True)]
    return pd.DataFrame(
        {
            "trained_first": [first for first, _ in verdicts],
            "trained_second": [second for _, second in verdicts],
            "outcome": outcomes,
            "consistent": consistent,
            "trained_chars": [t for t, _ in lengths],
            "other_chars": [o for _, o in lengths],
        }
    )


def test_comparison_report_counts_consistency_lengths_and_the_similar_length_win_rate() -> None:
    rows = _rows(
        ["win", "win", "tie", "loss", "judge_error"],
        [True, True, False, True, None],
        [(500, 100), (100, 95), (300, 300), (200, 230), (10, 10)],
    )
    figures = comparison_report(rows)
    assert figures["items"] == 5 and figures["pairs_judged"] == 4
    assert (figures["wins"], figures["ties"], figures["losses"]) == (2, 1, 1)
    assert figures["judge_errors"] == 1
    assert figures["win_rate"] == pytest.approx(2.5 / 4)
    assert figures["swap_consistency"] == pytest.approx(3 / 4)
    assert figures["swap_inconsistent"] == 1
    # Decisive verdicts: 9 (every one but the tie... none here is a tie); 5 went to the answer
    # shown first (3 trained-first wins, 2 trained-second losses).
    assert figures["first_shown_wins"] == pytest.approx(5 / 9, abs=1e-4)
    assert figures["mean_chars"] == {"trained": 222.0, "other": 147.0}
    # Similar length (within 20% of the longer): 100/95, 300/300, 200/230; not 500/100; the
    # judge_error pair is no pair.
    assert figures["similar_length"]["pairs"] == 3
    assert figures["similar_length"]["win_rate"] == pytest.approx(1.5 / 3)


def test_the_gate_fails_below_the_minimum_and_when_nothing_was_measured() -> None:
    report = {"comparisons": {"vs_base": {"win_rate": 0.55}}}
    assert gate(report, None) is None
    assert gate(report, 0.5)["passed"] is True  # type: ignore[index]
    failed = gate(report, 0.6)
    assert failed is not None and failed["passed"] is False
    assert "0.55 is below the gate evaluation.min_win_rate_vs_base 0.6" in failed["message"]
    nothing = gate({"available": False, "reason": "no model"}, 0.5)
    assert nothing is not None and nothing["passed"] is False and "no model" in nothing["message"]


# ---- judging against the fake teacher's pairwise rules -----------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test its own request cache (no Prefect needed: the engine alone)."""
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path
    close_engines()


def items_frame(n: int = len(EVAL_ITEMS), reference: str = "R" * 900) -> pd.DataFrame:
    """The evaluation set as a version publishes it (EVAL_SCHEMA), every reference accepted."""
    rows = [
        {
            "id": record_id(item["user_context"], item["question"]),
            "user_context": item["user_context"],
            "question": item["question"],
            "answer": f"{reference} {i}",
            "teacher_model": "fake-teacher",
            "answer_request_id": f"req-{i}",
            "finish_reason": "stop",
            "prompt_tokens": 100,
            "completion_tokens": 200,
            "status": "accepted",
            "reason": None,
            "detail": None,
        }
        for i, item in enumerate(EVAL_ITEMS[:n])
    ]
    return pd.DataFrame(rows)


def answers_for(items: pd.DataFrame, base: list[str], trained: list[str]) -> StudentAnswers:
    ids = list(items["id"])
    return StudentAnswers(
        base=dict(zip(ids, base, strict=True)),
        trained=dict(zip(ids, trained, strict=True)),
        base_model="base",
        trained_model="trained",
    )


def judge_of(teacher: FakeTeacher) -> TeacherEndpoint:
    return TeacherEndpoint(model="fake-judge", base_url=teacher.url)


def test_a_judge_that_always_prefers_the_first_answer_yields_ties_in_4_requests_per_item_and_a_rerun_sends_none(  # noqa: E501
    cache: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.judge_pairwise = "first"
    items = items_frame()
    answers = answers_for(items, ["short"] * 4, ["a longer trained answer"] * 4)
    todo = pairs(items, answers)
    assert [p.comparison for p in todo].count("vs_teacher") == len(items)

    frame, stats = judge_pairs(JudgeSettings(), judge_of(teacher), todo)

    # Bench: the pairwise eval costs 4 requests per eval item (2 comparisons x 2 orders).
    assert teacher.stats.judged["pairwise"] == 4 * len(items) == stats.sent
    assert set(frame["trained_first"]) == {"win"} and set(frame["trained_second"]) == {"loss"}
    assert set(frame["outcome"]) == {"tie"} and not frame["consistent"].any()
    report = comparison_report(frame[frame["comparison"] == "vs_base"])
    assert report["win_rate"] == 0.5 and report["interval_95"] == [0.5, 0.5]
    assert report["swap_consistency"] == 0.0 and report["swap_inconsistent"] == len(items)
    assert report["first_shown_wins"] == 1.0  # every verdict went to the answer shown first
    # The reader is warned: these ties are the judge's position bias, not the students' parity.
    full = transfer_report(frame, judge_of(teacher), answers, stats, minimum=None)
    assert full["caution"] is not None
    assert "opposite verdicts on 8 of 8 pairs" in full["caution"]
    assert "100% went to the answer shown first" in full["caution"]
    assert any(line.startswith("  caution: the judge gave") for line in report_lines(full))
    assert "**Caution:** the judge gave" in report_markdown(full, "demo")

    again, stats = judge_pairs(JudgeSettings(), judge_of(teacher), todo)
    assert teacher.stats.judged["pairwise"] == 4 * len(items)  # nothing sent again
    assert stats.sent == 0 and stats.cached == 4 * len(items)
    pd.testing.assert_frame_equal(again, frame)


def test_a_judge_that_prefers_the_longer_answer_in_both_orders_is_consistent(
    cache: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.judge_pairwise = "longer"
    items = items_frame(reference="R" * 900)
    trained = ["T" * 400, "T" * 400, "T" * 400, "T" * 50]
    answers = answers_for(items, ["B" * 100] * 4, trained)

    frame, _ = judge_pairs(JudgeSettings(), judge_of(teacher), pairs(items, answers))

    vs_base = comparison_report(frame[frame["comparison"] == "vs_base"])
    assert (vs_base["wins"], vs_base["ties"], vs_base["losses"]) == (3, 0, 1)
    assert vs_base["win_rate"] == 0.75 and vs_base["swap_consistency"] == 1.0
    assert vs_base["first_shown_wins"] == 0.5  # no position bias
    assert caution({"vs_base": vs_base}) is None
    assert vs_base["mean_chars"] == {"trained": 312.5, "other": 100.0}
    expected = bootstrap_interval(["win", "win", "win", "loss"])
    assert vs_base["interval_95"] == [round(expected[0], 4), round(expected[1], 4)]  # type: ignore[index]
    # Length bias made visible: no pair is of similar length, so no length-controlled figure.
    assert vs_base["similar_length"] == {"max_difference": 0.2, "pairs": 0, "win_rate": None}
    vs_teacher = comparison_report(frame[frame["comparison"] == "vs_teacher"])
    assert vs_teacher["losses"] == 4 and vs_teacher["win_rate"] == 0.0


def test_a_verdict_that_flips_with_the_order_counts_as_a_tie(
    cache: Path, teacher: FakeTeacher
) -> None:
    # The longer answer wins only when shown first; shown second, the judge calls a tie.
    teacher.knobs.judge_pairwise = "longer_if_first"
    items = items_frame(n=3)
    answers = answers_for(items, ["B" * 100, "B" * 100, "B" * 500], ["T" * 300] * 3)

    frame, _ = judge_pairs(JudgeSettings(), judge_of(teacher), pairs(items, answers))

    vs_base = frame[frame["comparison"] == "vs_base"]
    assert list(vs_base["trained_first"]) == ["win", "win", "tie"]
    assert list(vs_base["trained_second"]) == ["tie", "tie", "loss"]
    assert list(vs_base["outcome"]) == ["tie"] * 3
    figures = comparison_report(vs_base)
    assert figures["win_rate"] == 0.5 and figures["swap_consistency"] == 0.0


def test_an_unparseable_verdict_is_a_counted_judge_error_never_a_tie(
    cache: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.judge_pairwise = "longer"
    teacher.knobs.judge_garbage_marker = "GARBLED"
    items = items_frame()
    trained = ["T" * 400, "T" * 400, "T" * 400 + " GARBLED", "T" * 400]
    answers = answers_for(items, ["B" * 100] * 4, trained)

    frame, stats = judge_pairs(JudgeSettings(), judge_of(teacher), pairs(items, answers))
    report = transfer_report(frame, judge_of(teacher), answers, stats, minimum=None)

    errors = frame[frame["outcome"] == "judge_error"]
    assert len(errors) == 2 and set(errors["comparison"]) == {"vs_base", "vs_teacher"}
    assert errors["consistent"].isna().all()
    assert errors["judge_error"].str.contains("no winner in the verdict").all()
    vs_base = report["comparisons"]["vs_base"]
    assert vs_base["judge_errors"] == 1 and vs_base["pairs_judged"] == 3
    assert vs_base["wins"] == 3 and vs_base["win_rate"] == 1.0
    lines = report_lines(report)
    assert any("win 3 / tie 0 / loss 0, 1 judge_error of 4 items" in line for line in lines)
    assert "| base student | 4 | 3 | 0 | 0 | 1 | 100% |" in report_markdown(report, "demo")


# ---- where the students' answers come from -----------------------------------------------------


def test_an_openai_student_and_its_base_answer_at_the_fine_tuning_endpoint(
    cache: Path, teacher: FakeTeacher
) -> None:
    items = items_frame(n=3)
    outcome = {
        "backend": "openai",
        "status": "succeeded",
        "model": "gpt-4o-mini-2024-07-18",
        "fine_tuned_model": "ft:gpt-4o-mini-2024-07-18:demo::abc",
        "base_url": teacher.url,
    }
    answers = student_answers(outcome, items, AnswerSettings())
    assert isinstance(answers, StudentAnswers)
    assert answers.trained_model == outcome["fine_tuned_model"]
    assert set(answers.base) == set(answers.trained) == set(items["id"])
    assert all(len(a) > 80 for a in answers.trained.values())
    assert teacher.stats.answered == 6 and answers.stats.sent == 6
    # Asked as the student was trained (answer.student_user: no markers), ending with the
    # question, which the fake teacher's answers echo.
    for rid, question in zip(items["id"], items["question"], strict=True):
        assert question in answers.base[rid] and question in answers.trained[rid]
    prompt = student_prompt(AnswerSettings(), "I am 30.", "Buy VTI?")
    assert prompt[-1] == {"role": "user", "content": "I am 30.\n\nBuy VTI?"}

    # A prefect run whose child trained through openai: the same models; without a child, none.
    again = student_answers({"backend": "prefect", "child": outcome}, items, AnswerSettings())
    assert isinstance(again, StudentAnswers) and again.stats.cached == 6
    none = student_answers({"backend": "prefect", "child": None}, items, AnswerSettings())
    assert isinstance(none, str) and "yielded no model this run can call" in none


def publish_version(root: Path, items: pd.DataFrame) -> Path:
    """A version folder with what the transfer report reads: manifest and evaluation set."""
    folder = root / "demo" / "v1"
    (folder / "evaluation").mkdir(parents=True)
    pq.write_table(eval_table(items), folder / EVAL_FILE)
    manifest = {"dataset": "demo", "version": "v1", "evaluation": {"enabled": True, "items": 4}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def local_outcome(items: pd.DataFrame, folder: Path) -> dict[str, Any]:
    """A local training's outcome with the students' answers (4 items)."""
    return {
        "backend": "local",
        "status": "succeeded",
        "eval_answers": {
            "ids": list(items["id"]),
            "base": ["B" * 300] * 4,
            "trained": ["T" * 280, "T" * 280, "T" * 100, "T" * 100],
            "base_model": "SmolLM2 (before training)",
            "trained_model": str(folder / "student" / "model"),
        },
    }


def gated_recipe(folder: Path, minimum: float) -> Recipe:
    data = {**yaml.safe_load(RECIPE.read_text()), "seeds": SEEDS}
    data.pop("seeds_file")
    data["evaluation"] = {"eval_seeds": EVAL_ITEMS, "min_win_rate_vs_base": minimum}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(str(path))


def test_run_transfer_writes_the_verdicts_the_manifest_entry_and_withholds_promotion(
    cache: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.judge_pairwise = "longer"
    items = items_frame()
    folder = publish_version(cache, items)
    outcome = local_outcome(items, folder)
    recipe = gated_recipe(cache, 0.5)
    logged: list[str] = []

    report = run_transfer(recipe, judge_of(teacher), str(folder), outcome, logged.append)

    verdicts = pq.read_table(folder / TRANSFER_FILE)
    assert verdicts.schema.equals(TRANSFER_SCHEMA)
    assert verdicts.num_rows == 8
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["evaluation"]["items"] == 4  # the entry is kept, the report added to it
    entry = manifest["evaluation"]["transfer"]
    assert entry == json.loads(json.dumps(report))
    base = entry["comparisons"]["vs_base"]
    # 280 vs 300 chars is "similar length" (within 20%): those two are losses there.
    assert (base["wins"], base["losses"], base["win_rate"]) == (0, 4, 0.0)
    assert base["similar_length"] == {"max_difference": 0.2, "pairs": 2, "win_rate": 0.0}
    assert entry["gate"]["passed"] is False
    assert manifest["training"]["promoted"] is False
    recorded = json.loads((folder / "training" / "outcome.json").read_text())
    assert recorded["promoted"] is False
    assert entry["judge_requests"]["requests"] == 16
    assert any(line.startswith("gate FAILED") for line in logged)


# ---- a whole run with the openai backend: the fine-tuned model asked where it was trained ---


def test_an_openai_training_run_judges_its_fine_tuned_model_against_its_base(
    workdir: Path, teacher: FakeTeacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole flow with the openai backend: the fine-tuning job runs on the fake API, which
    then serves the job's base model and its fine-tuned model (the tuned one answers at more
    length); the fake teacher judges, preferring the longer answer in both orders."""
    from distillery.flows.distill import distill

    teacher.knobs.judge_pairwise = "longer"
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    data = {**yaml.safe_load(RECIPE.read_text()), "seeds": SEEDS}
    data.pop("seeds_file")
    data.update(examples=16, validation_fraction=0.2)
    data["evaluation"] = {"eval_seeds": EVAL_ITEMS[:3], "min_win_rate_vs_base": 0.6}
    with FakeOpenAIJobs(JobKnobs(api_key="test-key", job_seconds=0.5)) as api:
        data["training"] = {
            "backend": "openai",
            "openai": {
                "base_url": api.base_url,
                "poll_interval_s": 0.05,
                "max_poll_interval_s": 0.2,
            },
        }
        recipe = workdir / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(data))
        summary = distill(
            recipe=str(recipe), output=str(workdir / "out"), teacher_model="fake-teacher",
            teacher_base_url=teacher.url,
        )  # fmt: skip
        (job,) = api.jobs()
        chats = api.stats.chats

    training = summary["training"]
    assert training["backend"] == "openai" and training["status"] == "succeeded"
    assert training["fine_tuned_model"] == job["fine_tuned_model"]
    # Each model answered each item once, at the fine-tuning endpoint.
    assert chats == {job["model"]: 3, job["fine_tuned_model"]: 3}
    report = summary["transfer"]
    assert report["students"] == {"base": job["model"], "trained": job["fine_tuned_model"]}
    assert report["student_requests"]["sent"] == 6
    vs_base = report["comparisons"]["vs_base"]
    assert (vs_base["wins"], vs_base["ties"], vs_base["losses"]) == (3, 0, 0)
    assert vs_base["win_rate"] == 1.0 and vs_base["swap_consistency"] == 1.0
    assert report["caution"] is None
    assert report["gate"]["passed"] is True and training["promoted"] is True
    assert teacher.stats.judged["pairwise"] == 4 * 3

    dataset = workdir / "out" / "stock-advisor"
    folder = dataset / (dataset / "LATEST").read_text().strip()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["evaluation"]["transfer"]["comparisons"]["vs_base"]["win_rate"] == 1.0
    verdicts = pd.read_parquet(folder / TRANSFER_FILE)
    assert set(verdicts[verdicts["comparison"] == "vs_base"]["outcome"]) == {"win"}


# ---- a whole run through the CLI: real training, the gate --------------------------------------


@pytest.mark.slow
# One real training and 2 x 3 greedy answers of the student on CPU: 15.5 min measured on the
# shared 2-core machine (load 6-8), past the suite's 900 s default.
@pytest.mark.timeout(2400)
def test_cli_run_trains_reports_the_transfer_and_exits_1_below_the_gate(
    tmp_path: Path, model_cache: Path, prefect_api: str
) -> None:
    """A real 1-step LoRA training of the student; the fake teacher teaches and judges, with a
    judge that always prefers the first answer: every pair a tie, win rate 0.5, under the gate
    of 0.9, so the run exits 1 and the version stays published."""
    data = {**yaml.safe_load(RECIPE.read_text()), "seeds": SEEDS}
    data.pop("seeds_file")
    data.update(examples=12, validation_fraction=0.2)
    data["evaluation"] = {"eval_seeds": EVAL_ITEMS[:3], "min_win_rate_vs_base": 0.9}
    data["training"] = {
        "backend": "local",
        "local": {"max_steps": 1, "batch_size": 2, "samples": 0},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
    env.update(
        PREFECT_API_URL=prefect_api,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
        DISTILLERY_CACHE_DIR=str(tmp_path / "cache"),
        DISTILLERY_MODEL_CACHE=str(model_cache),
    )
    out = tmp_path / "out"
    with FakeTeacher(Knobs(judge_pairwise="first")) as teacher:
        command = [sys.executable, "-m", "distillery.flows.cli", "run", str(recipe)]
        command += ["--output", str(out), "--teacher-base-url", teacher.url]
        command += ["--teacher-model", "fake-teacher"]
        proc = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=2300
        )
        pairwise = teacher.stats.judged["pairwise"]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "trained vs base: win 0 / tie 3 / loss 0 of 3 items; win rate 50%" in output
    assert "swap consistency 0%" in output and "trained vs teacher:" in output
    assert "gate FAILED: win rate vs the base student 0.50 is below the gate" in output
    assert "it is not promoted. The dataset stays published" in output
    assert pairwise == 4 * 3  # 4 judge requests per eval item

    dataset = out / "stock-advisor"
    folder = dataset / (dataset / "LATEST").read_text().strip()
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    training = manifest["training"]
    assert training["status"] == "succeeded" and training["promoted"] is False
    answers = training["eval_answers"]
    assert len(answers["ids"]) == 3 and all(answers["trained"]) and all(answers["base"])
    transfer = manifest["evaluation"]["transfer"]
    assert transfer["comparisons"]["vs_base"]["win_rate"] == 0.5
    assert transfer["gate"]["passed"] is False
    verdicts = pd.read_parquet(folder / TRANSFER_FILE)
    assert len(verdicts) == 6 and set(verdicts["outcome"]) == {"tie"}

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts(limit=100)
    [artifact] = [a for a in artifacts if a.key == "transfer-report"]
    assert "| base student | 3 | 0 | 3 | 0 | 0 | 50% |" in str(artifact.data)
    assert "Gate **failed**" in str(artifact.data)


def test_the_student_refuses_bad_eval_prompts_naming_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distillery.tasks.student import EXIT_BAD_INPUT, main

    chat = {
        "messages": [
            {"role": "user", "content": "I am 30.\n\nBuy VTI?"},
            {"role": "assistant", "content": "Yes, a broad index fund suits a long horizon."},
        ]
    }
    for name in ("train.jsonl", "validation.jsonl"):
        (tmp_path / name).write_text(json.dumps(chat) + "\n")
    prompts = tmp_path / "eval-prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "messages": chat["messages"][:1]})
        + "\n"
        + json.dumps({"id": "b", "messages": chat["messages"]})
        + "\n"
    )
    out = tmp_path / "out"
    argv = ["--train", str(tmp_path / "train.jsonl"), "--validation"]
    argv += [str(tmp_path / "validation.jsonl"), "--output", str(out)]

    assert main([*argv, "--eval-prompts", str(prompts)]) == EXIT_BAD_INPUT
    assert f"{prompts}:2: the prompt turns must end with the user's" in capsys.readouterr().err
    assert main([*argv, "--eval-prompts", str(tmp_path / "none.jsonl")]) == EXIT_BAD_INPUT
    assert "none.jsonl: no such file (--eval-prompts" in capsys.readouterr().err
    assert not out.exists()


def test_a_judge_that_refuses_every_request_leaves_a_report_that_says_so_and_fails_the_gate(
    cache: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.status = 400
    items = items_frame()
    folder = publish_version(cache, items)
    outcome = local_outcome(items, folder)

    report = run_transfer(gated_recipe(cache, 0.5), judge_of(teacher), str(folder), outcome, print)

    assert report["available"] is False and report["reason"].startswith("TeacherError")
    assert report["gate"]["passed"] is False and "TeacherError" in report["gate"]["message"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["evaluation"]["transfer"]["available"] is False
    assert manifest["training"]["promoted"] is False
    assert not (folder / TRANSFER_FILE).exists()
