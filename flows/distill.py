"""The distill flow: seeds -> expand -> answer -> validate -> export, as cached, retryable tasks."""

import gc
import os
import queue
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.assets import Asset, AssetProperties, materialize
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from distillery.flows import artifacts, recheck
from distillery.flows.artifacts import asset_key
from distillery.flows.notify import notify_failure
from distillery.flows.review import review_gate
from distillery.flows.shard import Sharding, dispatch, plan_sharding
from distillery.tasks import embedded
from distillery.tasks.answer import AnswerResult, answer_inputs
from distillery.tasks.cost import price_for
from distillery.tasks.diversity import diversity
from distillery.tasks.evaluation import evaluation_entry
from distillery.tasks.expand import ExpansionResult, expand_inputs
from distillery.tasks.export import (
    PublishedVersion,
    assemble_candidates,
    code_version,
    point_latest,
    publish_dataset,
    update_manifest,
)
from distillery.tasks.judge import (
    JudgedAnswers,
    add_judge_summaries,
    judge_endpoint,
    judge_manifest,
    judge_summary,
    sent_from_now,
    submit_answers,
)
from distillery.tasks.memory import release_freed_memory
from distillery.tasks.recipe import Recipe, load_recipe, target_size
from distillery.tasks.record import EVAL_SCHEMA, INPUT_COLUMNS
from distillery.tasks.refresh import (
    Previous,
    RefreshPlan,
    answer_fingerprint,
    content_fingerprint,
    plan_refresh,
    read_latest,
)
from distillery.tasks.teacher import (
    BatchesPending,
    CallStats,
    TeacherEndpoint,
    TeacherError,
    api_key_for,
    get_engine,
)
from distillery.tasks.train import train_student
from distillery.tasks.transfer import report_transfer
from distillery.tasks.validate import (
    ValidationReport,
    preload_great_expectations,
    publish_data_docs,
    validate_dataset,
)

EMBEDDED = "embedded"  # the teacher_base_url value that asks for the embedded teacher

# Top-up cycles: when answers are rejected, expansion runs again for the missing rows.
MAX_CYCLES = 4

TrainBackend = Literal["local", "openai", "prefect"]


@dataclass(frozen=True)
class DistillParams:
    """The distill flow's parameters in one value (described on the flow's signature)."""

    recipe: str
    examples: int | None = None
    output: str = "./out"
    teacher_model: str | None = None
    teacher_base_url: str | None = None
    teacher_gguf: str | None = None
    answer_batch_size: int = 500
    train: bool = True
    train_backend: TrainBackend | None = None
    review: bool | None = None
    refresh: bool = True
    notify: str | None = None
    shards: int | None = None


def resolve_endpoint(
    recipe: Recipe, params: DistillParams, gguf: embedded.Gguf | None
) -> TeacherEndpoint:
    """A GGUF file (`teacher_gguf`'s) chooses the embedded teacher; else the base URL: flag,
    then recipe, then OPENAI_BASE_URL, then OpenAI (if a key is set), else embedded."""
    if gguf is not None:
        return embedded.endpoint(gguf)
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


def teacher_gguf(recipe: Recipe, params: DistillParams) -> embedded.Gguf | None:
    """The GGUF file given to the embedded teacher, checked: the flag's, else the recipe's
    (unless the flag names another endpoint); None: none given (the shipped file, if embedded)."""
    if params.teacher_gguf is not None:
        if params.teacher_base_url not in (None, EMBEDDED):
            raise TeacherError(
                f"--teacher-gguf {params.teacher_gguf} is served by the embedded teacher, but "
                f"--teacher-base-url is {params.teacher_base_url}: pass --teacher-base-url "
                "embedded (or leave it out), or drop --teacher-gguf to use that endpoint."
            )
        return embedded.gguf_file(params.teacher_gguf, "--teacher-gguf (parameter teacher_gguf)")
    if recipe.teacher.gguf is not None and params.teacher_base_url in (None, EMBEDDED):
        return embedded.gguf_file(recipe.teacher.gguf, "the recipe's teacher.gguf")
    return None


def teacher_session(
    endpoint: TeacherEndpoint, gguf: embedded.Gguf | None
) -> AbstractContextManager[object]:
    """The embedded teacher's server on `gguf` for the teacher stages, if that is the teacher."""
    return embedded.embedded_teacher(gguf) if endpoint.embedded else nullcontext()


