"""Evaluation stage on a small run: layout, gates, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import artifacts, evaluate
from pipeline.config import load_recipe
from pipeline.errors import ConfigError, MissingArtifactError, PipelineError

from conftest import run_module, write_jsonl, write_recipe
from test_dpo import dpo_recipe, prepare_with_sft
from test_sft import prepare


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("eval")
    path = dpo_recipe(tmp_path)
    recipe = prepare_with_sft(path, "evaluate.backend=hf")
    evaluate.run(recipe)
    return path


def test_every_model_is_evaluated_with_every_metric(small_run: Path) -> None:
    recipe = load_recipe(small_run, ["evaluate.backend=hf"])
    eval_dir = recipe.run_dir / "eval"
    metrics = json.loads((eval_dir / evaluate.METRICS_FILE).read_text())
    assert list(metrics["models"]) == ["base", "sft"]
    for scores in metrics["models"].values():
        assert {"exact_match", "rouge1", "rougeL", "sacrebleu", "perplexity", "preference_accuracy", "mean_margin"} <= set(scores)
        assert scores["perplexity"] > 1
    manifest = json.loads((eval_dir / artifacts.MANIFEST).read_text())
    assert set(manifest["inputs"]) == {"data", "base", "sft"} and manifest["metrics"]["backend"] == "hf"


def test_a_failed_gate_exits_non_zero_with_a_table_and_keeps_the_report(small_run: Path) -> None:
    result = run_module("pipeline.evaluate", "--config", str(small_run), "evaluate.backend=hf",
                        "evaluate.gates={sft.exact_match: 0.99, sft-base.perplexity: 0.0}")  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "evaluation gates failed" in result.stderr and "Traceback" not in result.stderr
    assert "| sft.exact_match |" in result.stderr and "FAIL" in result.stderr
    assert "| sft-base.perplexity |" in result.stderr  # lower perplexity than base passes
    line = next(l for l in result.stderr.splitlines() if l.startswith("| sft-base.perplexity"))
    assert line.rstrip().endswith("| pass |")
    recipe = load_recipe(small_run, ["evaluate.backend=hf"])
    assert (recipe.run_dir / "eval" / evaluate.REPORT_FILE).is_file()
    assert artifacts.read_manifest(recipe.run_dir / "eval")["metrics"]["gates_passed"] is False


def test_no_model_artifacts_names_the_stage_to_run(tmp_path: Path) -> None:
    recipe = load_recipe(dpo_recipe(tmp_path), ["evaluate.backend=hf"])
    from pipeline import data

    data.run(recipe)
    with pytest.raises(MissingArtifactError, match=r"no model artifacts .* Run `accelerate launch pipeline/sft\.py"):
        evaluate.run(recipe)


def test_eval_split_without_references(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"call tool {i}"},
                          {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}
            for i in range(30)]  # fmt: skip
    path = write_recipe(tmp_path, [{"path": str(write_jsonl(tmp_path / "tools.jsonl", rows))}], evaluate={"backend": "hf"})
    recipe = prepare(path)
    with pytest.raises(PipelineError, match=r"has no reference answers .* so exact_match, rouge, sacrebleu cannot be computed"):
        evaluate.run(recipe)


def test_unknown_metric_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'bertscore' is not shipped; the shipped metrics are: exact_match, rouge, sacrebleu"):
        load_recipe(dpo_recipe(tmp_path), ["evaluate.metrics=[exact_match, bertscore]"])


def test_malformed_gate_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'final\.exact_match' is not MODEL\.METRIC"):
        load_recipe(dpo_recipe(tmp_path), ["evaluate.gates={final.exact_match: 0.5}"])


def test_shipped_metrics_are_deterministic_and_load_offline() -> None:
    from pipeline import scoring

    predictions, references = ["cat", "a dog", "x"], ["cat", "the dog", "y"]
    first = scoring.compute_metric("rouge", predictions, references)
    assert first == scoring.compute_metric("rouge", predictions, references)
    assert first["rouge1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert scoring.compute_metric("exact_match", predictions, references) == {"exact_match": pytest.approx(1 / 3)}
