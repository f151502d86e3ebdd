"""The training stage: submit the student run for a published version, wait, record the outcome."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from distillery.tasks.answer import student_messages
from distillery.tasks.evaluation import EVAL_FILE
from distillery.tasks.export import read_text, update_manifest
from distillery.tasks.recipe import AnswerSettings, TrainingSettings
from distillery.tasks.student import EVAL_ANSWERS

logger = logging.getLogger("distillery.train")

# In the cache key: edits to the helpers below change what a training run does.
TRAIN_VERSION = "1"


class TrainingFailed(RuntimeError):
    """The student's run did not produce a model (the dataset version stays published)."""


@dataclass(frozen=True)
class DatasetVersion:
    """A published, validated dataset version."""

    uri: str
    dataset: str
    version: str
    manifest: dict[str, Any]

    def path(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"


def resolve_version(uri: str) -> DatasetVersion:
    """A version folder, or a dataset folder's LATEST; refuses what was never published."""
    uri = uri.rstrip("/")
    manifest_text = read_text(f"{uri}/manifest.json")
    if manifest_text is None:
        latest = read_text(f"{uri}/LATEST")
        if latest is not None:
            return resolve_version(f"{uri}/{latest.strip()}")
        if read_text(f"{uri}/validation_result.json") is not None:
            raise FileNotFoundError(
                f"{uri} is a run that failed validation: nothing was published, so there is "
                f"nothing to train on; read {uri}/data-docs/ and fix the recipe or the teacher."
            )
        raise FileNotFoundError(
            f"no published dataset version at {uri}: pass a version folder "
            "(<output>/<dataset>/<version>, with manifest.json) or a dataset folder with LATEST."
        )
    manifest = json.loads(manifest_text)
    if not manifest.get("validation", {}).get("success"):
        raise ValueError(
            f"{uri} did not pass validation (manifest.json validation.success is not true): "
            "train only on a version the suite accepted."
        )
    review = manifest.get("review", {}).get("decision")
    if review == "rejected":
        raise ValueError(f"{uri} was rejected in review; it is not trained on.")
    return DatasetVersion(
        uri=uri, dataset=manifest["dataset"], version=manifest["version"], manifest=manifest
    )


def record_outcome(version: DatasetVersion, outcome: dict[str, Any]) -> None:
    """Write the outcome into the version's manifest and `training/outcome.json`."""
    fs, path = fsspec.core.url_to_fs(version.uri)
    fs.makedirs(posixpath.join(path, "training"), exist_ok=True)
    with fs.open(posixpath.join(path, "training", "outcome.json"), "wb") as f:
        f.write(json.dumps(outcome, indent=2, default=str).encode())
    update_manifest(version.uri, "training", outcome)


# ---- local: TRL SFT on this machine's CPU, in a subprocess --------------------------------------


def _student_command(
    train: Path,
    validation: Path,
    out: Path,
    settings: TrainingSettings,
    seed: int,
    eval_prompts: Path | None = None,
) -> list[str]:
    local = settings.local
    command = [
        sys.executable, "-m", "distillery.tasks.student", "--train", str(train),
        "--validation", str(validation), "--output", str(out), "--method", local.method,
        "--epochs", str(local.epochs), "--batch-size", str(local.batch_size),
        "--max-length", str(local.max_length), "--samples", str(local.samples),
        "--seed", str(seed),
    ]  # fmt: skip
    if local.max_steps is not None:
        command += ["--max-steps", str(local.max_steps)]
    if local.learning_rate is not None:
        command += ["--learning-rate", str(local.learning_rate)]
    if eval_prompts is not None:
        command += ["--eval-prompts", str(eval_prompts)]
    return command


def eval_items(version_uri: str) -> pd.DataFrame | None:
    """The version's evaluation set (evaluation/eval.parquet), or None when it has none."""
    fs, root = fsspec.core.url_to_fs(version_uri)
    path = posixpath.join(root, EVAL_FILE)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pandas()


def write_eval_prompts(version: DatasetVersion, answer: AnswerSettings, dest: Path) -> bool:
    """The version's evaluation items as the student is asked them (JSONL of {id, messages});
    False when the version has no evaluation set."""
    items = eval_items(version.uri)
    if items is None:
        return False
    with dest.open("w", encoding="utf-8") as f:
        for item in items.itertuples():
            messages = student_messages(answer, str(item.user_context), str(item.question))
            f.write(json.dumps({"id": item.id, "messages": messages}) + "\n")
    return True


def _log_event(line: str, log: Callable[[str], None]) -> None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return  # library chatter on stdout; the subprocess's stderr keeps the details
    if not isinstance(event, dict):
        return
    kind = event.get("event")
    if kind == "step":
        log(
            f"student step {event.get('step')}/{event.get('max_steps')}: "
            f"loss {event.get('loss')} (epoch {event.get('epoch')})"
        )
    elif kind == "phase":
        extra = {k: v for k, v in event.items() if k not in ("event", "phase")}
        log(f"student: {event.get('phase')} {json.dumps(extra) if extra else ''}".rstrip())


def train_local(
    version: DatasetVersion,
    settings: TrainingSettings,
    seed: int,
    log: Callable[[str], None],
    answer: AnswerSettings | None = None,
) -> dict[str, Any]:
    """Fine-tune the embedded student on the version's train split; model goes under student/.
    With `answer` (the recipe's) and an evaluation set in the version, the base and the trained
    student answer the evaluation items too (`eval_answers`, for the transfer report)."""
    fs, root = fsspec.core.url_to_fs(version.uri)
    remote = not isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="distillery-train-") as tmp:
        work = Path(tmp)
        for split in ("train", "validation"):
            fs.get_file(posixpath.join(root, f"{split}.jsonl"), str(work / f"{split}.jsonl"))
        out = work / "student" if remote else Path(root) / "student"
        prompts = work / "eval-prompts.jsonl"
        asked = answer is not None and write_eval_prompts(version, answer, prompts)
        command = _student_command(
            work / "train.jsonl", work / "validation.jsonl", out, settings, seed,
            prompts if asked else None,
        )  # fmt: skip
        stderr_path = work / "stderr.log"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    _log_event(line, log)
                code = process.wait(timeout=settings.timeout_s)
            finally:
                if process.poll() is None:  # interrupted or timed out: no orphan trainer
                    process.terminate()
                    process.wait(timeout=30)
        if code != 0:
            tail = "\n".join(stderr_path.read_text(errors="replace").splitlines()[-15:])
            raise TrainingFailed(f"local student training exited with code {code}:\n{tail}")
        metrics = json.loads((out / "metrics.json").read_text())
        eval_answers = json.loads((out / EVAL_ANSWERS).read_text()) if asked else None
        if remote:
            fs.put(str(out), posixpath.join(root, "student"), recursive=True)
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    improved = (
        isinstance(before, float) and isinstance(after, float) and math.isfinite(after)
        and after < before
    )  # fmt: skip
    return {
        "backend": "local",
        "status": "succeeded",
        "model_uri": version.path("student/model"),
        "method": metrics.get("method"),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "improved": improved,
        "metrics": metrics,
        "seconds": round(time.monotonic() - started, 1),
        **(
            {
                "eval_answers": {
                    **eval_answers,
                    "base_model": f"{metrics.get('base_model')} (before training)",
                    "trained_model": version.path("student/model"),
                    "max_new_tokens": metrics.get("eval_max_new_tokens"),
                }
            }
            if eval_answers is not None
            else {}
        ),
    }