def judge_session(
    judge: TeacherEndpoint | None, teacher: TeacherEndpoint
) -> AbstractContextManager[object]:
    """The embedded server (the shipped file) for an embedded judge of a teacher elsewhere."""
    if judge is not None and judge.embedded and not teacher.embedded:
        return embedded.embedded_teacher()
    return nullcontext()


@task(name="load-recipe", task_run_name="load-recipe", cache_policy=NO_CACHE)
def load_recipe_task(uri: str) -> Recipe:
    """Read and check the recipe."""
    return load_recipe(uri)


def _run_name() -> str:
    recipe = flow_run.parameters.get("recipe")
    stem = Path(str(recipe or "recipe")).stem
    return f"{stem}-{datetime.now(UTC):%Y-%m-%d-%H%M}"


class AnswerStage:
    """The answer tasks of a run: submitted as inputs come (seeds at once, generated inputs in
    batches while expansion goes on), collected when a cycle's expansion is over."""

    def __init__(
        self,
        recipe: Recipe,
        endpoint: TeacherEndpoint,
        size: int,
        judge: TeacherEndpoint | None = None,
    ) -> None:
        self.recipe, self.endpoint, self.size = recipe, endpoint, size
        self.judge = judge  # who scores the answers (the judge stage); None: the judge is off
        self.results: list[AnswerResult] = []
        self._futures: list[PrefectFuture[AnswerResult]] = []
        self._batches: Counter[int] = Counter()  # answer tasks submitted per cycle
        self._pending_rows = 0  # inputs of the tasks not collected yet
        # The evaluation items' reference answers: answered like any input, never a row.
        self.reference: AnswerResult | None = None
        self._reference: PrefectFuture[AnswerResult] | None = None
        # What other processes sent for this stage (the shards of a sharded run, flows/shard.py),
        # and the parent's own work to plan and merge the shards (seconds).
        self.sent_elsewhere = CallStats()
        self.judged_elsewhere: list[dict[str, Any]] = []  # the shards' judge_summary()s
        self.timings: dict[str, float] = {}

    def submit(self, inputs: pd.DataFrame, cycle: int) -> None:
        """Answer `inputs` (at most `size` rows) in one task."""
        self._batches[cycle] += 1
        self._pending_rows += len(inputs)
        label = f"cycle-{cycle}-batch-{self._batches[cycle]}"
        self._futures.append(submit_answers(self.recipe, self.endpoint, self.judge, inputs, label))

    def submit_reference(self, items: pd.DataFrame) -> None:
        """Answer the evaluation items, in one task of their own."""
        self._reference = answer_inputs.submit(self.recipe, self.endpoint, items, "eval")

    def submit_all(self, inputs: pd.DataFrame, cycle: int) -> None:
        for i in range(0, len(inputs), self.size):
            self.submit(inputs.iloc[i : i + self.size].reset_index(drop=True), cycle)

    @property
    def expected(self) -> int:
        """Accepted answers, plus the inputs still being answered: assumed accepted, so that
        expansion need not wait for them (a cycle short of rejected answers is made up by the
        next one)."""
        return sum(_accepted(r) for r in self.results) + self._pending_rows

    def collect(self) -> None:
        """Wait for every submitted task; BatchesPending if batches outlived the hold."""
        pending = []
        for future in self._futures:  # every task's batches, when they all outlive the hold
            try:
                self.results.append(future.result())
            except BatchesPending as exc:
                pending.append(exc)
        self._futures, self._pending_rows = [], 0
        if self._reference is not None:
            try:
                self.reference = self._reference.result()
            except BatchesPending as exc:
                pending.append(exc)
            self._reference = None
        if pending:
            raise BatchesPending.combine(pending)


@dataclass
class Generation:
    """What the teacher stages produced for one run."""

    answered: pd.DataFrame  # every input answered now; `status` says if its answer was kept
    reference: pd.DataFrame | None = None  # the evaluation items answered now (EVAL_SCHEMA)
    rejected_inputs: list[pd.DataFrame] = field(default_factory=list)
    expansion: Counter[str] = field(default_factory=Counter)
    expansion_rejects: Counter[str] = field(default_factory=Counter)
    requests: int = 0  # teacher requests behind these rows, sent now or earlier
    this_run: CallStats = field(default_factory=CallStats)  # what this run really sent
    shortfall: list[str] = field(default_factory=list)
    seconds: float = 0.0
    structured_form: str = ""  # how the endpoint took structured output in the end
    judge: dict[str, Any] | None = None  # the judge stage's counts (tasks/judge.py judge_summary)
    pending: BatchesPending | None = None  # batches still running after the hold: stopped
    shard_timings: dict[str, float] = field(default_factory=dict)  # a sharded run's plan, merge

    @property
    def requests_cached(self) -> int:
        return max(0, self.requests - (self.this_run.sent - self.this_run.retries))


