"""The local stack for real: server, pools, deployments, workers; a CLI-triggered run; the UI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest

from distillery.flows.stack import STATE_FILE, Stack, group_members, read_state
from fake_teacher import FakeTeacher, Knobs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "stock-advisor.yaml"
SCREENSHOTS = REPO / "test-artifacts"
NIGHTLY = ("distill/nightly-stock-advisor", "distill/nightly-stock-advisor-demo")
ARTIFACTS = {"dataset-summary", "dataset-sample", "validation-report"}
INSTALL_CHROMIUM = (
    "the UI test needs Debian's chromium: `sudo apt-get install -y chromium` "
    "(`make browser`, which `make test` runs, installs it)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    id: str
    name: str
    state: str
    trigger_output: str


@dataclass
class Running:
    stack: Stack
    env: dict[str, str]  # for `prefect` commands against the stack
    run: Run
    again: Run  # the same ad-hoc run once more, nothing changed
    requests_again: int  # teacher requests the second run sent


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{output[-4000:]}"
    return output


def _log_tail(path: str, chars: int = 3000) -> str:
    return f"--- {path}:\n{Path(path).read_text(errors='replace')[-chars:]}"


async def _pause_nightly_schedules(api_url: str) -> None:
    """A nightly refresh of the real recipe must not start mid-test (around 02:00 UTC)."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        for name in NIGHTLY:
            deployment = await client.read_deployment_by_name(name)
            for schedule in deployment.schedules:
                await client.update_deployment_schedule(deployment.id, schedule.id, active=False)


async def _wait_final(api_url: str, flow_run_id: str, timeout: float) -> tuple[str, str]:
    from prefect.client.orchestration import PrefectClient

    deadline = time.monotonic() + timeout
    async with PrefectClient(api_url) as client:
        while True:
            flow_run = await client.read_flow_run(UUID(flow_run_id))
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run.name, str(flow_run.state.name)
            if time.monotonic() > deadline:
                state = flow_run.state.name if flow_run.state else "no state"
                return flow_run.name, f"still {state} after {timeout:.0f} s"
            await asyncio.sleep(2)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One stack for the module, and one ad-hoc run on it triggered from the CLI."""
    tmp = tmp_path_factory.mktemp("stack")
    home = tmp / "home"
    # Not the developer's server, teacher or output: the stack's defaults are under test.
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "OPENAI_")) and k != "DISTILLERY_OUTPUT"
    }
    stack_env = {
        **base,
        "DISTILLERY_CACHE_DIR": str(tmp / "teacher-cache"),  # the run's own request cache
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # a triggered run is picked up at once
    }
    distillery = [sys.executable, "-m", "distillery.flows.cli", "stack"]
    with FakeTeacher(Knobs(latency=0.0, slots=32)) as teacher:
        try:
            started = time.monotonic()
            _cli(stack_env, *distillery, "up", "--home", str(home),
                 "--port", str(_free_port()), "--timeout", "300", timeout=900)  # fmt: skip
            stack = read_state(home)
            assert stack is not None
            print(f"stack up in {time.monotonic() - started:.0f} s")
            asyncio.run(_pause_nightly_schedules(stack.api_url))
            env = {**base, "PREFECT_API_URL": stack.api_url, "PREFECT_HOME": str(tmp / "cli")}
            env["COLUMNS"] = "200"  # rich tables cut names at the terminal width

            def adhoc() -> Run:
                started = time.monotonic()
                triggered = _cli(
                    env, sys.executable, "-m", "prefect", "deployment", "run", "distill/adhoc",
                    "--param", f"recipe={RECIPE}", "--param", "examples=30",
                    "--param", f"output={tmp / 'out'}",
                    "--param", f"teacher_base_url={teacher.url}",
                    "--param", "teacher_model=fake-teacher", "--param", "train=false",
                )  # fmt: skip
                match = re.search(r"UUID: ([0-9a-f-]{36})", triggered)
                assert match, triggered
                name, state = asyncio.run(_wait_final(stack.api_url, match.group(1), 600))
                print(f"ad-hoc run {name}: {state} in {time.monotonic() - started:.0f} s")
                return Run(match.group(1), name, state, triggered)

            first = adhoc()
            received = teacher.stats.received
            again = adhoc()
            yield Running(stack, env, first, again, teacher.stats.received - received)
        finally:
            recorded = read_state(home)
            _cli(stack_env, *distillery, "down", "--home", str(home))
            assert not (home / STATE_FILE).exists()
            if recorded is not None:
                left = {p.name: pids for p in recorded.processes if (pids := group_members(p.pid))}
                assert not left, f"processes left after `stack down`: {left}"


def test_adhoc_run_from_the_cli_completes_on_the_stack_with_its_artifacts(
    running: Running,
) -> None:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    stack, run = running.stack, running.run
    listed = _cli(running.env, sys.executable, "-m", "prefect", "deployment", "ls")
    for name in (*NIGHTLY, "distill/adhoc", "train/training"):
        assert name in listed, listed
    worker_log = next(p.log for p in stack.processes if p.name == "worker-distillery-process")
    assert run.state == "Completed", f"{run.name}: {run.state}\n{_log_tail(worker_log)}"

    async def read() -> tuple[Any, list[Any]]:
        async with PrefectClient(stack.api_url) as client:
            nightly = await client.read_deployment_by_name(NIGHTLY[0])
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run.id)]))
            )
            return nightly, artifacts

    nightly, artifacts = asyncio.run(read())
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [
        ("0 2 * * *", "UTC")
    ]
    assert nightly.parameters["recipe"] == "recipes/stock-advisor.yaml"
    assert nightly.parameters["output"] == "./out"  # DISTILLERY_OUTPUT, as the stack deployed it
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) >= ARTIFACTS, sorted(k for k in by_key if k)
    # The summary's publish row: 30 rows in all (not any "30", which a timestamp can hold).
    summary = str(by_key["dataset-summary"].data)
    publish = r"\| publish \| rows \(train / validation\) \| 30 \(\d+ / \d+\) \|"
    assert re.search(publish, summary), summary


def test_second_adhoc_run_with_nothing_changed_sends_no_teacher_request(
    running: Running,
) -> None:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    again = running.again
    assert again.state == "Completed", f"{again.name}: {again.state}"
    assert running.requests_again == 0

    async def summary() -> str:
        async with PrefectClient(running.stack.api_url) as client:
            found = await client.read_latest_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dataset-summary"]))
            )
            return str(found[0].data)

    text = asyncio.run(summary())
    assert ": unchanged" in text and "nothing published" in text, text


class DevTools:
    """Just enough of the Chrome DevTools protocol: commands in, results out, events ignored."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive(timeout=60)).data)
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return dict(message["result"])

    async def click_tab(self, name: str) -> bool:
        result = await self.call(
            "Runtime.evaluate", expression=f"({CLICK_TAB})({json.dumps(name)})"
        )
        return bool(result["result"].get("value"))

    async def text(self) -> str:
        result = await self.call(
            "Runtime.evaluate", expression="document.body ? document.body.innerText : ''"
        )
        return str(result["result"].get("value", ""))


