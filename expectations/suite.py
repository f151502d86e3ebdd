"""The data contract of a published version: one GX suite over the record columns."""

from __future__ import annotations

import math
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.expectations.row_conditions import Column

from tasks.recipe import ValidationSettings
from tasks.record import RECORD_COLUMNS, TEMPLATE_LEAK_PATTERN

SUITE_NAME = "distillery-dataset"

# The candidate frame holds every answered row; `status` says whether the answer filters kept it.
# Row checks apply to the kept rows; the share of rejected rows is checked over all of them.
# (A Condition object: the string form with condition_parser="pandas" still works in GX 1.24 but
# warns DeprecationWarning, "removed in GX Core 2.0".)
ACCEPTED: dict[str, Any] = {"row_condition": Column("status") == "accepted"}


def accepted_share_floor(max_rejected_share: float) -> float:
    """GX's `mostly` for the accepted share, never above 1 - max (GX compares ratio >= mostly).

    `1 - 1/3` is 0.6666666666666667 in floats while 8 of 12 rows is 0.6666666666666666, so
    the exact value would fail a run that sits exactly at the cap; rounding down to 6 decimals
    errs by under a millionth the other way instead.
    """
    return max(0.0, math.floor((1 - max_rejected_share) * 1e6 + 1e-6) / 1e6)


def build_suite(settings: ValidationSettings, min_rows: int) -> gx.ExpectationSuite:
    """The suite for a recipe's thresholds; `min_rows` is the fewest accepted rows allowed."""
    expectations: list[gxe.Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows, **ACCEPTED),
        # A row without a status would escape both the row checks and the share.
        gxe.ExpectColumnValuesToNotBeNull(column="status"),
        gxe.ExpectColumnValuesToBeInSet(
            column="status",
            value_set=["accepted"],
            mostly=accepted_share_floor(settings.max_rejected_share),
        ),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c, **ACCEPTED) for c in RECORD_COLUMNS),
        gxe.ExpectColumnValuesToBeUnique(column="id", **ACCEPTED),
        gxe.ExpectColumnValuesToMatchRegex(column="id", regex=r"^[0-9a-f]{16}$", **ACCEPTED),
    ]
    bounds = {
        "user_context": settings.context_chars,
        "question": settings.question_chars,
        "answer": settings.answer_chars,
    }
    for column, (low, high) in bounds.items():
        expectations += [
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=column, min_value=low, max_value=high, **ACCEPTED
            ),
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=column, regex=TEMPLATE_LEAK_PATTERN, **ACCEPTED
            ),
        ]
    expectations += [
        gxe.ExpectColumnValuesToBeInSet(
            column="source", value_set=["seed", "generated"], **ACCEPTED
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=["train", "validation"], **ACCEPTED
        ),
        gxe.ExpectColumnValuesToBeInSet(column="finish_reason", value_set=["stop"], **ACCEPTED),
        gxe.ExpectColumnValuesToBeBetween(
            column="max_similarity", min_value=0, max_value=1, **ACCEPTED
        ),
    ]
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)
