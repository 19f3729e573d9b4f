"""Every benchmark runs its whole logic in its --smoke mode (tiny sizes, a few steps) on a small recipe: a benchmark
that crashes before measuring anything fails here, not on the day someone needs its figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import run as pipeline_run
from pipeline.core.config import load_recipe

from conftest import REPO
from test_dpo import dpo_recipe

pytestmark = pytest.mark.slow  # about 7 minutes together: four vLLM servers, four launches, ONNX builds


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small recipe run through every stage, exported for vLLM and ONNX, as the benchmarks expect the default."""
    tmp_path = tmp_path_factory.mktemp("bench")
    sections = {"evaluate": {"backend": "hf"}, "export": {"targets": ["hf", "onnx"], "onnx_precisions": ["fp32"]}}
    path = dpo_recipe(tmp_path, sections=sections)
    pipeline_run.run(load_recipe(path))
    return path


def run_benchmark(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), "--smoke", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("onnx_vs_torch.py", "Llama 2 layers (smoke), random weights"),
        ("serving.py", "concurrency   2"),
        ("multi_adapter.py", "multi-adapter: 1 adapter counts against one merged server"),
        ("scaling.py", "scaling: 2 processes reach"),
        ("sft_throughput.py", "ratio pipeline / bare TRL"),
        ("seed_spread.py", "runs passed every gate"),
        ("scale_curve.py", "scale curve: 2 sizes"),
        ("train_profile.py", "train profile: sft and dpo, 2 steps each"),
    ],
)
def test_a_benchmark_on_the_small_recipe_runs_to_its_report(
    small_recipe: Path, tmp_path: Path, name: str, says: str
) -> None:
    extra = {
        "seed_spread.py": ["--out", str(tmp_path / "spread.json")],
        "scale_curve.py": ["--out", str(tmp_path / "curve.json"), "--plot", str(tmp_path / "curve.png"),
                           "--output-dir", str(tmp_path / "runs")],
        "train_profile.py": ["--out", str(tmp_path / "profile.json"), "--output-dir", str(tmp_path / "runs")],
    }.get(name, [])  # fmt: skip
    assert says in run_benchmark(name, "--config", str(small_recipe), *extra)


def test_the_admission_benchmark_runs_to_its_report(default_pipeline: dict) -> None:
    """On the default export: vLLM's CPU attention serves its head size (32), not the small recipe's (16)."""
    out = run_benchmark("admission.py", "--config", "configs/tiny.yaml", *default_pipeline["overrides"])
    assert "admission: probe p95 beside the flood / alone" in out


def test_the_near_duplicate_benchmark_runs_to_its_report() -> None:
    pytest.importorskip("faiss")
    out = run_benchmark("near_duplicates.py")
    assert "paraphrase" in out and "rows/s" in out


def test_the_gpu_benchmark_runs_its_logic_on_the_cpu(tmp_path: Path) -> None:
    out = run_benchmark("gpu_sft.py", "--workdir", str(tmp_path))
    assert "TINY sizes" in out
