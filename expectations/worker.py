"""The Great Expectations worker: one long-lived process per flow process runs the GX suites.

The flow process's GIL is shared with the teacher engine's asyncio loop. Importing
great_expectations there (3-4 s of CPU) and running the suites (about a second at 2,000 rows)
delayed the teacher's requests, so both happen in a single spawned worker process instead: a
flow starts it (preload) before the teacher stages, its import runs on the other core, and later
flow runs in the same process reuse it.

Prefect-free on purpose, like expectations.runner: the worker imports these two modules (and
tasks.recipe, tasks.record), never prefect. This module imports little at the top (pandas and
the rest come with the first call or the import thread), so that the worker is ready for calls
within a fraction of a second of its start.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import multiprocessing.context
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import types
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from distillery.expectations.runner import SuiteRun, ValidationReport
    from distillery.tasks.recipe import JudgeSettings, ValidationSettings

logger = logging.getLogger("distillery.validate")


class ValidationWorkerDied(RuntimeError):
    """The GX worker process ended abruptly on both tries (killed, out of memory, crashed)."""


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that does not run the parent's __main__ module again.

    multiprocessing's spawn imports the parent's main module in the child (`distillery run`'s
    script imports flows.cli and with it Prefect; `python -m prefect.engine` is Prefect itself),
    which is exactly the import the worker is meant to spare. While the process is launched the
    parent's __main__ is a bare module, so there is none to import; the worker's code lives in
    importable modules and does not need it.
    """

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            sys.modules["__main__"] = main


