"""The diversity report (tasks.diversity): distinct-n, nearest neighbours, near-duplicates."""

from __future__ import annotations

import random
import string

import pandas as pd
import pytest

from distillery.tasks import diversity as module
from distillery.tasks.diversity import distinct_n, diversity, diversity_line, sample_rows
from distillery.tasks.record import record_id


def test_distinct_n_counts_distinct_word_ngrams_over_all_of_them() -> None:
    texts = ["A b c", "a, B d!"]  # words: a b c a b d
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # ab bc ab bd
    assert distinct_n(["same words here", "same words here"], 3) == pytest.approx(1 / 2)
    assert distinct_n(["one"], 2) == 0.0 and distinct_n([], 1) == 0.0


def test_distinct_n_is_the_same_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(0)
    texts = [" ".join(rng.choice("abcdefgh") for _ in range(12)) for _ in range(300)]
    whole = distinct_n(texts, 2)
    monkeypatch.setattr(module, "_CHUNK", 7)
    assert distinct_n(texts, 2) == whole


def _frame(texts: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [record_id(c, q) + f"{i:04d}" for i, (c, q) in enumerate(texts)],
            "user_context": [c for c, _ in texts],
            "question": [q for _, q in texts],
        }
    )


def _noise(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


def test_diversity_finds_the_known_duplicates() -> None:
    rng = random.Random(1)
    distinct = [(_noise(rng, 200), _noise(rng, 60) + "?") for _ in range(10)]
    rows = _frame([*distinct, distinct[3], distinct[3]])  # three copies of one example
    report = diversity(rows)
    near = report["near_duplicates"]
    assert near["rows"] == 3 and near["share"] == pytest.approx(3 / 12, abs=1e-4)
    assert near["threshold"] == 0.7 and "ROUGE-L" in near["measure"]
    neighbours = report["nearest_neighbour"]
    assert neighbours["max"] == 1.0
    assert neighbours["mean"] == pytest.approx(3 / 12, abs=1e-4)  # the noise has no neighbour
    assert neighbours["sampled_rows"] == 12 and report["rows"] == 12
    line = diversity_line(report)
    assert "near-duplicates 25.0% (on 12 sampled rows of 12)" in line
    assert line.startswith("distinct-1 ")


def test_nearest_neighbours_are_searched_in_a_fixed_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(2)
    rows = _frame([(_noise(rng, 120), _noise(rng, 40)) for _ in range(30)])
    monkeypatch.setattr(module, "SAMPLE_ROWS", 10)
    report = diversity(rows)
    assert report["nearest_neighbour"]["sampled_rows"] == 10
    assert report["questions"]["of_rows"] == 30  # distinct-n reads every question
    picked = sample_rows(rows["id"], 10)
    assert list(picked) == sorted(rows["id"].sort_values().index[:10])
    shuffled = rows.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert set(shuffled["id"].iloc[sample_rows(shuffled["id"], 10)]) == set(rows["id"].iloc[picked])
