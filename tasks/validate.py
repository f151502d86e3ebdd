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
from expectations.runner import ExpectationOutcome, ValidationReport, run_suite
from expectations.worker import ValidationWorkerDied, preload, run_in_worker
from tasks.export import upload_folder
from tasks.recipe import ValidationSettings

__all__ = [
    "ExpectationOutcome",
    "ValidationFailed",
    "ValidationReport",
    "ValidationWorkerDied",
    "preload_great_expectations",
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


@task(name="validate", task_run_name="validate", cache_policy=NO_CACHE)
def validate_dataset(
    candidates: pd.DataFrame,
    settings: ValidationSettings,
    min_rows: int,
    output: str,
    dataset: str,
    run_id: str,
) -> ValidationReport:
    """Check the candidate dataset against the suite; raise ValidationFailed if it breaks it."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="distillery-gx-") as tmp:
        report = run_in_worker(candidates, settings, min_rows, Path(tmp))
        # Beside the run's output, pass or fail: a failed run's report is the one people read.
        docs = upload_folder(Path(tmp), output, dataset, "runs", run_id, "data-docs")
    report.docs_uri = f"{docs}/index.html"
    report.seconds = round(time.monotonic() - started, 2)
    create_markdown_artifact(
        key="validation-report",
        markdown=report.to_markdown(),
        description="Great Expectations results of the candidate dataset",
    )
    if not report.success:
        raise ValidationFailed(report)
    return report
