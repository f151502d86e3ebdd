"""Sharded runs (flows/shard.py): in-process shards here; real workers on a real server below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from distillery.flows.distill import distill
from distillery.flows.shard import limit_name, shard_of
from distillery.tasks.answer import build_answer_request
from distillery.tasks.recipe import load_recipe
from distillery.tasks.teacher import TeacherEndpoint
from distillery.tasks.teacher.pacing import RateLimiter
from fake_teacher import FakeTeacher

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "stock-advisor.yaml")


def run(teacher: FakeTeacher, output: Path, examples: int, **options: Any) -> dict[str, Any]:
    return distill(
        recipe=RECIPE,
        examples=examples,
        output=str(output),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=20,
        train=False,
        **options,
    )


def published(output: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    base = output / "stock-advisor"
    folder = base / (base / "LATEST").read_text().strip()
    rows = pd.concat(pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation"))
    return rows, json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("shards", [2, 3])
def test_in_process_shards_answer_each_input_once_and_publish_what_one_process_would(
    workdir: Path, teacher: FakeTeacher, shards: int
) -> None:
    out = workdir / "sharded"
    summary = run(teacher, out, examples=50, shards=shards)
    rows, manifest = published(out)
    assert len(rows) == 50 and rows["id"].is_unique
    assert summary["outcome"] == "published"
    stats = teacher.stats
    assert stats.answered_twice == 0 and stats.resent_after_answer == 0
    assert manifest["tokens"]["requests_sent"] == stats.answered == summary["requests_sent"]
    assert set(summary["timings_s"]) >= {"shard_plan", "shard_merge"}

    # Every shard's part holds exactly the inputs whose answer request hashes to it.
    recipe = load_recipe(RECIPE)
    endpoint = TeacherEndpoint(model="fake-teacher", base_url=teacher.url)
    dispatch = out / "stock-advisor" / "runs" / manifest["run_id"] / "shards" / "answers-1"
    seen: list[str] = []
    for part in sorted(dispatch.glob("part-*.parquet")):
        shard = int(part.stem.removeprefix("part-"))
        frame = pd.read_parquet(part)
        keys = [
            build_answer_request(recipe, c, q).key(endpoint)
            for c, q in zip(frame["user_context"], frame["question"], strict=True)
        ]
        assert {shard_of(k, shards) for k in keys} == {shard}
        seen += list(frame["id"])
    assert len(seen) == len(set(seen))
    assert set(rows["id"]) <= set(seen)
    assert len(list(dispatch.glob("part-*.parquet"))) == shards

    # The same run in one process, on the same request cache: nothing sent, the same content.
    before = teacher.stats.received
    single = run(teacher, workdir / "single", examples=50, shards=1)
    assert teacher.stats.received == before and single["requests_sent"] == 0
    _, alone = published(workdir / "single")
    assert alone["content_fingerprint"] == manifest["content_fingerprint"]

    # A re-run of the sharded run: nothing changed, nothing sent.
    again = run(teacher, out, examples=50, shards=shards)
    assert teacher.stats.received == before
    assert again["outcome"] == "unchanged" and again["requests_sent"] == 0


def test_in_process_shards_take_the_endpoints_global_concurrency_limit(
    workdir: Path, teacher: FakeTeacher
) -> None:
    from prefect.client.orchestration import get_client

    run(teacher, workdir / "out", examples=20, shards=2, refresh=False)
    endpoint = TeacherEndpoint(model="fake-teacher", base_url=teacher.url)
    with get_client(sync_client=True) as client:
        found = client.read_global_concurrency_limit_by_name(limit_name(endpoint))
    assert found.limit == 2 and found.active_slots == 0


def test_rate_share_scales_set_and_learned_limits() -> None:
    limiter = RateLimiter(rpm=600, tpm=None, share=1 / 3)
    assert limiter.rpm == 200
    limiter.observe({"x-ratelimit-limit-requests": "300", "x-ratelimit-limit-tokens": "90000"})
    assert (limiter.rpm, limiter.tpm) == (100, 30000)  # the endpoint's limits, a third each
    learned = RateLimiter(rpm=None, tpm=None, share=0.5)
    learned.observe({"x-ratelimit-limit-requests": "1000"})
    assert learned.rpm == 500
