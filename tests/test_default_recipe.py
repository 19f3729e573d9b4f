"""The offline default recipe end to end, as `make demo` runs it, with the figures each stage promises."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline import artifacts, base, data, dpo, evaluate, sft
from pipeline.config import load_recipe

from conftest import run_module


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """data -> base -> SFT -> DPO -> evaluate (HF backend) on configs/tiny.yaml, timed, under a temporary folder."""
    output = tmp_path_factory.mktemp("default")
    overrides = [f"run.output_dir={output}", "evaluate.backend=hf"]
    recipe = load_recipe("configs/tiny.yaml", overrides)
    seconds = {}
    for name, stage in (("data", data), ("base", base), ("sft", sft), ("dpo", dpo), ("eval", evaluate)):
        started = time.time()
        stage.run(recipe)
        seconds[name] = time.time() - started
    metrics = json.loads((recipe.run_dir / "eval" / evaluate.METRICS_FILE).read_text())
    print("default recipe:", json.dumps({"seconds": seconds, "models": metrics["models"]}, indent=1))
    return {"recipe": recipe, "overrides": overrides, "seconds": seconds, "metrics": metrics}


def test_sft_fits_the_time_budget_and_learns_the_tasks(default_run: dict) -> None:
    models = default_run["metrics"]["models"]
    assert default_run["seconds"]["sft"] <= 300
    assert models["base"]["exact_match"] < 0.05
    assert models["sft"]["exact_match"] >= 0.6


def test_dpo_fits_the_time_budget_and_improves_preferences_without_losing_answers(default_run: dict) -> None:
    models = default_run["metrics"]["models"]
    assert default_run["seconds"]["dpo"] <= 180
    assert models["dpo"]["preference_accuracy"] > models["sft"]["preference_accuracy"]
    assert models["dpo"]["exact_match"] >= models["sft"]["exact_match"] - 0.02


def test_evaluation_report_agrees_with_its_predictions(default_run: dict) -> None:
    eval_dir = default_run["recipe"].run_dir / "eval"
    assert default_run["seconds"]["eval"] <= 120
    metrics = default_run["metrics"]
    assert metrics["gates_passed"] and metrics["backend"] == "hf"
    predictions = [json.loads(line) for line in (eval_dir / evaluate.PREDICTIONS_FILE).read_text().splitlines()]
    assert len(predictions) == metrics["examples"]
    recomputed = sum(p["answers"]["sft"] == p["reference"] for p in predictions) / len(predictions)
    assert recomputed == pytest.approx(metrics["models"]["sft"]["exact_match"])
    report = (eval_dir / evaluate.REPORT_FILE).read_text()
    for plot in ("metrics.png", "sft_loss.png", "dpo_loss.png", "dpo_rewards.png"):
        assert (eval_dir / plot).is_file() and f"]({plot})" in report
    assert "| dpo |" in report and "## Gates" in report


def test_default_artifacts_are_complete_and_a_rerun_skips_everything(default_run: dict, capsys: pytest.CaptureFixture) -> None:
    recipe = load_recipe("configs/tiny.yaml", default_run["overrides"])
    for name in ("data", "base", "sft", "dpo", "eval"):
        assert artifacts.manifest_is_complete(recipe.run_dir / name), name
    capsys.readouterr()
    started = time.time()
    for stage in (data, base, sft, dpo, evaluate):
        stage.run(recipe)
    assert capsys.readouterr().out.count("up to date") == 5
    assert time.time() - started < 30


def test_vllm_and_hf_give_the_same_greedy_answers(default_run: dict) -> None:
    pytest.importorskip("vllm")
    eval_dir = default_run["recipe"].run_dir / "eval"
    hf = [json.loads(line)["answers"] for line in (eval_dir / evaluate.PREDICTIONS_FILE).read_text().splitlines()]
    overrides = [o for o in default_run["overrides"] if not o.startswith("evaluate.backend")]
    result = run_module("pipeline.evaluate", "--force", *overrides, "evaluate.backend=vllm")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((eval_dir / evaluate.METRICS_FILE).read_text())["backend"] == "vllm"
    vllm = [json.loads(line)["answers"] for line in (eval_dir / evaluate.PREDICTIONS_FILE).read_text().splitlines()]
    assert vllm == hf