# Clicks the page's tab named by the argument; false until the tab is there.
CLICK_TAB = """(name) => {
    const tab = [...document.querySelectorAll('[role=tab], .p-tab')]
        .find(e => e.innerText.trim() === name);
    if (tab) tab.click();
    return Boolean(tab);
}"""


async def _render(url: str, tab: str, expected: list[str], screenshot: Path, timeout: float) -> str:
    """Open url in headless Chromium, open its tab, wait for every expected string; screenshot."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(INSTALL_CHROMIUM)
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1440,1000", "--hide-scrollbars", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert browser.poll() is None, f"chromium exited with {browser.returncode}"
            assert time.monotonic() < deadline, "chromium opened no DevTools port in 60 s"
            await asyncio.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws,
        ):
            tools = DevTools(ws)
            await tools.call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            clicked, text = False, ""
            while not (clicked and all(s in text for s in expected)):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
                clicked = clicked or await tools.click_tab(tab)
                text = await tools.text()
            await asyncio.sleep(1)  # let the last fetched parts paint
            shot = await tools.call("Page.captureScreenshot", format="png")
            screenshot.parent.mkdir(exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return text
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


def test_flow_run_page_in_chromium_shows_the_run_and_its_summary_artifact(
    running: Running,
) -> None:
    run = running.run
    # Prefect 3.9.1's UI rewrites `?tab=Artifacts` to `?tab=Logs` on a fresh load (measured; the
    # tab is hidden until the run is fetched): the test clicks the tab, as a person would.
    url = f"{running.stack.ui_url}/runs/flow-run/{run.id}"
    screenshot = SCREENSHOTS / "flow-run-page.png"
    expected = [run.name, "dataset-summary"]
    text = asyncio.run(_render(url, "Artifacts", expected, screenshot, timeout=120))
    missing = [s for s in expected if s not in text]
    assert not missing, f"{url} does not show {missing}; it shows:\n{text[:3000]}"
    assert screenshot.stat().st_size > 10_000
