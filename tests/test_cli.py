"""The `distillery` command in subprocesses: bad input, and a run killed half-way then resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from distillery.tasks.record import JUDGE_COLUMNS
from fake_teacher import FakeTeacher, Knobs

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "stock-advisor.yaml")
CONCURRENCY = 8


def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: its own Prefect home (ephemeral server), teacher cache and no keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DISTILLERY_CACHE_DIR=str(tmp_path / "cache"),
        DISTILLERY_CONCURRENCY=str(CONCURRENCY),
    )
    return env


def distillery(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "distillery.flows.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the ephemeral Prefect server is its child: kill the group
    )


@pytest.mark.parametrize(
    ("recipe_text", "expected"),
    [
        ("name: demo\nteacher: {model: m}\nseeds: []\n", "'seeds' is empty"),
        ("name: demo\nteacher: {model: m, temprature: 1}\nseeds: []\n", "teacher.temprature"),
        ("name: demo\nseeds: [\n", "not valid YAML"),
    ],
)
def test_bad_recipe_exits_non_zero_before_any_request_and_writes_nothing(
    tmp_path: Path, recipe_text: str, expected: str
) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(recipe_text)
    with FakeTeacher() as teacher:
        out = str(tmp_path / "out")
        args = ["run", str(recipe), "--output", out, "--teacher-base-url", teacher.url]
        proc = distillery(*args, env=cli_env(tmp_path))
        output, _ = proc.communicate(timeout=120)
        assert teacher.stats.received == 0
    assert proc.returncode == 2
    assert "bad.yaml" in output and expected in output
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_teacher_model_without_an_endpoint_names_the_settings(tmp_path: Path) -> None:
    args = ["run", RECIPE, "--output", str(tmp_path / "out"), "--teacher-model", "gpt-4o"]
    proc = distillery(*args, env=cli_env(tmp_path))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--teacher-base-url" in output and "OPENAI_API_KEY" in output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("openai", "OPENAI_API_KEY"), ("prefect", "PREFECT_API_URL")],
)
def test_training_backend_without_its_settings_fails_before_any_request(
    tmp_path: Path, backend: str, expected: str
) -> None:
    with FakeTeacher() as teacher:
        args = ["run", RECIPE, "--output", str(tmp_path / "out"), "--train-backend", backend]
        args += ["--teacher-base-url", teacher.url, "--teacher-model", "fake-teacher"]
        proc = distillery(*args, env=cli_env(tmp_path))
        output, _ = proc.communicate(timeout=120)
        assert teacher.stats.received == 0
    assert proc.returncode == 2, output
    assert expected in output and f"backend {backend}" in output
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_killed_half_way_resumes_without_resending_and_publishes_200(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    out = tmp_path / "out"
    args = ["run", RECIPE, "--examples", "200", "--output", str(out), "--no-train"]
    with FakeTeacher(Knobs(latency=0.2, slots=CONCURRENCY)) as teacher:
        args += ["--teacher-base-url", teacher.url, "--teacher-model", "fake-teacher"]
        first = distillery(*args, env=env)
        deadline = time.monotonic() + 300
        while teacher.stats.answered < 130 and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[0]
            time.sleep(0.05)
        assert teacher.stats.answered >= 130, "the first run never got half-way"
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
        answered_before_kill = teacher.stats.answered
        assert not (out / "stock-advisor" / "LATEST").exists()

        second = distillery(*args, env=env)
        output, _ = second.communicate(timeout=600)
        assert second.returncode == 0, output
        stats = teacher.stats
        resent = sum(n - 1 for n in stats.received_by_body.values() if n > 1)
        assert resent <= CONCURRENCY, f"{resent} requests re-sent after the kill"
        assert stats.answered_twice <= CONCURRENCY
        assert stats.answered > answered_before_kill

        version = (out / "stock-advisor" / "LATEST").read_text().strip()
        folder = out / "stock-advisor" / version
        assert str(folder) in output and "rows: 200" in output
        frame = pd.concat(
            [
                pd.read_parquet(folder / "train.parquet"),
                pd.read_parquet(folder / "validation.parquet"),
            ]
        )
        manifest = json.loads((folder / "manifest.json").read_text())
        assert len(frame) == 200 == manifest["counts"]["published"]["total"]
        assert frame["id"].is_unique
        # Every column filled but the judge's: the shipped recipe's judge is off.
        assert not frame.drop(columns=JUDGE_COLUMNS).isna().any().any()

        received = stats.received
        third = distillery(*args, env=env)
        output, _ = third.communicate(timeout=600)
        assert third.returncode == 0, output
        assert teacher.stats.received == received
        assert "unchanged" in output and "(0 teacher requests sent)" in output
        assert (out / "stock-advisor" / "LATEST").read_text().strip() == version


def priced_recipe(tmp_path: Path, input_usd: float, output_usd: float) -> Path:
    """A copy of the shipped recipe with a teacher price (USD per 1M tokens)."""
    text = Path(RECIPE).read_text()
    seeds = str(REPO / "recipes" / "stock-advisor-seeds.yaml")
    text = text.replace("seeds_file: stock-advisor-seeds.yaml", f"seeds_file: {seeds}")
    price = f"  price: {{input_usd_per_1m: {input_usd}, output_usd_per_1m: {output_usd}}}\n"
    recipe = tmp_path / "priced.yaml"
    recipe.write_text(text.replace("teacher:\n", "teacher:\n" + price, 1))
    return recipe


def test_max_cost_stops_sending_keeps_answers_and_publishes_nothing(tmp_path: Path) -> None:
    # $1000 per 1M output tokens: each answer's worst case (768 tokens) is about $0.77.
    recipe = priced_recipe(tmp_path, 100, 1000)
    env = cli_env(tmp_path)
    out = tmp_path / "out"
    with FakeTeacher(Knobs(latency=0.0)) as teacher:
        args = ["run", str(recipe), "--examples", "40", "--output", str(out), "--no-train"]
        args += ["--teacher-base-url", teacher.url, "--teacher-model", "fake"]
        proc = distillery(*args, "--max-cost", "3", env=env)
        output, _ = proc.communicate(timeout=300)
        answered = teacher.stats.answered

        assert proc.returncode == 1, output[-3000:]
        # Prefect logs the failed flow run with its traceback; the CLI then says what happened.
        lines = output.splitlines()
        last = max(i for i, line in enumerate(lines) if line.startswith("Nothing was published"))
        assert lines[last - 1].startswith("error: ") and "spending cap of $3.00" in lines[last - 1]
        spent = float(re.search(r"\$([0-9.]+) spent", output).group(1))  # type: ignore[union-attr]
        assert 0 < spent <= 3 and answered >= 1
        assert not (out / "stock-advisor" / "LATEST").exists()

        # Every answer received is cached: a higher cap continues without paying for them again.
        proc = distillery(*args, "--max-cost", "1000", env=env)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
        assert teacher.stats.resent_after_answer == 0
        assert (out / "stock-advisor" / "LATEST").exists()


def test_batch_run_publishes_from_the_batch_api_and_a_rerun_submits_nothing(
    tmp_path: Path,
) -> None:
    from fake_openai_batches import FakeOpenAIBatches
    from fake_openai_batches import Knobs as BatchKnobs

    env = {
        **cli_env(tmp_path),
        "OPENAI_API_KEY": "test-key",
        "DISTILLERY_BATCH_POLL_INTERVAL_S": "0.1",
        "DISTILLERY_BATCH_MAX_POLL_INTERVAL_S": "0.5",
    }
    recipe = priced_recipe(tmp_path, 1, 2)
    out = tmp_path / "out"
    with FakeOpenAIBatches(BatchKnobs(api_key="test-key", batch_seconds=0.5)) as server:
        args = ["run", str(recipe), "--examples", "30", "--output", str(out), "--no-train"]
        args += ["--batch", "--teacher-base-url", server.base_url]
        proc = distillery(*args, env=env)
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        first = server.stats
        assert first.batches_created >= 2  # seed answers, expansion, answers of new inputs
        assert first.submitted_twice == 0

        version = (out / "stock-advisor" / "LATEST").read_text().strip()
        manifest = json.loads((out / "stock-advisor" / version / "manifest.json").read_text())
        assert manifest["counts"]["published"]["total"] == 30
        assert manifest["tokens"]["requests_sent"] == first.rows_submitted
        # The recipe's price at half (the default batch discount), on what was really sent.
        tokens = manifest["tokens"]
        expected = tokens["sent_prompt_tokens"] * 1 + tokens["sent_completion_tokens"] * 2
        assert manifest["cost"]["usd"] == pytest.approx(expected / 2 / 1e6)

        proc = distillery(*args, env=env)
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        assert server.stats.batches_created == first.batches_created
        assert server.stats.rows_submitted == first.rows_submitted


def test_batch_with_the_embedded_teacher_is_refused_before_anything_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = distillery("run", RECIPE, "--output", str(out), "--batch", env=cli_env(tmp_path))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--batch" in output and "embedded teacher has none" in output
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "not gguf", "with a base url"])
def test_a_bad_teacher_gguf_is_refused_before_prefect_starts_or_a_request_is_sent(
    tmp_path: Path, case: str
) -> None:
    from distillery.tasks.embedded import gguf_path

    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model\n")
    gguf, expected = {
        "missing": (tmp_path / "gone.gguf", f"{tmp_path / 'gone.gguf'} does not exist: give "
                    "--teacher-gguf (parameter teacher_gguf) the path of a GGUF model file."),
        "not gguf": (notes, f"{notes} is not a GGUF file"),
        "with a base url": (gguf_path(), "--teacher-base-url embedded (or leave it out)"),
    }[case]  # fmt: skip
    out = tmp_path / "out"
    with FakeTeacher() as teacher:
        args = ["run", RECIPE, "--output", str(out), "--no-train", "--teacher-gguf", str(gguf)]
        if case == "with a base url":
            args += ["--teacher-base-url", teacher.url]
        proc = distillery(*args, env=cli_env(tmp_path))
        output, _ = proc.communicate(timeout=120)
        assert teacher.stats.received == 0
    assert proc.returncode == 2, output
    assert expected in output and "Traceback" not in output, output
    assert not out.exists()
    # Importing Prefect makes its home folder; its server would make the database there.
    assert not (tmp_path / "prefect-home" / "prefect.db").exists(), "Prefect's server started"


def test_teacher_serve_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model\n")
    proc = distillery("teacher", "serve", "--gguf", str(notes), env=cli_env(tmp_path))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output
    assert f"{notes} is not a GGUF file" in output and "give --gguf" in output, output


def test_review_without_a_server_is_refused_before_anything_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = distillery("run", RECIPE, "--review", "--output", str(out), env=cli_env(tmp_path))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output
    assert "needs a Prefect server" in output and "--no-review" in output
    assert not out.exists()

    proc = distillery("review", "0b7e3c1e-0000-4000-8000-000000000000", "approve",
                      env=cli_env(tmp_path))  # fmt: skip
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "PREFECT_API_URL" in output, output
