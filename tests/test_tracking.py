"""`run.report_to`: training stages and the evaluation write TensorBoard event files, offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import dpo, evaluate
from pipeline.core import tracking

from test_dpo import dpo_recipe, prepare_with_sft


def scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_and_evaluation_report_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    recipe = prepare_with_sft(
        dpo_recipe(tmp_path, sections={"run": {"report_to": ["tensorboard"]}}, sft_settings={"logging_steps": 2}),
        "evaluate.backend=hf",
    )
    dpo.run(recipe)
    evaluate.run(recipe)
    sft_scalars = scalars(tracking.folder(recipe.run_dir, "sft"))
    assert len(sft_scalars["train/loss"]) >= 2
    dpo_scalars = scalars(tracking.folder(recipe.run_dir, "dpo"))
    assert "train/rewards/margins" in dpo_scalars
    eval_scalars = scalars(tracking.folder(recipe.run_dir, "eval"))
    assert {"base/perplexity", "sft/perplexity", "dpo/preference_accuracy"} <= set(eval_scalars)
    # Tracking sits beside the artifacts, not in them: no stage manifest lists an event file.
    assert not list((recipe.run_dir / "sft").rglob("events.out.tfevents*"))
