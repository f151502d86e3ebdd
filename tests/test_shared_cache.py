"""The request cache shared through S3 (DISTILLERY_CACHE=s3://...): moto in server mode, the fake
teacher, and engines in separate processes, as workers on two machines would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from distillery.tasks.cost import Price
from distillery.tasks.teacher import (
    BatchesPending,
    BudgetExceeded,
    ChatResult,
    EngineSettings,
    TeacherEndpoint,
    TeacherEngine,
)
from distillery.tasks.teacher.cache import (
    SQLITE_NAME,
    CacheError,
    RequestCache,
    SharedStore,
    object_name,
    open_cache,
)
from fake_teacher import FakeTeacher, Knobs, chat_requests

REPO = Path(__file__).resolve().parent.parent
BUCKET = "distillery-shared-cache"

# One engine process: answers requests [start, stop) of chat_requests(N) through the cache that
# DISTILLERY_CACHE names and prints its call's stats and the answers' contents.
WORKER = """
import json, sys
from fake_teacher import chat_requests
from distillery.tasks.teacher import EngineSettings, TeacherEndpoint, TeacherEngine
url, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
engine = TeacherEngine(
    TeacherEndpoint(model="fake-teacher", base_url=url), EngineSettings(progress=False), "k"
)
try:
    results, stats = engine.complete(chat_requests(200)[start:stop], "worker")
finally:
    engine.close()
print(json.dumps({"sent": stats.sent, "cached": stats.cached,
                  "contents": [r.content for r in results]}))
"""


@pytest.fixture
def bucket(s3_endpoint: str) -> Iterator[str]:
    """An empty bucket on the moto server, removed afterwards."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield BUCKET
    fs.rm(BUCKET, recursive=True)


def run_worker(url: str, start: int, stop: int, cache_dir: Path, cache: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
        DISTILLERY_CACHE=cache,
        DISTILLERY_CACHE_DIR=str(cache_dir),
    )
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, str(start), str(stop)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.s3
@pytest.mark.slow
def test_two_worker_processes_sharing_an_s3_cache_send_each_request_once(
    bucket: str, tmp_path: Path
) -> None:
    cache = f"s3://{bucket}/run"
    with FakeTeacher(Knobs(latency=0.01, slots=32)) as server:
        # Two workers on "two machines" (own local sqlite each) answer disjoint halves at once,
        # then each answers all of it: the second round comes from the other's answers in S3.
        first = run_worker(server.url, 0, 60, tmp_path / "a", cache)
        second = run_worker(server.url, 60, 120, tmp_path / "b", cache)
        a, b = finish(first), finish(second)
        assert (a["sent"], b["sent"]) == (60, 60)
        again_a = finish(run_worker(server.url, 0, 120, tmp_path / "a", cache))
        again_b = finish(run_worker(server.url, 0, 120, tmp_path / "b", cache))
        assert again_a["sent"] == again_b["sent"] == 0
        assert again_a["cached"] == again_b["cached"] == 120
        assert again_a["contents"] == again_b["contents"] == a["contents"] + b["contents"]
        stats = server.stats
        assert stats.received == 120
        assert max(stats.received_by_body.values()) == 1  # every key reached the teacher once

        # A fresh worker (empty local sqlite) sends nothing and fills its local file from S3.
        settings = EngineSettings(cache_dir=tmp_path / "fresh", cache=cache, progress=False)
        engine = TeacherEngine(
            TeacherEndpoint(model="fake-teacher", base_url=server.url), settings, "k"
        )
        try:
            results, call = engine.complete(chat_requests(200)[:120], "fresh")
            assert (call.sent, call.cached) == (0, 120)
            assert engine.cache.shared_hits == 120
            assert [r.content for r in results] == again_a["contents"]
        finally:
            engine.close()
        assert server.stats.received == 120
    local = RequestCache(tmp_path / "fresh" / SQLITE_NAME)
    assert len(list(local.keys())) == 120
    local.close()


