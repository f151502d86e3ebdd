"""The process's teacher engines: one per endpoint, closed together, stopped by Ctrl-C."""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from distillery.tasks.teacher.base import (
    BatchesPending,
    BudgetExceeded,
    EngineSettings,
    TeacherEndpoint,
    TeacherError,
    TeacherInterrupted,
)
from distillery.tasks.teacher.engine import TeacherEngine

_engines: dict[TeacherEndpoint, TeacherEngine] = {}
_engines_lock = threading.Lock()
# Set by the first Ctrl-C until close_engines(): no engine may start sending again meanwhile
# (a Prefect worker thread could otherwise ask for a fresh one while the run shuts down).
_interrupted = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C: every engine stops sending at once, then the usual KeyboardInterrupt.

    Without this, the flow's thread pool would wait for its running tasks, which would go on
    sending their whole batch, before the CLI's `finally` could close the engines.
    """
    global _interrupted
    _interrupted = True
    for engine in list(_engines.values()):  # no lock: the interrupted thread may hold it
        engine.stop()
    raise KeyboardInterrupt


def get_engine(endpoint: TeacherEndpoint) -> TeacherEngine:
    """The process's engine for an endpoint (one client, one cache, one concurrency budget)."""
    with _engines_lock:
        if _interrupted:
            raise TeacherInterrupted(
                "the run was interrupted (Ctrl-C); no teacher request is sent until it has closed."
            )
        engine = _engines.get(endpoint)
        if engine is None:
            settings = EngineSettings()
            if endpoint.embedded and "concurrency" not in settings.model_fields_set:
                # llama.cpp's server answers one request at a time; more in flight only queue
                # there and run into the request timeout (README, "The embedded teacher").
                settings = settings.model_copy(update={"concurrency": 1})
            engine = TeacherEngine(endpoint, settings, api_key=api_key_for(endpoint))
            _engines[endpoint] = engine
    # Only over Python's own handler, and only where signals can be handled (the main thread).
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, _on_sigint)
    return engine


def api_key_for(endpoint: TeacherEndpoint) -> str:
    """The key to send; raises TeacherError, naming the settings, when there is no teacher."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if endpoint.base_url is None and not endpoint.embedded:
        raise TeacherError(
            "no teacher endpoint: pass --teacher-base-url URL (parameter teacher_base_url), set "
            "OPENAI_BASE_URL, or set OPENAI_API_KEY to use OpenAI's API."
        )
    # Local OpenAI-compatible servers (vLLM, llama.cpp, Ollama) accept any key.
    return "no-key"


def close_engine(endpoint: TeacherEndpoint) -> None:
    """Close one endpoint's engine (the embedded teacher's, when its server stops)."""
    with _engines_lock:
        engine = _engines.pop(endpoint, None)
    if engine is not None:
        engine.close()


@atexit.register
def close_engines() -> None:
    """Stop every engine, wait up to drain_grace_s for answers in flight (cached), close them.

    Called at the end of a run, after Ctrl-C, and at exit; a second Ctrl-C while it waits
    raises KeyboardInterrupt at once.
    """
    global _interrupted
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:  # all stop sending at once; then one shared grace period
        engine.stop()
    deadline = time.monotonic() + max((e.settings.drain_grace_s for e in engines), default=0.0)
    try:
        for engine in engines:
            engine.close(deadline)
    finally:
        _interrupted = False
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is _on_sigint
        ):
            signal.signal(signal.SIGINT, signal.default_int_handler)


def retry_worthwhile(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a teacher task unless a retry cannot help."""
    # BatchesPending: a retry would only hold the worker longer; the flow schedules a re-check.
    return not isinstance(state.data, (TeacherError, BudgetExceeded, BatchesPending))
