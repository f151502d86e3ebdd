"""The student trainer (`python -m distillery.tasks.student`): bad input, a real 2-step training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.tasks.recipe import RecipeError, load_recipe
from distillery.tasks.student import EXIT_BAD_INPUT, METHODS, main

REPO = Path(__file__).resolve().parent.parent


def chat(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "system", "content": "You are an expert for stock markets."},
            {"role": "user", "content": f"I am 30.\n\n{question}"},
            {"role": "assistant", "content": answer},
        ]
    }


def write_jsonl(path: Path, rows: list[dict[str, list[dict[str, str]]]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def rows(n: int, offset: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    return [
        chat(
            f"Should I put ${1000 * (i + 1)} into an index fund?",
            f"Yes: with ${1000 * (i + 1)} and a long horizon, a low-cost index fund spreads your "
            "risk. Keep three months of expenses in cash first.",
        )
        for i in range(offset, offset + n)
    ]


def test_student_rejects_missing_train_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    validation = write_jsonl(tmp_path / "validation.jsonl", rows(2))
    missing = tmp_path / "train.jsonl"
    argv = ["--train", str(missing), "--validation", str(validation), "--output", str(tmp_path)]

    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(missing) in err
    assert len(err.strip().splitlines()) == 1


def test_student_rejects_empty_validation_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    train = write_jsonl(tmp_path / "train.jsonl", rows(8))
    validation = tmp_path / "validation.jsonl"
    validation.write_text("", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--train", str(train), "--validation", str(validation), "--output", str(out)]

    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(validation) in err
    assert "needs a validation split" in err
    assert not out.exists()


def test_student_rejects_a_row_without_an_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    row = chat("What is an ETF?", "A fund traded on an exchange.")
    row["messages"].pop()
    train = write_jsonl(tmp_path / "train.jsonl", [*rows(2), row])
    validation = write_jsonl(tmp_path / "validation.jsonl", rows(2))
    argv = ["--train", str(train), "--validation", str(validation), "--output", str(tmp_path)]

    assert main(argv) == EXIT_BAD_INPUT
    assert f"{train}:3:" in capsys.readouterr().err


def test_student_rejects_a_gkd_beta_outside_0_to_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    train = write_jsonl(tmp_path / "train.jsonl", rows(2))
    validation = write_jsonl(tmp_path / "validation.jsonl", rows(2))
    argv = ["--train", str(train), "--validation", str(validation), "--output", str(tmp_path)]

    assert main([*argv, "--method", "gkd", "--gkd-beta", "1.5"]) == EXIT_BAD_INPUT
    assert "--gkd-beta must be between 0 and 1" in capsys.readouterr().err


def test_recipe_local_methods_are_the_trainers_methods(tmp_path: Path):
    def recipe(method: str) -> str:
        data = yaml.safe_load((REPO / "recipes" / "stock-advisor.yaml").read_text())
        data["seeds_file"] = str(REPO / "recipes" / "stock-advisor-seeds.yaml")
        data["training"] = {"local": {"method": method}}
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    for method in METHODS:
        assert load_recipe(recipe(method)).training.local.method == method
    with pytest.raises(RecipeError, match=r"training\.local\.method"):
        load_recipe(recipe("distil"))


@pytest.mark.slow
def test_student_trains_measures_and_saves_a_loadable_model(tmp_path: Path, model_cache: Path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(8))
    validation = write_jsonl(tmp_path / "validation.jsonl", rows(2, offset=8))
    out = tmp_path / "out"
    command = [
        *(sys.executable, "-m", "distillery.tasks.student"),
        *("--train", str(train), "--validation", str(validation), "--output", str(out)),
        *("--max-steps", "2", "--batch-size", "4", "--max-length", "128", "--samples", "1"),
    ]
    env = {**os.environ, "DISTILLERY_MODEL_CACHE": str(model_cache)}

    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=840, check=False
    )

    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["convert", "eval_before", "train", "eval_after", "save"]
    steps = [e for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["max_steps"] == 2 and math.isfinite(s["loss"]) for s in steps)
    assert events[-1] == {"event": "done", "metrics": str(out / "metrics.json")}

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lora"
    assert metrics["steps"] == 2
    assert metrics["examples"] == {"train": 8, "validation": 2}
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert math.isfinite(metrics["eval_loss_before"])
    assert math.isfinite(metrics["eval_loss_after"])
    assert metrics["improved"] == (metrics["eval_loss_after"] < metrics["eval_loss_before"])
    [sample] = metrics["samples"]
    assert "$9000" in sample["question"]
    assert sample["teacher"].startswith("Yes: with $9000")
    assert sample["before"] and sample["after"]
    assert metrics["reload_check"]

    # The folder is a plain Hugging Face model: LoRA merged, no adapter files, no peft needed.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not (out / "model" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is an index fund?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()


@pytest.mark.slow
def test_gkd_distils_the_half_depth_student_from_the_full_model(tmp_path: Path, model_cache: Path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(4))
    validation = write_jsonl(tmp_path / "validation.jsonl", rows(2, offset=4))
    out = tmp_path / "out"
    command = [
        *(sys.executable, "-m", "distillery.tasks.student", "--method", "gkd"),
        *("--train", str(train), "--validation", str(validation), "--output", str(out)),
        *("--max-steps", "2", "--batch-size", "2", "--max-length", "128", "--samples", "1"),
        # The defaults a recipe's `method: gkd` gets: forward KL on the dataset's answers.
        *("--threads", "1"),
    ]
    env = {**os.environ, "DISTILLERY_MODEL_CACHE": str(model_cache)}

    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=840, check=False
    )

    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["phase"] for e in events if e["event"] == "phase"] == [
        *("convert", "eval_before", "train", "eval_after", "save"),
    ]
    assert [s["step"] for s in events if s["event"] == "step"] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "gkd"
    assert metrics["steps"] == 2
    assert metrics["hyperparameters"]["gkd_lmbda"] == 0.0
    assert metrics["hyperparameters"]["gkd_beta"] == 0.0
    # The losses are the divergence from the teacher (non-negative) at each step ...
    assert [p["step"] for p in metrics["train_loss"]] == [1, 2]
    assert all(math.isfinite(p["loss"]) and p["loss"] >= 0 for p in metrics["train_loss"])
    # ... and the student's cross-entropy on the held-out answers, as lora and layers report it.
    assert math.isfinite(metrics["eval_loss_before"]) and metrics["eval_loss_before"] > 0
    assert math.isfinite(metrics["eval_loss_after"])
    assert metrics["seconds_per_step"] > 0 and metrics["peak_rss_mb"] > 0
    # The student is the half-depth copy, trained in full; the teacher (30 layers) is not saved.
    params = metrics["parameters"]
    assert params["trainable"] == params["total"] < 100_000_000
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 15
    assert metrics["reload_check"] is not None
