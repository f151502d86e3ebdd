"""The embedded teacher: the real llama.cpp server on the SmolLM2 GGUF, started and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from distillery.tasks import embedded

REPO = Path(__file__).resolve().parent.parent


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_gguf_is_found_in_the_installed_package() -> None:
    path = embedded.gguf_path()
    assert path.name == embedded.GGUF_FILE
    assert path.stat().st_size > 50_000_000  # the 135M model, not a Git LFS pointer


def test_embedded_teacher_answers_structured_requests_and_stops() -> None:
    with embedded.embedded_teacher() as url:
        assert embedded.running_url() == url and url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url, api_key="no-key", max_retries=0)
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        }
        reply = client.chat.completions.create(
            model=embedded.MODEL_NAME,
            messages=[{"role": "user", "content": "Name a city in France as JSON."}],
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_object", "schema": schema},  # llama.cpp form
        )
        client.close()
        assert '"city"' in (reply.choices[0].message.content or "")
    assert not answers(url)
    with pytest.raises(RuntimeError, match="not running"):
        embedded.running_url()


def test_embedded_teacher_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from distillery.tasks.embedded import EmbeddedTeacher\n"
        "server = EmbeddedTeacher()\n"
        "print(server.start(), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    url = parent.stdout.readline().strip()
    assert answers(url), url
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    parent.stdout.close()
    deadline = time.monotonic() + 15
    while answers(url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not answers(url), "the embedded teacher outlived its killed parent"


def test_a_dead_server_fails_the_request_at_once_with_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that died (here: SIGILL, as a build for the wrong CPU does) is not retried."""
    from distillery.tasks.teacher import ChatRequest, TeacherUnavailable, close_engine, get_engine

    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DISTILLERY_PROGRESS", "false")
    request = ChatRequest(messages=(("user", "Hi"),), temperature=0, top_p=1.0, max_tokens=4)
    with embedded.embedded_teacher():
        server = embedded._running
        assert server is not None and server._process is not None
        os.kill(server._process.pid, signal.SIGILL)
        server._process.wait(timeout=30)
        engine = get_engine(embedded.endpoint())
        started = time.monotonic()
        with pytest.raises(TeacherUnavailable, match="killed by SIGILL") as info:
            engine.complete([request], "probe")
        assert time.monotonic() - started < 10  # not 8 attempts of backoff
        assert "make clean setup" in str(info.value)
        assert engine.totals.retries == 0
    close_engine(embedded.endpoint())
