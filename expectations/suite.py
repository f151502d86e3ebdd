"""The data contract of a published version: two GX suites over the record columns.

The candidate frame holds every answered row; `status` says whether the answer filters kept it.
Row and table checks apply to the kept rows, the share of rejected rows to all of them. Instead
of one suite whose row checks each carry a row_condition (GX then filters the frame again for
every metric, about 120 pandas queries per run), the runner filters the accepted rows once and
validates them against ACCEPTED_SUITE, and validates every answered row against ANSWERED_SUITE.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import great_expectations as gx
import great_expectations.expectations as gxe

from distillery.tasks.recipe import JudgeSettings, ValidationSettings
from distillery.tasks.record import JUDGE_COLUMNS, REQUIRED_COLUMNS, TEMPLATE_LEAK_PATTERN

# Of expectations.runner (SCORE_RANGE_COLUMNS), named here too: the suite is built in the GX
# worker, which imports this module on its own.
SCORE_RANGE_COLUMNS = ("judge_scores_min", "judge_scores_max")

SUITE_NAME = "distillery-dataset"  # the accepted rows: the rows a version publishes
STATUS_SUITE_NAME = "distillery-dataset-status"  # every answered row: status and rejected share


class Suites(NamedTuple):
    accepted: gx.ExpectationSuite  # validated against the rows whose status is "accepted"
    answered: gx.ExpectationSuite  # validated against every answered row


def accepted_share_floor(max_rejected_share: float) -> float:
    """GX's `mostly` for the accepted share, never above 1 - max (GX compares ratio >= mostly).

    `1 - 1/3` is 0.6666666666666667 in floats while 8 of 12 rows is 0.6666666666666666, so
    the exact value would fail a run that sits exactly at the cap; rounding down to 6 decimals
    errs by under a millionth the other way instead.
    """
    return max(0.0, math.floor((1 - max_rejected_share) * 1e6 + 1e-6) / 1e6)


def build_suites(
    settings: ValidationSettings, min_rows: int, judge: JudgeSettings | None = None
) -> Suites:
    """The suites for a recipe's thresholds; `min_rows` is the fewest accepted rows allowed;
    `judge`: the judge's settings when it scored the answers (its columns are checked then)."""
    answered: list[gxe.Expectation] = [
        # A row without a status would escape both the row checks and the share.
        gxe.ExpectColumnValuesToNotBeNull(column="status"),
        gxe.ExpectColumnValuesToBeInSet(
            column="status",
            value_set=["accepted"],
            mostly=accepted_share_floor(settings.max_rejected_share),
        ),
    ]
    accepted: list[gxe.Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToMatchRegex(column="id", regex=r"^[0-9a-f]{16}$"),
    ]
    bounds = {
        "user_context": settings.context_chars,
        "question": settings.question_chars,
        "answer": settings.answer_chars,
    }
    for column, (low, high) in bounds.items():
        accepted += [
            gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=low, max_value=high),
            gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=TEMPLATE_LEAK_PATTERN),
        ]
    accepted += [
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=["seed", "generated"]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "validation"]),
        gxe.ExpectColumnValuesToBeInSet(column="finish_reason", value_set=["stop"]),
        gxe.ExpectColumnValuesToBeBetween(column="max_similarity", min_value=0, max_value=1),
    ]
    if judge is not None:
        accepted += _judge_expectations(judge)
        # Over every judged row (nulls, the unjudged ones, are not counted): the share the
        # judge scored under min_score (rejected rows, which max_rejected_share counts too).
        answered.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="judge_score",
                min_value=judge.min_score,
                mostly=accepted_share_floor(judge.max_low_share),
            )
        )
    return Suites(
        accepted=gx.ExpectationSuite(name=SUITE_NAME, expectations=accepted),
        answered=gx.ExpectationSuite(name=STATUS_SUITE_NAME, expectations=answered),
    )


def _judge_expectations(judge: JudgeSettings) -> list[gxe.Expectation]:
    """The published rows' scores: every row judged, each score 1-10, their mean at least
    judge.min_mean_score."""
    return [
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in JUDGE_COLUMNS),
        *(
            gxe.ExpectColumnValuesToBeBetween(column=c, min_value=1, max_value=10)
            for c in ("judge_score", *SCORE_RANGE_COLUMNS)
        ),
        gxe.ExpectColumnMeanToBeBetween(column="judge_score", min_value=judge.min_mean_score),
    ]