def _accepted(result: AnswerResult) -> int:
    return int((result.rows["status"] == "accepted").sum())


def teacher_needed(plan: RefreshPlan) -> bool:
    """False when LATEST already has everything: the teacher is not even started."""
    return len(plan.to_answer) > 0 or len(plan.kept) < plan.goal or len(plan.evaluation) > 0


def generate(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    plan: RefreshPlan,
    batch_size: int,
    judge: TeacherEndpoint | None = None,
    sharding: Sharding | None = None,
) -> Generation:
    """Answer what the plan lists, then expand and answer until the plan's goal is reached.

    The stages overlap: the listed inputs are answered while expansion runs, and generated
    inputs are answered in batches while expansion goes on, so that the teacher's slots stay
    busy from the first request to the last (bench item 1b).
    """
    out = Generation(answered=pd.DataFrame())
    if not teacher_needed(plan):
        return out
    engine = get_engine(endpoint)
    sent_now = sent_from_now(endpoint, judge)  # a judge of its own counts in its own engine
    started = time.monotonic()
    stats = CallStats()
    inputs = pd.concat([plan.kept[INPUT_COLUMNS], plan.to_answer], ignore_index=True)
    answers = answer_stage(recipe, endpoint, batch_size, sharding, judge)
    with _until_batches_pending(out, answers), artifacts.TeacherProgress(engine, plan.goal):
        if len(plan.to_answer):
            answers.submit_all(plan.to_answer, 0)
        if len(plan.evaluation):
            answers.submit_reference(plan.evaluation)
        for cycle in range(1, MAX_CYCLES + 1):
            kept = len(plan.kept) + answers.expected
            if kept >= plan.goal:
                answers.collect()
                kept = len(plan.kept) + answers.expected
                if kept >= plan.goal:
                    break
            expansion = expand_and_answer(
                recipe, endpoint, inputs, plan, plan.goal - kept, cycle, answers
            )
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
            answers.collect()
            if expansion.accepted.empty:
                break
            inputs = pd.concat([inputs, expansion.accepted], ignore_index=True)
        answers.collect()
    for a in answers.results:
        stats.add(a.stats)
    if answers.results:
        out.answered = pd.concat([a.rows for a in answers.results], ignore_index=True)
    if answers.reference is not None:
        stats.add(answers.reference.stats)
        out.reference = answers.reference.rows[EVAL_SCHEMA.names]
    out.requests = stats.requests
    out.this_run = sent_now()
    if judge is not None:
        judged = [a for a in answers.results if isinstance(a, JudgedAnswers)]
        here = judge_summary(judged, str(flow_run.get_id() or ""))
        out.judge = add_judge_summaries([here, *answers.judged_elsewhere])
    out.this_run.add(answers.sent_elsewhere)
    out.shard_timings = {f"shard_{k}": round(v, 2) for k, v in answers.timings.items()}
    out.seconds = round(time.monotonic() - started, 2)
    out.structured_form = engine.structured_form
    return out


def answer_stage(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    batch_size: int,
    sharding: Sharding | None,
    judge: TeacherEndpoint | None = None,
) -> AnswerStage:
    """The answer stage: in this process, or in shards (`sharding`: flows/shard.py's plan, which
    carries the judge to the shards)."""
    if sharding is None:
        return AnswerStage(recipe, endpoint, batch_size, judge)
    return ShardedAnswers(recipe, endpoint, batch_size, sharding)