class _WorkerContext(multiprocessing.context.SpawnContext):
    """The spawn context, starting _WorkerProcess and remembering it (for its exit code)."""

    def __init__(self) -> None:
        self.processes: list[_WorkerProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> _WorkerProcess:  # type: ignore[override]
        process = _WorkerProcess(*args, **kwargs)
        self.processes.append(process)
        return process


class _Worker:
    """A one-process pool and what it was started with."""

    def __init__(self) -> None:
        self.context = _WorkerContext()
        self.pool = ProcessPoolExecutor(
            max_workers=1, mp_context=self.context, initializer=_start_worker
        )
        # The pool starts its process at the first submit: this one, so the import starts now.
        self.started: Future[int] = self.pool.submit(os.getpid)

    def ended(self) -> str:
        """How the worker's process ended, once the pool broke: pid and exit code, in words."""
        self.pool.shutdown(wait=True, cancel_futures=True)  # joins the process too
        if not self.context.processes:
            return "did not start"
        process = self.context.processes[0]
        code = process.exitcode
        if code is None:
            return f"(pid {process.pid}) ended abruptly"
        if code < 0:
            name = signal.Signals(-code).name
            oom = " (as the kernel's out-of-memory killer does)" if name == "SIGKILL" else ""
            return f"(pid {process.pid}) was killed by {name}{oom}"
        return f"(pid {process.pid}) exited with code {code}"


_lock = threading.Lock()
_worker: _Worker | None = None


def _current() -> _Worker:
    global _worker
    with _lock:
        if _worker is None:
            _worker = _Worker()
        return _worker


def _discard(worker: _Worker) -> str:
    global _worker
    with _lock:
        if _worker is worker:
            _worker = None
    return worker.ended()


def preload() -> None:
    """Start the worker (once per process) so that its great_expectations import overlaps the
    teacher stages on the other core; the process spawns in a few milliseconds of this thread.
    """
    _current()


def worker_info() -> dict[str, Any]:
    """The worker's pid, whether it imported great_expectations and prefect, and the CPU
    priority its calls run at (diagnostics)."""
    return _current().pool.submit(_info).result()


def run_in_worker(
    candidates: pd.DataFrame,
    settings: ValidationSettings,
    min_rows: int,
    docs_dir: Path | None,
    docs_key: str = "",
    judge: JudgeSettings | None = None,
) -> ValidationReport:
    """run_suite in the worker process; a worker that died is replaced and tried once more.

    `docs_dir` None: the Data Docs are written later, by docs_in_worker(docs_key, ...), so that
    the caller has the verdict first (writing the site is about a third of a run at 2,000 rows)
    and can go on while the worker writes them.

    The worker gets suite_frame's columns (only what the suites read) and the settings through
    a pickle file: pickled through the pool's pipe instead, 100,000 rows raised this process's
    peak RSS by 339 MiB (the pickle is built in memory, 114 MiB, with copies); written to a
    file, by 38.
    """
    from distillery.expectations.runner import suite_frame

    with tempfile.TemporaryDirectory(prefix="distillery-gx-frame-") as tmp:
        job = Path(tmp) / "candidates.pkl"
        with job.open("wb") as file:
            pickle.dump((suite_frame(candidates), settings, judge), file, pickle.HIGHEST_PROTOCOL)
        first = ""
        for attempt in (1, 2):
            worker = _current()
            try:
                report = worker.pool.submit(
                    _run_suite_from_file, job, min_rows, docs_dir, docs_key
                ).result()
            except BrokenProcessPool as error:
                ended = _discard(worker)
                if attempt == 2:
                    raise ValidationWorkerDied(
                        f"validation did not run: the Great Expectations worker process {first}, "
                        f"and the fresh one started after it {ended}; the workers' own output, "
                        f"if any, is in the log above"
                    ) from error
                first = ended
                logger.warning(
                    "the Great Expectations worker process %s; starting a fresh one and "
                    "validating again",
                    ended,
                )
                for entry in docs_dir.iterdir() if docs_dir else ():  # what the dead one wrote
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            else:
                # While the flow goes on. With the docs still to write, only what is free
                # already goes back now (a few ms; the frame's pages): the full collection
                # would delay them (0.14 s at 100,000 rows), and docs_in_worker runs it after.
                worker.pool.submit(_release_memory, docs_dir is not None)
                return report
    raise AssertionError("unreachable")  # pragma: no cover


def docs_in_worker(docs_key: str, docs_dir: Path) -> None:
    """Write the Data Docs of run_in_worker(..., docs_dir=None, docs_key) into docs_dir."""
    worker = _current()
    try:
        worker.pool.submit(_write_pending_docs, docs_key, docs_dir).result()
    except BrokenProcessPool as error:
        raise ValidationWorkerDied(
            f"the Data Docs were not written: the Great Expectations worker process "
            f"{_discard(worker)} after it validated the dataset; the validation results are in "
            "the run's manifest and its 'validation-report' artifact"
        ) from error
    worker.pool.submit(_release_memory)


# ---- in the worker process -----------------------------------------------------------------


_gx_import: threading.Thread | None = None


def _start_worker() -> None:
    """The worker's initializer: follow the parent out, and start importing great_expectations.

    The import runs beside the worker's call loop, not in this initializer: at exit the parent
    waits for the calls it has pending (preload's first one included), and a flow run that ends
    before validation (a bad recipe, Ctrl-C) should not wait seconds for the import to finish.
    """
    global _gx_import
    # Ctrl-C reaches the whole process group: the flow process handles it, and stops the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="distillery-gx-parent", daemon=True).start()
    _gx_import = threading.Thread(
        target=_import_great_expectations, name="distillery-gx-import", daemon=True
    )
    _gx_import.start()


def _import_great_expectations() -> None:
    """Import GX while the teacher stages run, so that validation finds it imported; a call that
    comes before the import is done (a very short run) waits for it.

    It used to run at the lowest CPU priority; two A/B pairs of bench item 1b (5 repeats each)
    put that within the noise (flow / bare client 1.16 and 1.13 with it, 1.11 and 1.11
    without; bench/README.md), so it went."""
    try:
        import great_expectations  # noqa: F401

        import distillery.expectations.suite  # noqa: F401
    except Exception:  # run_suite imports it again and raises there, to the flow
        pass


def _exit_with_parent() -> None:
    """End the worker when its parent is gone, even killed (no orphan holding a frame).

    Without this a worker whose parent was SIGKILLed waits for its next call forever: it holds
    the write end of its own call queue, so it never sees the end of it.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()  # returns when the parent's end of the spawn pipe closes: it exited
        os._exit(0)


# Validations whose Data Docs are still to be written, by key (a flow run's id): a few at most,
# the oldest dropped (its flow process died before it asked for them).
_docs_pending: collections.OrderedDict[str, SuiteRun] = collections.OrderedDict()
_DOCS_PENDING_MAX = 4


def _run_suite_from_file(
    job: Path, min_rows: int, docs_dir: Path | None, docs_key: str
) -> ValidationReport:
    """run_suite over the frame and settings in `job` (the call itself carries only stdlib
    types: unpickling the settings or a frame imports their modules, and that happens after the
    import thread is done, so that no module is imported by two threads at once); with no
    docs_dir, the Data Docs wait for _write_pending_docs."""
    if _gx_import is not None:
        _gx_import.join()
    from distillery.expectations.runner import validate_frame, write_docs

    with job.open("rb") as file:
        candidates, settings, judge = pickle.load(file)
    report, run = validate_frame(candidates, settings, min_rows, judge)
    if docs_dir is not None:
        write_docs(run, docs_dir)
    else:
        _docs_pending.pop(docs_key, None)
        _docs_pending[docs_key] = run
        while len(_docs_pending) > _DOCS_PENDING_MAX:
            _docs_pending.popitem(last=False)
    return report


def _write_pending_docs(docs_key: str, docs_dir: Path) -> None:
    from distillery.expectations.runner import write_docs

    run = _docs_pending.pop(docs_key, None)
    if run is None:
        raise RuntimeError(f"no validation of {docs_key!r} is waiting for its Data Docs")
    write_docs(run, docs_dir)


def _release_memory(collect: bool = True) -> None:
    """The worker lives on between runs: it must not hold a large frame's pages meanwhile.

    A call of its own, which the flow sends once it has what it waited for: run in a thread
    after the suite, the collection held the GIL while the report was on its way back (0.17 s
    at 2,000 rows). `collect=False`: give back what is free without a full collection (100,000
    rows of the fake teacher's texts, measured in-process: the suite left the worker 168 MiB
    up; the trim alone took 3 ms and left 66, the collection and trim 0.14 s and left none)."""
    from distillery.tasks.memory import release_freed_memory

    release_freed_memory(collect=collect)


def _info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "great_expectations": "great_expectations" in sys.modules,
        "prefect": "prefect" in sys.modules,
        "nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),  # the calls' thread
    }
