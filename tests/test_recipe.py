"""Recipe loading: good recipes load; each bad recipe fails with a message naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distillery.tasks.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parent.parent

SEEDS = [
    {"user_context": "I am 30 and save $500 a month.", "question": "Should I buy an index fund?"},
    {"user_context": "I am 60 and retire soon.", "question": "How much should I hold in bonds?"},
]


def write_recipe(tmp_path: Path, **fields: object) -> Path:
    data: dict[str, object] = {"name": "demo", "teacher": {"model": "m"}, "seeds": SEEDS}
    data.update(fields)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_stock_advisor_recipe_loads_with_at_least_eight_distinct_seeds() -> None:
    recipe = load_recipe(str(REPO / "recipes" / "stock-advisor.yaml"))
    assert recipe.name == "stock-advisor"
    assert len(recipe.seeds) >= 8
    assert len({s.question for s in recipe.seeds}) == len(recipe.seeds)
    assert "expert for stock markets" in recipe.answer.system


def test_recipe_hash_changes_with_content(tmp_path: Path) -> None:
    a = load_recipe(str(write_recipe(tmp_path, examples=10)))
    b = load_recipe(str(write_recipe(tmp_path, examples=11)))
    assert a.content_hash() != b.content_hash()


def test_missing_recipe_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"nope\.yaml: recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_bad_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\nseeds: [\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: not valid YAML"):
        load_recipe(str(path))


def test_unknown_field_is_named_with_its_path(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, teacher={"model": "m", "temprature": 0.3})
    with pytest.raises(RecipeError, match=r"teacher\.temprature: unknown field"):
        load_recipe(str(path))


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "demo", "seeds": SEEDS}))
    with pytest.raises(RecipeError, match=r"teacher: required field is missing"):
        load_recipe(str(path))


def test_seed_row_missing_question_names_the_row(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, seeds=[SEEDS[0], {"user_context": "only context"}])
    with pytest.raises(RecipeError, match=r"seeds\[1\]\.question: required field is missing"):
        load_recipe(str(path))


def test_empty_seed_list_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="'seeds' is empty"):
        load_recipe(str(write_recipe(tmp_path, seeds=[])))


def test_duplicated_seeds_name_both_rows(tmp_path: Path) -> None:
    twin = {"user_context": " i am 30 and save $500 a month. ", "question": SEEDS[0]["question"]}
    path = write_recipe(tmp_path, seeds=[*SEEDS, twin])
    with pytest.raises(RecipeError, match=r"seeds\[2\] duplicates seeds\[0\]"):
        load_recipe(str(path))


def test_blank_seed_field_is_rejected(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, seeds=[{"user_context": "   ", "question": "Why?"}])
    with pytest.raises(RecipeError, match=r"seeds\[0\]\.user_context is blank"):
        load_recipe(str(path))


def test_template_with_unknown_variable_is_rejected(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, answer={"user": "{user_context} {questoin}"})
    with pytest.raises(RecipeError, match=r"answer\.user uses unknown variable \{questoin\}"):
        load_recipe(str(path))


def test_template_with_stray_brace_is_rejected(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, expansion={"prompt": "write {n} like {examples} {"})
    with pytest.raises(RecipeError, match=r"expansion\.prompt: .*literal brace"):
        load_recipe(str(path))


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "yaml"])
def test_seeds_file_relative_to_recipe_in_each_format(tmp_path: Path, suffix: str) -> None:
    seeds_path = tmp_path / f"seeds.{suffix}"
    if suffix == "jsonl":
        seeds_path.write_text("\n".join(json.dumps(s) for s in SEEDS) + "\n")
    elif suffix == "json":
        seeds_path.write_text(json.dumps(SEEDS))
    elif suffix == "csv":
        rows = ["user_context,question"] + [
            f'"{s["user_context"]}","{s["question"]}"' for s in SEEDS
        ]
        seeds_path.write_text("\n".join(rows) + "\n")
    else:
        seeds_path.write_text(yaml.safe_dump(SEEDS))
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump({"name": "demo", "teacher": {"model": "m"}, "seeds_file": seeds_path.name})
    )
    recipe = load_recipe(str(path))
    assert [s.question for s in recipe.seeds] == [s["question"] for s in SEEDS]


def test_bad_jsonl_seed_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "seeds.jsonl").write_text(json.dumps(SEEDS[0]) + "\n{broken\n")
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump({"name": "demo", "teacher": {"model": "m"}, "seeds_file": "seeds.jsonl"})
    )
    with pytest.raises(RecipeError, match=r"seeds\.jsonl line 2: not valid JSON"):
        load_recipe(str(path))


def test_missing_seeds_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump({"name": "demo", "teacher": {"model": "m"}, "seeds_file": "gone.jsonl"})
    )
    with pytest.raises(RecipeError, match=r"gone\.jsonl: seeds file not found"):
        load_recipe(str(path))


def test_bad_dataset_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"name: String should match pattern"):
        load_recipe(str(write_recipe(tmp_path, name="Stock Advisor")))


def test_target_below_the_seed_count_is_rejected_with_the_minimum(tmp_path: Path) -> None:
    from distillery.tasks.recipe import target_size

    path = str(write_recipe(tmp_path, examples=5))
    recipe = load_recipe(path)
    assert target_size(recipe, path, None) == 5
    assert target_size(recipe, path, 2) == 2
    with pytest.raises(RecipeError, match=r"1 examples is below the recipe's 2 seeds"):
        target_size(recipe, path, 1)


def test_teacher_gguf_is_relative_to_the_recipe_and_not_part_of_its_hash(tmp_path: Path) -> None:
    plain = load_recipe(str(write_recipe(tmp_path)))
    recipe = load_recipe(str(write_recipe(tmp_path, teacher={"model": "m", "gguf": "big.gguf"})))
    assert recipe.teacher.gguf == str(tmp_path / "big.gguf")
    # Where the weights lie is not what they are: the manifest records their SHA-256.
    assert recipe.content_hash() == plain.content_hash()


def test_teacher_gguf_with_a_base_url_is_refused(tmp_path: Path) -> None:
    teacher = {"model": "m", "gguf": "big.gguf", "base_url": "http://127.0.0.1:8080/v1"}
    with pytest.raises(RecipeError, match=r"teacher: .*served by the embedded teacher.*remove one"):
        load_recipe(str(write_recipe(tmp_path, teacher=teacher)))
    teacher["base_url"] = "embedded"
    assert load_recipe(str(write_recipe(tmp_path, teacher=teacher))).teacher.gguf
