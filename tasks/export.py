"""Assembly and export: the candidate dataset, published as a versioned Parquet dataset."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.tasks.diversity import diversity_table
from distillery.tasks.evaluation import EVAL_FILE, eval_table
from distillery.tasks.recipe import Recipe
from distillery.tasks.record import JUDGE_COLUMNS, RECORD_COLUMNS, RECORD_SCHEMA, REJECT_SCHEMA

logger = logging.getLogger("distillery.export")


def assign_split(ids: pd.Series, validation_fraction: float) -> pd.Series:
    """Deterministic split by id: a row's split depends on its id alone.

    The one exception: when the hash puts no row in validation although the recipe asks for
    some (small datasets), the row with the lowest hash goes there, so a held-out split exists.
    """
    buckets = ids.map(lambda rid: int(hashlib.sha256(f"split/{rid}".encode()).hexdigest()[:8], 16))
    split = (buckets / 2**32 < validation_fraction).map({True: "validation", False: "train"})
    if validation_fraction > 0 and len(ids) >= 2 and not (split == "validation").any():
        split = split.where(buckets != buckets.min(), "validation")
    return split


def assemble_candidates(
    answered: pd.DataFrame, recipe: Recipe, run_id: str, kept: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Every answered row in record form plus `status`: the frame the GX suite checks.

    `kept`: rows of the last version published again (a refresh); they keep the run id and
    time that made them.
    """
    frame = answered.copy()
    if len(frame):
        frame["run_id"] = run_id
        frame["created_at"] = pd.Timestamp.now(tz="UTC").floor("us")
    if kept is not None and len(kept):
        old = kept.assign(status="accepted", reason=None, detail=None)
        frame = pd.concat([old, frame], ignore_index=True) if len(frame) else old
    for column in JUDGE_COLUMNS:  # null where nothing judged the row (the judge is off)
        if column not in frame:
            frame[column] = None
    frame["split"] = assign_split(frame["id"], recipe.validation_fraction)
    return frame.reset_index(drop=True)


# Rows a published file is written in at a time (a Parquet row group).
WRITE_ROWS = 10_000


def _table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    # A nullable column the frame lacks is null (the judge's, of rows nothing judged).
    missing = [f.name for f in schema if f.nullable and f.name not in frame.columns]
    if missing:
        frame = frame.assign(**dict.fromkeys(missing))
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout.

    A checkout run without an install (`python -m distillery.flows.cli` from the repository's
    root) has no package metadata: the version is then "0+unknown", and the commit still says
    exactly which code ran.
    """
    try:
        version = metadata.version("distillery")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (FileNotFoundError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return version
    # A local version label has one "+": the commit joins it with a dot.
    return f"{version}{'.' if '+' in version else '+'}g{sha}"


@dataclass(frozen=True)
class PublishedVersion:
    uri: str
    version: str
    counts: dict[str, int]


def dataset_card(recipe: Recipe, manifest: dict[str, Any]) -> str:
    counts = manifest["counts"]["published"]
    evaluation = manifest.get("evaluation", {})
    held_out = (
        [
            f"- `{EVAL_FILE}`: {evaluation['items']} held-out evaluation items (from "
            f"{evaluation['held_out_from']}) with the teacher's reference answer; never shown "
            "to expansion, never trained on; generated inputs too close to one were rejected "
            "(`contaminated` in `rejected.parquet`).",
        ]
        if evaluation.get("enabled")
        else []
    )
    report = manifest.get("diversity")
    lines = [
        f"# {recipe.name}",
        "",
        recipe.description.strip() or "A fine-tuning dataset distilled from a teacher LLM.",
        "",
        f"- version: `{manifest['version']}`",
        f"- teacher: `{manifest['teacher']['model']}` at `{manifest['teacher']['host']}`",
        f"- rows: {counts['total']} (train {counts['train']}, validation {counts['validation']})",
        f"- seeds: {manifest['counts']['seeds']}; answer style: {recipe.answer.style}",
        f"- made by distillery {manifest['code_version']}, run `{manifest['run_id']}`",
        "",
        "## Files",
        "",
        "- `train.parquet`, `validation.parquet`: one row per example (columns below), zstd.",
        "- `train.jsonl`, `validation.jsonl`: OpenAI chat fine-tuning format (`messages`).",
        "- `rejected.parquet`: rows a stage threw away, with `stage`, `reason` and `detail`.",
        *held_out,
        "- `manifest.json`: counts per stage, tokens, validation summary, diversity, timings.",
        "",
        *(["## Diversity", "", *diversity_table(report), ""] if report else []),
        "## Columns",
        "",
        "| column | type |",
        "|---|---|",
        *(f"| `{f.name}` | `{f.type}` |" for f in RECORD_SCHEMA),
        "",
        "## Load",
        "",
        "```python",
        "import pandas as pd",
        f'train = pd.read_parquet("{manifest["uri"]}/train.parquet")',
        "```",
        "",
    ]
    return "\n".join(lines)


def publish(
    output: str,
    recipe: Recipe,
    dataset: pd.DataFrame,
    rejected: pd.DataFrame,
    manifest: dict[str, Any],
    move_latest: bool = True,
    evaluation: pd.DataFrame | None = None,
) -> PublishedVersion:
    """Write a new version folder, then move LATEST to it (last: a half-written run never wins).

    `move_latest=False` leaves LATEST alone (a version waiting for its review); `evaluation`:
    the held-out evaluation set with its reference answers (EVAL_SCHEMA), if the recipe has one.
    """
    fs, root = fsspec.core.url_to_fs(output)
    base = posixpath.join(root, recipe.name)
    now = datetime.now(UTC)
    version = f"{now:%Y%m%dT%H%M%SZ}-{manifest['run_id'][:8]}"
    folder = posixpath.join(base, version)
    uri = output.rstrip("/") + f"/{recipe.name}/{version}"
    fs.makedirs(folder, exist_ok=True)

    def write_bytes(name: str, data: bytes) -> None:
        with fs.open(posixpath.join(folder, name), "wb") as f:
            f.write(data)

    # Written in slices of WRITE_ROWS rows (one Parquet row group each): a 100,000-row version
    # never holds a whole split as Arrow data or as JSONL text in memory.
    def write_parquet(
        name: str, frame: pd.DataFrame, to_table: Callable[[pd.DataFrame], pa.Table]
    ) -> None:
        with fs.open(posixpath.join(folder, name), "wb") as f:
            first = to_table(frame.iloc[:WRITE_ROWS])
            with pq.ParquetWriter(f, first.schema, compression="zstd") as writer:
                writer.write_table(first)
                for start in range(WRITE_ROWS, len(frame), WRITE_ROWS):
                    writer.write_table(to_table(frame.iloc[start : start + WRITE_ROWS]))

    def write_jsonl(name: str, messages: pd.Series) -> None:
        with fs.open(posixpath.join(folder, name), "wb") as f:
            for start in range(0, len(messages), WRITE_ROWS):
                chunk = messages.iloc[start : start + WRITE_ROWS]
                f.write(
                    "".join(
                        json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chunk
                    ).encode()
                )

    counts = {"total": len(dataset)}
    for split in ("train", "validation"):
        part = dataset[dataset["split"] == split]
        counts[split] = len(part)
        write_parquet(f"{split}.parquet", part, lambda f: _table(f, RECORD_SCHEMA))
        write_jsonl(f"{split}.jsonl", part["messages"])
    write_parquet("rejected.parquet", rejected, _rejected_table)
    if evaluation is not None:
        fs.makedirs(posixpath.join(folder, posixpath.dirname(EVAL_FILE)), exist_ok=True)
        write_parquet(EVAL_FILE, evaluation, eval_table)
    manifest = {**manifest, "version": version, "uri": uri}
    manifest["counts"]["published"] = counts
    write_bytes("README.md", dataset_card(recipe, manifest).encode())
    write_bytes("manifest.json", json.dumps(manifest, indent=2, default=str).encode())
    if move_latest:
        point_latest(output, recipe.name, version)
    return PublishedVersion(uri=uri, version=version, counts=counts)


def read_text(uri: str) -> str | None:
    """A small file's text (LATEST, manifest.json), local or remote; None when it is absent."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return bytes(f.read()).decode()
    except FileNotFoundError:
        return None