@pytest.mark.s3
def test_create_only_writes_racing_on_one_key_have_exactly_one_winner(
    bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{bucket}/race"
    caches = [RequestCache(tmp_path / n / SQLITE_NAME, SharedStore(uri)) for n in ("a", "b")]
    answer = ChatResult("", "stop", 1, 1, "m", "r")
    keys = [f"{i:064x}" for i in range(40)]
    kept: dict[int, dict[str, ChatResult]] = {0: {}, 1: {}}
    for key in keys:
        gate = threading.Barrier(2)

        def write(i: int, key: str = key, gate: threading.Barrier = gate) -> None:
            gate.wait()
            kept[i][key] = caches[i].put(key, replace(answer, content=f"writer {i}"))

        threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # Each key: one writer won, the other read the winner's answer back and uses it.
    assert caches[0].shared_lost + caches[1].shared_lost == len(keys)
    stored = caches[0].shared.read_many([object_name(k) for k in keys])  # type: ignore[union-attr]
    for key in keys:
        assert kept[0][key] == kept[1][key]
        assert json.loads(stored[object_name(key)])["content"] == kept[0][key].content
        # and both local first levels now hold the winner's answer
        assert caches[0].get_many([key])[key] == caches[1].get_many([key])[key] == kept[0][key]
    assert caches[0].shared is not None
    assert not caches[0].shared.create(object_name(keys[0]), b"{}")  # exists: refused
    for cache in caches:
        cache.close()


def test_a_bad_cache_uri_names_the_setting_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"DISTILLERY_CACHE='s4://x/y' is not a usable store"):
        open_cache(EngineSettings(cache_dir=tmp_path, cache="s4://x/y"))


@pytest.mark.s3
def test_a_missing_bucket_names_the_setting_and_the_fix(s3_endpoint: str, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"DISTILLERY_CACHE=s3://no-such-bucket/p: the bucket"):
        open_cache(EngineSettings(cache_dir=tmp_path, cache="s3://no-such-bucket/p"))


@pytest.mark.s3
def test_no_credentials_names_the_setting_and_the_fix(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to look for
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(CacheError, match=r"no credentials .* set AWS_ACCESS_KEY_ID"):
        open_cache(EngineSettings(cache_dir=tmp_path, cache=f"s3://{bucket}/p"))


def test_a_local_folder_in_distillery_cache_is_the_sqlite_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILLERY_CACHE_DIR", str(tmp_path / "old"))
    assert open_cache(EngineSettings()).path == tmp_path / "old" / SQLITE_NAME  # as before
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "new"))
    cache = open_cache(EngineSettings())
    assert cache.path == tmp_path / "new" / SQLITE_NAME and cache.shared is None
    cache.close()


@pytest.mark.s3
def test_many_keys_are_looked_up_in_one_concurrent_pass(bucket: str, tmp_path: Path) -> None:
    store = SharedStore(f"s3://{bucket}/many")
    cache = RequestCache(tmp_path / SQLITE_NAME, store)
    answer = ChatResult("x", "stop", 1, 1, "m", "r")
    keys = [f"{i:064x}" for i in range(300)]
    cache.put_many({k: replace(answer, content=k) for k in keys[:200]})
    fresh = RequestCache(tmp_path / "fresh" / SQLITE_NAME, store)
    found = fresh.get_many(keys)  # 200 hits, 100 misses: a miss is no error
    assert sorted(found) == keys[:200] and all(found[k].content == k for k in found)
    assert fresh.shared_hits == 200
    assert len(store.names("requests")) == 200
    fresh.close()
    cache.close()


PRICE = Price(input_usd_per_1m=1.0, output_usd_per_1m=2.0)


def priced_engine(server: FakeTeacher, cache_dir: Path, **settings: object) -> TeacherEngine:
    config = EngineSettings(cache_dir=cache_dir, progress=False, **settings)  # type: ignore[arg-type]
    endpoint = TeacherEndpoint(model="fake-teacher", base_url=server.url, price=PRICE)
    return TeacherEngine(endpoint, config, api_key="k")


