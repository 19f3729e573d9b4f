"""`python -m pipeline.run`: every stage in order, cached by manifests, with a table at the end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline import run as pipeline_run
from pipeline.config import load_recipe
from pipeline.errors import MissingArtifactError

from conftest import run_module
from test_dpo import dpo_recipe

SMALL = ["evaluate.backend=hf", "export.targets=[hf]"]


def test_second_run_runs_nothing_and_one_sft_change_reruns_from_sft(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = dpo_recipe(tmp_path, sections={"evaluate": {"gates": {"sft.exact_match": 0.0}}})
    first = pipeline_run.run(load_recipe(path, SMALL), SMALL)
    assert [(r["stage"], r["status"]) for r in first] == [(s, "ran") for s in pipeline_run.ORDER]
    table = capsys.readouterr().out
    assert "stage    status    seconds  headline" in table and "export   ran" in table

    started = time.time()
    second = pipeline_run.run(load_recipe(path, SMALL), SMALL)
    assert time.time() - started < 10
    assert {r["status"] for r in second} == {"skipped"}

    changed = [*SMALL, "sft.learning_rate=1e-3"]
    third = pipeline_run.run(load_recipe(path, changed), changed)
    assert {r["stage"]: r["status"] for r in third} == {
        "data": "skipped", "base": "skipped", "sft": "ran", "dpo": "ran", "eval": "ran", "export": "ran",
    }  # fmt: skip


def test_from_and_to_select_stages_and_a_failure_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = dpo_recipe(tmp_path)
    rows = pipeline_run.run(load_recipe(path, SMALL), SMALL, stop="base")
    assert [r["stage"] for r in rows] == ["data", "base"]
    with pytest.raises(MissingArtifactError):
        pipeline_run.run(load_recipe(path, SMALL), SMALL, start="dpo", stop="dpo")
    assert "dpo      failed" in capsys.readouterr().out


def test_cli_rejects_an_inverted_range() -> None:
    result = run_module("pipeline.run", "--from", "export", "--to", "data")
    assert result.returncode == 2 and "--from export comes after --to data" in result.stderr
