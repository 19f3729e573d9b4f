"""Python environments of their own for tools that cannot be installed beside the project's packages (optimum's ONNX
exporter needs transformers<4.58). Each is a virtual environment beside the running one (`.venv` ->
`.venv-optimum`), created on first use from a pinned requirements file and reused while the file is unchanged."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core.errors import PipelineError

REQUIREMENTS_DIR = Path(__file__).resolve().parents[2] / "requirements"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STAMP = ".pipeline-requirements.json"


def location(name: str) -> Path:
    return Path(sys.prefix).with_name(f"{Path(sys.prefix).name}-{name}")


def _torch_requirement() -> str:
    """The project's own torch build, so the isolated environment computes as the project does."""
    import torch

    return f"torch=={torch.__version__}"


def _pip(python: Path, arguments: list[str], what: str) -> None:
    result = subprocess.run([str(python), "-m", "pip", *arguments], capture_output=True, text=True)
    if result.returncode:
        raise PipelineError(
            f"could not install {what} into {python.parents[1]} (pip exited {result.returncode}; the package "
            f"registries must be reachable the first time): {result.stderr.strip()[-1500:]} Fix the cause and run "
            "again; the environment is created anew."
        )


def python_of(name: str) -> Path:
    """The interpreter of the environment `name` (requirements/NAME.txt), created or brought up to date first."""
    requirements = REQUIREMENTS_DIR / f"{name}.txt"
    folder = location(name)
    python = folder / "bin" / "python"
    wanted = {
        "requirements_sha256": hashlib.sha256(requirements.read_bytes()).hexdigest(),
        "torch": _torch_requirement(),
    }
    stamp = folder / STAMP
    if python.exists() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return python
    print(f"{name}: creating its environment {folder} from {requirements.name} (first use; a few minutes)", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    torch = wanted["torch"]
    try:
        _pip(python, ["install", "-q", torch], torch)
    except PipelineError:
        if "+cpu" not in torch:
            raise
        # The +cpu build is on PyTorch's index, or in a local wheel folder where pip's configuration names one.
        _pip(python, ["install", "-q", torch, "--index-url", TORCH_CPU_INDEX], torch)
    _pip(python, ["install", "-q", "-r", str(requirements)], requirements.name)
    stamp.write_text(json.dumps(wanted))
    print(f"{name}: environment ready in {time.perf_counter() - started:.0f} s", flush=True)
    return python


def run_json(name: str, script: Path, arguments: list[str], what: str) -> dict:
    """Runs `script` with the environment's interpreter; the script prints its result as one JSON object last."""
    result = subprocess.run([str(python_of(name)), str(script), *arguments], capture_output=True, text=True)
    if result.returncode:
        raise PipelineError(f"{what} failed (exit {result.returncode}):\n{result.stderr.strip()[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
