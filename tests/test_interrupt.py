"""Ctrl-C: the engine stops sending, caches the answers in flight, and a re-run re-sends none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distillery.tasks.teacher import (
    EngineSettings,
    TeacherEndpoint,
    TeacherEngine,
    TeacherInterrupted,
)
from fake_teacher import FakeTeacher, Knobs, chat_requests

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "stock-advisor.yaml")
DISTILLERY = str(Path(sys.executable).parent / "distillery")
CONCURRENCY = 8
GRACE_S = 10.0


@pytest.fixture(autouse=True)
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here and in the CLI runs started here, as in a terminal.

    A process started with SIGINT ignored (a shell's `cmd &` without job control: scripts, some
    CI runners) passes that on: Python then leaves it ignored, and so would the CLI it starts
    (exec keeps an ignored signal ignored). Without this, these tests failed when pytest was
    launched that way (the SIGINT never arrived), though the code was right.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def engine_for(server: FakeTeacher, cache: Path, **settings: object) -> TeacherEngine:
    config = EngineSettings(cache_dir=cache, progress=False, **settings)  # type: ignore[arg-type]
    return TeacherEngine(
        TeacherEndpoint(model="fake-teacher", base_url=server.url), config, api_key="sk-test"
    )


def wait_for(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)
    assert condition(), "timed out"  # type: ignore[operator]


def test_close_stops_sending_and_caches_the_answers_in_flight(tmp_path: Path) -> None:
    with FakeTeacher(Knobs(latency=1.0)) as server:
        engine = engine_for(server, tmp_path, concurrency=4)
        raised: list[BaseException] = []

        def worker() -> None:  # a Prefect task thread, blocked in complete()
            try:
                engine.complete(chat_requests(40), "answer batch")
            except BaseException as exc:  # the test inspects what it was
                raised.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        wait_for(lambda: server.stats.received == 4)
        started = time.monotonic()
        engine.close()  # what close_engines() does after Ctrl-C, on the main thread
        assert time.monotonic() - started < 2.0  # the 1 s answers in flight, not the grace
        thread.join(5)
        assert not thread.is_alive()
        assert len(raised) == 1 and isinstance(raised[0], TeacherInterrupted)
        assert "0 of 40 requests answered, 4 in flight" in str(raised[0])
        assert server.stats.received == server.stats.answered == 4

        again = engine_for(server, tmp_path, concurrency=40)
        try:
            _, stats = again.complete(chat_requests(40), "answer batch")
        finally:
            again.close()
        assert stats.cached == 4 and stats.sent == 36
        assert server.stats.resent_after_answer == 0


def test_a_second_ctrl_c_while_draining_forces_the_close(tmp_path: Path) -> None:
    with FakeTeacher(Knobs(latency=30.0)) as server:
        engine = engine_for(server, tmp_path, concurrency=2, drain_grace_s=20)
        raised: list[BaseException] = []

        def call() -> None:
            try:
                engine.complete(chat_requests(4), "t")
            except BaseException as exc:  # the test inspects what it was
                raised.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        wait_for(lambda: server.stats.received == 2)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            engine.close()  # waits for the 30 s answers until the second Ctrl-C
        assert time.monotonic() - started < 5
        worker.join(5)
        assert not worker.is_alive()
        assert len(raised) == 1 and isinstance(raised[0], TeacherInterrupted)


def cli_env(tmp_path: Path, api_url: str | None) -> dict[str, str]:
    """Its own Prefect home and teacher cache; the session's Prefect server (started once), or
    none (api_url None: Prefect's ephemeral mode)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OPENAI_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        DISTILLERY_CACHE_DIR=str(tmp_path / "cache"),
        DISTILLERY_CONCURRENCY=str(CONCURRENCY),
        DISTILLERY_DRAIN_GRACE_S=str(GRACE_S),
    )
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def distillery(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DISTILLERY, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a hung run is killed with its whole group
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the run hung:\n{output[-3000:]}")
    return output


@pytest.mark.slow
def test_ctrl_c_half_way_exits_promptly_and_the_rerun_resends_no_answered_request(
    tmp_path: Path, prefect_api: str
) -> None:
    env = cli_env(tmp_path, prefect_api)
    out = tmp_path / "out"
    args = ["run", RECIPE, "--examples", "200", "--output", str(out), "--no-train"]
    with FakeTeacher(Knobs(latency=0.5, slots=CONCURRENCY)) as teacher:
        args += ["--teacher-base-url", teacher.url, "--teacher-model", "fake-teacher"]
        first = distillery(args, env)
        deadline = time.monotonic() + 300
        # About half of the ~250 requests of a 200-example run (as in test_cli).
        while teacher.stats.answered < 130 and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[0]
            time.sleep(0.05)
        assert teacher.stats.answered >= 130, "the first run never got half-way"
        # The CLI process alone, as `kill -INT` (a terminal's Ctrl-C to the whole group: below).
        os.kill(first.pid, signal.SIGINT)
        interrupted = time.monotonic()
        output = finish(first, GRACE_S + 60)
        elapsed = time.monotonic() - interrupted
        assert first.returncode != 0, output
        assert elapsed < GRACE_S + 8, f"took {elapsed:.1f} s to stop:\n{output[-3000:]}"
        after_first = teacher.stats
        # It stopped sending at once: at most the requests in flight were answered after the
        # signal, and every request it sent was answered (the drain waited for them).
        assert after_first.answered <= 130 + 2 * CONCURRENCY
        assert after_first.received == after_first.answered
        assert not (out / "stock-advisor" / "LATEST").exists()

        second = distillery(args, env)
        output = finish(second, 600)
        assert second.returncode == 0, output
        after_second = teacher.stats
        assert after_second.resent_after_answer == 0, "an answered request was sent again"
        assert after_second.answered_twice == 0
        assert (out / "stock-advisor" / "LATEST").exists()

        third = distillery(args, env)
        output = finish(third, 600)
        assert third.returncode == 0, output
        assert teacher.stats.received == after_second.received


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_ctrl_c_to_the_whole_group_in_ephemeral_mode_exits_130_within_the_grace(
    tmp_path: Path,
) -> None:
    # As a terminal's Ctrl-C: SIGINT to the foreground process group, which in ephemeral mode (no
    # PREFECT_API_URL) also holds the API server that Prefect starts for the run.
    env = cli_env(tmp_path, None)
    out = tmp_path / "out"
    args = ["run", RECIPE, "--examples", "200", "--output", str(out), "--no-train"]
    with FakeTeacher(Knobs(latency=0.5, slots=CONCURRENCY)) as teacher:
        args += ["--teacher-base-url", teacher.url, "--teacher-model", "fake-teacher"]
        run = distillery(args, env)  # its own session: the group leader, as a shell job is
        deadline = time.monotonic() + 300
        while teacher.stats.answered < 60 and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()[0]
            time.sleep(0.05)
        assert teacher.stats.answered >= 60, "the run never reached the teacher stages"
        os.killpg(run.pid, signal.SIGINT)
        interrupted = time.monotonic()
        output = finish(run, GRACE_S + 90)
        elapsed = time.monotonic() - interrupted
        assert run.returncode == 130, output[-3000:]
        assert elapsed < GRACE_S + 8, f"took {elapsed:.1f} s to stop:\n{output[-3000:]}"
        assert "interrupted: stopped" in output
        assert teacher.stats.received == teacher.stats.answered
        assert not (out / "stock-advisor" / "LATEST").exists()
        # Nothing of the run is left behind: the API server went with it.
        deadline = time.monotonic() + 10
        while group_alive(run.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(run.pid), "a process of the run's group outlived it"