class ShardedAnswers(AnswerStage):
    """The answer stage of a sharded run: inputs are gathered as they come, and answered by the
    shards (flows/shard.py) each time the flow collects, after each expansion cycle."""

    def __init__(
        self, recipe: Recipe, endpoint: TeacherEndpoint, size: int, sharding: Sharding
    ) -> None:
        super().__init__(recipe, endpoint, size)
        self.sharding = sharding
        self._gathered: list[pd.DataFrame] = []
        self._dispatches = 0

    def submit(self, inputs: pd.DataFrame, cycle: int) -> None:
        self._gathered.append(inputs)
        self._pending_rows += len(inputs)

    def collect(self) -> None:
        gathered, self._gathered = self._gathered, []
        super().collect()  # the evaluation items' task, answered here
        if gathered:
            self._dispatches += 1
            inputs = pd.concat(gathered, ignore_index=True)
            label = f"answers-{self._dispatches}"
            merged = dispatch(
                self.sharding, self.recipe, self.endpoint, self.size, inputs, label, self.timings
            )
            self.results.append(merged.answers)
            self.sent_elsewhere.add(merged.sent_elsewhere)
            self.judged_elsewhere += merged.judge


def expand_and_answer(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    inputs: pd.DataFrame,
    plan: RefreshPlan,
    want: int,
    cycle: int,
    answers: AnswerStage,
) -> ExpansionResult:
    """One cycle's expand task, its accepted inputs answered in batches as they come.

    The expand task runs in a worker thread and hands its accepted inputs over as it accepts
    them (in order); this thread submits an answer task for each full batch, and for the rest
    once `want` inputs are in or the task is over. A cached expand task hands nothing over: its
    result is cut into the same batches afterwards.
    """
    handed: queue.SimpleQueue[tuple[int, list[dict[str, Any]]] | None] = queue.SimpleQueue()
    future = expand_inputs.submit(
        recipe, endpoint, inputs, want, cycle, plan.focus, plan.salt,
        on_accepted=lambda start, rows: handed.put((start, list(rows))),
    )  # fmt: skip
    future.add_done_callback(lambda _: handed.put(None))
    received = 0  # accepted inputs received, in order
    waiting: list[dict[str, Any]] = []  # of which not submitted yet
    submitted: list[str] = []  # ids of those submitted
    while (item := handed.get()) is not None:
        start, new = item
        fresh = new[received - start :]  # a retried task starts again from 0: skip what is here
        waiting += fresh
        received += len(fresh)
        while len(waiting) >= answers.size or (waiting and received >= want):
            batch, waiting = waiting[: answers.size], waiting[answers.size :]
            answers.submit(pd.DataFrame(batch, columns=INPUT_COLUMNS), cycle)
            submitted += [row["id"] for row in batch]
    expansion = future.result()
    accepted = expansion.accepted
    if list(accepted["id"][: len(submitted)]) != submitted:
        raise RuntimeError(  # the order of accepted inputs is deterministic; never expected
            f"expand cycle {cycle}: the inputs handed over while it ran differ from its result"
        )
    rest = accepted.iloc[len(submitted) :].to_dict("records")
    for i in range(0, len(rest), answers.size):
        answers.submit(pd.DataFrame(rest[i : i + answers.size], columns=INPUT_COLUMNS), cycle)
    return expansion


@contextmanager
def _until_batches_pending(out: Generation, answers: AnswerStage) -> Iterator[None]:
    """Batch mode with a hold: a stage whose batches are still running stops the teacher stages
    (the next stage needs its answers); what was answered so far is counted as usual, and the
    batches of answer tasks that ran beside it are waited for too (the seeds' beside the
    expansion's: their progress is shown and the re-check takes both up)."""
    try:
        yield
    except BatchesPending as exc:
        try:
            answers.collect()
        except BatchesPending as more:
            exc = BatchesPending.combine([exc, more])
        out.pending = exc


