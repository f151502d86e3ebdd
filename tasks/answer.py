"""Answers: one teacher call per input; bad answers are rejected with a reason."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from distillery.tasks.recipe import EXPLAINED_SUFFIX, AnswerSettings, Recipe, ValidationSettings
from distillery.tasks.record import ANSWER_COLUMNS, TEMPLATE_LEAK_PATTERN, VERDICT_COLUMNS
from distillery.tasks.teacher import (
    CallStats,
    ChatRequest,
    ChatResult,
    TeacherEndpoint,
    get_engine,
    retry_worthwhile,
)

# Bump when message building or judging changes, so Prefect's cache of this stage turns over.
# 2: `messages` holds the student's turns (student_messages), not the teacher's prompt.
ANSWER_VERSION = "2"

_REFUSAL = re.compile(
    r"^\s*(?:I'?m sorry|I am sorry|I apologi[sz]e|I can(?:no|')t (?:help|assist|provide)|"
    r"I am unable to|I'm unable to|As an AI\b)",
    re.IGNORECASE,
)


def build_answer_messages(
    settings: AnswerSettings, user_context: str, question: str
) -> list[dict[str, str]]:
    """System and user turns of the answer call (pure)."""
    system = settings.system.format(user_context=user_context, question=question)
    if settings.style == "explained":
        system += EXPLAINED_SUFFIX
    user = settings.user.format(user_context=user_context, question=question)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def student_messages(
    settings: AnswerSettings, user_context: str, question: str
) -> list[dict[str, str]]:
    """System and user turns the student is trained on (`messages`, before the teacher's
    answer) and asked at evaluation: the answer call's system prompt and `student_user`, which
    carries no markers of the teacher's prompt (pure)."""
    system = settings.system.format(user_context=user_context, question=question)
    if settings.style == "explained":
        system += EXPLAINED_SUFFIX
    user = settings.student_user.format(user_context=user_context, question=question)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def training_messages(
    settings: AnswerSettings, user_context: str, question: str, answer: str
) -> list[dict[str, str]]:
    """One row's `messages`: the student's turns and the teacher's answer (pure)."""
    return [
        *student_messages(settings, user_context, question),
        {"role": "assistant", "content": answer},
    ]


def build_answer_request(recipe: Recipe, user_context: str, question: str) -> ChatRequest:
    messages = build_answer_messages(recipe.answer, user_context, question)
    return ChatRequest(
        messages=tuple((m["role"], m["content"]) for m in messages),
        temperature=recipe.teacher.temperature,
        top_p=recipe.teacher.top_p,
        max_tokens=recipe.teacher.max_tokens,
    )


def judge_answer(result: ChatResult, limits: ValidationSettings) -> tuple[str, str] | None:
    """Reason and detail for rejecting an answer, or None to keep it (pure)."""
    text = result.content.strip()
    if result.finish_reason == "length":
        return "truncated", f"stopped at the max_tokens cap after {result.completion_tokens} tokens"
    if result.finish_reason == "content_filter":
        return "content_filter", "the endpoint's content filter stopped the answer"
    if result.refusal:
        return "refusal", result.refusal[:200]
    if not text:
        return "empty", "the teacher returned no text"
    if _REFUSAL.match(text):
        return "refusal", text[:200]
    if result.finish_reason != "stop":
        return "unfinished", f"finish_reason {result.finish_reason!r}"
    if re.search(TEMPLATE_LEAK_PATTERN, text):
        return "template_leak", "the answer contains a prompt-template marker"
    low, high = limits.answer_chars
    if len(text) < low:
        return "length", f"answer shorter than {low} characters"
    if len(text) > high:
        return "length", f"answer longer than {high} characters"
    return None


@dataclass
class AnswerResult:
    rows: pd.DataFrame  # the inputs with ANSWER_COLUMNS and VERDICT_COLUMNS added
    stats: CallStats = field(default_factory=CallStats)
    rejects: Counter[str] = field(default_factory=Counter)


def run_answers(
    recipe: Recipe, endpoint: TeacherEndpoint, inputs: pd.DataFrame, label: str
) -> AnswerResult:
    """Answer every input with one teacher call each; judge each answer."""
    engine = get_engine(endpoint)
    requests = [
        build_answer_request(recipe, c, q)
        for c, q in zip(inputs["user_context"], inputs["question"], strict=True)
    ]
    replies, stats = engine.complete(requests, f"answer {label}")
    out: list[dict[str, Any]] = []
    rejects: Counter[str] = Counter()
    for ctx, q, reply in zip(inputs["user_context"], inputs["question"], replies, strict=True):
        verdict = judge_answer(reply, recipe.validation)
        answer = reply.content.strip()
        # The teacher was asked with its own prompt (markers and all); the student is trained
        # on the turns its users will write.
        messages = training_messages(recipe.answer, ctx, q, answer)
        if verdict is not None:
            rejects[verdict[0]] += 1
        out.append(
            {
                "answer": answer,
                "messages": messages,
                "teacher_model": reply.model or endpoint.model,
                "answer_request_id": reply.request_id,
                "finish_reason": reply.finish_reason,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "status": "accepted" if verdict is None else "rejected",
                "reason": verdict[0] if verdict else None,
                "detail": verdict[1] if verdict else None,
            }
        )
    answered = pd.DataFrame(out, columns=[*ANSWER_COLUMNS, *VERDICT_COLUMNS], index=inputs.index)
    return AnswerResult(rows=pd.concat([inputs, answered], axis=1), stats=stats, rejects=rejects)


@task(
    name="answer",
    task_run_name="answer-{label}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_worthwhile,
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
)
def answer_inputs(
    recipe: Recipe,
    endpoint: TeacherEndpoint,
    inputs: pd.DataFrame,
    label: str,
    version: str = ANSWER_VERSION,
) -> AnswerResult:
    """Answer a batch of inputs with the teacher."""
    return run_answers(recipe, endpoint, inputs, label)
