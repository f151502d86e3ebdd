"""The local stack: a Prefect server on loopback, the work pools, the deployments and workers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from distillery.flows.prefect_env import PREFECT_DEFAULTS

REPO = Path(__file__).resolve().parent.parent
# In a checkout, .stack beside the code; from an installed wheel (REPO is then
# site-packages/distillery, no place for state), .stack in the current folder.
DEFAULT_HOME = (REPO if (REPO / "pyproject.toml").exists() else Path.cwd()) / ".stack"
DEFAULT_PORT = 4200
PREFECT_FILE = "deployments/prefect.yaml"
# The pools deployments/prefect.yaml names: process pools here (production's training pool is
# a GPU pool of its own type, its shards pool a Kubernetes or Docker pool).
POOLS = ("distillery-process", "distillery-training", "distillery-shards")
STATE_FILE = "stack.json"
GRACE_S = 15.0  # between SIGTERM and SIGKILL


class StackError(RuntimeError):
    """The stack did not come up; the message names the log and the fix."""


@dataclass
class Process:
    name: str
    pid: int  # also its process group: every process here starts in its own session
    started: int  # start time in clock ticks since boot, so a reused pid is never taken for it
    log: str


@dataclass
class Stack:
    api_url: str
    ui_url: str
    home: str
    processes: list[Process]

    @property
    def export_line(self) -> str:
        return f"export PREFECT_API_URL={self.api_url}"


def up(home: Path = DEFAULT_HOME, port: int = DEFAULT_PORT, timeout: float = 180.0) -> Stack:
    """Start server, pools, deployments and one worker per pool; say so if already up."""
    home = home.resolve()
    running = status(home)
    if running is not None:
        print(f"the local stack is already up: UI {running.ui_url}")
        print(running.export_line)
        return running
    if _stop(home, quiet=True):
        print("stopped what was left of an earlier stack that no longer answered")
    _check_port_free(port)
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{port}/api"
    stack = Stack(api_url=api_url, ui_url=f"http://127.0.0.1:{port}", home=str(home), processes=[])
    env = _child_env(home, api_url)
    try:
        server = _start(stack, "server", ["server", "start", "--host", "127.0.0.1",
                                          "--port", str(port)], env)  # fmt: skip
        _wait_healthy(api_url, server, timeout)
        print(f"Prefect server: {api_url} (log: {server.log})")
        asyncio.run(_create_pools(api_url))
        print(f"work pools: {', '.join(POOLS)}")
        _deploy(home, env)
        for pool in POOLS:
            _start(stack, f"worker-{pool}", ["worker", "start", "--pool", pool,
                                             "--type", "process"], env)  # fmt: skip
        asyncio.run(_wait_workers(api_url, stack, timeout))
    except BaseException:
        _stop(home, quiet=True)
        raise
    for process in stack.processes[1:]:
        print(f"{process.name} (log: {process.log})")
    print(f"UI: {stack.ui_url}")
    print("stop it with: distillery stack down (make stack-down)")
    print(stack.export_line)
    return stack


def down(home: Path = DEFAULT_HOME) -> bool:
    """Stop the workers, then the server; True if something was running."""
    return _stop(home.resolve(), quiet=False)


def status(home: Path = DEFAULT_HOME) -> Stack | None:
    """The stack recorded in `home`, if all its processes run and the server answers."""
    stack = read_state(home.resolve())
    if stack is None or not all(_running(p) for p in stack.processes):
        return None
    return stack if _healthy(stack.api_url) else None


def command(args: argparse.Namespace) -> int:
    """`distillery stack up|down|status`."""
    home = Path(args.home) if args.home else DEFAULT_HOME
    if args.stack_command == "up":
        try:
            up(home, args.port, args.timeout)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.stack_command == "down":
        down(home)
        return 0
    stack = status(home)
    if stack is None:
        print(f"the local stack is not up (state folder {home}); start it: distillery stack up")
        return 1
    print(f"up: UI {stack.ui_url}")
    for process in stack.processes:
        print(f"  {process.name}: pid {process.pid}, log {process.log}")
    print(stack.export_line)
    return 0


def _child_env(home: Path, api_url: str) -> dict[str, str]:
    env = {**PREFECT_DEFAULTS, **os.environ}
    # The stack's own server and settings, never those of a server the shell points at.
    for key in ("PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        env.pop(key, None)
    env.update(
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_API_URL=api_url,
        # The pull step's working directory (deployments/prefect.yaml): flows run from this
        # checkout.
        DISTILLERY_HOME=str(REPO),
    )
    # The deploy-time parameter value that differs between environments (prefect.yaml).
    env.setdefault("DISTILLERY_OUTPUT", "./out")
    return env


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _start(stack: Stack, name: str, args: list[str], env: dict[str, str]) -> Process:
    home = Path(stack.home)
    log = home / f"{name}.log"
    with log.open("wb") as out:
        # Its own session: a process started from a non-interactive shell with `&` ignores
        # SIGINT and SIGTERM (seen with `prefect worker start &`); `down` stops the whole group.
        proc = subprocess.Popen(
            _prefect(*args), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    process = Process(name=name, pid=proc.pid, started=_start_time(proc.pid) or 0, log=str(log))
    stack.processes.append(process)
    _write_state(home, stack)
    return process


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        # As the server binds: connections of a stack just stopped (TIME_WAIT) do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise StackError(
                f"port {port} on 127.0.0.1 is in use ({exc.strerror}): stop what listens there "
                "or pick another port: distillery stack up --port N"
            ) from None


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            return bool(json.load(response))
    except (OSError, ValueError):  # refused, reset, timed out, or not JSON yet
        return False


def _wait_healthy(api_url: str, server: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(api_url):
        if not _running(server):
            raise StackError(
                f"the Prefect server exited while starting: see {server.log} (a port taken "
                "meanwhile? then: distillery stack up --port N)"
            )
        if time.monotonic() > deadline:
            raise StackError(
                f"the Prefect server did not answer {api_url}/health within {timeout:.0f} s: see "
                f"{server.log}; on a busy machine give it longer: distillery stack up --timeout "
                f"{int(max(timeout * 2, 300))}"
            )
        time.sleep(0.5)


async def _create_pools(api_url: str) -> None:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    async with PrefectClient(api_url) as client:
        for pool in POOLS:
            # ObjectAlreadyExists: a stack brought up again on the same home.
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_work_pool(
                    WorkPoolCreate(name=pool, type="process", base_job_template=template)
                )


def _deploy(home: Path, env: dict[str, str]) -> None:
    log = home / "deploy.log"
    with log.open("wb") as out:
        proc = subprocess.run(
            _prefect("--no-prompt", "deploy", "--all", "--prefect-file", PREFECT_FILE),
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if proc.returncode != 0:
        raise StackError(
            f"`prefect deploy --all --prefect-file {PREFECT_FILE}` failed (exit "
            f"{proc.returncode}): see {log}; fix the deployment or the flow it names, then run "
            "distillery stack up again"
        )
    print(f"deployments: {PREFECT_FILE} (log: {log})")


async def _wait_workers(api_url: str, stack: Stack, timeout: float) -> None:
    """Until each pool has an online worker: a run triggered next is picked up."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import WorkerStatus

    workers = {p.name.removeprefix("worker-"): p for p in stack.processes if p.name != "server"}
    deadline = time.monotonic() + timeout
    async with PrefectClient(api_url) as client:
        waiting = set(workers)
        while waiting:
            for pool in sorted(waiting):
                found = await client.read_workers_for_work_pool(pool)
                if any(w.status == WorkerStatus.ONLINE for w in found):
                    waiting.discard(pool)
                elif not _running(workers[pool]):
                    raise StackError(f"the worker of {pool} exited: see {workers[pool].log}")
            if waiting and time.monotonic() > deadline:
                pools = ", ".join(sorted(waiting))
                raise StackError(
                    f"no worker of {pools} came online within {timeout:.0f} s: see "
                    f"{', '.join(workers[p].log for p in sorted(waiting))}; on a busy machine "
                    f"give it longer: distillery stack up --timeout {int(max(timeout * 2, 300))}"
                )
            await asyncio.sleep(1.0)


