"""Failure notifications: a real distill run, a Prefect webhook block, a webhook receiver."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from distillery.flows.distill import distill
from distillery.flows.notify import ENV_BLOCK, one_line
from distillery.tasks.teacher import TeacherError
from distillery.tasks.validate import ValidationFailed
from fake_teacher import FakeTeacher

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "stock-advisor.yaml")


class Receiver:
    """A webhook receiver on 127.0.0.1: records the JSON body of every request it gets."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def save_webhook_block(name: str, url: str) -> str:
    """A CustomWebhookNotificationBlock pointing at `url`; returns its slug."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name="distillery-test",
        url=url,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        timeout=5,
    )
    block.save(name, overwrite=True)
    return f"custom-webhook/{name}"


def run(teacher: FakeTeacher, workdir: Path, recipe: str = RECIPE, **options: Any) -> Any:
    return distill(
        recipe=recipe,
        examples=10,  # the seeds alone: no expansion
        output=str(workdir / "out"),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=25,
        train=False,
        **options,
    )


def unreachable_validation(workdir: Path) -> str:
    """The shipped recipe asking for more rows than the run makes: validation fails."""
    import yaml

    data = yaml.safe_load(Path(RECIPE).read_text())
    data["seeds_file"] = str(REPO / "recipes" / data["seeds_file"])
    data["validation"] = {**data.get("validation", {}), "min_rows": 500}
    path = workdir / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_failed_run_sends_one_message_naming_the_stage_and_cause(
    workdir: Path, teacher: FakeTeacher, receiver: Receiver
) -> None:
    slug = save_webhook_block("notify-test", receiver.url)
    recipe = unreachable_validation(workdir)
    with pytest.raises(ValidationFailed):
        run(teacher, workdir, recipe=recipe, notify=slug)

    assert len(receiver.received) == 1
    message = receiver.received[0]
    assert message["subject"].startswith("distill run variant-")
    assert message["subject"].endswith("failed at validate")
    body = message["body"]
    assert "Stage: validate" in body
    assert "Cause: ValidationFailed: validation failed" in body
    assert "expect_table_row_count_to_be_between" in body
    assert f"Recipe: {recipe}" in body
    cause = next(line for line in body.splitlines() if line.startswith("Cause: "))
    assert len(cause) <= len("Cause: ") + 400


def test_failure_before_any_task_fails_names_the_flow_and_env_block_is_used(
    workdir: Path, teacher: FakeTeacher, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settings check in the flow body: no task failed; the block comes from the env var."""
    monkeypatch.setenv(ENV_BLOCK, save_webhook_block("notify-env", receiver.url))
    with pytest.raises(TeacherError):
        distill(recipe=RECIPE, output=str(workdir / "out"), teacher_model="m", train=False)

    assert len(receiver.received) == 1
    message = receiver.received[0]
    assert message["subject"].endswith("failed at flow distill")
    assert "Cause: TeacherError: --teacher-model m needs a teacher endpoint" in message["body"]


def test_train_flow_failure_is_notified_through_the_env_block(
    workdir: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distillery.flows.train import TrainParams, train

    monkeypatch.setenv(ENV_BLOCK, save_webhook_block("notify-train", receiver.url))
    empty = workdir / "out" / "nothing-here"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        train(TrainParams(version=str(empty)))

    assert len(receiver.received) == 1
    message = receiver.received[0]
    assert message["subject"].startswith("train run train-")
    assert message["subject"].endswith("failed at flow train")
    assert f"Version: {empty}" in message["body"]
    assert "Cause: FileNotFoundError: " in message["body"]


def test_successful_run_sends_nothing(
    workdir: Path, teacher: FakeTeacher, receiver: Receiver
) -> None:
    slug = save_webhook_block("notify-ok", receiver.url)
    summary = run(teacher, workdir, notify=slug)
    assert summary["published"]["total"] == 10
    assert receiver.received == []


@pytest.mark.parametrize(
    ("broken", "fix"),
    [
        ("missing-block", "prefect block create custom-webhook"),
        ("receiver-down", "its receiver is reachable"),
        ("not-a-slug", "'<block-type-slug>/<block-name>'"),
    ],
)
def test_broken_notification_never_masks_the_run_failure(
    workdir: Path,
    teacher: FakeTeacher,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    broken: str,
    fix: str,
) -> None:
    if broken == "missing-block":
        slug = "custom-webhook/no-such-block"
    elif broken == "not-a-slug":
        slug = "nightly"
    else:
        down = Receiver()  # bound, then closed without serving: its port refuses connections
        down.server.server_close()
        slug = save_webhook_block("notify-down", down.url)
    caplog.set_level(logging.WARNING)
    with pytest.raises(ValidationFailed):
        run(teacher, workdir, recipe=unreachable_validation(workdir), notify=slug)

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "failure notification" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert repr(slug) in warnings[0] and "Fix: " in warnings[0] and fix in warnings[0]
    hook_errors = [r for r in caplog.records if "while running hook" in r.getMessage()]
    assert hook_errors == []
    assert receiver.received == []


def test_cause_is_one_short_line_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "local-key-0123456789")
    text = (
        "401 from https://user:hunter22@api.example.com/v1\n  with key sk-abcdefghijklmnop, "
        "api_key=local-key-0123456789 and Authorization: Bearer abcdefghijkl " + "x" * 600
    )
    line = one_line(text)
    assert "\n" not in line and len(line) <= 400 and line.endswith("...")
    for secret in ("hunter22", "sk-abcdefghijklmnop", "local-key-0123456789", "abcdefghijkl"):
        assert secret not in line
    assert line.startswith("401 from https://***@api.example.com/v1 with key ***")
