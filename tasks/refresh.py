"""Incremental refresh: start from the recipe's last published version instead of from nothing.

The rules (README, "Nightly refresh"):
- Rows of LATEST are kept as they are, unless a seed they came from was retired (removed from
  the recipe): the seed's own row and every generated row whose `seed_ids` name it are dropped,
  and the refresh generates replacements. A retired seed was usually wrong; examples modelled
  on it go with it.
- When the answer prompt (system, user template, style), the teacher model or its sampling
  settings changed, every kept input is answered again (the inputs themselves are kept); the
  answer fingerprint in the manifest tells.
- Added seeds are answered, and each adds its share of the target (target / number of seeds,
  rounded up) of new examples, from expansion requests that all show at least one new seed.
- Evaluation items (tasks/evaluation.py) stay out: a seed held out now counts as retired (its
  rows go with it), and when the evaluation set or its decontamination rules changed, kept
  generated rows too close to an item are dropped (rejected.parquet, reason `contaminated`) and
  replaced. The previous version's reference answers are reused while the items and the answer
  fingerprint are the same; else the items are answered again.
- Lowering the target deletes nothing; `--from-scratch` (refresh=False) rebuilds from the seeds.
- A version whose content (ids, answers, messages, splits) equals LATEST's is not published.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from distillery.tasks.evaluation import EVAL_FILE, contamination_for, eval_inputs
from distillery.tasks.expand import seed_inputs
from distillery.tasks.export import read_text
from distillery.tasks.judge import JUDGE_VERSION
from distillery.tasks.recipe import Recipe
from distillery.tasks.record import EVAL_SCHEMA, INPUT_COLUMNS, RECORD_COLUMNS
from distillery.tasks.teacher import TeacherEndpoint

logger = logging.getLogger("distillery.refresh")


@dataclass
class Previous:
    """The recipe's last published version (LATEST)."""

    version: str
    uri: str
    manifest: dict[str, Any]
    rows: pd.DataFrame  # RECORD_COLUMNS, train and validation
    evaluation: pd.DataFrame | None = None  # EVAL_SCHEMA, when the version has an evaluation set


def read_latest(output: str, dataset: str) -> Previous | None:
    """LATEST of `<output>/<dataset>`, or None if nothing was published there yet."""
    base = output.rstrip("/") + f"/{dataset}"
    pointer = read_text(f"{base}/LATEST")
    if pointer is None:
        return None
    version = pointer.strip()
    uri = f"{base}/{version}"
    raw = read_text(f"{uri}/manifest.json")
    if raw is None:
        raise FileNotFoundError(
            f"{uri}/manifest.json is missing although LATEST points at {version}: restore the "
            "version folder, or run with --from-scratch (refresh=False) to rebuild."
        )
    fs, folder = fsspec.core.url_to_fs(uri)
    parts = []
    for split in ("train", "validation"):
        with fs.open(posixpath.join(folder, f"{split}.parquet"), "rb") as f:
            parts.append(pd.read_parquet(f))
    # reindex: a version from before the judge's columns has none (null: not judged).
    rows = pd.concat(parts, ignore_index=True).reindex(columns=RECORD_COLUMNS)
    # Parquet lists come back as numpy arrays: back to the lists and dicts a fresh row has.
    rows["seed_ids"] = rows["seed_ids"].map(list)
    rows["messages"] = rows["messages"].map(lambda turns: [dict(t) for t in turns])
    rows["judge_scores"] = rows["judge_scores"].map(
        lambda scores: [dict(s) for s in scores] if isinstance(scores, np.ndarray) else None
    )
    rows["judge_reason"] = rows["judge_reason"].astype(object).where(rows["judge_reason"].notna())
    manifest = json.loads(raw)
    evaluation = None
    if manifest.get("evaluation", {}).get("enabled"):
        with fs.open(posixpath.join(folder, EVAL_FILE), "rb") as f:
            evaluation = pd.read_parquet(f)
    return Previous(version=version, uri=uri, manifest=manifest, rows=rows, evaluation=evaluation)


