"""The teacher engine: all teacher traffic (concurrency, rate limits, retries, durable cache)."""

from distillery.tasks.teacher.base import (
    BatchesPending,
    BudgetExceeded,
    CallStats,
    ChatRequest,
    ChatResult,
    EngineSettings,
    StructuredForm,
    TeacherEndpoint,
    TeacherError,
    TeacherInterrupted,
    TeacherUnavailable,
    register_embedded,
    unregister_embedded,
)
from distillery.tasks.teacher.cache import RequestCache
from distillery.tasks.teacher.engine import ReplyStream, TeacherEngine, check_settings
from distillery.tasks.teacher.pacing import ConcurrencyLimit, RateLimiter, parse_reset, retry_after
from distillery.tasks.teacher.registry import (
    api_key_for,
    close_engine,
    close_engines,
    get_engine,
    retry_worthwhile,
)

__all__ = [
    "BatchesPending",
    "BudgetExceeded",
    "CallStats",
    "ChatRequest",
    "ChatResult",
    "ConcurrencyLimit",
    "EngineSettings",
    "RateLimiter",
    "ReplyStream",
    "RequestCache",
    "StructuredForm",
    "TeacherEndpoint",
    "TeacherEngine",
    "TeacherError",
    "TeacherInterrupted",
    "TeacherUnavailable",
    "api_key_for",
    "check_settings",
    "close_engine",
    "close_engines",
    "get_engine",
    "parse_reset",
    "register_embedded",
    "retry_after",
    "retry_worthwhile",
    "unregister_embedded",
]
