"""Diversity of a dataset's inputs: distinct-n of the questions, nearest-neighbour similarity."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from distillery.tasks.dedup import example_text, nearest_similarities

# Nearest neighbours are searched among at most this many rows: the rows with the smallest ids
# (ids are hashes, so that is a fixed, uniform sample of the content). At 100,000 rows all of
# them would cost minutes; 5,000 cost about a second.
SAMPLE_ROWS = 5_000
# LSH finds the pairs at about this similarity and above; a row with no neighbour that close
# counts as 0. Low, so that the mean says something; lower costs more candidate pairs.
NEIGHBOUR_THRESHOLD = 0.3
# The near-duplicate line: Self-Instruct keeps a new instruction only below ROUGE-L 0.7 to every
# earlier one; here the same number on MinHash Jaccard of character 5-grams (what dedup computes
# at scale), which is not the same measure.
NEAR_DUPLICATE = 0.7
_WORD = re.compile(r"\w+")
_CHUNK = 100_000  # n-grams hashed before they are reduced to their distinct values


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams of the texts (Li et al. 2016; case and
    punctuation ignored); 0.0 when there is none."""
    return distinct_ns(texts, (n,))[0]


def distinct_ns(texts: Iterable[str], ns: tuple[int, ...]) -> tuple[float, ...]:
    """distinct_n for each n of `ns`, in one pass over the texts.

    n-grams are counted by a 64-bit hash, reduced to distinct values every 100,000 of them: the
    questions of 100,000 rows hold a few MB of numbers, never a set of tuples.
    """
    totals = dict.fromkeys(ns, 0)
    distinct: dict[int, list[np.ndarray]] = {n: [] for n in ns}
    batches: dict[int, list[int]] = {n: [] for n in ns}
    for text in texts:
        words = _WORD.findall(text.casefold())
        for n, batch in batches.items():
            batch.extend(hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1))
            if len(batch) >= _CHUNK:
                totals[n] += len(batch)
                distinct[n].append(np.unique(np.array(batch, dtype=np.int64)))
                batch.clear()
    shares = []
    for n, batch in batches.items():
        totals[n] += len(batch)
        distinct[n].append(np.array(batch, dtype=np.int64))
        unique = len(np.unique(np.concatenate(distinct[n])))
        shares.append(unique / totals[n] if totals[n] else 0.0)
    return tuple(shares)


def sample_rows(ids: pd.Series, limit: int) -> np.ndarray:
    """Positions of the `limit` rows with the smallest ids (all rows when there are fewer)."""
    order = np.argsort(ids.to_numpy(dtype=object), kind="stable")
    return np.sort(order[:limit])


def diversity(rows: pd.DataFrame) -> dict[str, Any]:
    """The diversity report of the inputs of `rows` (id, user_context, question): the manifest's
    `diversity` entry."""
    started = time.monotonic()
    questions = rows["question"]
    picked = sample_rows(rows["id"], SAMPLE_ROWS)
    texts = [
        example_text(c, q)
        for c, q in zip(rows["user_context"].iloc[picked], questions.iloc[picked], strict=True)
    ]
    nearest = np.array(nearest_similarities(texts, NEIGHBOUR_THRESHOLD) if texts else [])
    near = int((nearest >= NEAR_DUPLICATE).sum())
    distinct_1, distinct_2 = distinct_ns(questions, (1, 2))
    return {
        "rows": len(rows),
        "questions": {
            "distinct_1": round(distinct_1, 4),
            "distinct_2": round(distinct_2, 4),
            "of_rows": len(rows),
            "measure": "distinct word n-grams / all word n-grams of the questions",
        },
        "nearest_neighbour": {
            "mean": round(float(nearest.mean()), 4) if len(nearest) else 0.0,
            "max": round(float(nearest.max()), 4) if len(nearest) else 0.0,
            "sampled_rows": len(texts),
            "measure": (
                "MinHash Jaccard of character 5-grams of user_context + question, to the most "
                f"similar other sampled row; LSH at {NEIGHBOUR_THRESHOLD}: a row with no "
                "neighbour that close counts as 0"
            ),
        },
        "near_duplicates": {
            "share": round(near / len(texts), 4) if texts else 0.0,
            "rows": near,
            "sampled_rows": len(texts),
            "threshold": NEAR_DUPLICATE,
            "measure": (
                f"sampled rows with a neighbour at MinHash Jaccard {NEAR_DUPLICATE} or above "
                "(character 5-grams; Self-Instruct's line is ROUGE-L 0.7, not computed here)"
            ),
        },
        "seconds": round(time.monotonic() - started, 2),
    }


def diversity_line(report: dict[str, Any]) -> str:
    """One line of the report, for the terminal."""
    q, nn, nd = report["questions"], report["nearest_neighbour"], report["near_duplicates"]
    return (
        f"distinct-1 {q['distinct_1']:.2f}, distinct-2 {q['distinct_2']:.2f}, nearest-neighbour "
        f"similarity mean {nn['mean']:.2f} / max {nn['max']:.2f}, near-duplicates "
        f"{100 * nd['share']:.1f}% (on {nn['sampled_rows']:,} sampled rows of "
        f"{report['rows']:,})"
    )


def diversity_table(report: dict[str, Any]) -> list[str]:
    """The report as a markdown table (dataset card, summary artifact)."""
    q, nn, nd = report["questions"], report["nearest_neighbour"], report["near_duplicates"]
    sampled = f"{nn['sampled_rows']:,} sampled rows of {report['rows']:,}"
    return [
        "| diversity of the inputs | value | on |",
        "|---|---|---|",
        f"| distinct-1 / distinct-2 of the questions | {q['distinct_1']:.2f} / "
        f"{q['distinct_2']:.2f} | all {q['of_rows']:,} questions |",
        f"| nearest-neighbour similarity, mean / max | {nn['mean']:.2f} / {nn['max']:.2f} | "
        f"{sampled} |",
        f"| near-duplicates (a neighbour at {nd['threshold']} or above) | "
        f"{100 * nd['share']:.1f}% ({nd['rows']}) | {sampled} |",
        "",
        f"Similarity: MinHash Jaccard of character 5-grams of user_context + question, to the "
        f"most similar other sampled row; pairs are found by LSH at {NEIGHBOUR_THRESHOLD}, and a "
        "row with no neighbour that close counts as 0. The near-duplicate line is "
        "Self-Instruct's 0.7, on this measure rather than ROUGE-L.",
    ]