def build_manifest(
    recipe: Recipe,
    params: DistillParams,
    endpoint: TeacherEndpoint,
    plan: RefreshPlan,
    generation: Generation,
    candidates: pd.DataFrame,
    report: ValidationReport,
    run_id: str,
    target: int,
    fingerprint: str,
    evaluation: dict[str, Any],
    diversity: dict[str, Any],
    gguf: embedded.Gguf | None = None,
    judge: TeacherEndpoint | None = None,
) -> dict[str, Any]:
    """Everything a reader of a version needs to know about how it was made; `fingerprint`: the
    accepted rows' content_fingerprint; `evaluation`, `diversity`: their entries; `gguf`: the
    embedded teacher's file (None: shipped); `judge`: who scored the answers (None: no one)."""
    # Masks, not copies of the rows (each of the two was most of the frame).
    kept = candidates["status"] == "accepted"
    new = candidates["run_id"] == run_id
    answer_rejects = Counter(candidates.loc[new & (candidates["status"] == "rejected"), "reason"])
    return {
        "dataset": recipe.name,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(),
        "code_version": code_version(),
        "recipe": {"uri": params.recipe, "hash": recipe.content_hash(), "examples_target": target},
        "seeds": {"ids": plan.seed_ids},
        "teacher": {
            "model": endpoint.model,
            "host": endpoint.host,
            "structured_output": generation.structured_form,
            **((gguf or embedded.gguf_file()).manifest() if endpoint.embedded else {}),
        },
        "answer_fingerprint": plan.answer_fingerprint,
        "content_fingerprint": fingerprint,
        "refresh": plan.to_dict(),
        "random_seed": recipe.random_seed,
        "training_config": recipe.training.model_dump(),
        "counts": {
            "seeds": len(plan.seed_ids),
            "kept_from_previous": len(plan.kept),
            "expansion": {**generation.expansion, "rejected": dict(generation.expansion_rejects)},
            "answers": {
                "answered": int(new.sum()),
                "accepted": int((new & kept).sum()),
                "rejected": dict(answer_rejects),
            },
        },
        "tokens": {
            "dataset_prompt_tokens": int(candidates.loc[kept, "prompt_tokens"].sum()),
            "dataset_completion_tokens": int(candidates.loc[kept, "completion_tokens"].sum()),
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
        "evaluation": evaluation,
        "diversity": diversity,
        "judge": judge_manifest(recipe.judge, judge, candidates[kept], generation.judge),
        "validation": report.to_dict(),
        "data_docs": report.docs_uri,
        "shortfall": generation.shortfall,
        "timings_s": {
            "teacher": generation.seconds,
            "validate": report.seconds,
            **generation.shard_timings,
        },
    }


@flow(
    name="distill",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=4),  # type: ignore[arg-type]
    on_failure=[notify_failure],
)
def distill(
    recipe: Annotated[
        str, Field(description="Path or fsspec URI (s3://...) of the recipe YAML file.")
    ],
    examples: Annotated[
        int | None,
        Field(ge=1, description="Target dataset size, seeds included; default: the recipe's."),
    ] = None,
    output: Annotated[
        str,
        Field(
            min_length=1,
            description="Where versions are published: a local folder or an s3:// URI.",
        ),
    ] = "./out",
    teacher_model: Annotated[
        str | None, Field(description="Override the recipe's teacher model.")
    ] = None,
    teacher_base_url: Annotated[
        str | None,
        Field(
            description=(
                "OpenAI-compatible endpoint of the teacher, or 'embedded'; default: the "
                "recipe's, else OPENAI_BASE_URL, else OpenAI's API if OPENAI_API_KEY is set, "
                "else the embedded SmolLM2 teacher on 127.0.0.1."
            )
        ),
    ] = None,
    teacher_gguf: Annotated[
        str | None,
        Field(
            description=(
                "Local GGUF file for the embedded teacher to serve instead of the shipped "
                "SmolLM2 (a bigger teacher than the student); chooses the embedded teacher, "
                "refused with any other teacher_base_url; default: the recipe's teacher.gguf."
            )
        ),
    ] = None,
    answer_batch_size: Annotated[
        int, Field(ge=1, description="Inputs per answer task (the unit Prefect caches, retries).")
    ] = 500,
    train: Annotated[bool, Field(description="Train a student on the published version.")] = True,
    train_backend: Annotated[
        TrainBackend | None,
        Field(description="Override the recipe's training backend (local, openai, prefect)."),
    ] = None,
    review: Annotated[
        bool | None,
        Field(
            description=(
                "Pause for a human review (approve / reject) before LATEST moves and training "
                "starts; default: the recipe's review.enabled."
            )
        ),
    ] = None,
    refresh: Annotated[
        bool,
        Field(
            description=(
                "Start from the recipe's last published version (LATEST): keep its examples, "
                "generate and answer only what is missing. False: build from the seeds alone."
            )
        ),
    ] = True,
    notify: Annotated[
        str | None,
        Field(
            description=(
                "Notification block that hears about a failed run, as 'block-type/name' "
                "(e.g. slack-webhook/nightly); default: DISTILLERY_NOTIFY_BLOCK."
            )
        ),
    ] = None,
    shards: Annotated[
        int | None,
        Field(
            ge=1,
            le=1024,
            description=(
                "Split the answer stage into this many shards, one child flow run each (the "
                "distill-shard/shard deployment from a deployment, in-process otherwise); "
                "default: the recipe's scale.shards (1: no sharding)."
            ),
        ),
    ] = None,
) -> dict[str, Any]:
    """Build and publish one dataset version from a recipe."""
    params = DistillParams(
        recipe=recipe,
        examples=examples,
        output=output,
        teacher_model=teacher_model,
        teacher_base_url=teacher_base_url,
        teacher_gguf=teacher_gguf,
        answer_batch_size=answer_batch_size,
        train=train,
        train_backend=train_backend,
        review=review,
        refresh=refresh,
        notify=notify,
        shards=shards,
    )
    summary = _distill(params)
    if summary["outcome"] == recheck.WAITING:
        # A returned State is the run's final state, and its data what a caller gets: Completed,
        # so the worker is free and no failure is notified, named so that the UI tells it apart.
        return Completed(  # type: ignore[return-value]
            name=recheck.STATE_NAME, message=summary["message"], data=summary
        )
    return summary


