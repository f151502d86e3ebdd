"""The whole distill flow offline against the fake teacher: what it publishes, and how it fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from distillery.flows.distill import distill
from distillery.tasks.record import JUDGE_COLUMNS, RECORD_COLUMNS
from distillery.tasks.teacher import TeacherError
from distillery.tasks.validate import ValidationFailed
from fake_teacher import FakeTeacher

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "stock-advisor.yaml")


def run(
    teacher: FakeTeacher,
    output: Path | str,
    examples: int = 40,
    recipe: str = RECIPE,
    **options: Any,
) -> dict[str, Any]:
    return distill(
        recipe=recipe,
        examples=examples,
        output=str(output),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=25,
        train=False,
        **options,
    )


def variant(tmp_path: Path, **changes: Any) -> str:
    """The shipped recipe with some top-level sections changed."""
    data = yaml.safe_load(Path(RECIPE).read_text())
    # The copy lives elsewhere: point it at the shipped seeds file, not a relative path.
    data["seeds_file"] = str(REPO / "recipes" / data["seeds_file"])
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def read_version(root: Path, name: str = "stock-advisor") -> tuple[Path, dict[str, Any]]:
    version = (root / name / "LATEST").read_text().strip()
    folder = root / name / version
    return folder, json.loads((folder / "manifest.json").read_text())


def test_flow_publishes_a_complete_version_and_rerun_sends_no_request(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    summary = run(teacher, out, examples=60)
    folder, manifest = read_version(out)
    assert summary["uri"].endswith(folder.name)

    train = pd.read_parquet(folder / "train.parquet")
    validation = pd.read_parquet(folder / "validation.parquet")
    both = pd.concat([train, validation])
    assert len(both) == 60
    assert list(both.columns) == RECORD_COLUMNS
    assert both["id"].is_unique
    # The judge's columns are null: the shipped recipe's judge is off (tests/test_judge.py).
    assert not both.drop(columns=JUDGE_COLUMNS).isna().any().any()
    assert both[JUDGE_COLUMNS].isna().all().all()
    assert (both[["user_context", "question", "answer"]].map(len) > 0).all().all()
    assert set(train["split"]) == {"train"} and set(validation["split"]) == {"validation"}
    assert (both["source"] == "seed").sum() == 10
    generated = both[both["source"] == "generated"]
    assert generated["seed_ids"].map(len).min() >= 1
    assert (generated["expansion_request_id"] != "").all()
    roles = {tuple(turn["role"] for turn in m) for m in both["messages"]}
    assert roles == {("system", "user", "assistant")}

    published = manifest["counts"]["published"]
    assert published == {"total": 60, "train": len(train), "validation": len(validation)}
    assert manifest["teacher"] == {
        "model": "fake-teacher",
        "host": "127.0.0.1",
        "structured_output": "json_schema",
    }
    assert manifest["validation"]["success"] is True
    assert manifest["tokens"]["requests_sent"] == teacher.stats.answered
    assert manifest["evaluation"] == {"enabled": False}
    assert manifest["judge"] == {"enabled": False}
    assert manifest["diversity"]["rows"] == 60
    assert manifest["diversity"]["nearest_neighbour"]["sampled_rows"] == 60
    assert summary["diversity"] == manifest["diversity"]
    jsonl = (folder / "train.jsonl").read_text().splitlines()
    assert len(jsonl) == len(train)
    assert json.loads(jsonl[0])["messages"][-1]["role"] == "assistant"
    assert (folder / "README.md").read_text().startswith("# stock-advisor")
    assert (
        out / "stock-advisor" / "runs" / manifest["run_id"] / "data-docs" / "index.html"
    ).exists()

    before = teacher.stats.received
    again = run(teacher, out, examples=60)
    assert teacher.stats.received == before
    assert again["requests_sent"] == 0
    assert again["outcome"] == "unchanged" and again["version"] == folder.name
    assert (out / "stock-advisor" / "LATEST").read_text() == folder.name


def test_inputs_are_answered_while_expansion_goes_on(workdir: Path, teacher: FakeTeacher) -> None:
    """Seeds and the first batches of generated inputs are answered before expansion ends, and
    a second run, every task cached, cuts the expanded inputs into the same answer batches."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def task_runs(flow_run_id: str) -> dict[str, Any]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        return {r.name: r for r in runs}

    teacher.knobs.latency = 0.02  # so that expansion takes a while
    summary = run(teacher, workdir / "out", examples=200)
    runs = task_runs(summary["flow_run_id"])
    expand_ended = runs["expand-cycle-1"].end_time
    answers = sorted(n for n in runs if n.startswith("answer-cycle-1-"))
    assert len(answers) == 8  # 190 generated inputs in batches of 25
    assert runs["answer-cycle-0-batch-1"].start_time < expand_ended
    started_early = [n for n in answers if runs[n].start_time < expand_ended]
    assert len(started_early) >= 2, started_early

    again = run(teacher, workdir / "out", examples=200, refresh=False)
    rerun = task_runs(again["flow_run_id"])
    assert again["requests_sent"] == 0
    assert {n for n in rerun if n.startswith("answer-")} == {*answers, "answer-cycle-0-batch-1"}
    assert all(rerun[n].state_name == "Cached" for n in rerun if n.startswith(("answer", "expand")))


