"""The GX suite: valid data passes, each broken rule fails by name, Data Docs are written."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from distillery.expectations import worker
from distillery.tasks.recipe import ValidationSettings
from distillery.tasks.record import REQUIRED_COLUMNS, record_id
from distillery.tasks.validate import (
    ValidationFailed,
    ValidationReport,
    ValidationWorkerDied,
    run_suite,
    validate_dataset,
)

REPO = Path(__file__).resolve().parent.parent

SETTINGS = ValidationSettings(max_rejected_share=0.25)


def make_rows(n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        ctx, q = f"I am {20 + i} years old and save ${100 * i} a month.", f"Should I buy fund {i}?"
        answer = f"Given your age of {20 + i}, a diversified index fund is a sound start. " * 2
        rows.append(
            {
                "id": record_id(ctx, q),
                "user_context": ctx,
                "question": q,
                "answer": answer,
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": answer},
                ],
                "source": "seed" if i < 2 else "generated",
                "seed_ids": [] if i < 2 else ["0123456789abcdef"],
                "max_similarity": 0.1,
                "teacher_model": "m",
                "expansion_request_id": "" if i < 2 else f"req-{i}",
                "answer_request_id": f"ans-{i}",
                "finish_reason": "stop",
                "prompt_tokens": 10,
                "completion_tokens": 20,
                "split": "validation" if i % 10 == 0 else "train",
                "run_id": "run",
                "created_at": pd.Timestamp("2026-11-28", tz="UTC"),
                "status": "accepted",
                "reason": None,
            }
        )
    return pd.DataFrame(rows)


def reject(frame: pd.DataFrame, count: int) -> pd.DataFrame:
    """Mark the last `count` rows as rejected by the answer filters, with empty answers."""
    frame = frame.copy()
    idx = frame.index[-count:]
    frame.loc[idx, "status"] = "rejected"
    frame.loc[idx, "reason"] = "truncated"
    frame.loc[idx, "answer"] = ""
    frame.loc[idx, "finish_reason"] = "length"
    return frame


def failed_names(report_frame: pd.DataFrame, tmp_path: Path, min_rows: int = 10) -> set[str]:
    report = run_suite(report_frame, SETTINGS, min_rows, tmp_path)
    return {f"{r.expectation}:{r.column}" for r in report.failed}


def test_valid_frame_passes_and_writes_data_docs(tmp_path: Path) -> None:
    report = run_suite(make_rows(20), SETTINGS, 20, tmp_path)
    assert report.success, report.to_markdown()
    assert report.accepted_rows == 20
    index = (tmp_path / "index.html").read_text()
    assert "distillery-dataset" in index
    assert list((tmp_path / "validations").rglob("*.html"))
    assert (tmp_path / "validation_result.json").exists()
    assert report.evaluated == report.successful == len(report.results)


# Every expectation of the contract: (type, column), "(table)" for the row count.
CONTRACT = sorted(
    [
        ("expect_table_row_count_to_be_between", "(table)"),
        ("expect_column_values_to_not_be_null", "status"),
        ("expect_column_values_to_be_in_set", "status"),
        *(("expect_column_values_to_not_be_null", c) for c in REQUIRED_COLUMNS),
        ("expect_column_values_to_be_unique", "id"),
        ("expect_column_values_to_match_regex", "id"),
        *(
            (kind, c)
            for c in ("user_context", "question", "answer")
            for kind in (
                "expect_column_value_lengths_to_be_between",
                "expect_column_values_to_not_match_regex",
            )
        ),
        ("expect_column_values_to_be_in_set", "source"),
        ("expect_column_values_to_be_in_set", "split"),
        ("expect_column_values_to_be_in_set", "finish_reason"),
        ("expect_column_values_to_be_between", "max_similarity"),
    ]
)


def test_markdown_lists_every_expectation_of_the_suites(tmp_path: Path) -> None:
    from distillery.expectations.suite import build_suites

    report = run_suite(make_rows(12), SETTINGS, 10, tmp_path)
    markdown = report.to_markdown()
    assert markdown.startswith("# Validation passed")
    assert "12 answered rows (12 accepted, 0 rejected)" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| expect_")]
    listed = [tuple(cell.strip() for cell in row.strip("|").split("|")[:2]) for row in rows]
    suites = build_suites(SETTINGS, 10)
    in_suites = [
        (e.expectation_type, getattr(e, "column", None) or "(table)")
        for suite in suites
        for e in suite.expectations
    ]
    assert sorted(listed) == sorted(in_suites) == CONTRACT  # GX reports in its own order
    assert all(row.endswith("| pass |") for row in rows)
    # The status checks see every answered row; the rest only the accepted ones, which the
    # runner filters once, so no expectation carries a row_condition of its own.
    assert {getattr(e, "column", None) for e in suites.answered.expectations} == {"status"}
    assert all(not getattr(e, "row_condition", None) for s in suites for e in s.expectations)


def test_duplicated_id_fails_on_id(tmp_path: Path) -> None:
    frame = make_rows(12)
    frame.loc[5, "id"] = frame.loc[4, "id"]
    assert "expect_column_values_to_be_unique:id" in failed_names(frame, tmp_path)


def test_template_leak_in_answer_fails(tmp_path: Path) -> None:
    frame = make_rows(12)
    frame.loc[3, "answer"] += "\n# QUESTION 2\nWhat next?"
    assert failed_names(frame, tmp_path) == {"expect_column_values_to_not_match_regex:answer"}


def test_too_short_answer_fails_on_length(tmp_path: Path) -> None:
    frame = make_rows(12)
    frame.loc[3, "answer"] = "Buy."
    report = run_suite(frame, SETTINGS, 10, tmp_path)
    (failure,) = report.failed
    assert failure.expectation == "expect_column_value_lengths_to_be_between"
    assert failure.failing_ids == (frame.loc[3, "id"],)


def test_failure_names_expectations_and_report_and_survives_pickle(tmp_path: Path) -> None:
    frame = make_rows(12)
    frame.loc[3, "answer"] = "Buy."
    frame.loc[4, "id"] = frame.loc[5, "id"]
    report = run_suite(frame, SETTINGS, 10, tmp_path)
    report.docs_uri = "s3://bucket/demo/runs/r1/data-docs/index.html"
    error = ValidationFailed(report)
    message = str(error)
    assert "expect_column_value_lengths_to_be_between(answer)" in message
    assert "expect_column_values_to_be_unique(id)" in message
    assert "s3://bucket/demo/runs/r1/data-docs/index.html" in message
    assert "validation-report" in message
    assert f"failed 2 of {report.evaluated} expectations" in message
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == message and isinstance(copy.report, ValidationReport)
    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["success"] is False
    assert summary["evaluated"] - summary["successful"] == 2
    by_name = {f["expectation"]: f for f in summary["failed"]}
    assert by_name["expect_column_value_lengths_to_be_between"]["failing_ids"] == [
        frame.loc[3, "id"]
    ]


def test_null_field_fails_not_null(tmp_path: Path) -> None:
    frame = make_rows(12)
    frame.loc[2, "teacher_model"] = None
    assert "expect_column_values_to_not_be_null:teacher_model" in failed_names(frame, tmp_path)


def test_too_few_accepted_rows_fails_row_count(tmp_path: Path) -> None:
    frame = reject(make_rows(12), 2)  # 10 accepted, rejected share 1/6
    assert failed_names(frame, tmp_path, min_rows=10) == set()
    assert failed_names(frame, tmp_path, min_rows=11) == {"expect_table_row_count_to_be_between:"}


def test_rejected_share_above_the_cap_fails_and_at_the_cap_passes(tmp_path: Path) -> None:
    at_cap = reject(make_rows(20), 5)  # 25 %
    assert failed_names(at_cap, tmp_path, min_rows=15) == set()
    above = reject(make_rows(20), 6)  # 30 %
    assert failed_names(above, tmp_path, min_rows=14) == {
        "expect_column_values_to_be_in_set:status"
    }


def test_rejected_share_exactly_at_a_non_binary_cap_passes(tmp_path: Path) -> None:
    settings = ValidationSettings(max_rejected_share=1 / 3)  # 1 - 1/3 > 8/12 in floats
    assert run_suite(reject(make_rows(12), 4), settings, 8, tmp_path).success
    assert not run_suite(reject(make_rows(12), 5), settings, 7, tmp_path).success


def test_rejected_rows_with_empty_fields_do_not_trip_row_checks(tmp_path: Path) -> None:
    frame = reject(make_rows(12), 2)
    gone = frame.index[-2:]
    for column in ("id", "user_context", "question", "teacher_model", "messages", "split"):
        frame.loc[gone, column] = None
    assert failed_names(frame, tmp_path, min_rows=10) == set()


def test_row_without_status_fails(tmp_path: Path) -> None:
    frame = make_rows(12)
    frame.loc[3, "status"] = None
    assert failed_names(frame, tmp_path) == {"expect_column_values_to_not_be_null:status"}


def test_validate_task_raises_and_publishes_the_report_artifact(
    tmp_path: Path, prefect_api: str
) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    frame = make_rows(12)
    frame.loc[3, "answer"] = "Buy."

    @flow
    def check() -> None:
        validate_dataset(frame, SETTINGS, 10, str(tmp_path / "out"), "demo", "run-1")

    with pytest.raises(
        ValidationFailed, match=r"expect_column_value_lengths_to_be_between\(answer\)"
    ):
        check()
    assert (tmp_path / "out" / "demo" / "runs" / "run-1" / "data-docs" / "index.html").exists()
    only_reports = ArtifactFilter(key=ArtifactFilterKey(any_=["validation-report"]))
    with get_client(sync_client=True) as client:
        (artifact, *_) = client.read_artifacts(
            artifact_filter=only_reports, sort=ArtifactSort.CREATED_DESC, limit=1
        )
    assert "Validation FAILED" in str(artifact.data)


# ---- the Great Expectations worker process ---------------------------------------------------


def run_python(*args: str) -> subprocess.Popen[str]:
    """A fresh interpreter on this checkout's code (GX is imported in this one by other tests)."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.PIPE,
        text=True,
    )