def point_latest(output: str, dataset: str, version: str) -> None:
    """Move `<output>/<dataset>/LATEST` to a version (one small write)."""
    fs, root = fsspec.core.url_to_fs(output)
    with fs.open(posixpath.join(root, dataset, "LATEST"), "wb") as f:
        f.write(version.encode())


def update_manifest(uri: str, key: str, value: Any) -> dict[str, Any]:
    """Set one top-level entry of a published version's manifest.json; returns the manifest."""
    fs, folder = fsspec.core.url_to_fs(uri)
    path = posixpath.join(folder, "manifest.json")
    manifest: dict[str, Any] = json.loads(read_text(uri.rstrip("/") + "/manifest.json") or "{}")
    manifest[key] = value
    with fs.open(path, "wb") as f:
        f.write(json.dumps(manifest, indent=2, default=str).encode())
    return manifest


def _rejected_table(rejected: pd.DataFrame) -> pa.Table:
    frame = rejected.copy()
    for name in REJECT_SCHEMA.names:
        if name not in frame.columns:
            frame[name] = None
    frame = (
        frame[REJECT_SCHEMA.names].astype(object).where(frame[REJECT_SCHEMA.names].notna(), None)
    )
    return pa.Table.from_pandas(frame, schema=REJECT_SCHEMA, preserve_index=False)


def folder_uri(output: str, *parts: str) -> str:
    """The URI of a folder under the output (upload_folder's target)."""
    return output.rstrip("/") + "/" + "/".join(parts)


def upload_folder(local: Path, output: str, *parts: str) -> str:
    """Copy a local folder (the Data Docs) under the output; returns its URI."""
    fs, root = fsspec.core.url_to_fs(output)
    target = posixpath.join(root, *parts)
    fs.makedirs(target, exist_ok=True)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            dest = posixpath.join(target, path.relative_to(local).as_posix())
            fs.makedirs(posixpath.dirname(dest), exist_ok=True)
            fs.put_file(str(path), dest)
    return folder_uri(output, *parts)


@task(name="publish", task_run_name="publish", cache_policy=NO_CACHE)
def publish_dataset(
    output: str,
    recipe: Recipe,
    candidates: pd.DataFrame,
    rejected: pd.DataFrame,
    manifest: dict[str, Any],
    move_latest: bool = True,
    evaluation: pd.DataFrame | None = None,
) -> PublishedVersion:
    """Publish the accepted rows as a new dataset version and move LATEST to it."""
    dataset = candidates[candidates["status"] == "accepted"][RECORD_COLUMNS]
    return publish(output, recipe, dataset, rejected, manifest, move_latest, evaluation)
