"""Experiment tracking (`run.report_to`): the trainers' own integrations for training stages, and the evaluation's
metrics, written where a tracker's viewer finds them: `<run>/tracking/<stage>/`.

The folder lies beside the stage artifacts, not in them: tracking is a view across runs, and re-running a stage
adds to it instead of replacing it. TensorBoard is the tracker this offline pipeline tests; any other name the
transformers Trainer knows is passed to it as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.core import artifacts


def folder(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / artifacts.TRACKING_DIR / stage


def trainer_fields(recipe: Any, stage: str) -> dict[str, Any]:
    """The Trainer's `report_to`; TensorBoard's event files go to the stage's tracking folder."""
    if not recipe.run.report_to:
        return {"report_to": "none"}
    if "tensorboard" in recipe.run.report_to:
        # transformers' TensorBoard callback takes its folder from this variable when the Trainer is built.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder(recipe.run_dir, stage))
    return {"report_to": list(recipe.run.report_to)}


def log_evaluation(recipe: Any, stage: str, results: dict[str, dict[str, Any]]) -> None:
    """Every model's evaluation scalars, one tag per model and metric, as one step of the run's evaluation history."""
    if "tensorboard" not in recipe.run.report_to:
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder(recipe.run_dir, stage)))
    try:
        for model, scores in results.items():
            for metric, value in scores.items():
                if isinstance(value, float):
                    writer.add_scalar(f"{model}/{metric}", value)
    finally:
        writer.close()
