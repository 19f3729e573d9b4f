"""SFT stage: methods, assistant-only loss mask, determinism, resume after kill -9, SIGTERM, drift, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import base, data, sft
from pipeline.core import artifacts, launch, stages, training
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError, DataError, MissingArtifactError

from conftest import REPO, chat_rows, write_jsonl, write_recipe

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def small_sft_recipe(tmp_path: Path, rows: int = 64, **sft_settings) -> Path:
    """A recipe that trains a 30k-parameter model for a few steps: enough to see the loss fall."""
    sft_section = {
        "method": "lora",
        "global_batch_size": 8,
        "learning_rate": 5e-3,
        "max_steps": 12,
        "logging_steps": 1,
        "save_steps": 100,
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    }
    sft_section.update(sft_settings)
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(rows))
    return write_recipe(tmp_path, [{"path": str(source)}], sft=sft_section)


def prepare(recipe_path: Path, *overrides: str):
    recipe = load_recipe(recipe_path, list(overrides))
    data.run(recipe)
    base.run(recipe)
    return recipe


def losses(folder: Path) -> list[float]:
    return [e["loss"] for e in json.loads((folder / artifacts.LOG_HISTORY).read_text()) if "loss" in e]


def no_pickles(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES], "pickle files in the artifact"


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "full"])
def test_each_method_trains_and_writes_safetensors(tmp_path: Path, method: str) -> None:
    recipe = prepare(small_sft_recipe(tmp_path, method=method))
    sft.run(recipe)
    out = recipe.run_dir / "sft"
    curve = losses(out)
    assert curve[-1] < curve[0], f"{method}: loss did not fall: {curve}"
    model_dir = out / artifacts.MODEL_DIR
    if method == "full":
        assert (model_dir / "model.safetensors").is_file()
    else:
        assert (model_dir / "adapter_model.safetensors").is_file()
        config = json.loads((model_dir / "adapter_config.json").read_text())
        assert config["use_dora"] is (method == "dora")
    assert (model_dir / "chat_template.jinja").is_file() and (out / artifacts.LOSS_PLOT).is_file()
    assert not (out / artifacts.CHECKPOINTS_DIR).exists(), "resume checkpoints are not part of the artifact"
    no_pickles(out)
    manifest = json.loads((out / artifacts.MANIFEST).read_text())
    assert manifest["metrics"]["method"] == method and manifest["metrics"]["optimizer_steps"] == 12
    assert manifest["metrics"]["tokens_seen"] > 0 and manifest["metrics"]["tokens_per_second"] > 0
    assert set(manifest["inputs"]) == {"data", "base"}


def test_qlora_uses_4bit_layers(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    recipe = prepare(small_sft_recipe(tmp_path, method="qlora"))
    model = training.load_trainable_model(recipe, recipe.sft, "sft", recipe.run_dir / "base")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_loss_mask_covers_assistant_turns_and_end_of_turn_only(tmp_path: Path) -> None:
    """The labels TRL trains on: every assistant token and each turn's <|im_end|>, no system/user token."""
    from trl import SFTConfig, SFTTrainer

    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {i}"},
                {"role": "assistant", "content": f"{i}"},
                {"role": "user", "content": "And twice?"},
                {"role": "assistant", "content": f"{i} {i}"},
            ]
        }
        for i in range(20)
    ]
    recipe_path = write_recipe(tmp_path, [{"path": str(write_jsonl(tmp_path / "c.jsonl", rows))}])
    recipe = prepare(recipe_path)
    import datasets

    from pipeline.core import chat

    tokenizer = chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR)
    train = datasets.load_from_disk(str(recipe.run_dir / "data" / "sft"))["train"].select_columns(
        ["messages", "input_ids", "assistant_masks"]
    )
    args = training.trainer_arguments(
        SFTConfig, recipe, recipe.sft, "sft", tmp_path / "out", max_length=256, assistant_only_loss=True
    )
    model = training.load_trainable_model(recipe, recipe.sft, "sft", recipe.run_dir / "base")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example in trainer.train_dataset.select(range(5)):
        trained = [t for t in example["labels"] if t != -100]
        text = tokenizer.decode(trained)
        i = text.split("<|im_end|>")[0]
        assert text == f"{i}<|im_end|>{i} {i}<|im_end|>"
        assert trained.count(end_of_turn) == 2  # each assistant turn ends with a trained stop token
        untrained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == -100])
        assert "Be brief." in untrained and "And twice?" in untrained and "Say" in untrained


def test_same_seed_same_curve_other_seed_other_curve(tmp_path: Path) -> None:
    curves = []
    for attempt, seed in enumerate((7, 7, 8)):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        recipe = prepare(
            small_sft_recipe(folder, lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}), f"run.seed={seed}"
        )
        sft.run(recipe)
        curves.append(losses(recipe.run_dir / "sft"))
    assert curves[0] == curves[1]
    assert curves[0] != curves[2]


PAUSE_AFTER_SAVE = REPO / "tests" / "pause_after_save.py"


