"""Clean text in: the teacher prompt's markers (`# USER CONTEXT`, `# QUESTION`) never reach the
stored inputs, the `messages` the student is trained on, or train.jsonl / validation.jsonl."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from distillery.flows.distill import distill
from distillery.tasks.answer import student_messages, training_messages
from distillery.tasks.expand import parse_examples
from distillery.tasks.recipe import AnswerSettings
from distillery.tasks.refresh import content_fingerprint
from fake_teacher import FakeTeacher, Knobs

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "stock-advisor.yaml"
SEEDS = REPO / "recipes" / "stock-advisor-seeds.yaml"

# The markers as the prompt writes them and as models echo them back (with or without "#").
MARKER = re.compile(
    r"(?i)(?:#+\s*|\*\*\s*|\b)(?:user\s+context|question)\s*\d*\s*:|#+\s*(?:user\s+context|question)\b"
)


def recipe_file(tmp_path: Path, **changes: Any) -> str:
    data = yaml.safe_load(RECIPE.read_text())
    data.pop("seeds_file")
    data["seeds"] = yaml.safe_load(SEEDS.read_text())
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run(teacher: FakeTeacher, recipe: str, out: Path) -> dict[str, Any]:
    return distill(
        recipe=recipe,
        examples=30,
        output=str(out),
        teacher_model="fake-teacher",
        teacher_base_url=teacher.url,
        answer_batch_size=25,
        train=False,
    )


def version_folder(out: Path) -> Path:
    base = out / "stock-advisor"
    return base / (base / "LATEST").read_text().strip()


def published(folder: Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The rows of both Parquet splits and the chats of both JSONL files of a version."""
    rows = pd.concat(
        [pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "validation")],
        ignore_index=True,
    )
    chats = [
        json.loads(line)
        for split in ("train", "validation")
        for line in (folder / f"{split}.jsonl").read_text().splitlines()
    ]
    return rows, chats


def assert_no_markers(rows: pd.DataFrame, chats: list[dict[str, Any]]) -> None:
    for column in ("user_context", "question"):
        leaked = rows.loc[rows[column].str.contains(MARKER), column]
        assert leaked.empty, f"{column} carries a marker: {leaked.tolist()[:3]}"
    for messages in rows["messages"]:
        for turn in messages[:-1]:  # the answer is the teacher's text, judged on its own
            assert not MARKER.search(turn["content"]), turn["content"][:200]
    for chat in chats:
        for turn in chat["messages"][:-1]:
            assert not MARKER.search(turn["content"]), turn["content"][:200]


def test_the_marker_pattern_sees_the_echoed_forms() -> None:
    # The check below means something only if it finds what a teacher echoes.
    for text in (
        "# USER CONTEXT 2\nI am 40",
        "QUESTION 3: why?",
        "**User context 1:** I am",
        "## Question",
    ):
        assert MARKER.search(text), text
    assert not MARKER.search("I am 40 and my question is whether to buy gold.")


@pytest.mark.parametrize(
    "reply",
    [
        # JSON whose fields begin with an echoed marker, with and without "#", numbered or not
        json.dumps(
            {
                "examples": [
                    {
                        "user_context": "# USER CONTEXT 2\nI am 45 with $20,000 in bonds.",
                        "question": "# QUESTION 2\nShould I buy stocks now?",
                    },
                    {
                        "user_context": "USER CONTEXT 3: I am 45 with $20,000 in bonds.",
                        "question": "QUESTION 3: Should I buy stocks now?",
                    },
                    {
                        "user_context": "**User context 4:** I am 45 with $20,000 in bonds.",
                        "question": "**Question:** Should I buy stocks now?",
                    },
                ]
            }
        ),
        # the text form with a doubled marker, markdown headers and bold labels
        "# USER CONTEXT 1\n# USER CONTEXT 1\nI am 45 with $20,000 in bonds.\n\n# QUESTION 1\n"
        "# QUESTION 1\nShould I buy stocks now?\n\n## User Context 2:\nI am 45 with $20,000 in "
        "bonds.\n## Question 2:\nShould I buy stocks now?\n\n**User context 3:**\nI am 45 with "
        "$20,000 in bonds.\n**Question 3:** Should I buy stocks now?\n\n# USER CONTEXT 4\n",
    ],
)
def test_echoed_markers_are_stripped_from_parsed_inputs(reply: str) -> None:
    examples = parse_examples(reply)

    assert examples
    assert set(examples) == {("I am 45 with $20,000 in bonds.", "Should I buy stocks now?")}


def test_messages_are_the_student_turns_and_the_answer_not_the_teacher_prompt() -> None:
    settings = AnswerSettings()
    messages = training_messages(settings, "I am 30 and save $500 a month.", "Index fund?", "Yes.")

    assert messages[:-1] == student_messages(
        settings, "I am 30 and save $500 a month.", "Index fund?"
    )
    assert messages[1] == {
        "role": "user",
        "content": "I am 30 and save $500 a month.\n\nIndex fund?",
    }
    assert messages[-1] == {"role": "assistant", "content": "Yes."}
    assert not any(MARKER.search(m["content"]) for m in messages)


