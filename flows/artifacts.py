"""What a run shows in the Prefect UI: summary, sample rows, dataset link and asset, progress."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse
from uuid import UUID

import pandas as pd
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.assets import Asset
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
from prefect.utilities.context import get_task_and_flow_run_ids

from distillery.tasks.cost import format_usd
from distillery.tasks.diversity import diversity_table
from distillery.tasks.recipe import Recipe
from distillery.tasks.teacher import BatchesPending, TeacherEngine
from distillery.tasks.transfer import report_markdown

logger = logging.getLogger("distillery.artifacts")

SAMPLE_ROWS = 20


def _short(text: Any, limit: int) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def sample(recipe: Recipe, dataset: pd.DataFrame, version: str) -> None:
    """20 rows of the version (seeds and generated, a fixed draw per recipe) as a table."""
    rows = dataset.sample(n=min(SAMPLE_ROWS, len(dataset)), random_state=recipe.random_seed)
    ordered = rows.sort_values(["source", "id"], ascending=[False, True])
    table = [
        {
            "id": r["id"],
            "source": r["source"],
            "split": r["split"],
            "seed_ids": ", ".join(r["seed_ids"]),
            "user_context": _short(r["user_context"], 300),
            "question": _short(r["question"], 200),
            "answer": _short(r["answer"], 500),
        }
        for r in ordered.to_dict("records")
    ]
    create_table_artifact(
        key="dataset-sample",
        table=table,
        description=f"{recipe.name} {version}: {len(table)} of {len(dataset)} rows",
    )


def location_uri(location: str) -> str:
    """An fsspec location as a URI: s3://... as it is, a local path as file:///abs/path."""
    if urlparse(location).scheme in ("", "file"):
        path = location.removeprefix("file://")
        return Path(path).expanduser().resolve().as_uri()
    return location


def asset_key(location: str) -> str | None:
    """The Prefect asset key of a location, or None where Prefect refuses it as a key."""
    try:
        return Asset(key=location_uri(location)).key
    except ValueError:
        logger.debug("no Prefect asset for %s: not a valid asset key", location)
        return None


def dataset_link(recipe: Recipe, uri: str, version: str) -> None:
    """A link artifact to the published version folder."""
    create_link_artifact(
        key="dataset-version",
        link=location_uri(uri),
        link_text=f"{recipe.name} {version}",
        description=f"The published version of {recipe.name} (Parquet, JSONL, manifest, card)",
    )


def summary(recipe: Recipe, summary: dict[str, Any], manifest: dict[str, Any]) -> None:
    """The run's summary: outcome, counts per stage, rejects, tokens, cost, durations."""
    create_markdown_artifact(
        key="dataset-summary",
        markdown=summary_markdown(recipe, summary, manifest),
        description=f"{recipe.name} {summary.get('version')}: {summary['outcome']}",
    )


def judge_rows(judge: dict[str, Any]) -> list[str]:
    """The judge stage's rows of the summary table (none when the judge is off)."""
    if not judge.get("enabled"):
        return []
    mean = judge.get("mean_score")
    rejected = judge.get("rejected", {})
    return [
        f"| judge | published rows scored (mean score, 1-10) | {judge.get('scored_rows', 0)} "
        f"({'n/a' if mean is None else f'{mean:.2f}'}) |",
        f"| judge | requests sent / from cache | {judge.get('requests_sent', 0)} / "
        f"{judge.get('requests_cached', 0)} |",
        f"| judge | rejected: low_score (under {judge.get('min_score', 0):g}) | "
        f"{rejected.get('low_score', 0)} |",
        f"| judge | rejected: judge_error (no usable verdict) | {rejected.get('judge_error', 0)} |",
    ]


