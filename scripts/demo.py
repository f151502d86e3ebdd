"""`make demo`: the whole pipeline end to end on this machine, no key and no network.

Until the embedded SmolLM2 teacher lands, the teacher here is the project's loopback stand-in
(tests/fake_teacher.py): a real HTTP server speaking the OpenAI API with canned, deterministic
text. Every other part is the real pipeline: Prefect (ephemeral), the engine, expansion,
answers, Great Expectations and the Parquet export to ./out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fake_teacher import spawn  # noqa: E402


def main() -> int:
    teacher, url = spawn("--latency", "0.05")
    try:
        print(f"stand-in teacher on {url}", flush=True)
        cli = [
            sys.executable, "-m", "flows.cli", "run", str(REPO / "recipes" / "stock-advisor.yaml"),
            "--examples", "200", "--output", str(REPO / "out"),
            "--teacher-base-url", url, "--teacher-model", "fake-teacher", "--no-train",
        ]  # fmt: skip
        return subprocess.call(cli, cwd=REPO)
    finally:
        teacher.terminate()
        teacher.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
