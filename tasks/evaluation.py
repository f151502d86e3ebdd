"""The held-out evaluation set: its items, the decontamination of generated inputs, its record."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from distillery.tasks.dedup import NearDuplicateIndex, example_text
from distillery.tasks.recipe import EvaluationSettings, Recipe
from distillery.tasks.record import (
    EVAL_SCHEMA,
    hand_written_inputs,
)

# Where a version holds its evaluation set, relative to the version folder.
EVAL_FILE = "evaluation/eval.parquet"

_WORD = re.compile(r"\w+")


def eval_inputs(recipe: Recipe) -> pd.DataFrame:
    """The recipe's evaluation items as input rows (source "eval"); none without evaluation."""
    return hand_written_inputs(recipe.seed_split()[1], "eval")


def word_runs(text: str, n: int) -> Iterator[tuple[str, ...]]:
    """The runs of n consecutive words of a text, case and punctuation ignored; a text of fewer
    than n words is one run, itself."""
    words = _WORD.findall(text.casefold())
    if len(words) < n:
        if words:
            yield tuple(words)
        return
    for i in range(len(words) - n + 1):
        yield tuple(words[i : i + n])


class Contamination:
    """Decides whether a generated input is too close to an evaluation item.

    Two rules, either one rejects: (1) MinHash Jaccard similarity of the example (character
    5-grams of context + question) to an item at or above `contamination_threshold`, found with
    an LSH index of the items; (2) the question shares a run of `ngram` words with an item's
    question (13-gram overlap is the rule of GPT-3's decontamination; 8 words catches a copied
    question that was reworded around the edges).
    """

    def __init__(self, items: pd.DataFrame, settings: EvaluationSettings) -> None:
        self.settings = settings
        self.ids: list[str] = list(items["id"])
        self.index = NearDuplicateIndex(settings.contamination_threshold)
        self.runs: dict[tuple[str, ...], str] = {}
        for rid, ctx, q in zip(items["id"], items["user_context"], items["question"], strict=True):
            self.index.add(rid, self.index.minhash(example_text(ctx, q)))
            for run in word_runs(q, settings.ngram):
                self.runs.setdefault(run, rid)

    def judge(self, question: str, signature: np.ndarray) -> tuple[str, str] | None:
        """("contaminated", detail naming the item), or None; `signature`: the input's MinHash
        (NearDuplicateIndex.minhash: its permutations are the same at any threshold)."""
        similarity, item = self.index.closest(signature)
        if similarity >= self.settings.contamination_threshold:
            return "contaminated", f"MinHash similarity {similarity:.2f} to eval item {item}"
        for run in word_runs(question, self.settings.ngram):
            found = self.runs.get(run)
            if found is not None:
                return "contaminated", f"question shares {' '.join(run)!r} with eval item {found}"
        return None

    def check(self, user_context: str, question: str) -> tuple[str, str] | None:
        """judge() for an input whose signature is not at hand."""
        return self.judge(question, self.index.minhash(example_text(user_context, question)))


def contamination_for(recipe: Recipe) -> Contamination | None:
    """The recipe's decontamination rules, or None without evaluation."""
    items = eval_inputs(recipe)
    return Contamination(items, recipe.evaluation) if len(items) else None


def eval_fingerprint(rows: pd.DataFrame) -> str:
    """The published evaluation set: ids and reference answers, in id order."""
    digest = hashlib.sha256()
    for rid, answer in sorted(zip(rows["id"], rows["answer"], strict=True)):
        digest.update(json.dumps([rid, answer]).encode())
    return digest.hexdigest()[:16]


def eval_table(rows: pd.DataFrame) -> pa.Table:
    """The evaluation set as published (EVAL_SCHEMA)."""
    frame = rows[EVAL_SCHEMA.names].astype(object).where(rows[EVAL_SCHEMA.names].notna(), None)
    return pa.Table.from_pandas(frame, schema=EVAL_SCHEMA, preserve_index=False)


def evaluation_entry(
    recipe: Recipe, rows: pd.DataFrame | None, contaminated: int, reused_from: str | None
) -> dict[str, Any]:
    """The manifest's `evaluation` entry: counts, ids, settings, where the set is."""
    cfg = recipe.evaluation
    if not cfg.enabled or rows is None:
        return {"enabled": False}
    accepted = rows["status"] == "accepted"
    return {
        "enabled": True,
        "file": EVAL_FILE,
        "items": len(rows),
        "held_out_from": "eval_seeds" if cfg.eval_seeds else f"seeds (share {cfg.share:g})",
        "ids": sorted(rows["id"]),
        "reference_answers": {
            "accepted": int(accepted.sum()),
            "rejected": {
                str(k): int(v) for k, v in rows.loc[~accepted, "reason"].value_counts().items()
            },
            "from_version": reused_from,
        },
        "decontamination": {
            "contamination_threshold": cfg.contamination_threshold,
            "ngram": cfg.ngram,
            "rejected": contaminated,
        },
        "fingerprint": eval_fingerprint(rows),
    }
