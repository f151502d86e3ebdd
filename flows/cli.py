"""The `distillery` command: ad-hoc runs of the distill flow from a terminal."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from distillery.flows.prefect_env import PREFECT_DEFAULTS

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
# Batch mode with DISTILLERY_BATCH_HOLD_S: batches still running, nothing published yet; the same
# command later re-attaches to them (sysexits' EX_TEMPFAIL: try again later).
EXIT_WAITING = 75
BACKENDS = ("local", "openai", "prefect")


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
        help="OpenAI-compatible endpoint, or 'embedded' (default: recipe, then OPENAI_BASE_URL, "
        "then OpenAI if OPENAI_API_KEY is set, else the embedded teacher)",
    )
    run.add_argument(
        "--teacher-gguf",
        metavar="PATH",
        help="local GGUF file for the embedded teacher to serve instead of the shipped SmolLM2 "
        "(a bigger teacher than the student); overrides the recipe's teacher.gguf",
    )
    run.add_argument(
        "--no-train", action="store_true", help="publish the dataset only; train no student"
    )
    run.add_argument("--train-backend", choices=BACKENDS, help="override the recipe's backend")
    run.add_argument(
        "--from-scratch",
        action="store_true",
        help="build from the seeds alone instead of refreshing the last published version "
        "(LATEST); answers already received still come from the request cache",
    )
    run.add_argument(
        "--review",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pause for a human review before LATEST moves and training starts (default: the "
        "recipe's review.enabled); needs a Prefect server (PREFECT_API_URL)",
    )
    run.add_argument(
        "--notify",
        metavar="BLOCK",
        help="notification block told about a failed run, as block-type/name (e.g. "
        "slack-webhook/nightly; also DISTILLERY_NOTIFY_BLOCK)",
    )
    run.add_argument(
        "--batch",
        action="store_true",
        help="send the teacher requests through OpenAI's Batch API (about half the price, "
        "answered within 24 h; the same command re-attaches to its batches; also "
        "DISTILLERY_BATCH=1)",
    )
    run.add_argument(
        "--cache",
        metavar="URI",
        help="where teacher answers are cached: a local folder, or s3://bucket/prefix shared by "
        "every worker of the run (also DISTILLERY_CACHE; default DISTILLERY_CACHE_DIR)",
    )
    run.add_argument(
        "--max-cost",
        type=float,
        metavar="USD",
        help="stop sending teacher requests before this run's spend could pass USD; what was "
        "answered stays cached (also DISTILLERY_MAX_COST_USD)",
    )

    run.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="split the answer stage into N shards, one child flow run each, in this process "
        "(from a deployment: runs of distill-shard/shard on its work pool); default: the "
        "recipe's scale.shards",
    )

    train = sub.add_parser("train", help="train a student on a published dataset version")
    train.add_argument(
        "version", help="version folder (<output>/<dataset>/<version>) or dataset folder (LATEST)"
    )
    train.add_argument("--backend", choices=BACKENDS, help="override the recorded backend")

    review = sub.add_parser("review", help="answer a run paused for review (approve / reject)")
    review.add_argument("flow_run_id", help="the paused flow run's id (in its log and the UI)")
    review.add_argument("decision", choices=("approve", "reject"))
    review.add_argument("--comment", default="", help="why (kept in the version's manifest)")

    teacher = sub.add_parser("teacher", help="the embedded teacher")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", required=True)
    serve = teacher_sub.add_parser(
        "serve", help="serve the embedded teacher (OpenAI-compatible) until Ctrl-C"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument(
        "--gguf", metavar="PATH", help="GGUF file to serve (default: the shipped SmolLM2)"
    )

    stack = sub.add_parser("stack", help="a local Prefect stack on 127.0.0.1 (flows/stack.py)")
    stack_sub = stack.add_subparsers(dest="stack_command", required=True)
    stack_up = stack_sub.add_parser(
        "up", help="start a Prefect server, the work pools, the deployments and the workers"
    )
    stack_up.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    stack_up.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for server and workers"
    )
    stack_sub.add_parser("down", help="stop the workers, then the server")
    stack_sub.add_parser("status", help="say whether the stack is up, where, and its logs")
    for action in stack_sub.choices.values():
        action.add_argument(
            "--home",
            help="state folder: pids, logs, PREFECT_HOME (default: .stack in the checkout, or "
            "in the current folder for an installed package)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Per-call teacher summaries (requests, cached, sent, retries) reach the terminal and the UI.
    logging.getLogger("distillery").setLevel(logging.INFO)
    try:
        if args.command == "teacher":
            return _serve(args)
        if args.command == "train":
            return _train(args)
        if args.command == "review":
            return _review(args)
        if args.command == "stack":
            from distillery.flows.stack import command as stack_command

            return stack_command(args)
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted: stopped (answers already received are in the cache)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _start_ephemeral_api() -> None:
    """Without a Prefect server configured, start Prefect's ephemeral API now, deaf to Ctrl-C.

    A terminal's Ctrl-C reaches the whole foreground process group, and Prefect starts its
    ephemeral API server as a plain child in that group: the same Ctrl-C stopped it, and the run
    then retried the lost server for about a minute instead of stopping within the drain grace.
    A child inherits its parent's signal mask across exec, and neither Python nor uvicorn unblock
    SIGINT, so the server started here with SIGINT blocked never sees a Ctrl-C meant for the run;
    Prefect still stops it at exit (SIGTERM). A Ctrl-C pressed meanwhile is delivered to this
    process as soon as the mask is restored.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with get_client(sync_client=True) as client:  # starts the server, once per process
            client.api_healthcheck()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _serve(args: argparse.Namespace) -> int:
    from distillery.tasks.embedded import EmbeddedSettings, gguf_file, serve
    from distillery.tasks.teacher import TeacherError

    try:
        gguf = gguf_file(args.gguf, "--gguf")
    except TeacherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        f"serving {gguf.model} ({gguf.path}) on http://{args.host}:{args.port}/v1 (Ctrl-C stops it)"
    )
    serve(args.host, args.port, None, EmbeddedSettings(), gguf.path, gguf.model)
    return 0


