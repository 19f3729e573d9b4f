"""DPO stage: starts from the SFT artifact (merged in full precision), LoRA/QLoRA/full, resume, bad input."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from pipeline import dpo, sft
from pipeline.core import artifacts, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import MissingArtifactError

from conftest import chat_rows, preference_rows, write_jsonl, write_recipe
from test_sft import losses, no_pickles, prepare, signal_paused, start_paused_at


def dpo_recipe(
    tmp_path: Path,
    sft_method: str = "lora",
    dpo_method: str = "lora",
    *,
    with_pairs: bool = True,
    sections: dict | None = None,
    sft_settings: dict | None = None,
    **dpo_settings,
) -> Path:
    sources = [{"path": str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(64)))}]
    if with_pairs:
        sources.append({"path": str(write_jsonl(tmp_path / "pairs.jsonl", preference_rows(80)))})
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    dpo_section = {
        "method": dpo_method,
        "global_batch_size": 8,
        "learning_rate": 5e-3,
        "max_steps": 8,
        "logging_steps": 1,
        "save_steps": 100,
        "lora": lora,
        **dpo_settings,
    }
    return write_recipe(
        tmp_path,
        sources,
        sft={
            "method": sft_method,
            "global_batch_size": 8,
            "learning_rate": 5e-3,
            "max_steps": 6,
            "lora": lora,
            **(sft_settings or {}),
        },
        dpo=dpo_section,
        **(sections or {}),
    )


def prepare_with_sft(path: Path, *overrides: str):
    recipe = prepare(path, *overrides)
    sft.run(recipe)
    return recipe


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_dpo_on_a_lora_sft_merges_it_in_full_precision(tmp_path: Path) -> None:
    recipe = prepare_with_sft(dpo_recipe(tmp_path))
    dpo.run(recipe)
    out = recipe.run_dir / "dpo"
    base_dir = out / artifacts.START_MODEL_DIR
    import torch

    from pipeline.core import models

    merged = weights(base_dir)
    assert all(t.dtype == torch.float32 for t in merged.values())
    reference = models.load_merged(recipe.run_dir / "base", recipe.run_dir / "sft" / artifacts.MODEL_DIR, recipe.model)
    for name, tensor in reference.state_dict().items():
        if name in merged:
            assert torch.allclose(merged[name], tensor, atol=1e-6), name
    assert (out / artifacts.MODEL_DIR / "adapter_model.safetensors").is_file()
    assert (out / artifacts.REWARDS_PLOT).is_file() and (out / artifacts.LOSS_PLOT).is_file()
    no_pickles(out)
    manifest = json.loads((out / artifacts.MANIFEST).read_text())
    assert manifest["model"] == {"base": artifacts.START_MODEL_DIR, "base_inside_artifact": True, "adapter": True}
    assert {"rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies"} <= set(manifest["metrics"])
    assert set(manifest["inputs"]) == {"data", "sft"}
    base, adapter = artifacts.model_location(out)
    assert base == base_dir and adapter == out / artifacts.MODEL_DIR


def test_a_combined_loss_is_also_measured_term_by_term_on_the_held_out_pairs(tmp_path: Path) -> None:
    recipe = prepare_with_sft(
        dpo_recipe(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], eval_strategy="steps", eval_steps=4)
    )
    dpo.run(recipe)
    out = recipe.run_dir / "dpo"
    evaluations = [e for e in json.loads((out / artifacts.LOG_HISTORY).read_text()) if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [4, 8]
    for entry in evaluations:
        # The terms are what TRL sums: the combined held-out loss is their weighted sum.
        assert entry["eval_loss"] == pytest.approx(entry["eval_sigmoid_loss"] + 0.5 * entry["eval_sft_loss"], rel=1e-5)
        assert entry["eval_sigmoid_loss"] > 0 and entry["eval_sft_loss"] > 0
    metrics = artifacts.read_manifest(out)["metrics"]
    assert metrics["eval_sigmoid_loss"] == evaluations[-1]["eval_sigmoid_loss"]
    assert metrics["eval_sft_loss"] == evaluations[-1]["eval_sft_loss"]


def test_qlora_dpo_trains_on_the_cpu_and_keeps_a_full_precision_base(tmp_path: Path) -> None:
    recipe = prepare_with_sft(dpo_recipe(tmp_path, sft_method="qlora", dpo_method="qlora"))
    dpo.run(recipe)
    out = recipe.run_dir / "dpo"
    curve = losses(out)
    assert len(curve) == 8 and all(loss == loss for loss in curve)  # every step logged, no NaN
    merged = weights(out / artifacts.START_MODEL_DIR)
    assert not [name for name in merged if "absmax" in name or "quant" in name], "4-bit state leaked into the merge"


def test_full_dpo_trains_every_weight_against_a_frozen_reference(tmp_path: Path) -> None:
    recipe = prepare_with_sft(dpo_recipe(tmp_path, sft_method="full", dpo_method="full"))
    dpo.run(recipe)
    out = recipe.run_dir / "dpo"
    trained = weights(out / artifacts.MODEL_DIR)
    start = weights(recipe.run_dir / "sft" / artifacts.MODEL_DIR)
    assert any(not (trained[k] == start[k]).all() for k in start)
    assert not (out / artifacts.START_MODEL_DIR).exists()
    assert artifacts.model_location(out) == (out / artifacts.MODEL_DIR, None)


def test_dpo_sigterm_saves_and_a_rerun_resumes(tmp_path: Path) -> None:
    path = dpo_recipe(tmp_path, max_steps=40, save_steps=5, logging_steps=5)
    recipe = prepare_with_sft(path)
    process = start_paused_at(10, "pipeline.dpo", "--config", str(path))
    signal_paused(process, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == stages.STOPPED_EXIT_CODE, stderr[-3000:]
    assert not artifacts.manifest_is_complete(recipe.run_dir / "dpo")
    assert dpo.run(load_recipe(path)) == stages.Outcome.RAN
    out = recipe.run_dir / "dpo"
    metrics = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    assert metrics["resumed_from"].startswith("checkpoint-") and metrics["optimizer_steps"] == 40


def test_missing_preference_data_says_how_to_get_it(tmp_path: Path) -> None:
    recipe = prepare_with_sft(dpo_recipe(tmp_path, with_pairs=False))
    with pytest.raises(
        MissingArtifactError, match=r"has no preference pairs\. Add a source with prompt/chosen/rejected"
    ):
        dpo.run(recipe)


def test_missing_sft_artifact_names_the_command(tmp_path: Path) -> None:
    recipe = prepare(dpo_recipe(tmp_path))
    with pytest.raises(
        MissingArtifactError, match=r"the dpo stage needs the 'sft' artifact.*accelerate launch pipeline/sft\.py"
    ):
        dpo.run(recipe)
