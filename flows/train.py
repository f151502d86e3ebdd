"""The train flow: train a student on one published dataset version (its own deployment)."""

from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from distillery.flows.notify import notify_failure
from distillery.tasks.recipe import AnswerSettings, TrainingSettings
from distillery.tasks.train import resolve_version, train_student


class TrainParams(BaseModel):
    """Parameters of one training run (rendered as a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(
        description=(
            "A published version folder (<output>/<dataset>/<version>) or a dataset folder "
            "(its LATEST version); local path or s3:// URI."
        )
    )
    backend: Literal["local", "openai", "prefect"] | None = Field(
        None, description="Override the training backend recorded with the version's recipe."
    )
    answer: AnswerSettings | None = Field(
        None,
        description=(
            "The recipe's answer settings: with them the student answers the version's "
            "evaluation items before and after training (for the transfer report)."
        ),
    )


def _run_name() -> str:
    params = flow_run.parameters.get("params")
    version: Any
    if isinstance(params, TrainParams):
        version = params.version
    else:
        version = dict(params or {}).get("version")
    parts = str(version or "dataset").rstrip("/").split("/")
    return f"train-{'-'.join(parts[-2:])}-{datetime.now(UTC):%H%M}"


def training_settings(manifest: dict[str, Any], backend: str | None) -> TrainingSettings:
    """The recipe's training settings as published with the version, with the backend override."""
    settings = TrainingSettings.model_validate(manifest.get("training_config") or {})
    if backend is not None:
        settings = settings.model_copy(update={"backend": backend})
    return settings


@flow(name="train", flow_run_name=_run_name, on_failure=[notify_failure])
def train(params: TrainParams) -> dict[str, Any]:
    """Train the student on a published dataset version and record the outcome in it."""
    version = resolve_version(params.version)
    settings = training_settings(version.manifest, params.backend)
    return train_student(version.uri, settings, params.answer)