def _train(args: argparse.Namespace) -> int:
    from distillery.flows.train import TrainParams, train
    from distillery.tasks.train import TrainingFailed, resolve_version

    try:
        resolve_version(args.version)  # a bad version costs nothing and submits nothing
        _start_ephemeral_api()
        outcome = train(TrainParams(version=args.version, backend=args.backend))
    except (FileNotFoundError, ValueError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (TrainingFailed, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return _print_training(outcome)


def _review(args: argparse.Namespace) -> int:
    from distillery.flows.review import answer_review

    if not os.environ.get("PREFECT_API_URL"):
        print(
            "error: set PREFECT_API_URL to the server the paused run lives on (the local "
            "stack prints it: `distillery stack status`).",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        answer_review(args.flow_run_id, args.decision, args.comment)
    except Exception as exc:  # a wrong id, a run that is not paused, a server that is down
        print(f"error: could not resume flow run {args.flow_run_id}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"flow run {args.flow_run_id}: {args.decision} sent")
    return 0


def _print_training(outcome: dict[str, Any]) -> int:
    """The training part of the final summary; non-zero when the student run failed."""
    print(f"training ({outcome['backend']}): {outcome['status']}")
    for key, label in (
        ("model_uri", "student"),
        ("fine_tuned_model", "fine-tuned model"),
        ("job_id", "job"),
        ("flow_run_id", "training flow run"),
    ):
        if outcome.get(key):
            print(f"{label}: {outcome[key]}")
    if outcome.get("error"):
        print(f"error: {outcome['error']}")
    before, after = outcome.get("eval_loss_before"), outcome.get("eval_loss_after")
    if before is not None and after is not None:
        verdict = (
            "lower: the student learned the teacher's answers"
            if outcome.get("improved")
            else "NOT lower: this training did not improve the student on held-out data"
        )
        print(f"validation loss: {before:.4f} before, {after:.4f} after training ({verdict})")
    samples = (outcome.get("metrics") or {}).get("samples") or []
    for i, sample in enumerate(samples, 1):
        # The sample's user turn is answer.student_user: by default the context, a blank line and
        # the question; the question is what a reader needs (the context would fill the line).
        question = str(sample.get("question") or "").rsplit("\n\n", 1)[-1]
        print(f"\nvalidation question {i}: {_short(question, 300)}")
        for who in ("before", "after", "teacher"):
            print(f"  {who:>7}: {_short(sample.get(who), 240)}")
    return 0 if outcome["status"] == "succeeded" else EXIT_FAILED


def _short(text: Any, limit: int) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _run(args: argparse.Namespace) -> int:
    # The recipe and the teacher settings are checked before Prefect starts: a bad recipe costs
    # nothing, writes nothing and sends no request.
    from distillery.tasks.recipe import RecipeError, load_recipe, target_size

    try:
        recipe = load_recipe(args.recipe)
        target_size(recipe, args.recipe, args.examples)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.max_cost is not None:
        if args.max_cost <= 0:
            print("error: --max-cost must be a positive amount of USD", file=sys.stderr)
            return EXIT_BAD_INPUT
        # The engine reads its settings from the environment, in this process and in workers.
        os.environ["DISTILLERY_MAX_COST_USD"] = str(args.max_cost)

    if args.batch:
        os.environ["DISTILLERY_BATCH"] = "1"

    if args.shards is not None and args.shards < 1:
        print("error: --shards must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.cache:
        os.environ["DISTILLERY_CACHE"] = args.cache
    if (cache := os.environ.get("DISTILLERY_CACHE")) and "://" in cache:
        from distillery.tasks.teacher.cache import CacheError, SharedStore

        try:  # a bad URI, a missing bucket or no credentials: said now, not mid-run
            SharedStore(cache)
        except CacheError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    from distillery.flows.distill import DistillParams, distill, resolve_endpoint, teacher_gguf
    from distillery.flows.recheck import WAITING
    from distillery.tasks.cost import format_usd
    from distillery.tasks.diversity import diversity_line
    from distillery.tasks.teacher import (
        BudgetExceeded,
        EngineSettings,
        TeacherError,
        TeacherUnavailable,
        check_settings,
        close_engines,
    )
    from distillery.tasks.train import TrainingFailed, check_backend
    from distillery.tasks.validate import ValidationFailed

    params = DistillParams(
        recipe=args.recipe,
        examples=args.examples,
        output=args.output,
        teacher_model=args.teacher_model,
        teacher_base_url=args.teacher_base_url,
        teacher_gguf=args.teacher_gguf,
        train=not args.no_train,
        train_backend=args.train_backend,
        refresh=not args.from_scratch,
        review=args.review,
        notify=args.notify,
        shards=args.shards,
    )
    if (recipe.review.enabled if args.review is None else args.review) and not os.environ.get(
        "PREFECT_API_URL"
    ):
        print(
            f"error: {args.recipe} asks for a review (review.enabled), which needs a Prefect "
            "server a reviewer can reach: start the local stack (`distillery stack up`) and "
            "run the adhoc deployment, or pass --no-review.",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:  # before any stage: a bad setting sends nothing and writes nothing
        if params.train:
            backend = params.train_backend or recipe.training.backend
            check_backend(recipe.training.model_copy(update={"backend": backend}))
        endpoint = resolve_endpoint(recipe, params, teacher_gguf(recipe, params))
        check_settings(endpoint, EngineSettings())  # --max-cost and --batch against it
    except (TeacherError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if endpoint.gguf_sha256 is not None:
        print(
            f"teacher: {endpoint.model} (GGUF, sha256 {endpoint.gguf_sha256[:16]}) on the "
            "embedded llama.cpp server on 127.0.0.1."
        )
    elif endpoint.embedded:
        print(
            "teacher: the embedded SmolLM2-135M-Instruct on 127.0.0.1 (no teacher endpoint or "
            "OPENAI_API_KEY is set); a small model, for trying distillery out."
        )
    try:
        _start_ephemeral_api()
        summary = distill(**dataclasses.asdict(params))
    except TeacherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (TrainingFailed, TimeoutError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(
            "The dataset was published before training: see "
            f"{args.output.rstrip('/')}/{recipe.name}/LATEST.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except (TeacherUnavailable, ValidationFailed, BudgetExceeded) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(
            "Nothing was published; LATEST still points at the previous version.", file=sys.stderr
        )
        return EXIT_FAILED
    finally:
        close_engines()
    counts = summary["published"] or {}
    print()
    if summary["outcome"] == WAITING:
        print(summary["message"])
        return EXIT_WAITING
    if summary["outcome"] == "unchanged":
        print(
            f"unchanged: {summary['uri']} already holds this content; nothing published, no "
            f"student trained ({summary['requests_sent']} teacher requests sent)."
        )
        return 0
    print(f"dataset: {summary['uri']}")
    print(
        f"rows: {counts['total']} (train {counts['train']}, validation {counts['validation']}); "
        f"teacher requests: {summary['requests_sent']} sent, {summary['requests_cached']} cached, "
        f"cost {format_usd(summary.get('cost_usd'))}"
    )
    if summary.get("evaluation_items"):
        print(
            f"evaluation: {summary['evaluation_items']} held-out items with the teacher's "
            "reference answers (evaluation/eval.parquet)"
        )
    if summary.get("diversity"):
        print(f"diversity: {diversity_line(summary['diversity'])}")
    if (summary.get("judge") or {}).get("enabled"):
        from distillery.tasks.judge import judge_line

        print(f"judge: {judge_line(summary['judge'])}")
    for stage in ("expansion", "answer"):
        rejects = summary[f"{stage}_rejects"]
        if rejects:
            listed = ", ".join(f"{k} {v}" for k, v in sorted(rejects.items()))
            print(f"rejected at {stage}: {listed} (see rejected.parquet)")
    for line in summary["shortfall"]:
        print(f"note: {line}")
    if summary["outcome"] == "rejected in review":
        review = summary.get("review") or {}
        print(f"rejected in review: {review.get('comment') or 'no comment'}; LATEST not moved")
        return EXIT_FAILED
    if summary.get("training"):
        code = _print_training(summary["training"])
        return _print_transfer(summary.get("transfer"), summary["uri"]) or code
    return 0


def _print_transfer(report: dict[str, Any] | None, uri: str) -> int:
    """The transfer report's lines; EXIT_FAILED when its gate failed."""
    if report is None:
        return 0
    from distillery.tasks.transfer import report_lines

    print()
    for line in report_lines(report):
        print(line)
    gate = report.get("gate")
    if gate is not None and not gate["passed"]:
        print(
            f"error: the student did not pass the gate ({gate['message']}); it is not promoted. "
            f"The dataset stays published: {uri}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