def start_paused_at(step: int | str, module: str, *args: str) -> subprocess.Popen:
    """A module that stops itself once checkpoint `step` (or `STAGE:STEP`) is saved (tests/pause_after_save.py);
    `signal_paused` then delivers a signal there."""
    return subprocess.Popen(
        [sys.executable, str(PAUSE_AFTER_SAVE), str(step), "-m", module, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_paused(process: subprocess.Popen, timeout: float = 600) -> int:
    """The pid of the process (or of one of its children, under a launcher) once it has stopped itself."""
    import psutil

    def stopped(member: psutil.Process) -> bool:
        try:
            return member.status() == psutil.STATUS_STOPPED
        except psutil.NoSuchProcess:  # a short-lived helper (a launcher's probe, git) that ended meanwhile
            return False

    deadline = time.time() + timeout
    while True:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        paused = [member.pid for member in family if stopped(member)]
        if paused:
            return paused[0]
        assert process.poll() is None and time.time() < deadline, "the stage ended or never reached its checkpoint"
        time.sleep(0.05)


def signal_paused(process: subprocess.Popen, signum: int, timeout: float = 600) -> None:
    """Wait until the process has stopped itself, then deliver `signum` (and let it run on to handle it)."""
    wait_paused(process, timeout)
    process.send_signal(signum)
    if signum != signal.SIGKILL:
        process.send_signal(signal.SIGCONT)


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / artifacts.MODEL_DIR / "adapter_model.safetensors"))


def resume_recipe(tmp_path: Path) -> Path:
    # Dropout draws random numbers every step, so an exact match after resume proves the RNG state came back too.
    return small_sft_recipe(
        tmp_path,
        rows=200,
        max_steps=40,
        save_steps=10,
        logging_steps=5,
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
    )


def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    reference = prepare(resume_recipe(reference_dir))
    sft.run(reference)
    expected = reference.run_dir / "sft"

    killed_recipe_path = resume_recipe(killed_dir)
    killed = prepare(killed_recipe_path)
    process = start_paused_at(20, "pipeline.sft", "--config", str(killed_recipe_path))
    signal_paused(process, signal.SIGKILL)
    process.wait()
    assert not artifacts.manifest_is_complete(killed.run_dir / "sft")

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.sft", "--config", str(killed_recipe_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = killed.run_dir / "sft"
    metrics = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    assert metrics["resumed_from"] in {"checkpoint-20", "checkpoint-30"}
    assert metrics["optimizer_steps"] == 40
    want, got = adapter_tensors(expected), adapter_tensors(out)
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert losses(out)[-4:] == losses(expected)[-4:]


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_refuses_drift(tmp_path: Path) -> None:
    recipe_path = resume_recipe(tmp_path)
    recipe = prepare(recipe_path)
    process = start_paused_at(10, "pipeline.sft", "--config", str(recipe_path))
    signal_paused(process, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == stages.STOPPED_EXIT_CODE, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout
    assert not artifacts.manifest_is_complete(recipe.run_dir / "sft")
    assert training.complete_checkpoints(recipe.run_dir / "sft.partial")

    with pytest.raises(Exception, match=r"changed since it started.*--allow-drift") as caught:
        sft.run(load_recipe(recipe_path, ["sft.learning_rate=1e-3"]))
    assert "the recipe" in str(caught.value)
    sft.run(load_recipe(recipe_path))  # unchanged recipe: resumes and completes
    out = recipe.run_dir / "sft"
    assert json.loads((out / artifacts.MANIFEST).read_text())["metrics"]["resumed_from"].startswith("checkpoint-")


def test_missing_data_artifact_names_the_command(tmp_path: Path) -> None:
    recipe = load_recipe(small_sft_recipe(tmp_path))
    with pytest.raises(
        MissingArtifactError, match=r"needs the 'data' artifact.*Run `python -m pipeline\.data --config"
    ):
        sft.run(recipe)


def test_stale_data_artifact_is_refused(tmp_path: Path) -> None:
    path = small_sft_recipe(tmp_path)
    prepare(path)
    with pytest.raises(MissingArtifactError, match=r"'data' artifact .* was made with other settings"):
        sft.run(load_recipe(path, ["data.eval_fraction=0.3"]))


def test_unknown_target_module_lists_the_linear_layers(tmp_path: Path) -> None:
    recipe = prepare(small_sft_recipe(tmp_path, lora={"target_modules": ["q_proj", "qkv"]}))
    with pytest.raises(
        ConfigError,
        match=(
            r"target_modules names qkv, which the model does not have\. Its linear layers are: down_proj, gate_proj,"
            r" k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
        ),
    ):
        sft.run(recipe)


def test_qlora_without_bitsandbytes_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = prepare(small_sft_recipe(tmp_path, method="qlora"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"method is qlora, which needs bitsandbytes, but it cannot be imported"):
        sft.run(recipe)


def test_max_length_shorter_than_every_example(tmp_path: Path) -> None:
    path = small_sft_recipe(tmp_path)
    with pytest.raises(
        DataError, match=r"no sft training rows survived .*too_long.*data\.max_length=10, raise the limit"
    ):
        data.run(load_recipe(path, ["data.max_length=10"]))


def test_global_batch_is_the_same_for_any_process_count() -> None:
    from pipeline.core.schema import SFTSection

    section = SFTSection(global_batch_size=32, per_device_train_batch_size=4)
    plans = [training.plan_batch(section, "sft", n) for n in (1, 2, 4, 8)]
    assert [p.global_batch for p in plans] == [32, 32, 32, 32]
    assert [(p.per_device, p.accumulation) for p in plans] == [(4, 8), (4, 4), (4, 2), (4, 1)]
    with pytest.raises(ConfigError, match="cannot be split over the 3 processes of DDP"):
        launch.check_method("full", "sft", launch.Launch("ddp", 3), section.global_batch_size)


def test_accelerate_launch_runs_the_stage_file(tmp_path: Path) -> None:
    """The documented entry point: `accelerate launch pipeline/sft.py` with the single-process launch config."""
    path = small_sft_recipe(tmp_path)
    recipe = prepare(path)
    result = subprocess.run(
        [
            "accelerate",
            "launch",
            "--config_file",
            "accelerate_configs/single_process.yaml",
            "pipeline/sft.py",
            "--config",
            str(path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sft: lora, 12 steps" in result.stdout
    assert artifacts.manifest_is_complete(recipe.run_dir / "sft")