def gone(pid: int, timeout: float) -> bool:
    """Whether the process ended (or is a zombie nobody reaped yet) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


# A flow's main module imports Prefect (`distillery run`, `python -m prefect.engine`): spawn would
# import it again in the worker unless the worker is started without it.
CALLER = """
import json, os, sys
from pathlib import Path

import pandas as pd

from distillery.expectations import worker
from distillery.tasks.recipe import ValidationSettings
# The flow's module, Prefect and all.
from distillery.tasks.validate import validate_dataset  # noqa: F401

if __name__ == "__main__":
    tmp = Path(sys.argv[1])
    (tmp / "docs").mkdir()
    frame = pd.read_pickle(tmp / "frame.pkl")
    # What validate_dataset calls; no preload before it: it starts the worker itself.
    report = worker.run_in_worker(frame, ValidationSettings(), 10, tmp / "docs")
    seen = {"pid": os.getpid(), "worker": worker.worker_info(), "report": report.to_dict()}
    seen["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    print(json.dumps({**seen, "gx_here": "great_expectations" in sys.modules}))
"""


def test_the_suite_runs_in_the_worker_and_gx_is_never_imported_by_the_caller(
    tmp_path: Path,
) -> None:
    frame = make_rows(12)
    frame.loc[3, "answer"] = "Buy."
    frame.to_pickle(tmp_path / "frame.pkl")
    (tmp_path / "caller.py").write_text(CALLER)
    proc = run_python(str(tmp_path / "caller.py"), str(tmp_path))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["worker"]["pid"] != seen["pid"]
    assert seen["worker"]["great_expectations"] is True
    assert seen["worker"]["prefect"] is False
    assert seen["worker"]["nice"] == seen["nice"]  # the calls run at the flow's priority
    assert seen["gx_here"] is False
    (failure,) = seen["report"]["failed"]
    assert failure["expectation"] == "expect_column_value_lengths_to_be_between"
    assert failure["failing_ids"] == [frame.loc[3, "id"]]
    assert (tmp_path / "docs" / "index.html").exists()


def test_a_killed_worker_is_replaced_and_the_next_validation_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = make_rows(12)
    (tmp_path / "a").mkdir()
    assert worker.run_in_worker(frame, SETTINGS, 10, tmp_path / "a").success
    first = worker.worker_info()["pid"]
    assert first != os.getpid()
    os.kill(first, signal.SIGKILL)
    assert gone(first, 10)
    frame.loc[3, "answer"] = "Buy."
    (tmp_path / "b").mkdir()
    with caplog.at_level(logging.WARNING, logger="distillery.validate"):
        report = worker.run_in_worker(frame, SETTINGS, 10, tmp_path / "b")
    assert [f.failing_ids for f in report.failed] == [(frame.loc[3, "id"],)]
    assert (tmp_path / "b" / "index.html").exists()
    assert f"(pid {first}) was killed by SIGKILL" in caplog.text
    assert worker.worker_info()["pid"] not in (first, os.getpid())


def test_docs_written_after_the_verdict_once_and_a_worker_lost_in_between_is_named(
    tmp_path: Path,
) -> None:
    frame = make_rows(12)
    report = worker.run_in_worker(frame, SETTINGS, 10, None, docs_key="run-a")
    assert report.success and report.evaluated == len(CONTRACT)
    broken = frame.copy()
    broken.loc[3, "answer"] = "Buy."
    assert not worker.run_in_worker(broken, SETTINGS, 10, None, docs_key="run-b").success
    (tmp_path / "a").mkdir()
    worker.docs_in_worker("run-a", tmp_path / "a")
    index = (tmp_path / "a" / "index.html").read_text()
    assert "distillery-dataset" in index and "distillery-dataset-status" in index
    results = json.loads((tmp_path / "a" / "validation_result.json").read_text())
    assert set(results) == {"distillery-dataset", "distillery-dataset-status"}
    assert all(r["success"] for r in results.values())  # run-a's, not run-b's (validated after)
    with pytest.raises(RuntimeError, match="no validation of 'run-a' is waiting for its Data Docs"):
        worker.docs_in_worker("run-a", tmp_path / "a")

    assert worker.run_in_worker(frame, SETTINGS, 10, None, docs_key="run-c").success
    pid = worker.worker_info()["pid"]
    os.kill(pid, signal.SIGKILL)
    assert gone(pid, 10)
    (tmp_path / "b").mkdir()
    with pytest.raises(ValidationWorkerDied) as info:
        worker.docs_in_worker("run-c", tmp_path / "b")
    assert (
        f"the Data Docs were not written: the Great Expectations worker process (pid {pid}) "
        "was killed by SIGKILL" in str(info.value)
    )
    assert worker.run_in_worker(frame, SETTINGS, 10, tmp_path / "b").success  # a fresh worker
    assert (tmp_path / "b" / "index.html").exists()


def test_list_columns_sent_as_stand_ins_still_fail_on_their_nulls(tmp_path: Path) -> None:
    frame = make_rows(12)
    frame.at[4, "messages"] = None
    frame.at[5, "seed_ids"] = None
    report = worker.run_in_worker(frame, SETTINGS, 10, tmp_path)
    assert {(f.expectation, f.column, f.failing_ids) for f in report.failed} == {
        ("expect_column_values_to_not_be_null", "messages", (frame.loc[4, "id"],)),
        ("expect_column_values_to_not_be_null", "seed_ids", (frame.loc[5, "id"],)),
    }


class ExitOnUnpickle:
    """A cell value that ends the process that unpickles it: a worker that dies on every try."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (os._exit, (3,))


def test_a_worker_that_dies_twice_fails_with_a_clear_error_and_the_next_run_works(
    tmp_path: Path,
) -> None:
    frame = make_rows(12)
    frame["teacher_model"] = frame["teacher_model"].astype(object)
    frame.loc[2, "teacher_model"] = ExitOnUnpickle()
    with pytest.raises(ValidationWorkerDied) as info:
        worker.run_in_worker(frame, SETTINGS, 10, tmp_path)
    assert re.fullmatch(
        r"validation did not run: the Great Expectations worker process \(pid \d+\) exited "
        r"with code 3, and the fresh one started after it \(pid \d+\) exited with code 3; .*",
        str(info.value),
    )
    assert worker.run_in_worker(make_rows(12), SETTINGS, 10, tmp_path).success


@pytest.mark.parametrize("ending", ["SIGKILL", "exit"])
def test_the_worker_does_not_outlive_its_parent(ending: str) -> None:
    script = (
        "import sys, time\n"
        "from distillery.expectations import worker\n"
        "print(worker.worker_info()['pid'], flush=True)  # warm and idle, waiting for a call\n"
        "if sys.argv[1] == 'SIGKILL':\n"
        "    time.sleep(600)\n"
    )
    parent = run_python("-c", script, ending)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert not gone(pid, 0)
    if ending == "SIGKILL":
        os.kill(parent.pid, signal.SIGKILL)
    assert parent.wait(timeout=60) == (-signal.SIGKILL if ending == "SIGKILL" else 0)
    parent.stdout.close()
    assert gone(pid, 5), f"the GX worker {pid} outlived its parent ({ending})"


def test_a_run_that_ends_before_validation_does_not_wait_for_the_gx_import() -> None:
    """A flow run that stops early (bad recipe, Ctrl-C) exits while the worker still imports."""
    script = (
        "import time\n"
        "from distillery.expectations import worker\n"
        "worker.preload()\n"
        "print(time.time(), flush=True)\n"
    )
    parent = run_python("-c", script)
    assert parent.stdout is not None
    preloaded = float(parent.stdout.readline())
    assert parent.wait(timeout=60) == 0
    exit_s = time.time() - preloaded
    parent.stdout.close()
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import great_expectations"], check=True)
    import_s = time.monotonic() - started
    assert exit_s < import_s / 2, f"exit took {exit_s:.2f} s, importing GX {import_s:.2f} s"
