"""The dataset record: one definition of the columns, shared by memory, Parquet and the GX suite."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Every published row has every one of these columns filled (the GX suite checks it).
RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("user_context", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("messages", pa.list_(_MESSAGE), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "seed" | "generated"
        pa.field("seed_ids", pa.list_(pa.string()), nullable=False),
        pa.field("max_similarity", pa.float64(), nullable=False),
        pa.field("teacher_model", pa.string(), nullable=False),
        pa.field("expansion_request_id", pa.string(), nullable=False),  # "" for seeds
        pa.field("answer_request_id", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("completion_tokens", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" | "validation"
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
RECORD_COLUMNS: list[str] = RECORD_SCHEMA.names

# Text columns the suite bounds in length and checks for prompt-template leakage.
TEXT_COLUMNS = ("user_context", "question", "answer")

# A row that a stage threw away: the record's columns (any may be empty) plus where and why.
REJECT_SCHEMA = pa.schema(
    [pa.field(f.name, f.type, nullable=True) for f in RECORD_SCHEMA if f.name != "split"]
    + [
        pa.field("stage", pa.string(), nullable=False),  # "expand" | "answer"
        pa.field("reason", pa.string(), nullable=False),
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
