"""The package as shipped: declared dependencies, no import cycles, one installed name, a wheel."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "expectations")


def sources() -> Iterator[tuple[str, Path]]:
    """(module name, file) of every module of the package, as `distillery.x.y`."""
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(("distillery", *parts)), path


def imports(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) of every import in a file, in functions too; relative resolved."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, node.lineno
            for alias in node.names:  # `from distillery.tasks import export` imports a module
                yield f"{base}.{alias.name}", node.lineno


def test_every_third_party_import_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        canonicalize_name(Requirement(r).name)
        for r in project["dependencies"]
        + [r for extra in project["optional-dependencies"].values() for r in extra]
    }
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, path in sources():
        for name, line in imports(path, module):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("distillery", "__future__", ""):
                continue
            dists = {canonicalize_name(d) for d in providers.get(top, [top])}
            if not dists & declared:
                missing.append(f"{path.relative_to(REPO)}:{line} imports {top} ({sorted(dists)})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_no_import_cycles_between_modules() -> None:
    modules = dict(sources())
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = {
            name for name, _ in imports(path, module) if name in modules and name != module
        }
        # Importing a submodule runs its packages' __init__ first, which import nothing here.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_comments_and_docs_cite_only_files_that_exist() -> None:
    cited = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b|\b(STACK-NOTES|DESIGN|STYLE)\b")
    texts = [path for _, path in sources()]
    texts += [REPO / "pyproject.toml", REPO / "Makefile"]
    texts += [p for p in sorted((REPO / "tests").glob("*.py")) if p.name != Path(__file__).name]
    texts += sorted((REPO / "bench").glob("*.py"))
    missing = []
    for path in texts:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in cited.finditer(line):
                name = match.group(1) or match.group(2)
                candidates = [REPO / name, path.parent / name]
                if match.group(2) or not any(c.exists() for c in candidates):
                    missing.append(f"{path.relative_to(REPO)}:{number}: {name}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_code_version_without_an_install_falls_back_to_the_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distillery.tasks import export

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(export.metadata, "version", not_installed)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert sha, "the test needs a git checkout"
    assert export.code_version() == f"0+unknown.g{sha}"


@pytest.mark.slow
def test_wheel_installs_one_top_level_package_that_runs_from_a_fresh_venv(
    tmp_path: Path,
) -> None:
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("distillery-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"distillery"}, tops  # no top-level flows/, tasks/ or expectations/
    for shipped in (
        "distillery/flows/cli.py",
        "distillery/recipes/stock-advisor.yaml",
        "distillery/recipes/stock-advisor-seeds.yaml",
        "distillery/deployments/prefect.yaml",
    ):
        assert shipped in names

    # A fresh venv: the wheel installed into it, the dependencies seen through a .pth line to
    # this venv's site-packages (a plain path: this venv's own .pth files, the checkout's
    # editable install among them, are not read from there).
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    probe = (
        "import importlib.util, json, distillery.flows.cli, distillery.tasks.recipe as r\n"
        "print(json.dumps({'cli': distillery.flows.cli.__file__, 'recipes': str(r.BUNDLED_RECIPES),"
        " 'top': [importlib.util.find_spec(n) is None for n in ('flows', 'tasks', 'expectations')]"
        "}))"
    )
    env = {"PATH": str(fresh / "bin"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    found = __import__("json").loads(result.stdout)
    assert found["cli"].startswith(purelib), found
    assert found["recipes"].startswith(purelib), found
    assert found["top"] == [True, True, True], "a top-level flows/tasks/expectations is importable"

    # The console script runs, and a missing recipe names where the shipped ones are.
    cli = subprocess.run(
        [str(fresh / "bin" / "distillery"), "run", "no-such-recipe.yaml", "--no-train"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert "stock-advisor.yaml" in cli.stderr and found["recipes"] in cli.stderr, cli.stderr
