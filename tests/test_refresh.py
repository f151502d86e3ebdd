"""The incremental refresh: a run starts from LATEST and asks the teacher only for what is new."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from distillery.flows.distill import distill
from distillery.tasks.record import record_id
from distillery.tasks.teacher import TeacherError
from fake_teacher import FakeTeacher

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "stock-advisor.yaml"
SEEDS = REPO / "recipes" / "stock-advisor-seeds.yaml"

NEW_SEEDS = [
    {
        "user_context": "I am 41, a self-employed electrician in Ohio with irregular income "
        "between $50,000 and $90,000 a year, $30,000 in a high-yield savings account and a SEP-IRA "
        "holding one S&P 500 index fund.",
        "question": "Should I move part of my emergency savings into dividend stocks?",
    },
    {
        "user_context": "I am 67, retired, living on Social Security and a $900,000 IRA that is "
        "60% bonds. My required minimum distributions start next year and I worry about taxes.",
        "question": "How should I take my required minimum distributions without selling "
        "stocks at a bad time?",
    },
]


def recipe_file(tmp_path: Path, seeds: list[dict[str, str]], **changes: Any) -> str:
    """The shipped recipe with its seeds inline (so a test can add or retire some)."""
    data = yaml.safe_load(RECIPE.read_text())
    data.pop("seeds_file")
    data["seeds"] = seeds
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def shipped_seeds() -> list[dict[str, str]]:
    seeds: list[dict[str, str]] = yaml.safe_load(SEEDS.read_text())
    return seeds


def run(teacher: FakeTeacher, recipe: str, out: Path, **options: Any) -> dict[str, Any]:
    return distill(
        recipe=recipe,
        examples=options.pop("examples", 40),
        output=str(out),
        teacher_model="fake-teacher",
        teacher_base_url=options.pop("teacher_base_url", teacher.url),
        answer_batch_size=25,
        train=False,
        **options,
    )


def latest(out: Path) -> tuple[str, pd.DataFrame, dict[str, Any]]:
    version = (out / "stock-advisor" / "LATEST").read_text().strip()
    folder = out / "stock-advisor" / version
    rows = pd.concat(
        [pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation")],
        ignore_index=True,
    )
    return version, rows, json.loads((folder / "manifest.json").read_text())


def versions(out: Path) -> list[str]:
    return sorted(
        p.name for p in (out / "stock-advisor").iterdir() if (p / "manifest.json").exists()
    )


def test_unchanged_refresh_sends_nothing_and_publishes_nothing(
    workdir: Path, teacher: FakeTeacher
) -> None:
    recipe = recipe_file(workdir, shipped_seeds())
    out = workdir / "out"
    first = run(teacher, recipe, out)
    assert first["outcome"] == "published"
    received = teacher.stats.received

    again = run(teacher, recipe, out)

    assert teacher.stats.received == received  # not one request, not even from the cache
    assert again["outcome"] == "unchanged"
    assert again["requests"] == 0 and again["requests_sent"] == 0
    assert versions(out) == [first["version"]]
    assert "training" not in again


def test_added_seeds_lead_to_new_examples_drawn_on_them(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    seeds = shipped_seeds()
    first = run(teacher, recipe_file(workdir, seeds), out)
    _, before, _ = latest(out)

    refreshed = run(teacher, recipe_file(workdir, seeds + NEW_SEEDS), out)

    assert refreshed["outcome"] == "published"
    version, rows, manifest = latest(out)
    assert version == refreshed["version"] != first["version"]
    new_ids = {record_id(s["user_context"], s["question"]) for s in NEW_SEEDS}
    assert set(manifest["refresh"]["new_seeds"]) == new_ids
    # Every earlier row is published again, unchanged, with the run that made it.
    again = rows.set_index("id").loc[before["id"]]
    assert (again["answer"].to_numpy() == before["answer"].to_numpy()).all()
    assert set(again["run_id"]) == {first["flow_run_id"]}
    # The new seeds are answered, and their share of new examples shows them (seed_ids).
    assert new_ids <= set(rows.loc[rows["source"] == "seed", "id"])
    added = rows[(rows["run_id"] == refreshed["flow_run_id"]) & (rows["source"] == "generated")]
    extra = manifest["refresh"]["extra_for_new_seeds"]
    assert extra == math.ceil(40 * 2 / (len(seeds) + 2))  # target * new / all, rounded up
    assert len(added) >= extra
    assert added["seed_ids"].map(lambda ids: bool(new_ids.intersection(ids))).all()
    assert len(rows) == len(before) + 2 + len(added)


def test_retired_seed_takes_its_rows_with_it_and_they_are_replaced(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    seeds = shipped_seeds()
    run(teacher, recipe_file(workdir, seeds), out)
    _, before, _ = latest(out)
    retired = record_id(seeds[0]["user_context"], seeds[0]["question"])
    drawn_on = before["seed_ids"].map(lambda ids: retired in ids)
    assert drawn_on.any()  # the test means something only if some rows drew on that seed

    refreshed = run(teacher, recipe_file(workdir, seeds[1:]), out)

    _, rows, manifest = latest(out)
    assert manifest["refresh"]["retired_seeds"] == [retired]
    assert manifest["refresh"]["dropped_with_retired_seeds"] == int(drawn_on.sum()) + 1
    assert retired not in set(rows["id"])
    assert not rows["seed_ids"].map(lambda ids: retired in ids).any()
    assert len(rows) >= 40  # replacements were generated
    assert refreshed["requests_sent"] > 0


def test_changed_answer_prompt_answers_every_kept_input_again(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    seeds = shipped_seeds()
    run(teacher, recipe_file(workdir, seeds), out)
    _, before, _ = latest(out)
    sent_before = teacher.stats.received

    changed = recipe_file(workdir, seeds, answer={"system": "You are a careful fiduciary adviser."})
    refreshed = run(teacher, changed, out)

    _, rows, manifest = latest(out)
    assert manifest["refresh"]["answer_changed"] is True
    assert manifest["refresh"]["reanswered"] == len(before)
    # The inputs are the same; each was asked again with the new system prompt.
    assert set(before["id"]) <= set(rows["id"])
    assert teacher.stats.received - sent_before >= len(before)
    assert {m[0]["content"] for m in rows["messages"]} == {"You are a careful fiduciary adviser."}
    assert refreshed["outcome"] == "published"


def test_failed_refresh_leaves_latest_on_the_previous_version(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    first = run(teacher, recipe_file(workdir, shipped_seeds()), out)
    grown = recipe_file(workdir, shipped_seeds() + NEW_SEEDS)
    teacher.knobs.status = 401  # the key was revoked overnight

    with pytest.raises(TeacherError, match="401"):
        run(teacher, grown, out)

    assert latest(out)[0] == first["version"]
    assert versions(out) == [first["version"]]


def test_from_scratch_ignores_latest(workdir: Path, teacher: FakeTeacher) -> None:
    out = workdir / "out"
    recipe = recipe_file(workdir, shipped_seeds())
    first = run(teacher, recipe, out)
    scratch = run(teacher, recipe, out, refresh=False)
    # The same requests, all from the engine's cache; a new version of the same content.
    assert scratch["requests_sent"] == 0 and scratch["requests_cached"] > 0
    assert scratch["outcome"] == "published" and scratch["version"] != first["version"]
    _, rows, manifest = latest(out)
    assert manifest["refresh"]["previous"] is None
    assert set(rows["run_id"]) == {scratch["flow_run_id"]}


def _rows(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ids,
            "answer": [f"answer of {i}" for i in ids],
            "split": ["train" if n % 3 else "validation" for n in range(len(ids))],
            "messages": [
                [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]
                for i in ids
            ],
            "status": ["accepted" if n % 4 else "rejected" for n in range(len(ids))],
        }
    )


def test_content_fingerprint_reads_the_masked_rows_in_id_order_chunk_by_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hashlib

    from distillery.tasks import refresh

    frame = _rows([f"{n * 7919 % 101:016x}" for n in range(23)])  # ids out of order
    accepted = frame[frame["status"] == "accepted"]
    # The form that published manifests hold (must not change: a refresh compares with them).
    digest = hashlib.sha256()
    for row in accepted.sort_values("id").itertuples():
        turns = [(m["role"], m["content"]) for m in row.messages]
        digest.update(json.dumps([row.id, row.answer, row.split, turns]).encode())
    expected = digest.hexdigest()[:16]

    assert refresh.content_fingerprint(accepted) == expected
    assert refresh.content_fingerprint(frame, frame["status"] == "accepted") == expected
    assert refresh.content_fingerprint(accepted.iloc[::-1]) == expected  # row order: none
    monkeypatch.setattr(refresh, "_FINGERPRINT_CHUNK", 2)  # chunks split the 17 rows unevenly
    assert refresh.content_fingerprint(frame, frame["status"] == "accepted") == expected
    changed = frame.copy()
    changed.loc[changed.index[1], "answer"] = "another answer"
    assert refresh.content_fingerprint(changed, changed["status"] == "accepted") != expected
