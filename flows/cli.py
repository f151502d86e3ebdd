"""The `distillery` command: ad-hoc runs of the distill flow from a terminal."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

# Ephemeral Prefect (no server configured) starts its own API; on 2 busy cores that can take
# longer than Prefect's 20 s default, and telemetry cannot reach its host offline.
_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "distillery",
}

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery",
        description="Distil a fine-tuning dataset from a few seed examples with a teacher LLM.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline for a recipe")
    run.add_argument("recipe", help="recipe YAML: a local path or fsspec URI (s3://...)")
    run.add_argument("--examples", type=int, help="target dataset size, seeds included")
    run.add_argument("--output", default="./out", help="local folder or s3:// URI (default ./out)")
    run.add_argument("--teacher-model", help="teacher model (overrides the recipe)")
    run.add_argument(
        "--teacher-base-url",
        help="OpenAI-compatible endpoint (default: recipe, then OPENAI_BASE_URL, then OpenAI)",
    )
    run.add_argument(
        "--no-train", action="store_true", help="publish the dataset only; train no student"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Per-call teacher summaries (requests, cached, sent, retries) reach the terminal and the UI.
    logging.getLogger("distillery").setLevel(logging.INFO)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    # The recipe and the teacher settings are checked before Prefect starts: a bad recipe costs
    # nothing, writes nothing and sends no request.
    from tasks.recipe import RecipeError, load_recipe, target_size

    try:
        recipe = load_recipe(args.recipe)
        target_size(recipe, args.recipe, args.examples)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from flows.distill import DistillParams, distill, resolve_endpoint
    from tasks.teacher import TeacherError, TeacherUnavailable, close_engines
    from tasks.validate import ValidationFailed

    params = DistillParams(
        recipe=args.recipe,
        examples=args.examples,
        output=args.output,
        teacher_model=args.teacher_model,
        teacher_base_url=args.teacher_base_url,
    )
    try:
        resolve_endpoint(recipe, params)
        summary = distill(params)
    except TeacherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (TeacherUnavailable, ValidationFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(
            "Nothing was published; LATEST still points at the previous version.", file=sys.stderr
        )
        return EXIT_FAILED
    finally:
        close_engines()
    counts = summary["published"]
    print()
    print(f"dataset: {summary['uri']}")
    print(
        f"rows: {counts['total']} (train {counts['train']}, validation {counts['validation']}); "
        f"teacher requests: {summary['requests_sent']} sent, {summary['requests_cached']} cached"
    )
    for stage in ("expansion", "answer"):
        rejects = summary[f"{stage}_rejects"]
        if rejects:
            listed = ", ".join(f"{k} {v}" for k, v in sorted(rejects.items()))
            print(f"rejected at {stage}: {listed} (see rejected.parquet)")
    for line in summary["shortfall"]:
        print(f"note: {line}")
    if not args.no_train:
        print("training: this version has no training stage yet; the dataset is published.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
