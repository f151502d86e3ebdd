"""Running the GX suites over a candidate frame, and the short report of the results.

Prefect-free on purpose: the Great Expectations worker process (expectations.worker) imports
this module, and it should pay for neither Prefect nor, until a suite runs, great_expectations.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from distillery.tasks.recipe import JudgeSettings, ValidationSettings
from distillery.tasks.record import RECORD_COLUMNS, RECORD_SCHEMA

# The columns the suites read: all the worker is sent of the candidate frame.
CHECKED_COLUMNS: list[str] = [*RECORD_COLUMNS, "status"]
# Columns of lists that the suites only check for nulls: the worker is sent a stand-in with the
# same nulls (messages alone was 64 of 171 MiB pickled at 100,000 rows, and slowest to pickle).
NULL_CHECKED_LISTS = tuple(f.name for f in RECORD_SCHEMA if pa.types.is_list(f.type))
PRESENT = "(present; not sent to the validation worker)"


# The lowest and highest of a row's judge_scores (null where it has none): what the suite
# checks of the scores' range, without sending the lists to the worker.
SCORE_RANGE_COLUMNS = ("judge_scores_min", "judge_scores_max")


def suite_frame(candidates: pd.DataFrame) -> pd.DataFrame:
    """What the suites need of the candidate frame, cheap to pickle: the checked columns, and
    for NULL_CHECKED_LISTS a stand-in that is null exactly where the column is (which is all
    that ExpectColumnValuesToNotBeNull reads of them), plus SCORE_RANGE_COLUMNS."""
    frame = with_score_range(candidates[[c for c in CHECKED_COLUMNS if c in candidates.columns]])
    stand_ins = {
        c: frame[c].where(frame[c].isna(), PRESENT) for c in NULL_CHECKED_LISTS if c in frame
    }
    return frame.assign(**stand_ins)


def with_score_range(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with SCORE_RANGE_COLUMNS, from its judge_scores (if it has them yet)."""
    if "judge_scores" not in frame or SCORE_RANGE_COLUMNS[0] in frame:
        return frame
    ranges: dict[str, Any] = {
        name: [
            None if _missing(s) else pick(int(x["score"]) for x in s) for s in frame["judge_scores"]
        ]
        for name, pick in zip(SCORE_RANGE_COLUMNS, (min, max), strict=True)
    }
    return frame.assign(**ranges)


def _missing(scores: Any) -> bool:
    """No scores: None or NaN (not judged), or an empty list (never made, but no range)."""
    return scores is None or isinstance(scores, float) or len(scores) == 0


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


@dataclass
class SuiteRun:
    """What writing the Data Docs of a validation needs: its GX context (the suites and results
    are in its stores) and the results (for the JSON beside the pages)."""

    context: Any
    results: list[Any]


def run_suite(
    candidates: pd.DataFrame,
    settings: ValidationSettings,
    min_rows: int,
    docs_dir: Path,
    judge: JudgeSettings | None = None,
) -> ValidationReport:
    """Validate the candidate frame; write Data Docs and the GX result JSON into docs_dir.

    Runs GX in the calling process: the flow runs it in the worker (expectations.worker).
    """
    report, run = validate_frame(candidates, settings, min_rows, judge)
    write_docs(run, docs_dir)
    return report


def validate_frame(
    candidates: pd.DataFrame,
    settings: ValidationSettings,
    min_rows: int,
    judge: JudgeSettings | None = None,
) -> tuple[ValidationReport, SuiteRun]:
    """Run the suites over the candidate frame (`judge`: the judge's settings when it scored
    the answers): the report, and what write_docs needs."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from distillery.expectations.suite import build_suites

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("candidates").add_dataframe_asset("dataset")
    suites = build_suites(settings, min_rows, judge)
    candidates = with_score_range(candidates)
    accepted = candidates["status"] == "accepted"
    # The accepted rows, filtered once here (a row_condition per expectation made GX filter the
    # frame about 120 times), then every answered row for the status checks.
    batches = [
        ("accepted-rows", suites.accepted, candidates[accepted]),
        ("answered-rows", suites.answered, candidates),
    ]
    # Each validation definition is run on its own frame and the site is built once, later: a
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
    # The docs need the suites and results only: without its data source the context no longer
    # holds the frames (GX keeps the batches), so that a worker waiting to write the docs of
    # 100,000 rows does not hold them too.
    context.data_sources.delete("candidates")
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
    report = ValidationReport(
        success=all(r.success for r in results),
        rows=len(candidates),
        accepted_rows=int(accepted.sum()),
        results=outcomes,
    )
    return report, SuiteRun(context=context, results=results)


def write_docs(run: SuiteRun, docs_dir: Path) -> None:
    """The Data Docs site of a validation, and its results as JSON, into docs_dir."""
    run.context.add_data_docs_site(
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
    run.context.build_data_docs(site_names=["distillery"])
    # The site ships 4 MB of fonts and images per run; the pages read fine without them, and
    # every run's docs are uploaded beside its output (S3 included).
    for heavy in ("fonts", "images"):
        shutil.rmtree(docs_dir / "static" / heavy, ignore_errors=True)
    (docs_dir / "validation_result.json").write_text(
        json.dumps({r.suite_name: r.to_json_dict() for r in run.results}, indent=2)
    )