_startup_frozen = False


def _freeze_startup_objects() -> None:
    """Once per process: move what exists now (the imported modules of Prefect, pydantic,
    pandas, openai: long-lived) out of the cyclic GC's reach, so that its full collections
    during the teacher stages scan only what the run creates."""
    global _startup_frozen
    if not _startup_frozen:
        gc.freeze()
        _startup_frozen = True


def _distill(params: DistillParams) -> dict[str, Any]:
    started = time.monotonic()
    _freeze_startup_objects()
    preload_great_expectations()  # its import overlaps the teacher stages (bench item 1b)
    log = get_run_logger()
    recipe = load_recipe_task(params.recipe)
    gguf = teacher_gguf(recipe, params)
    endpoint = resolve_endpoint(recipe, params, gguf)
    judge = judge_endpoint(recipe, endpoint) if recipe.judge.enabled else None
    # The transfer report's judge, checked before any stage (it judges after training).
    transfer_judge = judge_endpoint(recipe, endpoint) if recipe.evaluation.enabled else None
    target = target_size(recipe, params.recipe, params.examples)
    run_id = str(flow_run.get_id() or "local")
    previous = read_previous(params.output, recipe.name) if params.refresh else None
    plan = plan_refresh(recipe, previous, answer_fingerprint(recipe, endpoint, judge), target)
    if previous is not None:
        log.info(
            "refreshing %s: %d rows kept, %d inputs to answer, goal %d rows",
            previous.uri, len(plan.kept), len(plan.to_answer), plan.goal,
        )  # fmt: skip
    needed = teacher_needed(plan)
    session = teacher_session(endpoint, gguf) if needed else nullcontext()
    sharding = plan_shards(recipe, params, endpoint, run_id, judge) if needed else None
    with session, judge_session(judge, endpoint) if needed else nullcontext():
        generation = generate(recipe, endpoint, plan, params.answer_batch_size, judge, sharding)
    release_freed_memory()  # what the teacher stages freed, before the GX worker takes its share
    if generation.pending is not None:
        return waiting_for_batches(recipe, generation, generation.pending, run_id, started)
    candidates = assemble_candidates(generation.answered, recipe, run_id, plan.kept)
    validation = validate_dataset.submit(
        candidates, recipe.validation, recipe.validation.min_rows or target, params.output,
        recipe.name, run_id, recipe.judge if judge is not None else None,
    )  # fmt: skip
    # While the GX worker validates, this thread does what needs no verdict (reading the
    # accepted rows in place: the worker is at its peak of memory now).
    accepted = candidates["status"] == "accepted"
    fingerprint = content_fingerprint(candidates, accepted)
    # Here, not after the verdict: it was on the flow's path there (0.3 s of a 2,000-example
    # run; bench item 1b 1.14 -> 1.19); three columns, not a copy of the rows.
    inputs_diversity = diversity(candidates.loc[accepted, ["id", "user_context", "question"]])
    report = validation.result()
    dataset = candidates[accepted]
    # The Data Docs are written (in the GX worker) while the flow publishes; their URI is known
    # already, so the manifest and the summary link them before they are there.
    docs = publish_data_docs.submit(params.output, recipe.name, run_id)
    reference = reference_set(recipe, plan, generation)
    evaluation = evaluation_entry(
        recipe,
        reference,
        generation.expansion_rejects["contaminated"] + len(plan.contaminated),
        plan.previous.version if plan.previous and generation.reference is None else None,
    )
    manifest = build_manifest(
        recipe, params, endpoint, plan, generation, candidates, report, run_id, target,
        fingerprint, evaluation, inputs_diversity, gguf, judge,
    )  # fmt: skip
    timings = {"teacher": generation.seconds, "validate": report.seconds}
    timings.update(generation.shard_timings)
    if previous is not None and _unchanged(manifest, previous):
        log.info(
            "nothing changed since %s (%d teacher requests sent): nothing published, no training",
            previous.version, generation.this_run.sent,
        )  # fmt: skip
        summary = _summary(manifest, generation, "unchanged", started, timings)
        summary.update(
            uri=previous.uri,
            version=previous.version,
            published=previous.manifest.get("counts", {}).get("published"),
        )
        artifacts.summary(recipe, summary, manifest)
        docs.result()
        return summary
    rejected = pd.concat(
        [
            *generation.rejected_inputs,
            *([plan.contaminated] if len(plan.contaminated) else []),
            candidates[
                (candidates["status"] == "rejected") & (candidates["run_id"] == run_id)
            ].assign(stage="answer"),
        ],
        ignore_index=True,
    )
    review = recipe.review.enabled if params.review is None else params.review
    t0 = time.monotonic()
    published = publish_version(
        params.output, recipe, candidates, rejected, manifest, not review, reference
    )
    timings["publish"] = round(time.monotonic() - t0, 2)
    log.info(
        "published %s: %d rows (train %d, validation %d); %d teacher requests sent",
        published.uri,
        published.counts["total"],
        published.counts["train"],
        published.counts["validation"],
        generation.this_run.sent,
    )
    outcome = "awaiting review" if review else "published"
    summary = _summary(manifest, generation, outcome, started, timings)
    summary.update(uri=published.uri, version=published.version, published=published.counts)
    artifacts.sample(recipe, dataset, published.version)
    artifacts.dataset_link(recipe, published.uri, published.version)
    artifacts.summary(recipe, summary, manifest)
    docs.result()  # before a reviewer is asked to read them, and before training
    if review:
        decision = review_gate(recipe, published.uri, summary)
        update_manifest(published.uri, "review", decision)
        summary["review"] = decision
        if decision["decision"] != "approved":
            summary["outcome"] = "rejected in review"
            log.warning(
                "%s was rejected in review (%s): LATEST stays where it was; no training",
                published.version, decision.get("comment") or "no comment",
            )  # fmt: skip
            artifacts.summary(recipe, summary, manifest)
            return summary
        point_latest(params.output, recipe.name, published.version)
        summary["outcome"] = "published"
        artifacts.summary(recipe, summary, manifest)
    if params.train:
        settings = recipe.training
        if params.train_backend is not None:
            settings = settings.model_copy(update={"backend": params.train_backend})
        summary["training"] = train_student(published.uri, settings, recipe.answer)
        if transfer_judge is not None and summary["training"].get("status") == "succeeded":
            summary["transfer"] = judge_transfer(
                recipe, endpoint, transfer_judge, gguf, published.uri, summary["training"]
            )
    return summary


