"""Expansion: the Self-Instruct loop that turns seeds into many new (context, question) inputs."""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from distillery.tasks.dedup import NearDuplicateIndex, example_text
from distillery.tasks.evaluation import contamination_for
from distillery.tasks.recipe import Recipe, ValidationSettings
from distillery.tasks.record import (
    INPUT_COLUMNS,
    TEMPLATE_LEAK_PATTERN,
    hand_written_inputs,
    normalise_text,
    record_id,
)
from distillery.tasks.teacher import (
    CallStats,
    ChatRequest,
    TeacherEndpoint,
    TeacherError,
    get_engine,
    retry_worthwhile,
)

logger = logging.getLogger("distillery.expand")

# Bump when the prompt building or parsing changes, so Prefect's cache of this stage turns over.
EXPANSION_VERSION = "5"

# Expansion requests take a free slot before answer requests queued earlier: their replies are
# the inputs that keep the answer stage busy (tasks.teacher.pacing.Slots).
EXPANSION_PRIORITY = -1

# on_accepted(start, rows): accepted inputs, as rows of INPUT_COLUMNS, from position `start`.
Feed = Callable[[int, list[dict[str, Any]]], None]


def expansion_schema(n: int) -> dict[str, Any]:
    """JSON schema of one expansion reply: exactly n examples."""
    item = {
        "type": "object",
        "properties": {"user_context": {"type": "string"}, "question": {"type": "string"}},
        "required": ["user_context", "question"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"examples": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
        "required": ["examples"],
        "additionalProperties": False,
    }


def render_examples(examples: list[tuple[str, str]]) -> str:
    """The few-shot text form the prompt shows and the text parser reads back."""
    return "\n\n".join(
        f"# USER CONTEXT {i}\n{ctx.strip()}\n\n# QUESTION {i}\n{q.strip()}"
        for i, (ctx, q) in enumerate(examples, start=1)
    )


def build_expansion_request(recipe: Recipe, shown: list[tuple[str, str]], n: int) -> ChatRequest:
    """Messages and sampling of one expansion request (pure)."""
    prompt = recipe.expansion.prompt.format(n=n, examples=render_examples(shown))
    return ChatRequest(
        messages=(("user", prompt),),
        temperature=recipe.expansion.temperature,
        top_p=1.0,
        max_tokens=recipe.expansion.max_tokens,
        json_schema=expansion_schema(n),
        schema_name="examples",
    )


# A field marker as the prompt writes it ("# USER CONTEXT 1") or as models echo it back:
# "## Question 2:", "**User context 3:**", "QUESTION 1:".
_HEAD = r"(?:#+|\*\*)\s*"
_TAIL = r"\s*\d*\s*:?\s*(?:\*\*)?\s*:?"
_TEXT_FORM = re.compile(
    rf"{_HEAD}user\s+context{_TAIL}\s*\n?(?P<ctx>.*?){_HEAD}question{_TAIL}\s*\n?(?P<q>.*?)"
    rf"(?={_HEAD}user\s+context|\Z)",
    re.IGNORECASE | re.DOTALL,
)
_LEADING_NOISE = re.compile(
    rf"^\s*(?:{_HEAD}(?:user\s+context|question){_TAIL}|(?:user\s+context|question)\s*\d*\s*:|"
    # Numbering ("1.", "2)") and bullets ("-", "*") only when white space follows: "2.5% of my
    # salary", "1.5 million" and "-20%" are numbers, not formatting.
    r"\d{1,3}[.)](?=\s)|[-*](?=\s))\s*",
    re.IGNORECASE,
)


def clean_field(text: str) -> str:
    """Strip what is only formatting: numbering, a repeated field marker, quotes, white space."""
    text = normalise_text(text)
    previous = None
    while previous != text:
        previous = text
        text = _LEADING_NOISE.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def parse_examples(content: str) -> list[tuple[str, str]]:
    """Examples from a reply: JSON (`{"examples": [...]}` or a list) or the text form."""
    stripped = content.strip()
    if stripped.startswith("```"):
        stripped = re.sub(r"^```\w*\s*|\s*```$", "", stripped)
    try:
        data = json.loads(stripped, strict=False)
    except json.JSONDecodeError:
        data = None
    items: list[Any]
    if isinstance(data, dict) and isinstance(data.get("examples"), list):
        items = data["examples"]
    elif isinstance(data, list):
        items = data
    else:
        items = [
            {"user_context": m["ctx"], "question": m["q"]} for m in _TEXT_FORM.finditer(content)
        ]
    found = []
    for item in items:
        if not isinstance(item, dict):
            continue
        ctx, q = item.get("user_context"), item.get("question")
        if isinstance(ctx, str) and isinstance(q, str):
            found.append((clean_field(ctx), clean_field(q)))
    return found


def _length_problem(text: str, bounds: tuple[int, int]) -> str | None:
    if len(text) < bounds[0]:
        return f"shorter than {bounds[0]} characters"
    if len(text) > bounds[1]:
        return f"longer than {bounds[1]} characters"
    return None


def judge_input(ctx: str, q: str, limits: ValidationSettings) -> tuple[str, str] | None:
    """Reason and detail for dropping a generated input, or None to keep it (pure)."""
    for name, text, bounds in (
        ("user_context", ctx, limits.context_chars),
        ("question", q, limits.question_chars),
    ):
        problem = _length_problem(text, bounds)
        if problem:
            return "length", f"{name} {problem}"
        if re.search(TEMPLATE_LEAK_PATTERN, text):
            return "template_leak", f"{name} contains a prompt-template marker"
    return None


@dataclass
class ExpansionResult:
    accepted: pd.DataFrame
    rejected: pd.DataFrame
    stats: CallStats = field(default_factory=CallStats)
    rounds: int = 0
    requests: int = 0
    parsed: int = 0
    surplus: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    shortfall: str | None = None


def seed_inputs(recipe: Recipe) -> pd.DataFrame:
    """The recipe's training seeds as input rows (an evaluation item is never one)."""
    return hand_written_inputs(recipe.seed_split()[0], "seed")


def run_expansion(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    existing: pd.DataFrame,
    want: int,
    cycle: int,
    focus: tuple[str, ...] = (),
    salt: str = "",
    on_accepted: Feed | None = None,
) -> ExpansionResult:
    """Rounds of expansion until `want` new inputs are accepted or the round cap is reached.

    `focus`: seed ids of which every request shows one (seeds added since the last version).
    `salt`: sets the sampling of shown seeds apart from earlier runs (a refresh's previous
    version), so a refresh does not ask the requests that made the rows it already has.
    `on_accepted(start, rows)`: called as inputs are accepted, with their position among the
    accepted ones, so the caller can answer them while expansion goes on (a task retry calls
    it again from position 0 with the same rows).
    """
    cfg = recipe.expansion
    engine = get_engine(endpoint)
    seeds = seed_inputs(recipe)
    seed_pairs = list(zip(seeds["id"], seeds["user_context"], seeds["question"], strict=True))
    focus_pairs = [p for p in seed_pairs if p[0] in set(focus)]
    prefix = f"{recipe.random_seed}/{salt}" if salt else f"{recipe.random_seed}"
    index = NearDuplicateIndex(cfg.near_duplicate_threshold)
    contamination = contamination_for(recipe)
    known: set[str] = set()
    for rid, ctx, q in zip(
        existing["id"], existing["user_context"], existing["question"], strict=True
    ):
        known.add(rid)
        index.add(rid, index.minhash(example_text(ctx, q)))
    result = ExpansionResult(accepted=pd.DataFrame(columns=INPUT_COLUMNS), rejected=pd.DataFrame())
    accepted: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    fed = 0  # accepted rows handed to on_accepted
    m = cfg.examples_per_request
    while len(accepted) < want and result.rounds < cfg.max_rounds:
        missing = want - len(accepted)
        # Ask for a quarter more than is missing: some replies are duplicates or unusable.
        n_requests = max(1, math.ceil(missing * 1.25 / m))
        requests, shown_ids = [], []
        for i in range(n_requests):
            rng = random.Random(f"{prefix}/{cycle}/{result.rounds}/{i}")
            if focus_pairs:
                first = rng.choice(focus_pairs)
                others = [p for p in seed_pairs if p[0] != first[0]]
                picked = [first, *rng.sample(others, min(cfg.seeds_per_request - 1, len(others)))]
                rng.shuffle(picked)
            else:
                picked = rng.sample(seed_pairs, min(cfg.seeds_per_request, len(seed_pairs)))
            shown = [(c, q) for _, c, q in picked]
            if accepted and cfg.generated_per_request:
                extra = rng.sample(accepted, min(cfg.generated_per_request, len(accepted)))
                shown += [(e["user_context"], e["question"]) for e in extra]
                rng.shuffle(shown)
            requests.append(build_expansion_request(recipe, shown, m))
            shown_ids.append([sid for sid, _, _ in picked])
        label = f"expand cycle {cycle} round {result.rounds + 1}"
        # Replies are judged in request order as they come in (so the outcome does not depend on
        # which came first), and the round stops sending once `want` inputs are accepted.
        replies = engine.stream(requests, label, priority=EXPANSION_PRIORITY)
        result.rounds += 1
        parsed_this_round = 0
        first_reply = None
        try:
            for reply, ids in zip(replies, shown_ids, strict=False):
                if len(accepted) >= want:
                    break
                first_reply = first_reply or reply
                result.requests += 1
                examples = parse_examples(reply.content)
                if not examples:
                    result.rejects["unparseable_reply"] += 1
                parsed_this_round += len(examples)
                for ctx, q in examples:
                    rid = record_id(ctx, q)
                    row = {
                        "id": rid,
                        "user_context": ctx,
                        "question": q,
                        "source": "generated",
                        "seed_ids": ids,
                        "max_similarity": 0.0,
                        "expansion_request_id": reply.request_id,
                    }
                    verdict = judge_input(ctx, q, recipe.validation)
                    if verdict is None and rid in known:
                        verdict = (
                            "duplicate",
                            "same normalised context and question as an earlier row",
                        )
                    if verdict is None:
                        similarity, mh = index.check(example_text(ctx, q))
                        row["max_similarity"] = round(similarity, 4)
                        if contamination is not None:
                            verdict = contamination.judge(q, mh)
                        if verdict is None and similarity >= cfg.near_duplicate_threshold:
                            verdict = ("near_duplicate", f"MinHash similarity {similarity:.2f}")
                    if verdict is not None:
                        result.rejects[verdict[0]] += 1
                        rejected.append(
                            {**row, "stage": "expand", "reason": verdict[0], "detail": verdict[1]}
                        )
                        continue
                    known.add(rid)
                    if len(accepted) >= want:
                        result.surplus += 1
                        continue
                    index.add(rid, mh)
                    accepted.append(row)
                if on_accepted is not None and len(accepted) > fed:
                    on_accepted(fed, accepted[fed:])
                    fed = len(accepted)
        finally:
            replies.close()  # the round is over (or failed here): send nothing more
        result.stats.add(replies.stats)
        result.parsed += parsed_this_round
        # A teacher whose first round gives nothing usable will not start later: stop early. One
        # that did (an earlier round or cycle) can have a bad round, as small models do; the next
        # round samples anew, and the round cap bounds it.
        if cycle == 1 and result.parsed == 0:
            sample = first_reply.content.strip().replace("\n", " ")[:160] if first_reply else ""
            raise TeacherError(
                f"the teacher at {endpoint.host} (model {endpoint.model!r}) returned no parseable "
                f"examples in {result.requests} replies of {label}; first reply began: {sample!r}. "
                "Use a model that follows instructions, or set teacher.structured_output in the "
                "recipe to a form the endpoint supports (json_schema, json_object, text)."
            )
    if len(accepted) < want:
        result.shortfall = (
            f"expansion stopped at the round cap ({cfg.max_rounds}) with {len(accepted)} of {want} "
            f"new inputs accepted ({result.requests} requests, {result.parsed} examples parsed, "
            f"rejected: {dict(result.rejects)}); raise expansion.max_rounds, or raise "
            "expansion.near_duplicate_threshold in the recipe to keep more near-duplicates."
        )
        logger.warning(result.shortfall)
    result.accepted = pd.DataFrame(accepted, columns=INPUT_COLUMNS)
    result.rejected = pd.DataFrame(rejected)
    return result


@task(
    name="expand",
    task_run_name="expand-cycle-{cycle}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_worthwhile,
    cache_policy=(INPUTS - "on_accepted") + TASK_SOURCE,
    persist_result=True,
)
def expand_inputs(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    existing: pd.DataFrame,
    want: int,
    cycle: int,
    focus: tuple[str, ...] = (),
    salt: str = "",
    version: str = EXPANSION_VERSION,
    on_accepted: Feed | None = None,
) -> ExpansionResult:
    """Generate `want` new inputs with the teacher (Self-Instruct rounds)."""
    return run_expansion(recipe, endpoint, existing, want, cycle, focus, salt, on_accepted)
