"""The distill flow: seeds -> expand -> answer -> validate -> export, as cached, retryable tasks."""

import dataclasses
import os
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from tasks import embedded
from tasks.answer import AnswerResult, answer_inputs
from tasks.cost import format_usd, price_for
from tasks.expand import expand_inputs, seed_inputs
from tasks.export import assemble_candidates, code_version, publish_dataset
from tasks.recipe import Recipe, load_recipe, target_size
from tasks.teacher import CallStats, TeacherEndpoint, TeacherError, api_key_for, get_engine
from tasks.train import train_student
from tasks.validate import ValidationReport, validate_dataset

EMBEDDED = "embedded"  # the teacher_base_url value that asks for the embedded teacher

# Top-up cycles: when answers are rejected, expansion runs again for the missing rows.
MAX_CYCLES = 4


class DistillParams(BaseModel):
    """Parameters of one distill run (rendered as a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")

    recipe: str = Field(description="Path or fsspec URI (s3://...) of the recipe YAML file.")
    examples: int | None = Field(
        None, ge=1, description="Target dataset size, seeds included; default: the recipe's."
    )
    output: str = Field(
        "./out", description="Where versions are published: a local folder or an s3:// URI."
    )
    teacher_model: str | None = Field(None, description="Override the recipe's teacher model.")
    teacher_base_url: str | None = Field(
        None,
        description=(
            "OpenAI-compatible endpoint of the teacher, or 'embedded'; default: the recipe's, "
            "else OPENAI_BASE_URL, else OpenAI's API if OPENAI_API_KEY is set, else the "
            "embedded SmolLM2 teacher on 127.0.0.1."
        ),
    )
    answer_batch_size: int = Field(
        500, ge=1, description="Inputs per answer task (the unit Prefect caches and retries)."
    )
    train: bool = Field(True, description="Train a student on the published version.")
    train_backend: Literal["local", "openai", "prefect"] | None = Field(
        None, description="Override the recipe's training backend (local, openai, prefect)."
    )


def resolve_endpoint(recipe: Recipe, params: DistillParams) -> TeacherEndpoint:
    """Flag, then recipe, then OPENAI_BASE_URL, then OpenAI (if a key is set), else embedded."""
    base_url = (
        params.teacher_base_url or recipe.teacher.base_url or os.environ.get("OPENAI_BASE_URL")
    )
    if base_url == EMBEDDED or (base_url is None and not os.environ.get("OPENAI_API_KEY")):
        if params.teacher_model and base_url != EMBEDDED:
            raise TeacherError(
                f"--teacher-model {params.teacher_model} needs a teacher endpoint: pass "
                "--teacher-base-url URL or set OPENAI_BASE_URL or OPENAI_API_KEY (with none of "
                "them and no --teacher-model, the embedded SmolLM2 teacher answers)."
            )
        return embedded.endpoint()
    endpoint = TeacherEndpoint(
        model=params.teacher_model or recipe.teacher.model,
        base_url=base_url,
        structured_output=recipe.teacher.structured_output,
        price=recipe.teacher.price,
    )
    api_key_for(endpoint)  # an OpenAI-compatible endpoint: checked before any stage runs
    return endpoint


def teacher_session(endpoint: TeacherEndpoint) -> AbstractContextManager[object]:
    """The embedded teacher's server for the teacher stages, if that is the teacher."""
    return embedded.embedded_teacher() if endpoint.embedded else nullcontext()


@task(name="load-recipe", cache_policy=NO_CACHE)
def load_recipe_task(uri: str) -> Recipe:
    """Read and check the recipe."""
    return load_recipe(uri)


def _run_name() -> str:
    params = flow_run.parameters.get("params")
    recipe = (
        params.recipe if isinstance(params, DistillParams) else dict(params or {}).get("recipe")
    )
    stem = Path(str(recipe or "recipe")).stem
    return f"{stem}-{datetime.now(UTC):%Y-%m-%d-%H%M}"


def _answer_all(
    recipe: Recipe, endpoint: TeacherEndpoint, inputs: pd.DataFrame, cycle: int, size: int
) -> list[AnswerResult]:
    futures = [
        answer_inputs.submit(
            recipe, endpoint, inputs.iloc[i : i + size], f"cycle-{cycle}-batch-{i // size + 1}"
        )
        for i in range(0, len(inputs), size)
    ]
    return [f.result() for f in futures]