def test_priced_teacher_cost_is_in_the_manifest_and_summary(
    workdir: Path, teacher: FakeTeacher
) -> None:
    price = {"input_usd_per_1m": 2.5, "output_usd_per_1m": 10.0}
    recipe = variant(workdir, teacher={"model": "m", "price": price})
    summary = run(teacher, workdir / "out", examples=20, recipe=recipe)
    _, manifest = read_version(workdir / "out")

    tokens, cost = manifest["tokens"], manifest["cost"]
    expected = (tokens["sent_prompt_tokens"] * 2.5 + tokens["sent_completion_tokens"] * 10) / 1e6
    assert tokens["sent_completion_tokens"] > 0
    assert cost["usd"] == pytest.approx(expected) and cost["usd"] > 0
    # The estimate is the worst case the cap is checked against: never below what was paid.
    assert cost["estimated_usd"] >= cost["usd"]
    assert cost["price"]["input_usd_per_1m"] == 2.5
    assert summary["cost_usd"] == pytest.approx(expected)


def test_engine_cache_alone_makes_a_rerun_free(workdir: Path, teacher: FakeTeacher) -> None:
    """Even with Prefect's task cache gone (new result storage), no request is sent twice."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    run(teacher, workdir / "out", examples=30)
    before = teacher.stats.received
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: workdir / "other-results"}):
        # From scratch: the refresh would skip the teacher stages without asking the cache.
        summary = run(teacher, workdir / "out", examples=30, refresh=False)
    assert teacher.stats.received == before
    assert summary["requests_cached"] > 0


def test_faults_are_retried_and_no_request_is_answered_twice(
    workdir: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.fault_rate = 0.05
    summary = run(teacher, workdir / "out", examples=80)
    assert summary["published"]["total"] == 80
    assert sum(teacher.stats.faults.values()) > 0
    assert teacher.stats.answered_twice == 0


def test_endpoint_without_json_schema_falls_back_to_json_object(
    workdir: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.reject_json_schema = True
    run(teacher, workdir / "out", examples=30)
    _, manifest = read_version(workdir / "out")
    assert manifest["teacher"]["structured_output"] == "json_object"
    assert manifest["counts"]["published"]["total"] == 30


def test_text_form_teacher_is_parsed(workdir: Path, teacher: FakeTeacher) -> None:
    recipe = variant(workdir, teacher={"model": "m", "structured_output": "text"})
    summary = run(teacher, workdir / "out", examples=30, recipe=recipe)
    assert summary["published"]["total"] == 30
    # The text form was asked for (no response_format at all) and its parser read the replies:
    # the fake teacher writes `# USER CONTEXT n` / `# QUESTION n` blocks, and none of their
    # markers reaches a stored input.
    assert set(teacher.stats.received_by_form) == {"text"}, teacher.stats.received_by_form
    folder, manifest = read_version(workdir / "out")
    assert manifest["teacher"]["structured_output"] == "text"
    assert manifest["counts"]["expansion"]["parsed"] >= 30 - manifest["counts"]["seeds"]
    rows = pd.concat(pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation"))
    generated = rows[rows["source"] == "generated"]
    assert len(generated) > 0
    for column in ("user_context", "question"):
        assert not generated[column].str.contains("#").any(), generated[column].tolist()


@pytest.mark.parametrize("reply", ["prose", "malformed_json"])
def test_teacher_without_usable_examples_fails_clearly_and_publishes_nothing(
    workdir: Path, teacher: FakeTeacher, reply: str
) -> None:
    teacher.knobs.reply = reply
    with pytest.raises(TeacherError, match="returned no parseable examples"):
        run(teacher, workdir / "out", examples=30)
    assert not (workdir / "out" / "stock-advisor" / "LATEST").exists()


def test_unauthorized_teacher_fails_fast_without_retry_storm_or_key(
    workdir: Path, teacher: FakeTeacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-test-key-123")
    teacher.knobs.status = 401
    with pytest.raises(TeacherError) as info:
        run(teacher, workdir / "out", examples=30)
    message = str(info.value)
    assert "OPENAI_API_KEY" in message and "401" in message
    assert "sk-secret" not in message
    # Seeds are answered first, at most one request per seed and no retries (Prefect retries
    # the task twice: 3 attempts of 10 seeds at most).
    assert teacher.stats.received <= 30


def test_rejected_answers_are_kept_with_reasons_and_topped_up(
    workdir: Path, teacher: FakeTeacher
) -> None:
    teacher.knobs.truncate_rate = 0.1
    run(teacher, workdir / "out", examples=60)
    folder, manifest = read_version(workdir / "out")
    rejected = pd.read_parquet(folder / "rejected.parquet")
    truncated = rejected[rejected["reason"] == "truncated"]
    assert len(truncated) == manifest["counts"]["answers"]["rejected"]["truncated"] > 0
    assert set(truncated["stage"]) == {"answer"}
    assert manifest["counts"]["published"]["total"] == 60


def test_validation_failure_publishes_nothing_and_keeps_latest(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    run(teacher, out, examples=30)
    latest_before = (out / "stock-advisor" / "LATEST").read_text()
    teacher.knobs.refusal_rate = 0.6
    teacher.knobs.seed = 1  # new answers: the cached ones would all be good
    recipe = variant(workdir, teacher={"model": "m", "temperature": 0.5})
    with pytest.raises(ValidationFailed) as info:
        run(teacher, out, examples=30, recipe=recipe)
    assert "Data Docs" in str(info.value)
    assert (out / "stock-advisor" / "LATEST").read_text() == latest_before
    versions = [p for p in (out / "stock-advisor").iterdir() if p.name[:2] == "20"]
    assert len(versions) == 1
    docs = list((out / "stock-advisor" / "runs").glob("*/data-docs/index.html"))
    assert len(docs) == 2


@pytest.mark.s3
def test_export_to_s3_and_read_back(workdir: Path, teacher: FakeTeacher, s3_endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("distillery-test")
    summary = run(teacher, "s3://distillery-test/datasets", examples=30)
    version = fs.cat_file("distillery-test/datasets/stock-advisor/LATEST").decode()
    assert summary["uri"] == f"s3://distillery-test/datasets/stock-advisor/{version}"
    train = pd.read_parquet(f"{summary['uri']}/train.parquet")
    validation = pd.read_parquet(f"{summary['uri']}/validation.parquet")
    assert len(train) + len(validation) == 30
    manifest = json.loads(fs.cat_file(f"{summary['uri']}/manifest.json"))
    assert manifest["counts"]["published"]["total"] == 30
    assert fs.exists(
        f"distillery-test/datasets/stock-advisor/runs/{manifest['run_id']}/data-docs/index.html"
    )


@pytest.mark.s3
def test_recipe_and_seeds_file_load_from_s3(s3_endpoint: str) -> None:
    import s3fs

    from distillery.tasks.recipe import RecipeError, load_recipe

    fs = s3fs.S3FileSystem()
    fs.mkdir("distillery-recipes")
    seeds = [
        {"user_context": "I am 33 and hold only cash.", "question": "Where do I start investing?"},
        {"user_context": "I am 61 with a pension.", "question": "Should I buy an annuity?"},
    ]
    fs.pipe_file(
        "distillery-recipes/r/seeds.jsonl", "\n".join(json.dumps(s) for s in seeds).encode()
    )
    recipe_text = yaml.safe_dump(
        {"name": "remote", "teacher": {"model": "m"}, "seeds_file": "seeds.jsonl"}
    )
    fs.pipe_file("distillery-recipes/r/recipe.yaml", recipe_text.encode())
    recipe = load_recipe("s3://distillery-recipes/r/recipe.yaml")
    assert [s.question for s in recipe.seeds] == [s["question"] for s in seeds]
    with pytest.raises(
        RecipeError, match=r"s3://distillery-recipes/r/missing\.yaml: recipe file not found"
    ):
        load_recipe("s3://distillery-recipes/r/missing.yaml")


def test_the_startup_objects_are_frozen_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from distillery.flows import distill as module

    monkeypatch.setattr(module, "_startup_frozen", False)
    gc.unfreeze()
    try:
        module._freeze_startup_objects()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the imported modules' objects, out of the full collections' scans
        run_objects = [[n] for n in range(1000)]  # what a run creates stays collectable:
        module._freeze_startup_objects()  # a second flow run in the process freezes nothing
        # Not "==": a frozen object that dies (another thread's garbage) leaves the permanent
        # generation, so the count can fall; freezing again would add the 1,000 lists above.
        assert gc.get_freeze_count() <= frozen, len(run_objects)
    finally:
        gc.unfreeze()
