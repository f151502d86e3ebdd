"""The student trainer (tasks/student.py): input errors, and a real two-step training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillery.tasks.student import EXIT_BAD_INPUT, main

REPO = Path(__file__).resolve().parent.parent


def chat(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "system", "content": "You are an expert for stock markets."},
            {"role": "user", "content": f"# USER CONTEXT\nI am 30.\n\n# QUESTION\n{question}"},
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
