"""Recipes: one YAML file per niche domain, loaded and checked before any teacher call."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import string
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillery.tasks.cost import Price
from distillery.tasks.record import normalise_text, record_id


class RecipeError(ValueError):
    """A recipe (or its seeds file) that cannot be used; the message names the place and the fix."""


DEFAULT_EXPANSION_PROMPT = (
    "I will give you a sample prompt with a user context section and a question. "
    "Can you generate {n} more examples following the same pattern? Each new example must have "
    "a different user (other circumstances, goals and numbers) and a different question.\n\n"
    "{examples}"
)

DEFAULT_ANSWER_SYSTEM = (
    "You are an expert for stock markets. I will give you some user context and you will provide "
    "me with a good answer to my question. Use your knowledge of markets, investing and personal "
    "finance. Please provide concrete answer and justify your answer based on the information "
    "provided in the user context."
)

DEFAULT_ANSWER_USER = "# USER CONTEXT\n{user_context}\n\n# QUESTION\n{question}"

# What the student is trained on and asked: the context, then the question, without the markers
# of the teacher's prompt (a student trained on those would expect them from its users).
DEFAULT_STUDENT_USER = "{user_context}\n\n{question}"

# Orca-style explanation tuning: the teacher reasons step by step before it answers.
EXPLAINED_SUFFIX = (
    " Think step by step: first restate what matters in the user context, then reason through the "
    "options, and only then give your final recommendation and its justification."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Seed(_Strict):
    user_context: str = Field(min_length=1, description="What the teacher knows about the user.")
    question: str = Field(min_length=1, description="What the user asks.")


class TeacherSettings(_Strict):
    model: str = Field(description="Teacher model name, as the endpoint knows it.")
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint; the flag and OPENAI_BASE_URL override it."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature for answers.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for answers.")
    max_tokens: int = Field(
        768, gt=0, description="Answer length cap; longer answers are rejected."
    )
    structured_output: Literal["auto", "json_schema", "json_object", "text"] = Field(
        "auto",
        description=(
            "How expansion asks for JSON: OpenAI's json_schema form, llama.cpp's "
            "json_object+schema form, plain text, or auto (json_schema, falling back on the "
            "endpoint's first 4xx)."
        ),
    )
    price: Price | None = Field(
        None,
        description=(
            "USD per 1M input and output tokens (input_usd_per_1m, output_usd_per_1m, "
            "batch_discount); default: OpenAI's list price on OpenAI's API, 0 for the embedded "
            "teacher, unknown elsewhere (zeros mark a server nobody bills for as free)."
        ),
    )
    gguf: str | None = Field(
        None,
        description=(
            "Local GGUF file the embedded teacher serves instead of the shipped SmolLM2 "
            "(relative to the recipe's folder); chooses the embedded teacher; --teacher-gguf "
            "overrides it."
        ),
    )

    @model_validator(mode="after")
    def _one_teacher(self) -> TeacherSettings:
        if self.gguf is not None and self.base_url not in (None, "embedded"):
            raise ValueError(
                f"gguf {self.gguf} is served by the embedded teacher, but base_url is "
                f"{self.base_url}: remove one of them (or set base_url: embedded)"
            )
        return self


class ExpansionSettings(_Strict):
    prompt: str = Field(
        DEFAULT_EXPANSION_PROMPT,
        description="Few-shot prompt; variables {n} (how many to write) and {examples}.",
    )
    seeds_per_request: int = Field(3, ge=1, description="k: seeds shown in each request.")
    generated_per_request: int = Field(
        2, ge=0, description="Accepted generated examples shown too, after the first round."
    )
    examples_per_request: int = Field(5, ge=1, le=50, description="m: new examples asked for.")
    near_duplicate_threshold: float = Field(
        0.7,
        gt=0,
        le=1,
        description="MinHash Jaccard similarity at or above which a row is dropped.",
    )
    max_rounds: int = Field(30, ge=1, description="Cap on expansion rounds per cycle.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature for expansion.")
    max_tokens: int = Field(1536, gt=0, description="Token cap of one expansion reply.")


class AnswerSettings(_Strict):
    system: str = Field(DEFAULT_ANSWER_SYSTEM, description="System prompt of the answer call.")
    user: str = Field(
        DEFAULT_ANSWER_USER, description="User turn; variables {user_context} and {question}."
    )
    style: Literal["direct", "explained"] = Field(
        "direct", description="explained: Orca-style, the teacher reasons step by step first."
    )
    student_user: str = Field(
        DEFAULT_STUDENT_USER,
        description=(
            "User turn of the training data (`messages`) and of the student's evaluation "
            "prompts; variables {user_context} and {question}. Plain text, no markers: the "
            "student is asked the way its users will ask it."
        ),
    )


class ValidationSettings(_Strict):
    min_rows: int | None = Field(
        None, ge=1, description="Fewest rows a version may have; default: the target size."
    )
    max_rejected_share: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Largest share of answered rows the answer filters may reject.",
    )
    context_chars: tuple[int, int] = Field((10, 4000), description="Length bounds of user_context.")
    question_chars: tuple[int, int] = Field((10, 1000), description="Length bounds of question.")
    answer_chars: tuple[int, int] = Field((20, 8000), description="Length bounds of answer.")


class LocalTraining(_Strict):
    method: Literal["lora", "layers", "gkd"] = Field(
        "lora",
        description=(
            "lora: LoRA (r=16) on the 135M student; layers: full fine-tune of a half-depth "
            "student that keeps every other decoder layer; gkd: that half-depth student "
            "distilled from the full 135M model's token distributions (white-box, TRL's GKD; "
            "the teacher shares the student's vocabulary)."
        ),
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the train split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (a cap).")
    batch_size: int = Field(
        4, ge=1, description="Examples per optimiser step (activation memory grows with it)."
    )
    learning_rate: float | None = Field(None, gt=0, description="Default: the method's own.")
    max_length: int = Field(512, ge=32, description="Tokens per example; longer ones are cut.")
    samples: int = Field(3, ge=0, description="Validation questions answered before and after.")


class OpenAITraining(_Strict):
    model: str = Field(
        "gpt-4o-mini-2024-07-18", description="Base model of the OpenAI fine-tuning job."
    )
    base_url: str | None = Field(None, description="Fine-tuning API base URL; None: OpenAI's.")
    hyperparameters: dict[str, Any] | None = Field(
        None, description="Passed to the job as is (n_epochs, batch_size, ...)."
    )
    poll_interval_s: float = Field(30.0, gt=0, description="First wait between status polls.")
    max_poll_interval_s: float = Field(300.0, gt=0, description="Longest wait between polls.")


class PrefectTraining(_Strict):
    deployment: str = Field(
        "train/training", description="The training flow's deployment (flow/deployment)."
    )
    backend: Literal["local", "openai"] = Field(
        "local", description="What the training deployment itself runs (local on a GPU worker)."
    )


class TrainingSettings(_Strict):
    backend: Literal["local", "openai", "prefect"] = Field(
        "local",
        description=(
            "local: TRL SFT on this machine's CPU in a subprocess; openai: the fine-tuning API; "
            "prefect: the training deployment on its work pool."
        ),
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Stop waiting after this long (the run re-attaches later)."
    )
    local: LocalTraining = LocalTraining()
    openai: OpenAITraining = OpenAITraining()
    prefect: PrefectTraining = PrefectTraining()


class ReviewSettings(_Strict):
    enabled: bool = Field(
        False,
        description=(
            "Pause each new version for a human review (approve / reject with a comment) "
            "before LATEST moves to it and a student is trained; needs a Prefect server."
        ),
    )
    timeout_hours: float = Field(
        24.0,
        gt=0,
        description="With no answer by then the version counts as rejected (the safe default).",
    )


# The fewest items an evaluation set may have: fewer say nothing a reader could trust.
MIN_EVAL_ITEMS = 3


class EvaluationSettings(_Strict):
    enabled: bool = Field(
        False,
        description=(
            "Hold out an evaluation set: never shown to expansion, never trained on, answered "
            "once by the teacher as the reference; default: on when eval_seeds are given."
        ),
    )
    eval_seeds: tuple[Seed, ...] = Field(
        (),
        description=(
            "The evaluation items (user_context, question), inline or as eval_seeds_file (a "
            "file like seeds_file); none given: a share of the seeds is held out."
        ),
    )
    share: float = Field(
        0.2,
        gt=0,
        lt=1,
        description=(
            "Share of the seeds held out when no eval_seeds are given (rounded up; chosen by a "
            "hash of the seed id and random_seed, so a recipe always holds out the same seeds)."
        ),
    )
    contamination_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "MinHash Jaccard similarity to an evaluation item (character 5-grams of context + "
            "question) at or above which a generated input is rejected as contaminated."
        ),
    )
    ngram: int = Field(
        8,
        ge=2,
        description=(
            "A generated question that shares a run of this many words with an evaluation "
            "question is rejected as contaminated (case and punctuation ignored; a shorter "
            "question counts as one run, itself)."
        ),
    )

    min_win_rate_vs_base: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "A gate: when the trained student's judged win rate against the base student on the "
            "evaluation items is under this, the run says so and exits 1 (the version stays "
            "published; the student is not marked as promoted); None: report only."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _enabled_by_eval_seeds(cls, data: Any) -> Any:
        if isinstance(data, dict) and "enabled" not in data:
            return {**data, "enabled": bool(data.get("eval_seeds"))}
        return data


DEFAULT_RUBRIC: dict[str, str] = {
    "uses_context": (
        "Uses the user's context (their situation, numbers and goals), not a generic answer."
    ),
    "answers_question": "Answers the question that was asked, directly.",
    "justified": "Justifies its advice with reasons a reader can check.",
    "no_invented_facts": "Invents no facts, figures, prices or events.",
    "safe_advice": (
        "Gives safe, responsible advice for a retail investor (risks named, no guarantees)."
    ),
}


class JudgeSettings(_Strict):
    """LLM-as-judge: the scores of each answer (the `judge` stage) and the pairwise verdicts of
    the transfer report. The judge goes through the same engine as the teacher (cache, limits,
    cost, Batch API)."""

    enabled: bool = Field(
        False,
        description=(
            "Score every answer on the rubric (the judge stage: one more request per row); "
            "off (the shipped recipes): no scores, no low_score rejects."
        ),
    )
    model: str | None = Field(
        None, description="Judge model, as its endpoint knows it; default: the teacher's model."
    )
    base_url: str | None = Field(
        None,
        description=(
            "OpenAI-compatible endpoint of the judge, or 'embedded'; default: the teacher's "
            "endpoint (a judge stronger than the teacher is better, if you have one)."
        ),
    )
    rubric: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_RUBRIC),
        min_length=1,
        description=(
            "Criteria the judge scores from 1 to 10, as name: what a 10 means. Names are "
            "lowercase letters, digits and underscores (the criteria of the judge_scores column)."
        ),
    )
    min_score: float = Field(
        0.0,
        ge=0,
        le=10,
        description=(
            "Rows whose mean score is under this are rejected (reason low_score, the judge's "
            "reason kept in rejected.parquet); 0: score without rejecting."
        ),
    )
    max_tokens: int = Field(256, gt=0, description="Token cap of one judge reply.")
    min_mean_score: float = Field(
        0.0,
        ge=0,
        le=10,
        description=(
            "Validation: the published rows' mean judge score must be at least this, else the "
            "run fails before publishing (the GX suite); 0: reported, not checked."
        ),
    )
    max_low_share: float = Field(
        0.25,
        ge=0,
        le=1,
        description=(
            "Validation: the largest share of the judged rows whose mean score is under "
            "min_score (the GX suite; they are rejected either way)."
        ),
    )

    @model_validator(mode="after")
    def _check_rubric(self) -> JudgeSettings:
        for name in self.rubric:
            if not name or not all(c.islower() or c.isdigit() or c == "_" for c in name):
                raise ValueError(
                    f"rubric criterion {name!r}: use lowercase letters, digits and underscores "
                    "(it names a criterion of the judge_scores column)"
                )
            if name == "reason":
                raise ValueError(
                    "rubric criterion 'reason': the judge's verdict has a reason of its own; "
                    "name the criterion otherwise (e.g. reasoning)"
                )
        return self


class ScaleSettings(_Strict):
    """How a run is spread over Prefect workers (flows/shard.py); never what it makes."""

    shards: int = Field(
        1,
        ge=1,
        le=1024,
        description=(
            "Shards the answer stage is split into, by a hash of the request key: one child flow "
            "run each (the distill-shard/shard deployment, or in-process without one); 1: no "
            "sharding."
        ),
    )
    max_running: int | None = Field(
        None,
        ge=1,
        description=(
            "Shards answering at once against one endpoint, across runs: the limit of the "
            "Prefect global concurrency limit named after the endpoint, when it is created; "
            "None: the number of shards. Each shard paces to 1 / limit of the endpoint's "
            "RPM and TPM."
        ),
    )
    deployment: str = Field(
        "distill-shard/shard",
        description="The deployment a run started from a deployment runs its shards on.",
    )
    attempts: int = Field(
        3, ge=1, description="Runs of one shard before the run fails (a crashed shard re-runs)."
    )


class Recipe(_Strict):
    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Dataset name: lowercase letters, digits, dashes.",
    )
    description: str = Field("", description="One paragraph for the dataset card.")
    seeds: tuple[Seed, ...] = Field(description="The hand-written examples.")
    examples: int = Field(200, ge=1, description="Target dataset size (seeds included).")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of rows held out.")
    random_seed: int = Field(0, description="Seed of every sampling decision, for repeatable runs.")
    teacher: TeacherSettings
    expansion: ExpansionSettings = ExpansionSettings()
    answer: AnswerSettings = AnswerSettings()
    validation: ValidationSettings = ValidationSettings()
    training: TrainingSettings = TrainingSettings()
    review: ReviewSettings = ReviewSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    judge: JudgeSettings = JudgeSettings()
    scale: ScaleSettings = ScaleSettings()

    @model_validator(mode="after")
    def _check_templates(self) -> Recipe:
        _check_template("expansion.prompt", self.expansion.prompt, {"n", "examples"})
        _check_template("answer.system", self.answer.system, {"user_context", "question"})
        _check_template("answer.user", self.answer.user, {"user_context", "question"})
        _check_template(
            "answer.student_user", self.answer.student_user, {"user_context", "question"}
        )
        return self

    def content_hash(self) -> str:
        """Hash of everything that shapes the data (not how a student is trained from it)."""
        # The price only changes what a run is said to cost, never what it makes; the GGUF's
        # path is where the teacher lies, not what it is (the manifest records its SHA-256).
        # How a run is spread over workers (scale) changes no row either.
        exclude: Any = {
            "training": True,
            "review": True,
            "scale": True,
            "teacher": {"price", "gguf"},
        }
        dumped = self.model_dump_json(exclude=exclude)
        return hashlib.sha256(dumped.encode()).hexdigest()[:16]

    def seed_split(self) -> tuple[tuple[Seed, ...], tuple[Seed, ...]]:
        """(training seeds, evaluation items): what expansion and training see, and what they
        never see. Without evaluation every seed trains; with eval_seeds they are the items;
        else the `share` of the seeds first in the order of a hash of random_seed and id."""
        cfg = self.evaluation
        if not cfg.enabled:
            return self.seeds, ()
        if cfg.eval_seeds:
            return self.seeds, cfg.eval_seeds
        ids = [record_id(s.user_context, s.question) for s in self.seeds]
        ranked = sorted(
            ids, key=lambda i: hashlib.sha256(f"{self.random_seed}/eval/{i}".encode()).digest()
        )
        out = set(ranked[: held_out_count(cfg.share, len(ids))])
        return (
            tuple(s for s, i in zip(self.seeds, ids, strict=True) if i not in out),
            tuple(s for s, i in zip(self.seeds, ids, strict=True) if i in out),
        )


def held_out_count(share: float, seeds: int) -> int:
    """Seeds a share holds out: rounded up (the epsilon: 0.3 * 10 is 3.0000000000000004)."""
    return math.ceil(share * seeds - 1e-9)


def _check_template(where: str, template: str, allowed: set[str]) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}; write a literal brace as {{{{ or }}}}") from exc
    unknown = sorted(f for f in fields if f not in allowed)
    if unknown:
        raise ValueError(
            f"{where} uses unknown variable {{{unknown[0]}}}; allowed: "
            + ", ".join("{" + a + "}" for a in sorted(allowed))
        )


def target_size(recipe: Recipe, uri: str, examples: int | None) -> int:
    """The dataset size a run aims at (seeds included): `examples`, else the recipe's."""
    target = examples or recipe.examples
    seeds = len(recipe.seed_split()[0])
    if target < seeds:
        raise RecipeError(
            f"{uri}: {target} examples is below the recipe's {seeds} seeds"
            f"{' (evaluation items apart)' if recipe.evaluation.enabled else ''}; ask for "
            f"at least {seeds} (--examples or the recipe's 'examples')."
        )
    return target


