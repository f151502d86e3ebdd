"""Near-duplicate detection (tasks.dedup): signatures, the LSH index, nearest neighbours."""

from __future__ import annotations

from distillery.tasks.dedup import (
    NearDuplicateIndex,
    example_text,
    lsh_bands,
    nearest_similarities,
)

BASE = example_text("I am 30, a nurse saving $500 a month.", "Should I buy an S&P 500 index fund?")
FAR = example_text("I am 70 and retired in Spain.", "Are government bonds safe now?")


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


def test_an_exact_duplicate_scores_one_whatever_its_case_and_white_space() -> None:
    index = NearDuplicateIndex(0.7)
    index.add("a", index.minhash(BASE))
    assert index.check(BASE)[0] == 1.0
    assert index.check("  " + BASE.upper().replace(" ", "\n  "))[0] == 1.0


def test_disjoint_texts_score_zero_and_share_almost_no_signature() -> None:
    index = NearDuplicateIndex(0.7)
    index.add("a", index.minhash(BASE))
    assert index.check(FAR)[0] == 0.0  # no band in common: not even a candidate
    assert (index.minhash(BASE) == index.minhash(FAR)).mean() < 0.1


def test_a_pair_estimated_exactly_at_the_threshold_reads_as_the_threshold() -> None:
    # check reports the estimate (the share of equal signature values), and expansion drops at
    # `>=`: a pair whose estimate is the threshold itself is a near-duplicate. Whether LSH makes
    # a pair this close to the threshold a candidate is chance (about one in two); the seeded
    # permutations fix it for this pair.
    other = BASE.replace("index fund", "ETF")
    probe = NearDuplicateIndex(0.5)
    estimate = float((probe.minhash(BASE) == probe.minhash(other)).mean())
    assert estimate == 54 / 64
    index = NearDuplicateIndex(estimate)
    index.add("a", index.minhash(BASE))
    assert index.check(other)[0] == estimate


def test_the_index_is_deterministic_and_independent_of_insertion_order() -> None:
    texts = [BASE.replace("$500", f"${500 + 10 * i}") for i in range(20)] + [FAR]
    queries = [BASE.replace("nurse", "teacher"), FAR.replace("70", "71"), "Nothing alike at all."]
    forward, backward = NearDuplicateIndex(0.7), NearDuplicateIndex(0.7)
    for i, text in enumerate(texts):
        forward.add(str(i), forward.minhash(text))
    for i, text in reversed(list(enumerate(texts))):
        backward.add(str(i), backward.minhash(text))
    for query in queries:
        (a, sig_a), (b, sig_b) = forward.check(query), backward.check(query)
        assert a == b and (sig_a == sig_b).all()
    assert forward.nearest() == backward.nearest()[::-1]


def test_nearest_similarities_scores_each_text_against_the_others() -> None:
    texts = [BASE, FAR, BASE, BASE + " Or bonds?"]
    nearest = nearest_similarities(texts, 0.7)
    assert nearest[0] == nearest[2] == 1.0  # the exact duplicate, not the text itself
    assert nearest[1] == 0.0
    assert 0.7 <= nearest[3] < 1.0
    assert nearest_similarities([BASE], 0.7) == [0.0]