@pytest.mark.s3
def test_workers_of_one_budget_share_one_spend_total_and_one_cap(
    bucket: str, tmp_path: Path
) -> None:
    cache = f"s3://{bucket}/spend"
    with FakeTeacher(Knobs(latency=0.0, slots=8)) as server:
        first = priced_engine(server, tmp_path / "a", cache=cache, budget_id="run-1")
        try:
            _, call = first.complete(chat_requests(20, "a", 200), "first")
        finally:
            first.close()  # its final totals are in the ledger
        spent = call.cost_usd
        assert spent is not None and spent > 0
        one = first.estimate(chat_requests(1, "b", 200)[0])
        # A second worker of the same budget, capped a few requests above what the first spent:
        # the first's spend counts, so it stops after a few of its own 20 requests.
        second = priced_engine(
            server, tmp_path / "b", cache=cache, budget_id="run-1", max_cost_usd=spent + 3 * one
        )
        try:
            assert second.spent_usd() == pytest.approx(spent)
            with pytest.raises(BudgetExceeded, match="spending cap"):
                second.complete(chat_requests(20, "b", 200), "second")
            assert 0 < second.totals.sent < 20
            assert second.spend is not None
        finally:
            second.close()
        assert second.spend.total()["usd"] == pytest.approx(spent + (second.totals.cost_usd or 0))
        assert second.spend.total()["writers"] == 2
        # Another budget (another run) on the same cache and cap starts from zero.
        other = priced_engine(
            server, tmp_path / "c", cache=cache, budget_id="run-2", max_cost_usd=spent + 3 * one
        )
        try:
            _, call = other.complete(chat_requests(3, "c", 200), "other")
            assert call.sent == 3
        finally:
            other.close()


@pytest.mark.s3
def test_a_batch_submitted_by_one_worker_is_collected_by_another_not_paid_again(
    bucket: str, tmp_path: Path
) -> None:
    from fake_openai_batches import FakeOpenAIBatches
    from fake_openai_batches import Knobs as BatchKnobs

    cache = f"s3://{bucket}/batches"

    def engine(server: FakeOpenAIBatches, folder: str, **settings: object) -> TeacherEngine:
        config = EngineSettings(
            cache_dir=tmp_path / folder,
            cache=cache,
            progress=False,
            batch=True,
            batch_poll_interval_s=0.05,
            batch_max_poll_interval_s=0.2,
            **settings,  # type: ignore[arg-type]
        )
        endpoint = TeacherEndpoint(model="gpt-4o-mini", base_url=server.base_url, price=PRICE)
        return TeacherEngine(endpoint, config, api_key="test-key")

    with FakeOpenAIBatches(BatchKnobs(api_key="test-key", batch_seconds=2.0)) as server:
        first = engine(server, "a", batch_hold_s=0)
        try:
            with pytest.raises(BatchesPending):  # submitted, still running: it stops waiting
                first.complete(chat_requests(8), "answers")
        finally:
            first.close()
        (batch,) = server.batches()
        second = engine(server, "b")  # another machine: its own sqlite file is empty
        try:
            assert second._batches is not None
            (seen,) = second._batches.ledger.open_chunks()  # the first's batch, from S3
            assert seen.batch_id == batch["id"] and len(seen.keys) == 8
            results, call = second.complete(chat_requests(8), "answers")
        finally:
            second.close()
        assert all(f"Buy {i}?" in r.content for i, r in enumerate(results))
        assert call.sent == 0  # re-attached: nothing submitted again
        stats = server.stats
        assert (stats.batches_created, stats.rows_submitted) == (1, 8)
        # Collected: no worker re-attaches to it again, and a third gets every answer from S3.
        third = engine(server, "c")
        try:
            assert third._batches is not None and third._batches.ledger.open_chunks() == []
            again, call = third.complete(chat_requests(8), "answers")
        finally:
            third.close()
        assert (call.sent, call.cached) == (0, 8)
        assert [r.content for r in again] == [r.content for r in results]
        assert server.stats.total == stats.total


@pytest.mark.s3
def test_the_cli_refuses_a_missing_bucket_before_the_run_starts(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from distillery.flows.cli import EXIT_BAD_INPUT, main

    # main() sets DISTILLERY_CACHE from --cache: recorded here, so that it is removed after.
    monkeypatch.setenv("DISTILLERY_CACHE", str(REPO / "no-cache"))
    recipe = str(REPO / "recipes" / "stock-advisor.yaml")
    assert main(["run", recipe, "--cache", "s3://no-such-bucket/c"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "DISTILLERY_CACHE=s3://no-such-bucket/c: the bucket 'no-such-bucket' does not" in err
    assert not (REPO / "no-cache").exists()
