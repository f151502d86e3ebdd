"""The embedded teacher: the real llama.cpp server on the SmolLM2 GGUF, started and stopped."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from distillery.tasks.teacher import (
    ChatRequest,
    EngineSettings,
    RequestCache,
    TeacherError,
    close_engine,
    get_engine,
)

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
    from distillery.tasks.teacher import TeacherUnavailable

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


def changed_copy(tmp_path: Path, name: str) -> Path:
    """The shipped file at another path with its last byte (one weight) changed: another teacher."""
    path = tmp_path / name
    shutil.copyfile(embedded.gguf_path(), path)
    with path.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 0x01]))
    return path


def test_a_gguf_is_known_by_its_content_not_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "cache"))
    shipped = embedded.gguf_file()
    assert shipped.shipped and shipped.path == embedded.gguf_path()
    assert shipped.sha256 == hashlib.sha256(embedded.gguf_path().read_bytes()).hexdigest()
    assert shipped.manifest() == {
        "gguf": embedded.GGUF_FILE,
        "gguf_bytes": embedded.gguf_path().stat().st_size,
        "gguf_sha256": shipped.sha256,
    }

    copy = tmp_path / "my-teacher.gguf"
    shutil.copyfile(embedded.gguf_path(), copy)
    same = embedded.gguf_file(copy)
    assert same.shipped and same.sha256 == shipped.sha256 and same.path == copy.resolve()
    # The shipped teacher, wherever it lies: today's endpoint, name and cache identity.
    assert embedded.endpoint(same) == embedded.endpoint(shipped) == embedded.endpoint()
    assert embedded.endpoint(same).identity == "embedded"
    assert embedded.endpoint(same).model == embedded.MODEL_NAME

    other = embedded.gguf_file(changed_copy(tmp_path, "tweaked-135m.gguf"))
    assert not other.shipped and other.sha256 != shipped.sha256
    endpoint = embedded.endpoint(other)
    assert endpoint.identity == f"embedded:{other.sha256[:16]}"
    assert endpoint.model == "tweaked-135m" and endpoint.embedded
    request = ChatRequest(messages=(("user", "Hi"),), temperature=0, top_p=1.0, max_tokens=4)
    assert request.key(endpoint) != request.key(embedded.endpoint())


def test_a_gguf_hash_is_computed_once_per_path_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "small.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)))
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    assert embedded.file_sha256(path) == real
    store = tmp_path / "cache" / embedded.HASHES_FILE
    known = json.loads(store.read_text())
    key = str(path.resolve())
    assert known[key]["sha256"] == real
    # A recorded hash is trusted while path, size and mtime match: the file is not read again.
    known[key]["sha256"] = "recorded"
    store.write_text(json.dumps(known))
    assert embedded.file_sha256(path) == "recorded"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert embedded.file_sha256(path) == real


def test_a_missing_folder_or_non_gguf_path_is_refused_naming_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    for path, says in (
        (tmp_path / "gone.gguf", "does not exist"),
        (tmp_path, "is a folder"),
        (text, "is not a GGUF file"),
    ):
        with pytest.raises(TeacherError, match="--gguf") as info:
            embedded.gguf_file(path, "--gguf")
        assert str(info.value).startswith(f"{path.resolve()} {says}"), info.value


def test_another_gguf_is_served_under_its_own_name_and_cached_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "cache"))
    gguf = embedded.gguf_file(changed_copy(tmp_path, "tweaked-135m.gguf"))
    endpoint = embedded.endpoint(gguf)
    request = ChatRequest(messages=(("user", "Hi"),), temperature=0, top_p=1.0, max_tokens=4)
    with embedded.embedded_teacher(gguf) as url:
        with urllib.request.urlopen(f"{url}/models", timeout=10) as reply:
            models = [m["id"] for m in json.load(reply)["data"]]
        assert models == ["tweaked-135m"]
        with (
            pytest.raises(TeacherError, match="serves tweaked-135m, not smollm2"),
            embedded.embedded_teacher(),
        ):
            pass
        (result,), stats = get_engine(endpoint).complete([request], "probe")
        assert stats.sent == 1 and result.content
    stored = RequestCache(EngineSettings().cache_dir / "teacher-cache.sqlite")
    found = stored.get_many([request.key(endpoint), request.key(embedded.endpoint())])
    stored.close()
    assert list(found) == [request.key(endpoint)]  # under this file's identity only