def judge_transfer(
    recipe: Recipe,
    teacher: TeacherEndpoint,
    judge: TeacherEndpoint,
    gguf: embedded.Gguf | None,
    version_uri: str,
    outcome: dict[str, Any],
) -> dict[str, Any]:
    """The transfer report after training; the embedded judge (the teacher by default) is
    started again for it, since the teacher stages stopped theirs."""
    with teacher_session(judge, gguf if judge == teacher else None):
        report = report_transfer(recipe, judge, version_uri, outcome)
    outcome["promoted"] = report["gate"] is None or report["gate"]["passed"]
    artifacts.transfer(recipe, report, version_uri)
    if report["gate"] is not None and not report["gate"]["passed"]:
        get_run_logger().warning(
            "%s: the student is not promoted (the version stays published)",
            report["gate"]["message"],
        )
    return report


def plan_shards(
    recipe: Recipe,
    params: DistillParams,
    endpoint: TeacherEndpoint,
    run_id: str,
    judge: TeacherEndpoint | None = None,
) -> Sharding | None:
    """How the answers are spread (flows/shard.py); None for one shard: all in this process."""
    shards = params.shards or recipe.scale.shards
    if shards == 1:
        return None
    return plan_sharding(recipe, endpoint, params.output, run_id, shards, judge)