def _stop(home: Path, quiet: bool) -> bool:
    stack = read_state(home)
    if stack is None:
        if not quiet:
            print(f"no local stack runs (no {home / STATE_FILE})")
        return False
    # Workers first (their flow runs with them), then the server they report to.
    ours = [p for p in reversed(stack.processes) if _running(p)]
    for process in ours:
        if not quiet:
            print(f"stopping {process.name} (pid {process.pid})")
        _stop_group(process.pid)
    (home / STATE_FILE).unlink(missing_ok=True)
    if not quiet:
        print("the local stack is stopped" if ours else "the local stack was not running")
    return bool(ours)


def _stop_group(pgid: int) -> None:
    """SIGTERM the group and every group its processes started (flow runs start their own
    sessions), SIGKILL what is left after the grace."""
    groups = _groups_under(pgid)
    _signal(groups, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while any(group_members(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal([g for g in groups if group_members(g)], signal.SIGKILL)


def _signal(groups: Iterable[int], sig: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)


# Process table, read from /proc (Linux): zombies count as gone (a parent that exited leaves its
# children to an init that, in a container, may never reap them).


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, process group, start time) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                table[int(entry.name)] = (int(stat[1]), int(stat[2]), int(stat[19]))
    return table


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (the name before it may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return int(stat[19]) if stat is not None else None


def group_members(pgid: int) -> list[int]:
    return [pid for pid, (_, group, _) in _proc_table().items() if group == pgid]


def _groups_under(pgid: int) -> list[int]:
    table = _proc_table()
    pids = {pid for pid, (_, group, _) in table.items() if group == pgid}
    grew = True
    while grew:
        children = {pid for pid, (parent, _, _) in table.items() if parent in pids}
        grew = not children <= pids
        pids |= children
    return [pgid, *sorted({table[pid][1] for pid in pids} - {pgid})]


def _running(process: Process) -> bool:
    """Its group has a live process, and its pid was not reused by another process."""
    started = _start_time(process.pid)
    if started is not None and started != process.started:
        return False
    return bool(group_members(process.pid))


def _write_state(home: Path, stack: Stack) -> None:
    path = home / STATE_FILE
    path.with_suffix(".tmp").write_text(json.dumps(asdict(stack), indent=2) + "\n")
    path.with_suffix(".tmp").replace(path)


def read_state(home: Path) -> Stack | None:
    path = home / STATE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    processes = [Process(**p) for p in data.pop("processes")]
    return Stack(**data, processes=processes)