def summary_markdown(recipe: Recipe, summary: dict[str, Any], manifest: dict[str, Any]) -> str:
    counts = manifest["counts"]
    published = summary.get("published") or {}
    expansion = counts["expansion"]
    answers = counts["answers"]
    refresh = manifest.get("refresh", {})
    evaluation = manifest.get("evaluation", {})
    tokens = manifest["tokens"]
    outcome = summary["outcome"]
    headline = {
        "published": f"Published to `{summary['uri']}`; LATEST points at it.",
        "awaiting review": f"Written to `{summary['uri']}`; waiting for a review before LATEST "
        "moves and training starts.",
        "rejected in review": f"`{summary['uri']}` was rejected in review; LATEST was not moved "
        "and no student was trained.",
        "unchanged": f"Nothing changed since `{summary['uri']}`: nothing published, no training.",
    }.get(outcome, outcome)
    lines = [
        f"# {recipe.name} `{summary.get('version')}`: {outcome}",
        "",
        headline,
        "",
        "| stage | what | count |",
        "|---|---|---|",
        f"| seeds | in the recipe (evaluation items apart) | {counts['seeds']} |",
    ]
    if evaluation.get("enabled"):
        lines.append(
            f"| evaluate | held-out items (from {evaluation['held_out_from']}), reference "
            f"answers accepted | {evaluation['items']}, "
            f"{evaluation['reference_answers']['accepted']} |"
        )
    if refresh.get("previous"):
        lines += [
            f"| refresh | kept from `{refresh['previous']}` | {counts['kept_from_previous']} |",
            f"| refresh | new seeds / retired seeds | {len(refresh['new_seeds'])} / "
            f"{len(refresh['retired_seeds'])} |",
            f"| refresh | answered again (answer prompt or model changed) | "
            f"{refresh['reanswered']} |",
        ]
        if refresh.get("dropped_contaminated"):
            lines.append(
                "| refresh | dropped: too close to an evaluation item | "
                f"{refresh['dropped_contaminated']} |"
            )
    lines += [
        f"| expand | requests | {expansion.get('requests', 0)} |",
        f"| expand | examples parsed | {expansion.get('parsed', 0)} |",
        f"| expand | inputs accepted | {expansion.get('accepted', 0)} |",
        *(
            f"| expand | rejected: {k} | {v} |"
            for k, v in sorted(expansion.get("rejected", {}).items())
        ),
        f"| answer | answered | {answers['answered']} |",
        f"| answer | accepted | {answers['accepted']} |",
        *(f"| answer | rejected: {k} | {v} |" for k, v in sorted(answers["rejected"].items())),
        *judge_rows(manifest.get("judge") or {}),
        f"| validate | expectations met | {manifest['validation']['successful']} of "
        f"{manifest['validation']['evaluated']} |",
        f"| publish | rows (train / validation) | {published.get('total', 0)} "
        f"({published.get('train', 0)} / {published.get('validation', 0)}) |",
        "",
        "| teacher | value |",
        "|---|---|",
        f"| requests sent | {summary['requests_sent']} |",
        f"| requests from cache | {summary['requests_cached']} |",
        f"| tokens sent (prompt / completion) | {tokens['sent_prompt_tokens']} / "
        f"{tokens['sent_completion_tokens']} |",
        f"| cost (USD) | {format_usd(summary['cost_usd'])} |",
        f"| estimated cost (USD) | {format_usd(summary.get('estimated_cost_usd'))} |",
        "",
        *([*diversity_table(manifest["diversity"]), ""] if manifest.get("diversity") else []),
        "| duration | seconds |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in summary.get("timings_s", {}).items()),
        f"| whole run | {summary['seconds']} |",
    ]
    if manifest.get("data_docs"):
        lines += ["", f"Great Expectations Data Docs: `{manifest['data_docs']}`"]
    if summary.get("review"):
        r = summary["review"]
        lines += ["", f"Review: **{r['decision']}** ({r.get('comment') or 'no comment'})"]
    lines += [f"\n> {s}" for s in summary["shortfall"]]
    return "\n".join(lines)