def answer_fingerprint(
    recipe: Recipe, endpoint: TeacherEndpoint, judge: TeacherEndpoint | None = None
) -> str:
    """What an answer depends on besides its input: prompt, style, model (and the embedded
    teacher's GGUF file, when it is not the shipped one), sampling; and, when `judge` scores
    the answers, what a verdict depends on (a change re-judges every kept row; the answers
    themselves come from the request cache)."""
    t = recipe.teacher
    basis: dict[str, Any] = {
        "answer": recipe.answer.model_dump(),
        "model": endpoint.model,
        "sampling": {"temperature": t.temperature, "top_p": t.top_p, "max_tokens": t.max_tokens},
    }
    if endpoint.gguf_sha256 is not None:  # a GGUF file's stem is a weak name for its weights
        basis["gguf_sha256"] = endpoint.gguf_sha256
    if judge is not None:  # absent when off: the fingerprints of versions without it hold
        basis["judge"] = {
            "model": judge.model,
            "gguf_sha256": judge.gguf_sha256,
            "version": JUDGE_VERSION,
            **recipe.judge.model_dump(include={"rubric", "min_score", "max_tokens"}, mode="json"),
        }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def content_fingerprint(rows: pd.DataFrame, where: pd.Series | None = None) -> str:
    """The published content: ids, answers, chat turns, splits and judge scores (where there
    are), in id order; of the rows where `where` is true, when given (the accepted rows of a
    candidate frame).

    Read 10,000 rows at a time: a sorted copy of the four columns, made at once, held the flow
    process ~55 MiB higher (100,000 rows of the fake teacher's texts; glibc kept it) while the
    Great Expectations worker is at its own peak (the flow computes this during validation).
    """
    digest = hashlib.sha256()
    positions = np.arange(len(rows)) if where is None else np.flatnonzero(where.to_numpy(bool))
    order = positions[np.argsort(rows["id"].to_numpy(object)[positions], kind="stable")]
    judged = "judge_score" in rows.columns
    columns = rows[["id", "answer", "split", "messages", *(["judge_score"] if judged else [])]]
    for start in range(0, len(order), _FINGERPRINT_CHUNK):
        part = columns.iloc[order[start : start + _FINGERPRINT_CHUNK]]
        scores = part["judge_score"] if judged else itertools.repeat(None)
        for rid, answer, split, messages, score in zip(
            part["id"], part["answer"], part["split"], part["messages"], scores, strict=False
        ):
            turns = [(m["role"], m["content"]) for m in messages]
            # A row without a score hashes as before the judge existed (no change of LATEST).
            item = (
                [rid, answer, split, turns]
                if pd.isna(score)
                else [rid, answer, split, turns, score]
            )
            digest.update(json.dumps(item).encode())
    return digest.hexdigest()[:16]


_FINGERPRINT_CHUNK = 10_000


@dataclass
class RefreshPlan:
    """What a run keeps from LATEST and what it asks the teacher for."""

    previous: Previous | None
    kept: pd.DataFrame  # rows of LATEST published again as they are
    to_answer: pd.DataFrame  # inputs (INPUT_COLUMNS) to answer before any expansion
    goal: int  # rows the version should reach
    answer_fingerprint: str  # of the recipe and endpoint this run answers with
    seed_ids: list[str]  # the recipe's seeds now (the manifest records them for the next run)
    new_seeds: list[str] = field(default_factory=list)
    retired_seeds: list[str] = field(default_factory=list)
    dropped: int = 0  # rows of LATEST dropped with a retired seed
    reanswered: int = 0  # inputs of LATEST answered again (answer fingerprint changed)
    extra_for_new_seeds: int = 0
    answer_changed: bool = False
    # Evaluation items to answer (INPUT_COLUMNS): all of them, unless eval_kept has them.
    evaluation: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=INPUT_COLUMNS))
    # The previous version's evaluation set (EVAL_SCHEMA), reused as it is.
    eval_kept: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EVAL_SCHEMA.names))
    # Rows of LATEST dropped as too close to an evaluation item (with reason and detail).
    contaminated: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RECORD_COLUMNS))

    @property
    def focus(self) -> tuple[str, ...]:
        """Seeds every expansion request must show (the new ones)."""
        return tuple(self.new_seeds)

    @property
    def salt(self) -> str:
        """Sets this refresh's expansion sampling apart from the run that made LATEST."""
        return self.previous.version if self.previous else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "previous": self.previous.version if self.previous else None,
            "kept": len(self.kept),
            "dropped_with_retired_seeds": self.dropped,
            "reanswered": self.reanswered,
            "new_seeds": self.new_seeds,
            "retired_seeds": self.retired_seeds,
            "extra_for_new_seeds": self.extra_for_new_seeds,
            "answer_changed": self.answer_changed,
            "dropped_contaminated": len(self.contaminated),
        }


