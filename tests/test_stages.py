"""The pure parts of the stages: prompt building, reply parsing, judging, dedup, split, headers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from distillery.tasks import export
from distillery.tasks.answer import build_answer_messages, judge_answer
from distillery.tasks.expand import (
    NearDuplicateIndex,
    build_expansion_request,
    clean_field,
    expansion_schema,
    lsh_bands,
    parse_examples,
    render_examples,
)
from distillery.tasks.export import assign_split, publish
from distillery.tasks.recipe import AnswerSettings, ValidationSettings, load_recipe
from distillery.tasks.record import record_id
from distillery.tasks.teacher import (
    ChatResult,
    RateLimiter,
    TeacherEndpoint,
    parse_reset,
    retry_after,
)

REPO = Path(__file__).resolve().parent.parent
LIMITS = ValidationSettings()


def result(content: str, finish_reason: str = "stop", refusal: str | None = None) -> ChatResult:
    return ChatResult(content, finish_reason, 10, 20, "m", "req-1", refusal)


def test_expansion_request_shows_examples_in_text_form_and_asks_for_n() -> None:
    recipe = load_recipe(str(REPO / "recipes" / "stock-advisor.yaml"))
    req = build_expansion_request(recipe, [("ctx one", "q one?"), ("ctx two", "q two?")], 5)
    prompt = req.messages[0][1]
    assert "generate 5 more examples" in prompt
    assert "# USER CONTEXT 2\nctx two\n\n# QUESTION 2\nq two?" in prompt
    assert req.json_schema == expansion_schema(5)


def test_parse_examples_reads_json_object_with_raw_newline_inside_a_string() -> None:
    reply = '{"examples": [{"user_context": "I am 40\nand rich", "question": "What now?"}]}'
    assert parse_examples(reply) == [("I am 40 and rich", "What now?")]


def test_parse_examples_reads_bare_list_and_code_fence() -> None:
    reply = '```json\n[{"user_context": "A", "question": "B?"}]\n```'
    assert parse_examples(reply) == [("A", "B?")]


def test_parse_examples_reads_text_form_back() -> None:
    text = render_examples([("I am 30.", "Should I buy gold?"), ("I am 50.", "Bonds or cash?")])
    assert parse_examples("Sure! Here they are:\n\n" + text) == [
        ("I am 30.", "Should I buy gold?"),
        ("I am 50.", "Bonds or cash?"),
    ]


def test_parse_examples_tolerates_colons_and_markdown_headers() -> None:
    text = "## User Context 1:\nI trade daily.\n## Question 1:\nIs that wise?\n"
    assert parse_examples(text) == [("I trade daily.", "Is that wise?")]


def test_parse_examples_returns_nothing_for_prose_or_cut_json() -> None:
    assert parse_examples("Investing is a journey of patience.") == []
    assert parse_examples('{"examples": [{"user_context": "x", ') == []


def test_parse_examples_skips_items_with_missing_fields() -> None:
    reply = json.dumps(
        {"examples": [{"user_context": "A"}, {"user_context": "C", "question": "D?"}]}
    )
    assert parse_examples(reply) == [("C", "D?")]


def test_clean_field_strips_numbering_and_leaked_markers() -> None:
    assert clean_field("1. I am 30") == "I am 30"
    assert clean_field("# USER CONTEXT 3: I am 30") == "I am 30"
    assert clean_field('  "Should I sell?"  ') == "Should I sell?"
    assert clean_field("Question: Should I\n sell?") == "Should I sell?"
    assert clean_field("401(k) or IRA?") == "401(k) or IRA?"


def test_record_id_ignores_case_and_white_space() -> None:
    assert record_id("I am  30", "Buy?") == record_id("i am 30 ", " buy?")
    assert record_id("I am 30", "Buy?") != record_id("I am 31", "Buy?")


def test_near_duplicate_index_flags_rewordings_not_new_examples() -> None:
    index = NearDuplicateIndex(0.7)
    base = "I am 30, a nurse saving $500 a month.\nShould I buy an S&P 500 index fund?"
    index.add("a", index.minhash(base))
    close, _ = index.check(base.replace("$500", "$550"))
    far, _ = index.check("I am 70 and retired in Spain.\nAre government bonds safe now?")
    assert close >= 0.7
    assert far < 0.3


def test_near_duplicate_index_finds_early_and_late_rows_of_a_large_index() -> None:
    index = NearDuplicateIndex(0.7)
    texts = [
        f"I am {20 + i % 50}, row {i}, saving ${100 * i} a month in fund {i * 7919 % 10007}.\n"
        f"Question {i}: should I move {i % 97}% of it into bonds before {1990 + i % 40}?"
        for i in range(3000)  # past the signature array's first growth (1024 rows)
    ]
    for i, text in enumerate(texts):
        index.add(str(i), index.minhash(text))
    index.add("0", index.minhash("a different text under a key already indexed"))
    for i in (3, 2999):
        close, _ = index.check(texts[i].replace("bonds", "bond"))
        assert close >= 0.7
    far, _ = index.check("Retired teacher in Lisbon.\nIs a money market fund safe this year?")
    assert far < 0.3


def test_lsh_bands_are_datasketch_s_choice() -> None:
    # datasketch.lsh._optimal_param(threshold, 64, 0.5, 0.5) for these thresholds
    assert lsh_bands(0.5, 64) == (14, 4)
    assert lsh_bands(0.7, 64) == (8, 8)
    assert lsh_bands(0.9, 64) == (3, 21)


def test_answer_messages_render_the_recipe_prompt_and_explained_style() -> None:
    direct = build_answer_messages(AnswerSettings(), "I am 30.", "Buy gold?")
    assert direct[0]["role"] == "system" and "expert for stock markets" in direct[0]["content"]
    assert direct[1] == {
        "role": "user",
        "content": "# USER CONTEXT\nI am 30.\n\n# QUESTION\nBuy gold?",
    }
    explained = build_answer_messages(AnswerSettings(style="explained"), "I am 30.", "Buy gold?")
    assert "step by step" in explained[0]["content"]
    assert "step by step" not in direct[0]["content"]


def test_judge_answer_keeps_a_good_answer() -> None:
    assert (
        judge_answer(result("Given your age and savings, a broad index fund fits. " * 3), LIMITS)
        is None
    )


def test_judge_answer_rejects_truncated_empty_refusal_and_leaks() -> None:
    long = "A thoughtful answer that goes on. " * 5
    assert judge_answer(result(long, "length"), LIMITS)[0] == "truncated"  # type: ignore[index]
    assert judge_answer(result("   "), LIMITS)[0] == "empty"  # type: ignore[index]
    assert (
        judge_answer(result("I'm sorry, but I can't help with that request."), LIMITS)[0]
        == "refusal"
    )  # type: ignore[index]
    assert judge_answer(result(long, refusal="policy"), LIMITS)[0] == "refusal"  # type: ignore[index]
    assert judge_answer(result(long + "\n# QUESTION 2\nmore"), LIMITS)[0] == "template_leak"  # type: ignore[index]
    assert judge_answer(result("Buy."), LIMITS)[0] == "length"  # type: ignore[index]


def _records(n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        ctx, q, answer = f"I am {20 + i} and save ${i}00.", f"Buy fund {i}?", f"Yes ({i}), é."
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
        rows.append(
            {
                "id": record_id(ctx, q), "user_context": ctx, "question": q, "answer": answer,
                "messages": turns,
                "source": "generated", "seed_ids": ["0123456789abcdef"], "max_similarity": 0.1,
                "teacher_model": "m", "expansion_request_id": f"req-{i}",
                "answer_request_id": f"ans-{i}", "finish_reason": "stop", "prompt_tokens": 10,
                "completion_tokens": 20, "split": "validation" if i % 5 == 0 else "train",
                "run_id": "run", "created_at": pd.Timestamp("2026-11-28", tz="UTC"),
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def test_publish_in_slices_writes_the_same_rows_and_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = load_recipe(str(REPO / "recipes" / "stock-advisor.yaml"))
    dataset = _records(25)
    rejected = _records(7).drop(columns=["split"]).assign(stage="expand", reason="duplicate")
    rejected.loc[3:, ["answer", "messages", "prompt_tokens"]] = None
    manifest = {
        "run_id": "run-0001", "code_version": "x", "counts": {"seeds": 1},
        "teacher": {"model": "m", "host": "h"},
    }  # fmt: skip
    whole = publish(str(tmp_path / "a"), recipe, dataset, rejected, copy.deepcopy(manifest))
    monkeypatch.setattr(export, "WRITE_ROWS", 4)
    sliced = publish(str(tmp_path / "b"), recipe, dataset, rejected, copy.deepcopy(manifest))
    assert sliced.counts == whole.counts == {"total": 25, "train": 20, "validation": 5}
    for name, rows in (("train", 20), ("validation", 5), ("rejected", 7)):
        one, many = (Path(v.uri) / f"{name}.parquet" for v in (whole, sliced))
        pd.testing.assert_frame_equal(pd.read_parquet(one), pd.read_parquet(many))
        assert pq.ParquetFile(many).metadata.num_row_groups == -(-rows // 4)
    for name in ("train.jsonl", "validation.jsonl"):
        assert (Path(sliced.uri) / name).read_bytes() == (Path(whole.uri) / name).read_bytes()


def test_split_is_deterministic_per_id_and_near_the_fraction() -> None:
    ids = pd.Series([record_id(f"ctx {i}", "q") for i in range(2000)])
    first = assign_split(ids, 0.1)
    again = assign_split(ids.iloc[::-1], 0.1).sort_index()
    assert first.equals(again)
    share = (first == "validation").mean()
    assert 0.07 < share < 0.13


def test_split_holds_out_at_least_one_row_of_a_small_dataset() -> None:
    ids = pd.Series([record_id(f"ctx {i}", "q") for i in range(20)])
    for fraction in (0.01, 0.1):
        assert (assign_split(ids, fraction) == "validation").sum() >= 1
    assert set(assign_split(ids, 0.0)) == {"train"}


def test_reset_and_retry_after_header_forms() -> None:
    assert parse_reset("1s") == 1.0
    assert parse_reset("6m0s") == 360.0
    assert parse_reset("250ms") == 0.25
    assert parse_reset("0.5") == 0.5
    assert retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({}) is None


def test_rate_limiter_learns_limits_from_headers_and_keeps_a_lower_configured_cap() -> None:
    limiter = RateLimiter(rpm=100, tpm=None)
    limiter.observe({"x-ratelimit-limit-requests": "3000", "x-ratelimit-limit-tokens": "90000"})
    assert limiter.rpm == 100
    assert limiter.tpm == 90000


def test_cache_key_depends_on_host_model_and_sampling_not_on_port_or_wire_form() -> None:
    recipe = load_recipe(str(REPO / "recipes" / "stock-advisor.yaml"))
    req = build_expansion_request(recipe, [("a", "b")], 3)
    a = TeacherEndpoint(model="m", base_url="http://127.0.0.1:8000/v1", structured_output="auto")
    b = TeacherEndpoint(
        model="m", base_url="http://127.0.0.1:9000/v1", structured_output="json_object"
    )
    c = TeacherEndpoint(model="other", base_url="http://127.0.0.1:8000/v1")
    assert req.key(a) == req.key(b)
    assert req.key(a) != req.key(c)
