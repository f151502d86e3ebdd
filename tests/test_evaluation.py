"""The held-out evaluation set: its choice, decontamination, and what a run publishes of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from distillery.flows.artifacts import summary_markdown
from distillery.flows.distill import distill
from distillery.tasks.evaluation import EVAL_FILE, Contamination, eval_inputs, word_runs
from distillery.tasks.expand import seed_inputs
from distillery.tasks.recipe import EvaluationSettings, RecipeError, load_recipe
from distillery.tasks.record import EVAL_SCHEMA, record_id
from fake_teacher import FakeTeacher

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
]


def recipe_file(tmp_path: Path, seeds: list[dict[str, str]] = SEEDS, **changes: Any) -> str:
    """The shipped recipe with its seeds inline and some sections changed."""
    data = yaml.safe_load(RECIPE.read_text())
    data.pop("seeds_file")
    data["seeds"] = seeds
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run(teacher: FakeTeacher, recipe: str, out: Path, **options: Any) -> dict[str, Any]:
    return distill(
        recipe=recipe,
        examples=options.pop("examples", 40),
        output=str(out),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=25,
        train=False,
        **options,
    )


def latest(out: Path) -> tuple[Path, pd.DataFrame, dict[str, Any]]:
    version = (out / "stock-advisor" / "LATEST").read_text().strip()
    folder = out / "stock-advisor" / version
    rows = pd.concat(
        [pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation")],
        ignore_index=True,
    )
    return folder, rows, json.loads((folder / "manifest.json").read_text())


def ids(items: list[dict[str, str]]) -> set[str]:
    return {record_id(i["user_context"], i["question"]) for i in items}


# ---- the recipe's evaluation set --------------------------------------------------------------


def test_share_of_seeds_held_out_is_deterministic_and_disjoint_from_training(
    tmp_path: Path,
) -> None:
    recipe = load_recipe(recipe_file(tmp_path, evaluation={"enabled": True, "share": 0.3}))
    training, held = recipe.seed_split()
    assert len(held) == 3 and len(training) == 7
    assert load_recipe(
        recipe_file(tmp_path, evaluation={"enabled": True, "share": 0.3})
    ).seed_split() == (
        training,
        held,
    )
    items = set(eval_inputs(recipe)["id"])
    assert items == {record_id(s.user_context, s.question) for s in held}
    assert not items & set(seed_inputs(recipe)["id"])
    assert len(seed_inputs(recipe)) == 7
    # Another random seed holds out another share, still 3 and still disjoint.
    other = load_recipe(
        recipe_file(tmp_path, random_seed=7, evaluation={"enabled": True, "share": 0.3})
    )
    assert len(other.seed_split()[1]) == 3
    assert not set(eval_inputs(other)["id"]) & set(seed_inputs(other)["id"])


def test_without_evaluation_every_seed_trains(tmp_path: Path) -> None:
    recipe = load_recipe(str(RECIPE))
    assert recipe.evaluation.enabled is False
    assert recipe.seed_split() == (recipe.seeds, ())
    assert len(eval_inputs(recipe)) == 0


def test_eval_seeds_turn_evaluation_on_and_every_seed_still_trains(tmp_path: Path) -> None:
    recipe = load_recipe(recipe_file(tmp_path, evaluation={"eval_seeds": EVAL_ITEMS}))
    assert recipe.evaluation.enabled is True
    training, held = recipe.seed_split()
    assert training == recipe.seeds and len(held) == 3
    assert set(eval_inputs(recipe)["id"]) == ids(EVAL_ITEMS)


def test_eval_seeds_file_is_read_like_a_seeds_file(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(i) for i in EVAL_ITEMS))
    recipe = load_recipe(recipe_file(tmp_path, evaluation={"eval_seeds_file": "eval.jsonl"}))
    assert set(eval_inputs(recipe)["id"]) == ids(EVAL_ITEMS)


@pytest.mark.parametrize(
    ("evaluation", "fix"),
    [
        ({"enabled": True}, "holds out 2; an evaluation set needs at least 3 items: raise "
         "evaluation.share to 0.3, add seeds, or list evaluation.eval_seeds"),
        ({"eval_seeds": EVAL_ITEMS[:2]}, "has 2 item(s); an evaluation set needs at least 3: "
         "add eval_seeds"),
    ],
)  # fmt: skip
def test_an_eval_set_of_fewer_than_three_items_is_refused_naming_the_fix(
    tmp_path: Path, evaluation: dict[str, Any], fix: str
) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file(tmp_path, evaluation=evaluation))
    assert fix in str(info.value)


def test_a_recipe_with_three_seeds_cannot_hold_out_a_share(tmp_path: Path) -> None:
    for share in (0.5, 0.9):  # 2 items; all 3 seeds
        with pytest.raises(RecipeError) as info:
            load_recipe(
                recipe_file(tmp_path, SEEDS[:3], evaluation={"enabled": True, "share": share})
            )
        assert "add seeds, or list evaluation.eval_seeds" in str(info.value)
        assert "raise evaluation.share" not in str(info.value)


def test_an_eval_item_that_is_also_a_seed_is_refused(tmp_path: Path) -> None:
    evaluation = {"eval_seeds": [*EVAL_ITEMS[:2], SEEDS[4]]}
    with pytest.raises(RecipeError, match=r"evaluation\.eval_seeds\[2\] is also seeds\[4\]"):
        load_recipe(recipe_file(tmp_path, evaluation=evaluation))


def test_too_few_eval_items_stop_the_flow_before_any_request(
    workdir: Path, teacher: FakeTeacher
) -> None:
    recipe = recipe_file(workdir, evaluation={"enabled": True})
    with pytest.raises(RecipeError, match=r"raise evaluation\.share to 0\.3"):
        run(teacher, recipe, workdir / "out")
    assert teacher.stats.received == 0
    assert not (workdir / "out").exists()


# ---- decontamination --------------------------------------------------------------------------


def _contamination(**settings: Any) -> Contamination:
    items = pd.DataFrame(
        {
            "id": [record_id(i["user_context"], i["question"]) for i in EVAL_ITEMS],
            "user_context": [i["user_context"] for i in EVAL_ITEMS],
            "question": [i["question"] for i in EVAL_ITEMS],
        }
    )
    return Contamination(items, EvaluationSettings(enabled=True, **settings))


def test_word_runs_ignore_case_and_punctuation_and_a_short_text_is_one_run() -> None:
    assert list(word_runs("Buy, SELL or hold?", 2)) == [
        ("buy", "sell"),
        ("sell", "or"),
        ("or", "hold"),
    ]
    assert list(word_runs("Buy or hold?", 8)) == [("buy", "or", "hold")]
    assert list(word_runs("?!", 8)) == []


def test_a_copied_eval_item_is_contaminated_by_minhash() -> None:
    check = _contamination()
    item = EVAL_ITEMS[1]
    verdict = check.check(item["user_context"].replace("$120,000", "$125,000"), item["question"])
    assert verdict is not None and verdict[0] == "contaminated"
    assert verdict[1].startswith("MinHash similarity")
    assert record_id(item["user_context"], item["question"]) in verdict[1]


def test_a_question_sharing_eight_words_with_an_eval_question_is_contaminated() -> None:
    check = _contamination()
    ctx = "I am 23, a barista in Lisbon saving 200 euros a month in a money market fund."
    question = "Honestly, should I keep the inherited utility stock for its dividend income?"
    verdict = check.check(ctx, question)
    assert verdict is not None and verdict[0] == "contaminated"
    assert "'should i keep the inherited utility stock for'" in verdict[1]
    assert record_id(EVAL_ITEMS[1]["user_context"], EVAL_ITEMS[1]["question"]) in verdict[1]
    # Seven shared words are not enough; a longer run setting widens the net.
    seven = "Should I keep the inherited utility stock, or sell it all this year?"
    assert check.check(ctx, seven) is None
    assert _contamination(ngram=6).check(ctx, seven) is not None


def test_an_unrelated_input_is_not_contaminated() -> None:
    check = _contamination()
    assert check.check(SEEDS[0]["user_context"], SEEDS[0]["question"]) is None


# ---- a run with an evaluation set -------------------------------------------------------------


def test_a_run_holds_out_the_eval_seeds_answers_them_and_rejects_contaminated_inputs(
    workdir: Path, teacher: FakeTeacher
) -> None:
    recipe = recipe_file(workdir, evaluation={"enabled": True, "share": 0.3})
    held = load_recipe(recipe).seed_split()[1]
    held_ids = {record_id(s.user_context, s.question) for s in held}
    copied = (held[0].user_context, held[0].question)  # caught by MinHash
    other = (  # a context of its own, so that only the question's words give it away
        "I am 39, an airline pilot based in Utah. I keep $90,000 in VTI inside a taxable "
        "account, $40,000 in a high-yield savings account and have no debt at all; my wife "
        "works part time as a librarian and we plan to retire around 58."
    )
    echoed = (other, held[1].question)  # caught by the shared words of the question
    teacher.knobs.planted = (copied, echoed)
    teacher.knobs.plant_rate = 0.5
    out = workdir / "out"

    summary = run(teacher, recipe, out)

    folder, rows, manifest = latest(out)
    assert summary["outcome"] == "published" and len(rows) == 40
    assert not held_ids & set(rows["id"])
    assert not rows["seed_ids"].map(lambda s: bool(held_ids.intersection(s))).any()
    assert not set(rows["question"]) & {s.question for s in held}
    assert (rows["source"] == "seed").sum() == 7

    evaluation = pd.read_parquet(folder / EVAL_FILE)
    assert list(evaluation.columns) == EVAL_SCHEMA.names
    assert set(evaluation["id"]) == held_ids
    assert (evaluation["answer"].str.len() > 80).all()
    assert set(evaluation["status"]) == {"accepted"}

    rejected = pd.read_parquet(folder / "rejected.parquet")
    contaminated = rejected[rejected["reason"] == "contaminated"]
    assert set(contaminated["stage"]) == {"expand"}
    details = list(contaminated["detail"])
    assert any(d.startswith("MinHash similarity") for d in details), details
    assert any(d.startswith("question shares") for d in details), details
    assert all(any(h in d for h in held_ids) for d in details)

    entry = manifest["evaluation"]
    assert entry["enabled"] is True and entry["items"] == 3 and entry["file"] == EVAL_FILE
    assert entry["ids"] == sorted(held_ids)
    assert entry["reference_answers"]["accepted"] == 3
    assert entry["decontamination"] == {
        "contamination_threshold": 0.5,
        "ngram": 8,
        "rejected": len(contaminated),
    }
    assert manifest["counts"]["expansion"]["rejected"]["contaminated"] == len(contaminated)
    assert manifest["counts"]["seeds"] == 7
    diversity = manifest["diversity"]
    assert diversity["rows"] == 40 and diversity["nearest_neighbour"]["sampled_rows"] == 40
    assert 0 < diversity["questions"]["distinct_1"] < diversity["questions"]["distinct_2"] <= 1
    card = (folder / "README.md").read_text()
    assert EVAL_FILE in card and "distinct-1 / distinct-2" in card

    # Unchanged: nothing sent, nothing published; from scratch: everything, the reference
    # answers too, comes from the request cache.
    received = teacher.stats.received
    again = run(teacher, recipe, out)
    assert again["outcome"] == "unchanged" and teacher.stats.received == received
    scratch = run(teacher, recipe, out, refresh=False)
    assert scratch["outcome"] == "published" and scratch["requests_sent"] == 0
    assert teacher.stats.received == received
    folder2, _, manifest2 = latest(out)
    assert folder2 != folder
    assert manifest2["evaluation"]["fingerprint"] == entry["fingerprint"]
    pd.testing.assert_frame_equal(pd.read_parquet(folder2 / EVAL_FILE), evaluation)
    markdown = summary_markdown(load_recipe(recipe), scratch, manifest2)
    assert (
        "| evaluate | held-out items (from seeds (share 0.3)), reference answers accepted | 3, 3 |"
        in markdown
    )
    assert "| distinct-1 / distinct-2 of the questions |" in markdown


def test_refresh_keeps_held_out_seeds_and_contaminated_rows_out(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    run(teacher, recipe_file(workdir), out)

    # Evaluation turned on: the held-out seeds retire, and the rows drawn on them go with them.
    recipe = recipe_file(workdir, evaluation={"enabled": True, "share": 0.3})
    held_ids = set(eval_inputs(load_recipe(recipe))["id"])
    first = run(teacher, recipe, out)
    folder, rows, manifest = latest(out)
    assert first["outcome"] == "published"
    assert set(manifest["refresh"]["retired_seeds"]) == held_ids
    assert not held_ids & set(rows["id"])
    assert not rows["seed_ids"].map(lambda s: bool(held_ids.intersection(s))).any()
    assert len(rows) == 40
    assert set(pd.read_parquet(folder / EVAL_FILE)["id"]) == held_ids

    # Eval items given instead, one of them a copy of a published row: that row is dropped.
    row = rows[rows["source"] == "generated"].iloc[0]
    items = [{"user_context": row["user_context"], "question": row["question"]}, *EVAL_ITEMS[:2]]
    second = run(teacher, recipe_file(workdir, evaluation={"eval_seeds": items}), out)
    folder, rows, manifest = latest(out)
    assert second["outcome"] == "published"
    assert row["id"] not in set(rows["id"]) and len(rows) >= 40
    assert manifest["refresh"]["dropped_contaminated"] >= 1
    rejected = pd.read_parquet(folder / "rejected.parquet")
    dropped = rejected[(rejected["stage"] == "refresh") & (rejected["reason"] == "contaminated")]
    assert row["id"] in set(dropped["id"])
    assert set(pd.read_parquet(folder / EVAL_FILE)["id"]) == ids(items)
