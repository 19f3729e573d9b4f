"""The code is formatted and lint-free as pyproject.toml's [tool.ruff] says (line length, rules, import order), and its
imports keep the contracts of [tool.importlinter] (no circle, the schema alone, the layers)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_finds_nothing_to_change() -> None:
    for command in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout[-3000:]}{result.stderr[-1000:]}"


def test_imports_keep_their_contracts() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_stage_and_artifact_names_are_written_only_where_they_are_defined() -> None:
    """Stage names belong to the stage table (pipeline/core/stages.py), artifact file and folder names to
    pipeline/core/artifacts.py. Elsewhere a path built from a literal name (`run_dir / "sft"`), a stage looked up or
    compared by a literal name, or an artifact file's name is a second copy of the layout that drifts from it."""
    import ast

    from pipeline.core import artifacts, stages

    stage_names = set(stages.NAMES)
    artifact_names = {v for k, v in vars(artifacts).items() if k.isupper() and isinstance(v, str)}
    owners = {REPO / "pipeline" / "core" / "stages.py", REPO / "pipeline" / "core" / "artifacts.py"}
    named = stage_names | artifact_names

    def literal(node: ast.AST) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    found = []
    files = [f for folder in ("pipeline", "serving", "benchmarks") for f in sorted((REPO / folder).rglob("*.py"))]
    for file in files:
        if file in owners:
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            where = f"{file.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and literal(node.right) in named:
                found.append(f"{where}: a path ends in {literal(node.right)!r}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                if getattr(node.func.value, "id", None) == "stages" and literal(node.args[0]) in stage_names:
                    found.append(f"{where}: stages.{node.func.attr}({literal(node.args[0])!r}, ...)")
            elif isinstance(node, ast.Compare) and getattr(node.left, "attr", None) == "name":
                names = [literal(c) for c in node.comparators]
                found += [f"{where}: a stage compared with {n!r}" for n in names if n in stage_names]
            elif literal(node) in artifact_names and "." in literal(node):
                found.append(f"{where}: the artifact file {literal(node)!r}")
    assert found == [], "write these through pipeline/core/stages.py or artifacts.py:\n" + "\n".join(found)
