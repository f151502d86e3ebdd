"""The whole job on the embedded default: real SmolLM2 teacher, real (few-step) student training."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "recipes" / "stock-advisor-demo.yaml"


def tiny_recipe(tmp_path: Path, evaluation: bool = True) -> Path:
    """The demo recipe at test size: 4 of its seeds, 6 rows, 2 held out, a 2-step training, 3
    of its evaluation items (none with `evaluation` False)."""
    data = yaml.safe_load(DEMO_RECIPE.read_text())
    seeds = yaml.safe_load((REPO / "recipes" / data.pop("seeds_file")).read_text())
    data["seeds"] = seeds[:4]
    items = yaml.safe_load(
        (REPO / "recipes" / data.pop("evaluation")["eval_seeds_file"]).read_text()
    )
    if evaluation:
        data["evaluation"] = {"eval_seeds": items[:3]}
    data.update(examples=6, validation_fraction=0.34)
    data["training"]["local"].update(max_steps=2, batch_size=4, samples=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def clean_env(tmp_path: Path) -> dict[str, str]:
    """No teacher key or Prefect server of the developer's: ephemeral mode, caches in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DISTILLERY_CACHE_DIR=str(tmp_path / "cache"),
    )
    return env


@pytest.mark.slow
def test_run_on_the_embedded_default_publishes_and_trains_a_student_that_reloads(
    tmp_path: Path, model_cache: Path
) -> None:
    env = clean_env(tmp_path)
    env["DISTILLERY_MODEL_CACHE"] = str(model_cache)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "distillery.flows.cli", "run", str(tiny_recipe(tmp_path))]
    proc = subprocess.run(
        [*command, "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "the embedded SmolLM2" in output

    dataset = out / "stock-advisor-demo"
    folder = dataset / (dataset / "LATEST").read_text().strip()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["teacher"]["host"] == "embedded"
    assert manifest["counts"]["published"]["total"] >= 6
    training = manifest["training"]
    assert training["backend"] == "local" and training["status"] == "succeeded"
    before, after = training["eval_loss_before"], training["eval_loss_after"]
    assert 0 < before < 20 and 0 < after < 20
    assert training["improved"] == (after < before)
    assert f"validation loss: {before:.4f} before, {after:.4f} after" in output
    assert str(folder / "student" / "model") in output
    samples = training["metrics"]["samples"]
    assert len(samples) == 1 and samples[0]["teacher"] and samples[0]["after"]

    # The transfer report, judged by the embedded SmolLM2 itself: every pair in both orders,
    # each pair a verdict or a counted judge_error, whatever the small judge says.
    transfer = manifest["evaluation"]["transfer"]
    assert transfer["available"] is True and transfer["judge"]["host"] == "embedded"
    assert transfer["judge_requests"]["requests"] == 4 * 3
    # What the real judge replied, per pair: each of its two verdicts parsed into win / tie /
    # loss or a judge_error with its reason, and the manifest's counts are those of the file.
    from distillery.tasks.transfer import combine

    verdicts = pd.read_parquet(folder / "evaluation" / "transfer.parquet")
    for name in ("vs_base", "vs_teacher"):
        figures = transfer["comparisons"][name]
        pairs = verdicts[verdicts["comparison"] == name]
        assert figures["items"] == len(pairs) == 3
        for row in pairs.itertuples():
            assert {row.trained_first, row.trained_second} <= {"win", "tie", "loss", "judge_error"}
            assert combine(row.trained_first, row.trained_second)[0] == row.outcome
            assert (row.outcome == "judge_error") == pd.notna(row.judge_error)
        counts = pairs["outcome"].value_counts()
        for outcome, key in (("win", "wins"), ("tie", "ties"), ("loss", "losses")):
            assert figures[key] == counts.get(outcome, 0)
        assert figures["judge_errors"] == counts.get("judge_error", 0)
    assert "transfer report (judge smollm2-135m-instruct at embedded" in output

    # The student is a plain Hugging Face folder: it reloads and answers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = folder / "student" / "model"
    assert list(model_dir.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Should I buy index funds?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(generated[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()


@pytest.mark.slow
def test_a_gguf_given_by_path_teaches_and_the_manifest_names_its_weights(tmp_path: Path) -> None:
    """The shipped file given by path: a short run (6 rows, no training) on llama.cpp."""
    from distillery.tasks.embedded import MODEL_NAME, gguf_path

    gguf = gguf_path()
    out = tmp_path / "out"
    recipe = tiny_recipe(tmp_path, evaluation=False)
    command = [sys.executable, "-m", "distillery.flows.cli", "run", str(recipe)]
    command += ["--output", str(out), "--examples", "6", "--no-train", "--teacher-gguf", str(gguf)]
    proc = subprocess.run(
        command, cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    dataset = out / "stock-advisor-demo"
    folder = dataset / (dataset / "LATEST").read_text().strip()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"]["published"]["total"] >= 6
    teacher = manifest["teacher"]
    assert teacher["model"] == MODEL_NAME and teacher["host"] == "embedded"
    assert teacher["gguf"] == gguf.name
    assert teacher["gguf_bytes"] == gguf.stat().st_size
    assert teacher["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert "training" not in manifest