@dataclass
class Generation:
    """What the teacher stages produced for one run."""

    answered: pd.DataFrame  # every answered input; `status` says if its answer was kept
    rejected_inputs: list[pd.DataFrame] = field(default_factory=list)
    expansion: Counter[str] = field(default_factory=Counter)
    expansion_rejects: Counter[str] = field(default_factory=Counter)
    requests: int = 0  # teacher requests behind these rows, sent now or earlier
    this_run: CallStats = field(default_factory=CallStats)  # what this run really sent
    shortfall: list[str] = field(default_factory=list)
    seconds: float = 0.0
    structured_form: str = ""  # how the endpoint took structured output in the end

    @property
    def requests_cached(self) -> int:
        return max(0, self.requests - (self.this_run.sent - self.this_run.retries))


def generate(recipe: Recipe, endpoint: TeacherEndpoint, target: int, batch_size: int) -> Generation:
    """Answer the seeds, then expand and answer until `target` answers are kept."""
    engine = get_engine(endpoint)
    before = dataclasses.replace(engine.totals)
    started = time.monotonic()
    stats = CallStats()
    out = Generation(answered=pd.DataFrame())
    inputs = seed_inputs(recipe)
    answered = _answer_all(recipe, endpoint, inputs, 0, batch_size)
    for cycle in range(1, MAX_CYCLES + 1):
        kept = sum(int((a.rows["status"] == "accepted").sum()) for a in answered)
        if kept >= target:
            break
        expansion = expand_inputs(recipe, endpoint, inputs, target - kept, cycle)
        stats.add(expansion.stats)
        out.expansion.update(
            requests=expansion.requests,
            rounds=expansion.rounds,
            parsed=expansion.parsed,
            accepted=len(expansion.accepted),
            surplus=expansion.surplus,
        )
        out.expansion_rejects.update(expansion.rejects)
        if len(expansion.rejected):
            out.rejected_inputs.append(expansion.rejected)
        if expansion.shortfall:
            out.shortfall.append(expansion.shortfall)
        if expansion.accepted.empty:
            break
        inputs = pd.concat([inputs, expansion.accepted], ignore_index=True)
        answered += _answer_all(recipe, endpoint, expansion.accepted, cycle, batch_size)
    for a in answered:
        stats.add(a.stats)
    out.answered = pd.concat([a.rows for a in answered], ignore_index=True)
    out.requests = stats.requests
    out.this_run = engine.totals.since(before)
    out.seconds = round(time.monotonic() - started, 2)
    out.structured_form = engine.structured_form
    return out


def build_manifest(
    recipe: Recipe,
    params: DistillParams,
    endpoint: TeacherEndpoint,
    generation: Generation,
    candidates: pd.DataFrame,
    report: ValidationReport,
    run_id: str,
    target: int,
) -> dict[str, Any]:
    """Everything a reader of a version needs to know about how it was made."""
    kept = candidates[candidates["status"] == "accepted"]
    answer_rejects = Counter(candidates.loc[candidates["status"] == "rejected", "reason"])
    return {
        "dataset": recipe.name,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
        "code_version": code_version(),
        "recipe": {"uri": params.recipe, "hash": recipe.content_hash(), "examples_target": target},
        "teacher": {
            "model": endpoint.model,
            "host": endpoint.host,
            "structured_output": generation.structured_form,
            **({"gguf": embedded.GGUF_FILE} if endpoint.embedded else {}),
        },
        "random_seed": recipe.random_seed,
        "training_config": recipe.training.model_dump(),
        "counts": {
            "seeds": len(recipe.seeds),
            "expansion": {**generation.expansion, "rejected": dict(generation.expansion_rejects)},
            "answers": {
                "answered": len(candidates),
                "accepted": len(kept),
                "rejected": dict(answer_rejects),
            },
        },
        "tokens": {
            "dataset_prompt_tokens": int(kept["prompt_tokens"].sum()),
            "dataset_completion_tokens": int(kept["completion_tokens"].sum()),
            "requests": generation.requests,
            "requests_sent": generation.this_run.sent,
            "requests_cached": generation.requests_cached,
            "retries": generation.this_run.retries,
            "sent_prompt_tokens": generation.this_run.prompt_tokens,
            "sent_completion_tokens": generation.this_run.completion_tokens,
        },
        # USD of what this run sent (tasks/cost.py); None when the model's price is unknown.
        "cost": {
            "usd": generation.this_run.cost_usd,
            "estimated_usd": generation.this_run.estimated_cost_usd,
            "price": _price(endpoint),
        },
        "validation": report.to_dict(),
        "data_docs": report.docs_uri,
        "shortfall": generation.shortfall,
        "timings_s": {"teacher": generation.seconds, "validate": report.seconds},
    }