def waiting_for_batches(
    recipe: Recipe,
    generation: Generation,
    pending: BatchesPending,
    run_id: str,
    started: float,
) -> dict[str, Any]:
    """Batches still running after the hold: publish nothing, show their progress, and (from a
    deployment) schedule the re-check run (flows/recheck.py)."""
    log = get_run_logger()
    try:
        rerun = recheck.schedule_recheck(pending)
    except Exception as exc:
        raise RuntimeError(
            f"{pending} The re-check run could not be scheduled ({type(exc).__name__}: {exc}): "
            "run the deployment again after that time."
        ) from exc
    note = recheck.message(pending, rerun)
    log.warning(note)
    summary = _summary(
        {"run_id": run_id}, generation, recheck.WAITING, started, {"teacher": generation.seconds}
    )
    summary.update(
        {
            "message": note,
            "batches": pending.batches,
            "waiting": pending.waiting,
            "recheck_at": recheck.when(pending).isoformat(),
            "recheck_flow_run_id": str(rerun.id) if rerun is not None else None,
        }
    )
    artifacts.batch_progress(recipe, pending, summary, note)
    return summary


@task(name="read-latest", task_run_name="read-latest", cache_policy=NO_CACHE)
def read_previous(output: str, dataset: str) -> Previous | None:
    """The recipe's last published version, the start of a refresh."""
    return read_latest(output, dataset)


def publish_version(
    output: str,
    recipe: Recipe,
    candidates: pd.DataFrame,
    rejected: pd.DataFrame,
    manifest: dict[str, Any],
    move_latest: bool,
    evaluation: pd.DataFrame | None,
) -> PublishedVersion:
    """The publish task, recorded as a materialization of the dataset's Prefect asset."""
    deps: list[Asset | str] = [k for k in (asset_key(manifest["recipe"]["uri"]),) if k]
    key = asset_key(f"{output.rstrip('/')}/{recipe.name}")
    task_ = publish_dataset
    if key:
        asset = Asset(
            key=key,
            properties=AssetProperties(
                name=f"{recipe.name} dataset", description=recipe.description or None
            ),
        )
        task_ = materialize(
            asset,
            name="publish",
            task_run_name="publish",
            cache_policy=NO_CACHE,
            asset_deps=deps,
        )(publish_dataset.fn)
    return task_(output, recipe, candidates, rejected, manifest, move_latest, evaluation)


def reference_set(recipe: Recipe, plan: RefreshPlan, generation: Generation) -> pd.DataFrame | None:
    """The evaluation set to publish (EVAL_SCHEMA): answered now, else LATEST's, reused; None
    without evaluation."""
    if not recipe.evaluation.enabled:
        return None
    return generation.reference if generation.reference is not None else plan.eval_kept


def _unchanged(manifest: dict[str, Any], previous: Previous) -> bool:
    """The same rows and the same evaluation set as LATEST: nothing to publish."""
    before = previous.manifest.get("evaluation", {}).get("fingerprint")
    return (
        manifest["content_fingerprint"] == _fingerprint_of(previous)
        and manifest["evaluation"].get("fingerprint") == before
    )


def _fingerprint_of(previous: Previous) -> str:
    return str(previous.manifest.get("content_fingerprint") or content_fingerprint(previous.rows))


def _summary(
    manifest: dict[str, Any],
    generation: Generation,
    outcome: str,
    started: float,
    timings: dict[str, float],
) -> dict[str, Any]:
    counts = manifest.get("counts", {})
    return {
        "outcome": outcome,
        "flow_run_id": manifest["run_id"],
        "uri": manifest.get("uri"),
        "version": manifest.get("version"),
        "published": counts.get("published"),
        "answer_rejects": counts.get("answers", {}).get("rejected", {}),
        "expansion_rejects": dict(generation.expansion_rejects),
        "requests": generation.requests,
        "requests_sent": generation.this_run.sent,
        "requests_cached": generation.requests_cached,
        "cost_usd": generation.this_run.cost_usd,
        "estimated_cost_usd": generation.this_run.estimated_cost_usd,
        "shortfall": generation.shortfall,
        "evaluation_items": manifest.get("evaluation", {}).get("items"),
        "judge": manifest.get("judge"),
        "diversity": manifest.get("diversity"),
        "timings_s": timings,
        "seconds": round(time.monotonic() - started, 2),
    }


def _price(endpoint: TeacherEndpoint) -> dict[str, float] | None:
    price = price_for(endpoint.model, endpoint.host, endpoint.price)
    return price.model_dump() if price else None