# The shipped recipes: recipes/ in a checkout, distillery/recipes/ in an installed wheel.
BUNDLED_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(uri: str) -> Recipe:
    """Read a recipe from a local path or fsspec URI; raise RecipeError naming what to fix."""
    raw = _read_text(uri, what="recipe")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"{uri}: not valid YAML ({exc}); fix the syntax at the line shown."
        ) from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{uri}: expected a mapping of recipe fields at the top level.")
    seeds_file = data.pop("seeds_file", None)
    if seeds_file is not None:
        if "seeds" in data:
            raise RecipeError(f"{uri}: give either 'seeds' or 'seeds_file', not both.")
        data["seeds"] = _load_seeds_file(_resolve(uri, str(seeds_file)))
    teacher = data.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("gguf"), str):
        gguf = _resolve(uri, os.path.expanduser(teacher["gguf"]))
        if "://" in gguf:
            raise RecipeError(
                f"{uri}: teacher.gguf resolves to {gguf}, but the embedded teacher serves local "
                "files only: give the GGUF file's local path (absolute, or the recipe's own "
                "folder must be local)."
            )
        data["teacher"] = {**teacher, "gguf": gguf}
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and "eval_seeds_file" in evaluation:
        evaluation = dict(evaluation)
        eval_file = evaluation.pop("eval_seeds_file")
        if "eval_seeds" in evaluation:
            raise RecipeError(
                f"{uri}: give either 'evaluation.eval_seeds' or 'evaluation.eval_seeds_file', "
                "not both."
            )
        evaluation["eval_seeds"] = _load_seeds_file(_resolve(uri, str(eval_file)))
        data["evaluation"] = evaluation
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(uri, exc)) from None
    _check_seeds(uri, recipe.seeds)
    _check_evaluation(uri, recipe)
    return recipe


