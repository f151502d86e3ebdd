"""Validation: the GX suites over the candidate dataset, run in the GX worker process; a failure
stops the run before export."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

# The report types and the suite runner live in Prefect-free modules, which the Great
# Expectations worker process imports; they are re-exported here, where the flow finds them.
from distillery.expectations.runner import ExpectationOutcome, ValidationReport, run_suite
from distillery.expectations.worker import (
    ValidationWorkerDied,
    docs_in_worker,
    preload,
    run_in_worker,
)
from distillery.tasks.export import folder_uri, upload_folder
from distillery.tasks.recipe import JudgeSettings, ValidationSettings

__all__ = [
    "ExpectationOutcome",
    "ValidationFailed",
    "ValidationReport",
    "ValidationWorkerDied",
    "preload_great_expectations",
    "publish_data_docs",
    "run_suite",
    "validate_dataset",
]


class ValidationFailed(Exception):
    """The candidate dataset broke the data contract; nothing was published."""

    def __init__(self, report: ValidationReport) -> None:
        names = ", ".join(
            f"{r.expectation}({r.column})" if r.column else r.expectation for r in report.failed
        )
        where = f"the Data Docs at {report.docs_uri}" if report.docs_uri else "the Data Docs"
        super().__init__(
            f"validation failed {len(report.failed)} of {report.evaluated} expectations "
            f"({names}); see {where} or the Prefect artifact 'validation-report'."
        )
        self.report = report

    def __reduce__(self) -> tuple[type[ValidationFailed], tuple[ValidationReport]]:
        # Pickle (Prefect's result and state serialisers) rebuilds from the report, not the text.
        return (type(self), (self.report,))


def preload_great_expectations() -> None:
    """Start the Great Expectations worker process; a flow calls it before the teacher stages.

    The worker imports great_expectations (3-8 s on 2 cores) on the other core while the
    teacher stages run, so neither the import nor the suites hold the flow process's GIL; later
    flow runs in the same process reuse it.
    """
    preload()


def docs_parts(dataset: str, run_id: str) -> tuple[str, ...]:
    """Where a run's Data Docs go under the output: the parts of the folder's path."""
    return (dataset, "runs", run_id, "data-docs")


@task(name="validate", task_run_name="validate", cache_policy=NO_CACHE)
def validate_dataset(
    candidates: pd.DataFrame,
    settings: ValidationSettings,
    min_rows: int,
    output: str,
    dataset: str,
    run_id: str,
    judge: JudgeSettings | None = None,
) -> ValidationReport:
    """Check the candidate dataset against the suite (`judge`: the judge's settings, when it
    scored the answers); raise ValidationFailed if it breaks it.

    A failed run's Data Docs are written before it raises (they are the report people read);
    a passed run's are written by publish_data_docs, which the flow runs beside publishing.
    """
    started = time.monotonic()
    report = run_in_worker(candidates, settings, min_rows, None, docs_key=run_id, judge=judge)
    report.docs_uri = folder_uri(output, *docs_parts(dataset, run_id)) + "/index.html"
    report.seconds = round(time.monotonic() - started, 2)
    create_markdown_artifact(
        key="validation-report",
        markdown=report.to_markdown(),
        description="Great Expectations results of the candidate dataset",
    )
    if not report.success:
        write_data_docs(output, dataset, run_id)
        raise ValidationFailed(report)
    return report


@task(name="data-docs", task_run_name="data-docs", cache_policy=NO_CACHE)
def publish_data_docs(output: str, dataset: str, run_id: str) -> str:
    """Write the Data Docs of the last validate_dataset beside the run's output; their URI."""
    return write_data_docs(output, dataset, run_id)


def write_data_docs(output: str, dataset: str, run_id: str) -> str:
    with tempfile.TemporaryDirectory(prefix="distillery-gx-") as tmp:
        docs_in_worker(run_id, Path(tmp))
        return upload_folder(Path(tmp), output, *docs_parts(dataset, run_id))
