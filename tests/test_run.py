"""`python -m pipeline.run`: every stage in order, cached by manifests, a table at the end, and a stop that stays
a stop."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import run as pipeline_run
from pipeline.core import artifacts, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import MissingArtifactError
from serving import vllm_server

from conftest import REPO, run_module
from test_dpo import dpo_recipe
from test_sft import signal_paused, start_paused_at

SMALL = ["evaluate.backend=hf", "export.targets=[hf]"]


def test_second_run_runs_nothing_and_one_sft_change_reruns_from_sft(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = dpo_recipe(tmp_path, sections={"evaluate": {"gates": {"sft.exact_match": 0.0}}})
    first = pipeline_run.run(load_recipe(path, SMALL), SMALL)
    recipe_stages = [s.name for s in stages.STAGES if s.applies(load_recipe(path, SMALL))]
    assert recipe_stages == ["data", "base", "sft", "dpo", "eval", "export"]  # no grpo: the recipe gives no reward
    assert [(r["stage"], r["status"]) for r in first] == [(name, "ran") for name in recipe_stages]
    table = capsys.readouterr().out
    assert "stage    status    seconds  headline" in table and "export   ran" in table

    second = pipeline_run.run(load_recipe(path, SMALL), SMALL)
    assert {r["status"] for r in second} == {"skipped"}

    changed = [*SMALL, "sft.learning_rate=1e-3"]
    third = pipeline_run.run(load_recipe(path, changed), changed)
    assert {r["stage"]: r["status"] for r in third} == {
        "data": "skipped",
        "base": "skipped",
        "sft": "ran",
        "dpo": "ran",
        "eval": "ran",
        "export": "ran",
    }


def test_from_and_to_select_stages_and_a_failure_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = dpo_recipe(tmp_path)
    rows = pipeline_run.run(load_recipe(path, SMALL), SMALL, stop="base")
    assert [r["stage"] for r in rows] == ["data", "base"]
    with pytest.raises(MissingArtifactError):
        pipeline_run.run(load_recipe(path, SMALL), SMALL, start="dpo", stop="dpo")
    assert "dpo      failed" in capsys.readouterr().out


def test_failed_gates_stop_before_export_unless_allowed_and_the_export_says_so(tmp_path: Path) -> None:
    path = dpo_recipe(tmp_path, sections={"evaluate": {"gates": {"dpo.exact_match": 0.99}}})
    result = run_module("pipeline.run", "--config", str(path), *SMALL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluation gates failed: dpo.exact_match" in result.stderr and "--allow-failed-gates" in result.stderr
    recipe = load_recipe(path, SMALL)
    assert not (recipe.run_dir / "export").exists()

    result = run_module("pipeline.run", "--config", str(path), *SMALL, "--allow-failed-gates")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EXPORTED DESPITE FAILING GATES" in result.stdout
    assert artifacts.read_manifest(recipe.run_dir / "export")["metrics"]["gates"] == "failed"
    serving = artifacts.read_serving_file(recipe.run_dir / "export")
    assert serving["gates"] == "failed"
    # ... and so does the server's model listing (tests/test_serving_middleware.py shows how it reaches /v1/models).
    listed = vllm_server.model_metadata(serving)[serving["served_model_name"]]
    assert listed == {"gates": "failed", "exported_from": "dpo"}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sigterm_in_a_training_stage_ends_the_run_and_the_same_command_finishes_it(tmp_path: Path, stage: str) -> None:
    """A real `pipeline.run` process, signalled while one of its training stages trains: that stage checkpoints,
    nothing after it starts, the run exits with 143 and its table says `stopped`; rerunning resumes and finishes."""
    long = {"max_steps": 60, "save_steps": 5, "logging_steps": 5}
    settings = {"sft_settings": {**long, "max_steps": 30}} if stage == "sft" else long
    path = dpo_recipe(tmp_path, **settings)
    command = [sys.executable, "-m", "pipeline.run", "--config", str(path), *SMALL]
    recipe = load_recipe(path, SMALL)
    process = start_paused_at(f"{stage}:10", *command[2:])
    signal_paused(process, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == stages.STOPPED_EXIT_CODE, stderr[-3000:]
    row = next(line for line in stdout.splitlines() if line.startswith(f"{stage} "))
    assert row.split()[1] == "stopped"
    later = [s.name for s in stages.STAGES[stages.NAMES.index(stage) + 1 :] if s.applies(recipe)]
    assert not any((recipe.run_dir / name).exists() or (recipe.run_dir / f"{name}.partial").exists() for name in later)
    assert not artifacts.manifest_is_complete(recipe.run_dir / stage)

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = artifacts.read_manifest(recipe.run_dir / stage)["metrics"]
    assert resumed["resumed_from"].startswith("checkpoint-")
    assert all(artifacts.manifest_is_complete(recipe.run_dir / name) for name in later)


def test_cli_rejects_an_inverted_range() -> None:
    result = run_module("pipeline.run", "--from", "export", "--to", "data")
    assert result.returncode == 2 and "--from export comes after --to data" in result.stderr


def test_every_stage_command_has_help_from_the_stage_table() -> None:
    for stage in stages.STAGES:
        result = run_module(stage.module, "--help")
        assert result.returncode == 0 and stage.description.split(":")[0] in result.stdout, stage.name
    assert "--allow-drift" in run_module("pipeline.sft", "--help").stdout
    assert "--allow-drift" not in run_module("pipeline.data", "--help").stdout