# ---- prefect: the training deployment on its work pool ------------------------------------------


def train_prefect(
    version: DatasetVersion,
    settings: TrainingSettings,
    log: Callable[[str], None],
    answer: AnswerSettings | None = None,
) -> dict[str, Any]:
    """Run the training deployment for this version and wait for it."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = settings.prefect.deployment
    try:
        child: FlowRun = run_deployment(  # type: ignore[assignment]  # sync context: a FlowRun
            name=name,
            parameters={
                "params": {
                    "version": version.uri,
                    "backend": settings.prefect.backend,
                    # The student prompts of the evaluation items (transfer report).
                    **({"answer": answer.model_dump()} if answer is not None else {}),
                }
            },
            timeout=settings.timeout_s,
            # One training run per version: a restarted flow gets the run it already created.
            idempotency_key=f"distillery-train-{version.dataset}-{version.version}",
        )
    except ObjectNotFound as exc:
        raise ValueError(
            f"no Prefect deployment named {name!r}: deploy the training flow first "
            "(prefect deploy --all --prefect-file deployments/prefect.yaml) or set "
            "training.prefect.deployment in the recipe."
        ) from exc
    state = child.state
    log(f"training deployment {name}: flow run {child.id} is {state.name if state else '?'}")
    if state is None or not state.is_final():
        raise TimeoutError(
            f"flow run {child.id} of {name} did not finish within {settings.timeout_s} s; "
            "it keeps running, and a re-run of this stage waits for it again."
        )
    recorded = json.loads(read_text(version.path("training/outcome.json")) or "{}")
    return {
        "backend": "prefect",
        "status": "succeeded" if state.is_completed() else "failed",
        "deployment": name,
        "flow_run_id": str(child.id),
        "work_pool": child.work_pool_name,
        "state": state.name,
        "child": recorded if state.is_completed() else None,
        "model_uri": recorded.get("model_uri") if state.is_completed() else None,
        "eval_loss_before": recorded.get("eval_loss_before"),
        "eval_loss_after": recorded.get("eval_loss_after"),
        "improved": recorded.get("improved"),
    }


def check_backend(settings: TrainingSettings) -> None:
    """What a backend needs before anything runs; raises ValueError naming the fix."""
    if settings.backend == "openai" and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError(
            "training backend openai needs OPENAI_API_KEY (the fine-tuning API's key); set it, "
            "or choose --train-backend local."
        )
    if settings.backend == "prefect":
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ValueError(
                "training backend prefect runs the training deployment on a Prefect server's "
                "work pool: set PREFECT_API_URL (see the README's local stack), or choose "
                "--train-backend local."
            )


# ---- the task -----------------------------------------------------------------------------------


def run_training(
    version: DatasetVersion,
    settings: TrainingSettings,
    log: Callable[[str], None],
    answer: AnswerSettings | None = None,
) -> dict[str, Any]:
    """Dispatch to the backend and record the outcome in the version; `answer`: the recipe's
    answer settings, which the student's evaluation prompts are built with."""
    check_backend(settings)
    if settings.backend == "local":
        seed = int(version.manifest.get("random_seed", 0))
        outcome = train_local(version, settings, seed=seed, log=log, answer=answer)
    elif settings.backend == "openai":
        from distillery.tasks.train_openai import train_openai

        cfg = settings.openai
        outcome = train_openai(
            version.uri,
            dataset=version.dataset,
            version=version.version,
            model=cfg.model,
            base_url=cfg.base_url,
            hyperparameters=cfg.hyperparameters,
            poll_interval_s=cfg.poll_interval_s,
            max_poll_interval_s=cfg.max_poll_interval_s,
            timeout_s=settings.timeout_s,
            log=log,
        )
    else:
        outcome = train_prefect(version, settings, log, answer)
    outcome = {**outcome, "version_uri": version.uri, "settings": settings.model_dump()}
    record_outcome(version, outcome)
    return outcome


