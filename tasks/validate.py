"""Validation: the GX suites over the candidate dataset; a failure stops the run before export."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.export import upload_folder
from tasks.recipe import ValidationSettings

logger = logging.getLogger("distillery.validate")


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result, in the short form that the artifact and the manifest show."""

    expectation: str  # GX type, e.g. expect_column_values_to_be_unique
    column: str  # "" for table-level expectations
    observed: str  # observed value, or "N unexpected of M (P%)"
    success: bool
    failing_ids: tuple[str, ...] = ()  # up to 5 ids of rows that broke it


@dataclass
class ValidationReport:
    success: bool
    rows: int  # answered rows in the candidate frame
    accepted_rows: int
    results: list[ExpectationOutcome] = field(default_factory=list)
    docs_uri: str | None = None  # Data Docs index, once uploaded beside the run's output
    seconds: float = 0.0

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success]

    @property
    def evaluated(self) -> int:
        return len(self.results)

    @property
    def successful(self) -> int:
        return self.evaluated - len(self.failed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary for the manifest (failures in full, passes counted)."""
        return {
            "success": self.success,
            "evaluated": self.evaluated,
            "successful": self.successful,
            "rows": self.rows,
            "accepted_rows": self.accepted_rows,
            "failed": [{**asdict(r), "failing_ids": list(r.failing_ids)} for r in self.failed],
        }

    def to_markdown(self) -> str:
        verdict = "passed" if self.success else "FAILED"
        lines = [
            f"# Validation {verdict}",
            "",
            f"{self.successful} of {self.evaluated} expectations met over {self.rows} answered "
            f"rows ({self.accepted_rows} accepted, {self.rows - self.accepted_rows} rejected).",
            "",
            f"Great Expectations Data Docs: `{self.docs_uri}`"
            if self.docs_uri
            else "Great Expectations Data Docs: not uploaded.",
            "",
            "| expectation | column | observed | result |",
            "|---|---|---|---|",
        ]
        for r in self.results:
            ids = f" (e.g. {', '.join(r.failing_ids)})" if r.failing_ids else ""
            result = "pass" if r.success else f"**fail**{ids}"
            cells = (r.expectation, r.column or "(table)", r.observed, result)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        return "\n".join(lines)


def _cell(text: str) -> str:
    """Text that cannot break a markdown table row."""
    return " ".join(text.split()).replace("|", "\\|")


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


def _observed(result: dict[str, Any]) -> str:
    if "observed_value" in result:
        return str(result["observed_value"])[:80]
    if "unexpected_count" in result:
        share = result.get("unexpected_percent")
        tail = f" ({share:.1f}%)" if isinstance(share, (int, float)) else ""
        return (
            f"{result['unexpected_count']} unexpected of {result.get('element_count', '?')}{tail}"
        )
    return ""


def _failing_ids(result: dict[str, Any]) -> tuple[str, ...]:
    rows = result.get("unexpected_index_list") or []
    ids = [str(r["id"]) for r in rows if isinstance(r, dict) and r.get("id") not in (None, "")]
    return tuple(dict.fromkeys(ids))[:5]


_preload: threading.Thread | None = None


def _import_great_expectations() -> None:
    try:
        import great_expectations  # noqa: F401

        import expectations.suite  # noqa: F401
    except Exception:  # run_suite imports it again and raises there
        pass


def preload_great_expectations() -> None:
    """Import great_expectations (3-8 s on 2 cores) in a background thread.

    A flow starts it before the teacher stages, which mostly wait on the teacher, so the import
    is done by the time validation starts instead of delaying it; run_suite waits for it.
    """
    global _preload
    if _preload is None and "great_expectations" not in sys.modules:
        _preload = threading.Thread(
            target=_import_great_expectations, name="distillery-gx-import", daemon=True
        )
        _preload.start()


def run_suite(
    candidates: pd.DataFrame, settings: ValidationSettings, min_rows: int, docs_dir: Path
) -> ValidationReport:
    """Validate the candidate frame; write Data Docs and the GX result JSON into docs_dir."""
    # great_expectations takes ~8 s to import: only runs that reach validation pay for it, and a
    # flow run starts the import early (preload_great_expectations); wait for that one.
    if _preload is not None:
        _preload.join()
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from expectations.suite import build_suites

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        site_name="distillery",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    asset = context.data_sources.add_pandas("candidates").add_dataframe_asset("dataset")
    suites = build_suites(settings, min_rows)
    accepted = candidates["status"] == "accepted"
    # The accepted rows, filtered once here (a row_condition per expectation made GX filter the
    # frame about 120 times), then every answered row for the status checks.
    batches = [
        ("accepted-rows", suites.accepted, candidates[accepted]),
        ("answered-rows", suites.answered, candidates),
    ]
    # Each validation definition is run on its own frame and the site is built once: a
    # Checkpoint passes the same batch parameters (one dataframe) to all of its definitions, and
    # its UpdateDataDocsAction rebuilds the site once per result.
    run_id = RunIdentifier(run_name="distillery")
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]}
    results = []
    for name, suite, frame in batches:
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(
                name=name,
                data=asset.add_batch_definition_whole_dataframe(name),
                suite=context.suites.add(suite),
            )
        )
        # Stored in the context's validation results store, which the docs build renders.
        results.append(
            definition.run(
                batch_parameters={"dataframe": frame}, result_format=result_format, run_id=run_id
            )
        )
    context.build_data_docs(site_names=["distillery"])
    # The site ships 4 MB of fonts and images per run; the pages read fine without them, and
    # every run's docs are uploaded beside its output (S3 included).
    for heavy in ("fonts", "images"):
        shutil.rmtree(docs_dir / "static" / heavy, ignore_errors=True)
    (docs_dir / "validation_result.json").write_text(
        json.dumps({r.suite_name: r.to_json_dict() for r in results}, indent=2)
    )
    outcomes = []
    for result in results:
        for r in result.results:
            config = r.expectation_config
            assert config is not None  # a validation result always carries its expectation
            outcomes.append(
                ExpectationOutcome(
                    expectation=config.type,
                    column=str(config.kwargs.get("column", "")),
                    observed=_observed(r.result),
                    success=bool(r.success),
                    failing_ids=() if r.success else _failing_ids(r.result),
                )
            )
    return ValidationReport(
        success=all(r.success for r in results),
        rows=len(candidates),
        accepted_rows=int(accepted.sum()),
        results=outcomes,
    )


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
        report = run_suite(candidates, settings, min_rows, Path(tmp))
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
