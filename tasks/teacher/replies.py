"""Reading the teacher's replies: chat completion bodies into ChatResults, refusals into fixes."""

from __future__ import annotations

import json
from typing import Any

import openai

from distillery.tasks.teacher.base import ChatResult, TeacherEndpoint


class MalformedReply(Exception):
    """A 2xx answer whose body is not a chat completion."""


def json_body(content: bytes) -> dict[str, Any]:
    """A chat completion's JSON body; a body that is not one is the endpoint's fault (retried)."""
    try:
        return chat_completion(json.loads(content))
    except ValueError:
        raise MalformedReply(f"not a chat completion: {content[:120]!r}") from None


def chat_completion(body: Any) -> dict[str, Any]:
    """`body` if it has the shape of a chat completion (what result_from_body reads)."""
    try:
        if isinstance(body, dict) and isinstance(body["choices"][0]["message"], dict):
            return body
    except (KeyError, IndexError, TypeError):
        pass
    raise MalformedReply(f"not a chat completion: {str(body)[:120]!r}")


def result_from_body(body: dict[str, Any], request_id: str | None) -> ChatResult:
    """The cached form of a chat completion's JSON body (online, or a batch output row's)."""
    choice = body["choices"][0]
    message = choice["message"]
    usage = body.get("usage") or {}
    return ChatResult(
        content=message.get("content") or "",
        finish_reason=choice.get("finish_reason") or "",
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        model=body.get("model") or "",
        request_id=request_id or body.get("id") or "",
        refusal=message.get("refusal"),
    )


def describe_refusal(exc: openai.APIStatusError, endpoint: TeacherEndpoint) -> str:
    where = f"the teacher at {endpoint.host} (model {endpoint.model!r})"
    if exc.status_code == 401:
        # The server's own message can echo part of the key: never repeat it.
        return (
            f"{where} rejected the API key (401 Unauthorized); set OPENAI_API_KEY to a valid key "
            "for this endpoint."
        )
    if exc.status_code == 403:
        return (
            f"{where} denied access (403 Forbidden); use a key whose project may call this model, "
            "or pick another model with --teacher-model."
        )
    if exc.status_code == 404:
        return (
            f"{where} answered 404 Not Found; check --teacher-model (teacher.model in the recipe) "
            "and --teacher-base-url / OPENAI_BASE_URL (it usually ends in /v1)."
        )
    detail = str(exc.message)[:300]
    return (
        f"{where} rejected a request ({exc.status_code}: {detail}); check the recipe's teacher "
        "settings (model, max_tokens, temperature, structured_output)."
    )