def _read_text(uri: str, what: str) -> str:
    try:
        with fsspec.open(uri, "r", encoding="utf-8") as f:
            return str(f.read())
    except FileNotFoundError:
        hint = ""
        if what == "recipe" and BUNDLED_RECIPES.is_dir():
            names = ", ".join(sorted(p.name for p in BUNDLED_RECIPES.glob("*.yaml")))
            hint = (
                f" The recipes that come with distillery are in {BUNDLED_RECIPES} ({names}): "
                "pass one of them, or copy one and edit it."
            )
        raise RecipeError(f"{uri}: {what} file not found; check the path or URI.{hint}") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise RecipeError(f"{uri}: cannot read the {what} file ({exc}).") from None


def _resolve(recipe_uri: str, uri: str) -> str:
    """A relative seeds_file (or teacher.gguf) is relative to the recipe's folder (local or
    remote)."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return posixpath.join(posixpath.dirname(recipe_uri) or ".", uri)


def _load_seeds_file(uri: str) -> list[Any]:
    """Seeds from .jsonl, .json, .csv or .yaml: each row has user_context and question."""
    text = _read_text(uri, what="seeds")
    suffix = uri.rsplit(".", 1)[-1].lower()
    try:
        if suffix == "jsonl":
            rows: list[Any] = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RecipeError(f"{uri} line {lineno}: not valid JSON ({exc.msg}).") from None
            return rows
        if suffix == "json":
            loaded = json.loads(text)
        elif suffix == "csv":
            loaded = list(csv.DictReader(io.StringIO(text)))
        elif suffix in ("yaml", "yml"):
            loaded = yaml.safe_load(text)
        else:
            raise RecipeError(f"{uri}: unknown seeds format; use .jsonl, .json, .csv or .yaml.")
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{uri}: cannot parse the seeds file ({exc}).") from None
    if not isinstance(loaded, list):
        raise RecipeError(f"{uri}: expected a list of seeds (user_context, question).")
    return loaded


def _describe(uri: str, exc: ValidationError) -> str:
    lines = [f"{uri}: the recipe has {exc.error_count()} problem(s):"]
    for err in exc.errors():
        loc = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in err["loc"])
        loc = loc.replace(".[", "[") or "(top level)"
        if err["type"] == "extra_forbidden":
            hint = "unknown field; remove it or fix its spelling"
        elif err["type"] == "missing":
            hint = "required field is missing; add it"
        else:
            hint = err["msg"]
        lines.append(f"  - {loc}: {hint}")
    return "\n".join(lines)


def _check_seeds(uri: str, seeds: tuple[Seed, ...], where: str = "seeds") -> None:
    if not seeds:
        raise RecipeError(f"{uri}: '{where}' is empty; add at least one example.")
    seen: dict[str, int] = {}
    for i, seed in enumerate(seeds):
        for field in ("user_context", "question"):
            if not normalise_text(getattr(seed, field)):
                raise RecipeError(
                    f"{uri}: {where}[{i}].{field} is blank; write the text or remove the seed."
                )
        sid = record_id(seed.user_context, seed.question)
        if sid in seen:
            raise RecipeError(
                f"{uri}: {where}[{i}] duplicates {where}[{seen[sid]}]; remove one of them."
            )
        seen[sid] = i


def _check_evaluation(uri: str, recipe: Recipe) -> None:
    """An evaluation set of at least MIN_EVAL_ITEMS items, none of them a seed, and at least
    one seed left for expansion; refused before any teacher call, with the fix."""
    cfg = recipe.evaluation
    if not cfg.enabled:
        return
    n = len(recipe.seeds)
    if cfg.eval_seeds:
        where = "evaluation.eval_seeds"
        _check_seeds(uri, cfg.eval_seeds, where)
        seeds = {record_id(s.user_context, s.question): i for i, s in enumerate(recipe.seeds)}
        for i, item in enumerate(cfg.eval_seeds):
            j = seeds.get(record_id(item.user_context, item.question))
            if j is not None:
                raise RecipeError(
                    f"{uri}: {where}[{i}] is also seeds[{j}]: an evaluation item is never "
                    "trained on; remove it from one of the two lists."
                )
        if len(cfg.eval_seeds) < MIN_EVAL_ITEMS:
            raise RecipeError(
                f"{uri}: {where} has {len(cfg.eval_seeds)} item(s); an evaluation set needs at "
                f"least {MIN_EVAL_ITEMS}: add eval_seeds, or remove them to hold out a share of "
                "the seeds, or set evaluation.enabled: false."
            )
        return
    held = held_out_count(cfg.share, n)
    if held < MIN_EVAL_ITEMS:
        # The smallest share (in hundredths) that holds out MIN_EVAL_ITEMS and leaves a seed.
        need = math.floor(MIN_EVAL_ITEMS / n * 100 + 1e-9) / 100
        fix = f"raise evaluation.share to {need:g}, " if n > MIN_EVAL_ITEMS else ""
        raise RecipeError(
            f"{uri}: evaluation.share {cfg.share:g} of {n} seeds holds out {held}; an "
            f"evaluation set needs at least {MIN_EVAL_ITEMS} items: {fix}add seeds, or list "
            "evaluation.eval_seeds (or set evaluation.enabled: false)."
        )
    if held >= n:
        raise RecipeError(
            f"{uri}: evaluation.share {cfg.share:g} holds out all {n} seeds and leaves none to "
            "expand: lower evaluation.share, add seeds, or list evaluation.eval_seeds."
        )
