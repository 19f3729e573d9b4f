"""Multi-process training with two real processes on the CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each launch is checked for the number of processes the trainer actually ran with (a launch that silently
falls back to one process per rank still exits 0), for rank-0-only output, and for an artifact that loads in a
single process without DeepSpeed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import sft
from pipeline.core import artifacts, launch, training
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError

from conftest import REPO, chat_rows, preference_rows, write_jsonl, write_recipe
from test_sft import PAUSE_AFTER_SAVE, losses, no_pickles, prepare, wait_paused

CONFIGS = REPO / "accelerate_configs"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


def two_stage_recipe(tmp_path: Path, sft_method: str = "full", dpo_method: str = "lora", **sft_settings) -> Path:
    sources = [
        {"path": str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(96)))},
        {"path": str(write_jsonl(tmp_path / "pairs.jsonl", preference_rows(96)))},
    ]
    common = {"global_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 100, "lora": LORA}
    return write_recipe(
        tmp_path,
        sources,
        sft={"method": sft_method, "max_steps": 6, **common, **sft_settings},
        dpo={"method": dpo_method, "max_steps": 4, **common},
    )


def accelerate_launch(
    config: str, stage: str, recipe: Path, *overrides: str, **popen
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        f"pipeline/{stage}.py",
        "--config",
        str(recipe),
        *overrides,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, **popen)


def kill_tree(process: subprocess.Popen, sig: signal.Signals) -> None:
    """Signal the launcher and every rank: torchrun starts each rank in its own session, out of the launcher's group."""
    import psutil

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def load_without_deepspeed(folder: Path):
    """The artifact's weights in this single, DeepSpeed-free process."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))


@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sft_then_dpo_with_two_processes(tmp_path: Path, config: str) -> None:
    import torch

    recipe = prepare(two_stage_recipe(tmp_path))
    for stage in ("sft", "dpo"):
        result = accelerate_launch(config, stage, recipe.source_path)
        assert result.returncode == 0, result.stderr[-4000:]
        # Only rank 0 reports: one summary line, one copy of each logged step.
        assert result.stdout.count(f"{stage}: ") == 1, result.stdout[-3000:]
        out = recipe.run_dir / stage
        manifest = json.loads((out / artifacts.MANIFEST).read_text())
        metrics = manifest["metrics"]
        assert metrics["processes"] == 2 and len(metrics["peak_memory_mb_per_process"]) == 2
        args = json.loads((out / artifacts.TRAINING_ARGS).read_text())
        # The recipe's global batch of 8, split over two processes rather than doubled.
        assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (4, 1)
        steps = [e["step"] for e in json.loads((out / artifacts.LOG_HISTORY).read_text()) if "loss" in e]
        assert steps == list(range(1, len(steps) + 1)) and metrics["optimizer_steps"] == {"sft": 6, "dpo": 4}[stage]
        assert not list(recipe.run_dir.glob("*.partial")) and not (out / artifacts.CHECKPOINTS_DIR).exists()
        no_pickles(out)

    # Full fine-tuning: whole weights (ZeRO-3 gathers its partitions), loading without DeepSpeed.
    sft_model = load_without_deepspeed(recipe.run_dir / "sft" / artifacts.MODEL_DIR)
    base_model = load_without_deepspeed(recipe.run_dir / "base")
    changed = [name for name, p in sft_model.state_dict().items() if not torch.equal(p, base_model.state_dict()[name])]
    assert all(p.numel() > 0 for p in sft_model.parameters()) and changed
    # DPO with LoRA: the adapter applies to the base model DPO wrote.
    from peft import PeftModel

    dpo_dir = recipe.run_dir / "dpo"
    tuned = PeftModel.from_pretrained(
        load_without_deepspeed(dpo_dir / artifacts.START_MODEL_DIR), str(dpo_dir / artifacts.MODEL_DIR)
    )
    lora_b = [p for name, p in tuned.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.numel() > 0 for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)


def test_pipeline_run_launches_sft_with_the_recipes_launch_config(tmp_path: Path) -> None:
    path = two_stage_recipe(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "--config",
            str(path),
            "--to",
            "sft",
            "sft.launch_config=accelerate_configs/ddp.yaml",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,  # launch configs resolve from the repository too
    )
    assert result.returncode == 0, result.stderr[-4000:]
    recipe = load_recipe(path, ["sft.launch_config=accelerate_configs/ddp.yaml"])
    assert json.loads((recipe.run_dir / "sft" / artifacts.MANIFEST).read_text())["metrics"]["processes"] == 2
    assert [line.split()[:2] for line in result.stdout.splitlines() if line.startswith("sft ")] == [["sft", "ran"]]


def test_two_process_loss_curve_matches_one_process(tmp_path: Path) -> None:
    """Same recipe, same global batch: DDP over two processes follows the single-process curve (full, fp32).

    Measured: equal to 2e-7 relative within an epoch (8 steps of the 69 training rows here). The epoch's last,
    short batch differs by design (accelerate evens the ranks' shares by repeating rows), 0.9% at that step.
    """
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir(), two_dir.mkdir()
    settings = {"max_steps": 8, "learning_rate": 2e-3}
    one = prepare(two_stage_recipe(one_dir, **settings))
    sft.run(one)
    two = prepare(two_stage_recipe(two_dir, **settings))
    result = accelerate_launch("ddp.yaml", "sft", two.source_path)
    assert result.returncode == 0, result.stderr[-4000:]
    single, double = losses(one.run_dir / "sft"), losses(two.run_dir / "sft")
    assert len(single) == len(double) == 8
    worst = max(abs(a - b) / abs(a) for a, b in zip(single, double))
    assert worst < 1e-5, f"relative loss difference {worst:.2e}: {single} vs {double}"


def test_zero2_run_killed_then_rerun_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    recipe = prepare(two_stage_recipe(tmp_path, max_steps=200, save_steps=10, logging_steps=1))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "deepspeed_zero2.yaml"),
        str(PAUSE_AFTER_SAVE),
        "10",
        "-m",
        "pipeline.sft",
        "--config",
        str(recipe.source_path),
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found = recipe.run_dir / "sft.partial" / artifacts.CHECKPOINTS_DIR / "checkpoint-10"
    try:
        wait_paused(process)  # rank 0, once checkpoint-10 is saved; rank 1 waits for it
    finally:
        kill_tree(process, signal.SIGKILL)  # the launcher and both ranks at once, as a crash would
        process.communicate()
    assert not artifacts.manifest_is_complete(recipe.run_dir / "sft")
    assert any((found / name).is_dir() for name in os.listdir(found) if name.startswith("global_step")), (
        "no DeepSpeed state"
    )

    result = accelerate_launch("deepspeed_zero2.yaml", "sft", recipe.source_path)
    assert result.returncode == 0, result.stderr[-4000:]
    out = recipe.run_dir / "sft"
    metrics = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    resumed_at = int(metrics["resumed_from"].rsplit("-", 1)[-1])
    assert resumed_at == 10 and metrics["optimizer_steps"] == 200 and metrics["processes"] == 2
    steps = [e["step"] for e in json.loads((out / artifacts.LOG_HISTORY).read_text()) if "loss" in e]
    assert steps[-1] == 200 and steps[:resumed_at] == list(range(1, resumed_at + 1))


def test_qlora_under_zero3_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    path = two_stage_recipe(tmp_path, sft_method="qlora")
    with pytest.raises(ConfigError, match="Use sft.method=lora under ZeRO-3") as refused:
        load_recipe(path, ["sft.launch_config=accelerate_configs/deepspeed_zero3.yaml"])
    assert "ddp.yaml" in str(refused.value) and "deepspeed_zero2.yaml" in str(refused.value)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.run",
            "--config",
            str(path),
            "sft.launch_config=accelerate_configs/deepspeed_zero3.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "qlora" in result.stderr and not (tmp_path / "checkpoints").exists(), "the data stage ran before the refusal"


def test_a_direct_launch_refuses_qlora_under_zero3_on_every_rank(tmp_path: Path) -> None:
    recipe = prepare(two_stage_recipe(tmp_path))
    result = accelerate_launch("deepspeed_zero3.yaml", "sft", recipe.source_path, "sft.method=qlora")
    assert result.returncode != 0
    assert result.stderr.count("error: sft.method is qlora") == 1, result.stderr[-3000:]
    assert not (recipe.run_dir / "sft.partial").exists() and not (recipe.run_dir / "sft").exists()


def test_shipped_launch_configs_describe_what_they_launch() -> None:
    described = {p.name: launch.from_config_file(p, p.name) for p in CONFIGS.glob("*.yaml")}
    assert described["single_process.yaml"] == launch.Launch("single", 1)
    assert described["ddp.yaml"] == launch.Launch("ddp", 2)
    assert described["deepspeed_zero2.yaml"] == launch.Launch("deepspeed", 2, 2, False)
    assert described["deepspeed_zero3.yaml"] == launch.Launch("deepspeed", 2, 3, False)
    assert described["deepspeed_zero3_offload.yaml"] == launch.Launch("deepspeed", 2, 3, True)
    two_node = described["two_nodes.yaml"]
    assert two_node.processes == 16 and two_node.kind == "deepspeed"
    for path in CONFIGS.glob("*.yaml"):
        assert "16 bytes per parameter" in path.read_text(), f"{path.name} does not give the memory arithmetic"


def test_a_missing_launch_config_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sft.launch_config: cannot read the accelerate config nowhere.yaml") as error:
        load_recipe(two_stage_recipe(tmp_path), ["sft.launch_config=nowhere.yaml"])
    assert "deepspeed_zero3.yaml" in str(error.value)


def test_a_global_batch_the_processes_cannot_share_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="global_batch_size=7 cannot be split over the 2 processes of DDP"):
        load_recipe(two_stage_recipe(tmp_path, global_batch_size=7), ["sft.launch_config=accelerate_configs/ddp.yaml"])


def test_sigterm_to_the_launcher_checkpoints_both_ranks_then_the_rerun_resumes(tmp_path: Path) -> None:
    """A scheduler stopping the job signals the launcher, which passes SIGTERM on to each rank at its own moment."""
    recipe = prepare(two_stage_recipe(tmp_path, max_steps=400, save_steps=10_000, logging_steps=1))
    # -v: the trainer's log lines, so the test sees training under way.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "ddp.yaml"),
        "pipeline/sft.py",
        "-v",
        "--config",
        str(recipe.source_path),
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if "'loss'" in line:  # rank 0 logged a step: both ranks are inside training
                break
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    finally:
        kill_tree(process, signal.SIGKILL)
    saved = training.complete_checkpoints(recipe.run_dir / "sft.partial")
    assert saved and int(saved[-1].name.rsplit("-", 1)[-1]) < 400
    assert not artifacts.manifest_is_complete(recipe.run_dir / "sft")

    result = accelerate_launch("ddp.yaml", "sft", recipe.source_path)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((recipe.run_dir / "sft" / artifacts.MANIFEST).read_text())["metrics"]
    assert metrics["resumed_from"] == saved[-1].name and metrics["optimizer_steps"] == 400