@task(
    name="train-student",
    task_run_name="train-student",
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
    version=TRAIN_VERSION,
)
def train_student(
    version_uri: str, settings: TrainingSettings, answer: AnswerSettings | None = None
) -> dict[str, Any]:
    """Train the student on a published version and record how it went."""
    run_logger = get_run_logger()
    version = resolve_version(version_uri)
    run_logger.info(
        "training a student on %s %s (backend %s)", version.dataset, version.version,
        settings.backend,
    )  # fmt: skip
    outcome = run_training(version, settings, run_logger.info, answer)
    create_markdown_artifact(
        key="training-report",
        markdown=training_markdown(version, outcome),
        description=f"{version.dataset} {version.version}: {settings.backend} training",
    )
    if outcome.get("status") == "succeeded" and outcome.get("improved") is False:
        run_logger.warning(
            "the student's validation loss did not go down (%.4f before, %.4f after): this "
            "training did not learn the teacher's answers; see the training report.",
            outcome["eval_loss_before"],
            outcome["eval_loss_after"],
        )
    return outcome


def _cell(text: Any, limit: int = 400) -> str:
    flat = " ".join(str(text or "").split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("|", "\\|")


def training_markdown(version: DatasetVersion, outcome: dict[str, Any]) -> str:
    """The training report: status, where the student is, loss before/after, samples."""
    lines = [
        f"# Student training: {outcome.get('status')}",
        "",
        f"Dataset `{version.dataset}` version `{version.version}`, backend "
        f"`{outcome.get('backend')}`.",
        "",
        "| what | value |",
        "|---|---|",
    ]
    for key in (
        "model_uri", "job_id", "fine_tuned_model", "flow_run_id", "work_pool", "state",
        "method", "eval_loss_before", "eval_loss_after", "improved", "seconds",
    ):  # fmt: skip
        if outcome.get(key) is not None:
            lines.append(f"| {key} | `{outcome[key]}` |")
    if outcome.get("error"):
        lines.append(f"| error | {_cell(outcome['error'])} |")
    if outcome.get("improved") is False:
        lines += ["", "> The validation loss did not go down: the student did not improve."]
    samples = (outcome.get("metrics") or {}).get("samples") or []
    if samples:
        lines += [
            "",
            "## Validation questions: student before and after, teacher",
            "",
            "| question | before | after | teacher |",
            "|---|---|---|---|",
        ]
        for s in samples:
            lines.append(
                f"| {_cell(s.get('question'), 300)} | {_cell(s.get('before'))} | "
                f"{_cell(s.get('after'))} | {_cell(s.get('teacher'))} |"
            )
    return "\n".join(lines)