@flow(
    name="distill",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=4),  # type: ignore[arg-type]
)
def distill(params: DistillParams) -> dict[str, Any]:
    """Build and publish one dataset version from a recipe."""
    started = time.monotonic()
    recipe = load_recipe_task(params.recipe)
    endpoint = resolve_endpoint(recipe, params)
    target = target_size(recipe, params.recipe, params.examples)
    run_id = str(flow_run.get_id() or "local")
    with teacher_session(endpoint):
        generation = generate(recipe, endpoint, target, params.answer_batch_size)
    candidates = assemble_candidates(generation.answered, recipe, run_id)
    report = validate_dataset(
        candidates, recipe.validation, recipe.validation.min_rows or target, params.output,
        recipe.name, run_id,
    )  # fmt: skip
    manifest = build_manifest(
        recipe, params, endpoint, generation, candidates, report, run_id, target
    )
    rejected = pd.concat(
        [
            *generation.rejected_inputs,
            candidates[candidates["status"] == "rejected"].assign(stage="answer"),
        ],
        ignore_index=True,
    )
    published = publish_dataset(params.output, recipe, candidates, rejected, manifest)
    get_run_logger().info(
        "published %s: %d rows (train %d, validation %d); %d teacher requests sent",
        published.uri,
        published.counts["total"],
        published.counts["train"],
        published.counts["validation"],
        generation.this_run.sent,
    )
    summary = {
        "uri": published.uri,
        "version": published.version,
        "published": published.counts,
        "answer_rejects": manifest["counts"]["answers"]["rejected"],
        "expansion_rejects": dict(generation.expansion_rejects),
        "requests": generation.requests,
        "requests_sent": generation.this_run.sent,
        "requests_cached": generation.requests_cached,
        "cost_usd": generation.this_run.cost_usd,
        "shortfall": generation.shortfall,
        "seconds": round(time.monotonic() - started, 2),
    }
    create_markdown_artifact(
        key="dataset-summary",
        markdown=_summary_markdown(recipe, summary),
        description=f"{recipe.name} {published.version}",
    )
    if params.train:
        settings = recipe.training
        if params.train_backend is not None:
            settings = settings.model_copy(update={"backend": params.train_backend})
        summary["training"] = train_student(published.uri, settings)
    return summary


def _price(endpoint: TeacherEndpoint) -> dict[str, float] | None:
    price = price_for(endpoint.model, endpoint.host, endpoint.price)
    return price.model_dump() if price else None


def _summary_markdown(recipe: Recipe, summary: dict[str, Any]) -> str:
    counts = summary["published"]
    lines = [
        f"# {recipe.name} `{summary['version']}`",
        "",
        f"Published to `{summary['uri']}`.",
        "",
        "| what | count |",
        "|---|---|",
        f"| rows | {counts['total']} |",
        f"| train | {counts['train']} |",
        f"| validation | {counts['validation']} |",
        f"| teacher requests sent | {summary['requests_sent']} |",
        f"| teacher requests from cache | {summary['requests_cached']} |",
        f"| teacher cost (USD) | {format_usd(summary['cost_usd'])} |",
        *(f"| rejected at expansion: {k} | {v} |" for k, v in summary["expansion_rejects"].items()),
        *(f"| rejected at answer: {k} | {v} |" for k, v in summary["answer_rejects"].items()),
    ]
    lines += [f"\n> {s}" for s in summary["shortfall"]]
    return "\n".join(lines)
