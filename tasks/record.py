"""The dataset record: one definition of the columns, shared by memory, Parquet and the GX suite."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
# One criterion of the judge's rubric (the recipe's judge.rubric) and its score, 1-10.
_SCORE = pa.struct([("criterion", pa.string()), ("score", pa.int64())])

# Who fills a column of the in-memory row: expansion (or a seed), the answer call, the judge,
# or assembly.
_INPUT, _ANSWER, _JUDGE, _ASSEMBLY = "input", "answer", "judge", "assembly"

# Every published row has every non-nullable column filled (the GX suite checks it); the judge's
# columns are null when the recipe's judge is off, and filled when it is on (checked too).
_COLUMNS = [
    (pa.field("id", pa.string(), nullable=False), _INPUT),
    (pa.field("user_context", pa.string(), nullable=False), _INPUT),
    (pa.field("question", pa.string(), nullable=False), _INPUT),
    (pa.field("answer", pa.string(), nullable=False), _ANSWER),
    (pa.field("messages", pa.list_(_MESSAGE), nullable=False), _ANSWER),
    (pa.field("source", pa.string(), nullable=False), _INPUT),  # "seed" | "generated"
    (pa.field("seed_ids", pa.list_(pa.string()), nullable=False), _INPUT),
    (pa.field("max_similarity", pa.float64(), nullable=False), _INPUT),
    (pa.field("teacher_model", pa.string(), nullable=False), _ANSWER),
    (pa.field("expansion_request_id", pa.string(), nullable=False), _INPUT),  # "" for seeds
    (pa.field("answer_request_id", pa.string(), nullable=False), _ANSWER),
    (pa.field("finish_reason", pa.string(), nullable=False), _ANSWER),
    (pa.field("prompt_tokens", pa.int64(), nullable=False), _ANSWER),
    (pa.field("completion_tokens", pa.int64(), nullable=False), _ANSWER),
    (pa.field("judge_scores", pa.list_(_SCORE), nullable=True), _JUDGE),
    (pa.field("judge_score", pa.float64(), nullable=True), _JUDGE),  # mean of judge_scores
    (pa.field("judge_reason", pa.string(), nullable=True), _JUDGE),  # the judge's one line
    (pa.field("split", pa.string(), nullable=False), _ASSEMBLY),  # "train" | "validation"
    (pa.field("run_id", pa.string(), nullable=False), _ASSEMBLY),
    (pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False), _ASSEMBLY),
]
RECORD_SCHEMA = pa.schema([f for f, _ in _COLUMNS])
RECORD_COLUMNS: list[str] = RECORD_SCHEMA.names
# An input to answer, as expansion (or a seed) makes it.
INPUT_COLUMNS = [f.name for f, stage in _COLUMNS if stage == _INPUT]
# What the answer call adds to an input.
ANSWER_COLUMNS = [f.name for f, stage in _COLUMNS if stage == _ANSWER]
# What the judge stage adds to an answered row (None where it did not judge).
JUDGE_COLUMNS = [f.name for f, stage in _COLUMNS if stage == _JUDGE]
# The columns every published row fills.
REQUIRED_COLUMNS = [f.name for f in RECORD_SCHEMA if not f.nullable]
# The answer stage's verdict, beside the record in the candidate frame: status "accepted" |
# "rejected", and for a rejected row the reason and detail.
VERDICT_COLUMNS = ["status", "reason", "detail"]


# A row that a stage threw away: the record's columns (any may be empty) plus where and why.
REJECT_SCHEMA = pa.schema(
    [pa.field(f.name, f.type, nullable=True) for f in RECORD_SCHEMA if f.name != "split"]
    + [
        pa.field("stage", pa.string(), nullable=False),  # "expand" | "answer" | "refresh"
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=True),
    ]
)

# An evaluation item as published (evaluation/eval.parquet): the input and the teacher's
# reference answer, with the answer filters' verdict on it (a rejected reference is kept, and
# says why: the item stays in the set).
_EVAL_FROM_RECORD = (
    "id", "user_context", "question", "answer", "teacher_model", "answer_request_id",
    "finish_reason", "prompt_tokens", "completion_tokens",
)  # fmt: skip
EVAL_SCHEMA = pa.schema(
    [
        *(RECORD_SCHEMA.field(name) for name in _EVAL_FROM_RECORD),
        pa.field("status", pa.string(), nullable=False),  # "accepted" | "rejected"
        pa.field("reason", pa.string(), nullable=True),
        pa.field("detail", pa.string(), nullable=True),
    ]
)

# Markers of the few-shot text form; seeing one inside a field means the template leaked.
TEMPLATE_LEAK_PATTERN = r"(?i)#+\s*(?:user\s+context|question)\b"

_WS = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Collapse white space and trim: the form that ids and duplicate checks are computed on."""
    return _WS.sub(" ", text).strip()


def record_id(user_context: str, question: str) -> str:
    """Stable id of an example: a hash of its normalised, case-folded context and question."""
    key = normalise_text(user_context).casefold() + "\x1f" + normalise_text(question).casefold()
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def hand_written_inputs(examples: Iterable[Any], source: str) -> pd.DataFrame:
    """Input rows (INPUT_COLUMNS) of hand-written examples (objects with user_context and
    question: seeds, evaluation items), marked with `source`."""
    rows = [
        {
            "id": record_id(e.user_context, e.question),
            "user_context": normalise_text(e.user_context),
            "question": normalise_text(e.question),
            "source": source,
            "seed_ids": [],
            "max_similarity": 0.0,
            "expansion_request_id": "",
        }
        for e in examples
    ]
    return pd.DataFrame(rows, columns=INPUT_COLUMNS)