def batch_progress(
    recipe: Recipe, pending: BatchesPending, summary: dict[str, Any], note: str
) -> None:
    """Batches still running when the run ended (batch mode with a hold): their progress."""
    batches = pending.batches
    answered = sum(b["completed"] for b in batches)
    failed = sum(b["failed"] for b in batches)
    total = sum(b["total"] for b in batches)
    lines = [
        f"# {recipe.name}: waiting for batches",
        "",
        f"{note}.",
        "",
        "| batch | status | answered | failed | requests | created |",
        "|---|---|---|---|---|---|",
        *(
            f"| `{b['id']}` | {b['status']} | {b['completed']} | {b['failed']} | {b['total']} | "
            f"{datetime.fromtimestamp(b['created_at'], UTC):%Y-%m-%d %H:%M:%S} UTC |"
            for b in batches
        ),
        f"| all | | {answered} | {failed} | {total} | |",
        "",
        f"Teacher requests submitted by this run: {summary['requests_sent']}; "
        f"{pending.waiting} still without an answer. The batches are recorded in the request "
        "cache (DISTILLERY_CACHE_DIR, or the shared DISTILLERY_CACHE): the next run re-attaches "
        "to them and submits nothing twice.",
    ]
    create_markdown_artifact(
        key="batch-progress",
        markdown="\n".join(lines),
        description=f"{recipe.name}: {answered} of {total} batch requests answered",
    )
    share = 100.0 * answered / total if total else 0.0
    create_progress_artifact(share, description=f"batches: {answered} of {total} answered")


class TeacherProgress:
    """Live progress of the teacher stages: a Prefect progress artifact, updated every few s.

    Progress is the share of the teacher requests planned so far that have an answer (from the
    cache or the teacher); expansion rounds and answer batches add to the plan as they start.
    """

    def __init__(self, engine: TeacherEngine, goal: int, interval_s: float = 2.0) -> None:
        self.engine = engine
        self.goal = goal
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._id: Any = None
        self._succeeded = False
        self._base = (engine.planned, engine.finished)

    def _numbers(self) -> tuple[float, str]:
        planned = self.engine.planned - self._base[0]
        done = self.engine.finished - self._base[1]
        share = 100.0 * done / planned if planned else 0.0
        text = f"teacher: {done} of {planned} requests answered so far; goal {self.goal} rows"
        batches = self.engine.batch_counts()
        if batches is not None:  # batch mode: what the Batch API has answered of the rest
            text += f"; batches running: {batches[0]}, {batches[1]} of {batches[2]} answered there"
        return min(100.0, share), text

    def _loop(self, flow_run_id: UUID | None) -> None:
        """Create the artifact, update it every interval_s, and once more when the stages end.

        All of it on this thread and over one client, which it closes: the teacher stages do
        not wait for the API (creating the artifact took 45-55 ms before the first request),
        and the engine's thread does not share the GIL with a new client every few seconds.
        (Not prefect.artifacts.update_progress_artifact: it opens a client per call and never
        closes it (Prefect 3.9.1), a socket left to the garbage collector each time.)
        """
        try:
            with get_client(sync_client=True) as client:
                self._id = client.create_artifact(
                    artifact=ArtifactCreate(
                        type="progress",
                        key="teacher-progress",
                        description=f"teacher: starting; goal {self.goal} rows",
                        data=0.0,
                        flow_run_id=flow_run_id,
                    )
                ).id
                while not self._stop.wait(self.interval_s):
                    self._update(client)
                self._update(client, final=100.0 if self._succeeded else None)
        except Exception as exc:  # the UI's progress must never break the run
            logger.debug("progress artifact not kept up to date: %s", exc)

    def _update(self, client: SyncPrefectClient, final: float | None = None) -> None:
        share, text = self._numbers()
        update = ArtifactUpdate(data=final if final is not None else share, description=text)
        try:
            client.update_artifact(artifact_id=self._id, artifact=update)
        except Exception as exc:
            logger.debug("progress artifact not updated: %s", exc)

    def __enter__(self) -> TeacherProgress:
        _, flow_run_id = get_task_and_flow_run_ids()
        self._thread = threading.Thread(
            target=self._loop, args=(flow_run_id,), name="teacher-progress", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._succeeded = exc_type is None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def transfer(recipe: Recipe, report: dict[str, Any], version_uri: str) -> None:
    """The transfer report: win / tie / loss of the trained student as a table and bars."""
    version = version_uri.rstrip("/").rsplit("/", 1)[-1]
    if report.get("available"):
        base = report["comparisons"].get("vs_base") or {}
        about = f"win rate vs base {base.get('win_rate')}"
    else:
        about = "no model to judge"
    create_markdown_artifact(
        key="transfer-report",
        markdown=report_markdown(report, f"{recipe.name} `{version}`"),
        description=f"{recipe.name} {version}: {about}",
    )
