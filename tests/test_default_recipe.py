"""The offline default recipe end to end, as `make demo` runs it, with the figures each stage promises."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline import artifacts, base, chat, data, dpo, engines, models, scoring, sft, training
from pipeline.config import load_recipe


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """data -> base -> SFT -> DPO on configs/tiny.yaml, timed; artifacts under a temporary folder."""
    output = tmp_path_factory.mktemp("default")
    recipe = load_recipe("configs/tiny.yaml", [f"run.output_dir={output}"])
    seconds = {}
    for name, stage in (("data", data), ("base", base), ("sft", sft), ("dpo", dpo)):
        started = time.time()
        stage.run(recipe)
        seconds[name] = time.time() - started
    run_dir = recipe.run_dir
    tokenizer = chat.load_tokenizer(run_dir / "data" / artifacts.TOKENIZER_DIR)
    prompts, references, tools = engines.held_out_conversations(run_dir / "data")
    ids = engines.prompt_ids(tokenizer, prompts, tools)
    pairs = scoring.held_out_pairs(run_dir / "data")
    figures = {}
    for name in ("base", "sft", "dpo"):
        folder = run_dir / name
        location = (folder, None) if name == "base" else training.trained_model_location(folder)
        model = models.load_merged(*location, "float32")
        answers = engines.hf_generate(model, tokenizer, ids, recipe.evaluate.max_new_tokens)
        figures[name] = {**scoring.compute_metric("exact_match", answers, references), **scoring.preference_scores(model, tokenizer, pairs)}
    print("default recipe:", json.dumps({"seconds": seconds, "figures": figures}, indent=1))
    return {"recipe": recipe, "seconds": seconds, "figures": figures}


def test_sft_fits_the_time_budget_and_learns_the_tasks(default_run: dict) -> None:
    figures = default_run["figures"]
    assert default_run["seconds"]["sft"] <= 300
    assert figures["base"]["exact_match"] < 0.05
    assert figures["sft"]["exact_match"] >= 0.6


def test_dpo_fits_the_time_budget_and_improves_preferences_without_losing_answers(default_run: dict) -> None:
    figures = default_run["figures"]
    assert default_run["seconds"]["dpo"] <= 180
    assert figures["dpo"]["preference_accuracy"] > figures["sft"]["preference_accuracy"]
    assert figures["dpo"]["exact_match"] >= figures["sft"]["exact_match"] - 0.02


def test_default_artifacts_are_complete_and_a_rerun_skips_everything(default_run: dict, capsys: pytest.CaptureFixture) -> None:
    recipe = default_run["recipe"]
    for name in ("data", "base", "sft", "dpo"):
        assert artifacts.manifest_is_complete(recipe.run_dir / name), name
    capsys.readouterr()
    started = time.time()
    for stage in (data, base, sft, dpo):
        stage.run(recipe)
    assert capsys.readouterr().out.count("up to date") == 4
    assert time.time() - started < 30