def plan_refresh(
    recipe: Recipe, previous: Previous | None, fingerprint: str, target: int
) -> RefreshPlan:
    """Apply the module's rules to LATEST and the recipe as it is now."""
    seeds = seed_inputs(recipe)
    items = eval_inputs(recipe)
    if previous is None:
        return RefreshPlan(
            previous=None,
            kept=previous_rows_empty(),
            to_answer=seeds,
            goal=target,
            answer_fingerprint=fingerprint,
            seed_ids=list(seeds["id"]),
            evaluation=items,
        )
    rows = previous.rows
    earlier = previous.manifest.get("seeds", {}).get("ids")
    if earlier is None:  # a version from before seed ids were recorded: its seed rows tell
        earlier = rows.loc[rows["source"] == "seed", "id"].tolist()
    current = list(seeds["id"])
    new = [s for s in current if s not in set(earlier)]
    retired = sorted(set(earlier) - set(current))
    gone = set(retired)
    drop = rows["id"].isin(gone) | rows["seed_ids"].map(lambda ids: bool(gone.intersection(ids)))
    dropped = int(drop.sum())
    contaminated = _contaminated(recipe, previous, rows[~drop])
    drop |= rows.index.isin(contaminated.index)
    kept = rows[~drop].reset_index(drop=True)
    answer_changed = previous.manifest.get("answer_fingerprint") != fingerprint
    # The previous reference answers hold while the items and the answer fingerprint do.
    eval_kept = previous.evaluation
    if eval_kept is None or answer_changed or set(eval_kept["id"]) != set(items["id"]):
        eval_kept = items.iloc[0:0]
    reanswer = kept[INPUT_COLUMNS] if answer_changed else kept[INPUT_COLUMNS].iloc[0:0]
    if answer_changed:
        kept = kept.iloc[0:0]
    # Seeds without a kept row: new ones, and old ones whose answer was rejected (the request
    # cache answers those again for free).
    unanswered = seeds[~seeds["id"].isin(set(kept["id"]) | set(reanswer["id"]))]
    extra = math.ceil(target * len(new) / len(current)) if new and earlier else 0
    # The new seeds' own rows come on top of what was kept; their share of examples on top of that.
    goal = max(target, int((~drop).sum()) + len(new)) + extra
    if retired:
        logger.info(
            "seeds retired since %s: %s; %d rows drawn on them are dropped and replaced",
            previous.version,
            ", ".join(retired),
            dropped,
        )
    if answer_changed:
        logger.info(
            "the answer prompt, teacher model or sampling changed since %s: the %d kept inputs "
            "are answered again",
            previous.version,
            len(reanswer),
        )
    return RefreshPlan(
        previous=previous,
        kept=kept,
        to_answer=pd.concat([reanswer, unanswered], ignore_index=True)[INPUT_COLUMNS],
        goal=goal,
        answer_fingerprint=fingerprint,
        seed_ids=current,
        new_seeds=new,
        retired_seeds=retired,
        dropped=dropped,
        reanswered=len(reanswer),
        extra_for_new_seeds=extra,
        answer_changed=answer_changed,
        evaluation=items.iloc[0:0] if len(eval_kept) else items,
        eval_kept=eval_kept,
        contaminated=contaminated,
    )


def _contaminated(recipe: Recipe, previous: Previous, rows: pd.DataFrame) -> pd.DataFrame:
    """The generated rows among `rows` (of LATEST) too close to an evaluation item, with stage,
    reason and detail; checked only when the items or the rules differ from those LATEST was
    made with (its rows were checked against those as they were generated)."""
    contamination = contamination_for(recipe)
    if contamination is None:
        return rows.iloc[0:0]
    before = previous.manifest.get("evaluation", {})
    checked = before.get("decontamination", {})
    cfg = recipe.evaluation
    if (
        before.get("ids") == sorted(contamination.ids)
        and checked.get("contamination_threshold") == cfg.contamination_threshold
        and checked.get("ngram") == cfg.ngram
    ):
        return rows.iloc[0:0]
    generated = rows[rows["source"] == "generated"]
    verdicts = [
        contamination.check(ctx, q)
        for ctx, q in zip(generated["user_context"], generated["question"], strict=True)
    ]
    found = generated[np.array([v is not None for v in verdicts], dtype=bool)].assign(
        stage="refresh",
        reason=[v[0] for v in verdicts if v is not None],
        detail=[v[1] for v in verdicts if v is not None],
    )
    if len(found):
        logger.info(
            "%d rows of %s are too close to an evaluation item: dropped and replaced",
            len(found),
            previous.version,
        )
    return found


def previous_rows_empty() -> pd.DataFrame:
    return pd.DataFrame(columns=RECORD_COLUMNS)