@pytest.mark.parametrize("structured_output", ["text", "json_object"])
def test_a_run_against_a_teacher_that_echoes_markers_stores_none(
    workdir: Path, structured_output: str
) -> None:
    # text: every expansion reply is the "# USER CONTEXT n" form; json_object: every reply's
    # first example is an echo that begins with the markers.
    planted = (
        (
            "# USER CONTEXT 1\nI am 52, a nurse in Leeds with £60,000 in a workplace pension "
            "and £8,000 in cash.",
            "# QUESTION 1\nShould I pay into a stocks and shares ISA before my mortgage?",
        ),
    )
    knobs = Knobs(latency=0.0, slots=32, planted=planted, plant_rate=1.0)
    with FakeTeacher(knobs) as teacher:
        out = workdir / "out"
        recipe = recipe_file(workdir, teacher={"structured_output": structured_output})
        first = run(teacher, recipe, out)
        assert first["outcome"] == "published"
        rows, chats = published(version_folder(out))
        sent = teacher.stats.received

        assert_no_markers(rows, chats)
        assert len(chats) == len(rows) >= 30
        if structured_output == "json_object":
            nurse = rows[rows["user_context"].str.startswith("I am 52, a nurse in Leeds")]
            assert list(nurse["question"]) == [
                "Should I pay into a stocks and shares ISA before my mortgage?"
            ]
        # The teacher was still asked with its own prompt, markers and all; the training
        # turns are the student's.
        seed = rows[rows["source"] == "seed"].iloc[0]
        assert seed["messages"][1]["content"] == f"{seed['user_context']}\n\n{seed['question']}"

        # A rerun from scratch asks the teacher for nothing: the request cache still answers.
        again = distill(
            recipe=recipe, examples=30, output=str(out), teacher_model="fake-teacher",
            teacher_base_url=teacher.url, answer_batch_size=25, train=False, refresh=False,
        )  # fmt: skip
        assert teacher.stats.received == sent
        assert again["requests_sent"] == 0


def to_teacher_prompt_format(folder: Path) -> None:
    """Rewrite a published version as versions before the student turns were: `messages` with
    the teacher's answer prompt (markers) as user turn, in Parquet, JSONL and the manifest."""
    settings = AnswerSettings()
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = {}
    for split in ("train", "validation"):
        frame = pd.read_parquet(folder / f"{split}.parquet")
        frame["messages"] = [
            [
                {"role": "system", "content": settings.system},
                {"role": "user", "content": f"# USER CONTEXT\n{c}\n\n# QUESTION\n{q}"},
                {"role": "assistant", "content": a},
            ]
            for c, q, a in zip(
                frame["user_context"], frame["question"], frame["answer"], strict=True
            )
        ]
        frame.to_parquet(folder / f"{split}.parquet", index=False)
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps({"messages": m}) + "\n" for m in frame["messages"])
        )
        parts[split] = frame
    manifest["content_fingerprint"] = content_fingerprint(pd.concat(parts.values()))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_refresh_of_a_version_with_marked_messages_publishes_the_student_turns(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    recipe = recipe_file(workdir)
    first = run(teacher, recipe, out)
    old = version_folder(out)
    to_teacher_prompt_format(old)
    rows, chats = published(old)
    assert rows["messages"].map(lambda m: m[1]["content"].startswith("# USER CONTEXT")).all()
    assert all(c["messages"][1]["content"].startswith("# USER CONTEXT") for c in chats)
    sent = teacher.stats.received

    refreshed = run(teacher, recipe, out)

    assert refreshed["outcome"] == "published"  # not "unchanged": the messages changed
    assert refreshed["version"] != first["version"]
    assert teacher.stats.received == sent  # the answers are kept, not asked again
    new_rows, new_chats = published(version_folder(out))
    assert_no_markers(new_rows, new_chats)
    assert set(new_rows["id"]) == set(rows["id"])
    by_id = new_rows.set_index("id")
    for rid, answer in zip(rows["id"], rows["answer"], strict=True):
        assert by_id.loc[rid, "answer"] == answer
        assert by_id.loc[rid, "messages"][-1]["content"] == answer
    manifest = json.loads((version_folder(out) / "manifest.json").read_text())
    assert manifest["refresh"]["answer_changed"] is False
    assert manifest["refresh"]["kept"] == len(rows)

    # The version written with the student turns is LATEST now: a refresh finds nothing new.
    assert run(teacher, recipe, out)["outcome"] == "unchanged"


def test_a_changed_student_user_republishes_the_turns_without_asking_the_teacher(
    workdir: Path, teacher: FakeTeacher
) -> None:
    out = workdir / "out"
    run(teacher, recipe_file(workdir), out)
    sent = teacher.stats.received

    changed = recipe_file(
        workdir, answer={"student_user": "{question}\n\nAbout me: {user_context}"}
    )
    refreshed = run(teacher, changed, out)

    assert refreshed["outcome"] == "published"
    assert teacher.stats.received == sent
    rows, chats = published(version_folder(out))
    assert all(
        m[1]["content"] == f"{q}\n\nAbout me: {c}"
        for m, c, q in zip(rows["messages"], rows["user_context"], rows["question"], strict=True)
    )
    assert {c["messages"][1]["content"] for c in chats} == {
        m[1]["content"] for m in rows["messages"]
    }


def test_the_terminal_shows_the_plain_validation_question(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from distillery.flows.cli import _print_training

    turn = student_messages(
        AnswerSettings(),
        "I am 67 and retired with a $480,000 IRA. " * 8,
        "Should I buy dividend stocks?",
    )[1]["content"]
    outcome = {
        "backend": "local",
        "status": "succeeded",
        "metrics": {"samples": [{"question": turn, "before": "b", "after": "a", "teacher": "t"}]},
    }

    _print_training(outcome)

    out = capsys.readouterr().out
    assert "validation question 1: Should I buy dividend stocks?\n" in out
    assert "USER CONTEXT" not in out and "QUESTION" not in out
