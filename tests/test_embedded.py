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

from tasks import embedded

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
        "from tasks.embedded import EmbeddedTeacher\n"
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
