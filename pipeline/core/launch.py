"""What a launch asks for (one process, DDP, DeepSpeed ZeRO stage N) and which training methods work under it.

Read from an accelerate config file before anything starts (`python -m pipeline.run` with a recipe's
`launch_config`, and recipe validation), or from the environment `accelerate launch` gives each process (a
stage started directly). Either way a method x launch pair that cannot work is refused before training, with
the alternatives that do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Launch:
    kind: str  # "single", "ddp" or "deepspeed"
    processes: int = 1
    zero_stage: int | None = None
    offload: bool = False

    def describe(self) -> str:
        if self.kind == "deepspeed":
            name = f"DeepSpeed ZeRO-{self.zero_stage}" + (" with CPU offload" if self.offload else "")
        else:
            name = {"single": "a single process", "ddp": "DDP"}[self.kind]
        return f"{name} ({self.processes} process{'es' if self.processes != 1 else ''})"


def resolve_config_path(path: str | Path) -> Path:
    """A launch config as written in a recipe: relative to the working directory, else to the repository."""
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists() and (REPO / candidate).exists():
        return REPO / candidate
    return candidate


def from_config_file(path: str | Path, key: str) -> Launch:
    """The launch an accelerate config file describes; `key` names the recipe key that points at it."""
    file = resolve_config_path(path)
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(
            f"{key}: cannot read the accelerate config {path} ({error.strerror}). The shipped ones are in "
            f"accelerate_configs/: {', '.join(sorted(p.name for p in (REPO / 'accelerate_configs').glob('*.yaml')))}."
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: {path} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path} is not an accelerate config (expected a mapping of its keys).")
    processes = int(config.get("num_processes", 1) or 1)
    distributed = str(config.get("distributed_type", "NO")).upper()
    if distributed == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config") or {}
        stage, offload = _deepspeed_file_settings(deepspeed.get("deepspeed_config_file"), file.parent)
        if stage is None:
            stage = int(deepspeed.get("zero_stage", 2))
            offload = any(
                str(deepspeed.get(k, "none")).lower() not in ("none", "")
                for k in ("offload_optimizer_device", "offload_param_device")
            )
        return Launch("deepspeed", processes, stage, offload)
    if distributed in ("NO",) or processes == 1:
        return Launch("single", 1)
    if distributed in ("MULTI_GPU", "MULTI_CPU"):
        return Launch("ddp", processes)
    raise ConfigError(
        f"{key}: {path} asks for distributed_type {distributed}, which the pipeline does not support; use one of the "
        "configs in accelerate_configs/ (single process, DDP, DeepSpeed ZeRO-2/3)."
    )


def _deepspeed_file_settings(path: str | None, folder: Path) -> tuple[int | None, bool]:
    """ZeRO stage and offload from a DeepSpeed JSON config that an accelerate config may point at instead."""
    if not path:
        return None, False
    file = folder / path  # an absolute path stays absolute
    try:
        zero = json.loads(file.read_text(encoding="utf-8")).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the DeepSpeed config {file}: {error}. Check deepspeed_config_file.") from None
    offload = any(
        str((zero.get(k) or {}).get("device", "none")).lower() != "none" for k in ("offload_optimizer", "offload_param")
    )
    return int(zero.get("stage", 0)), offload


def from_environment() -> Launch:
    """The launch this process belongs to: the process count torchrun gives every process (WORLD_SIZE), and the
    DeepSpeed settings as accelerate itself reads them from what `accelerate launch` passed on."""
    from accelerate.utils import DeepSpeedPlugin, parse_flag_from_env

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        plugin = DeepSpeedPlugin()
        offload = any(
            str(device).lower() not in ("none", "")
            for device in (plugin.offload_optimizer_device, plugin.offload_param_device)
        )
        return Launch("deepspeed", processes, int(plugin.zero_stage), offload)
    return Launch("ddp", processes) if processes > 1 else Launch("single", 1)


def check_method(method: str, section: str, launch: Launch, global_batch_size: int) -> None:
    """Refuse a training method the launch cannot run, and a global batch the processes cannot share."""
    if launch.kind == "deepspeed" and launch.zero_stage == 3 and method == "qlora":
        raise ConfigError(
            f"{section}.method is qlora, which the pipeline does not run under {launch.describe()}: ZeRO-3 partitions"
            " every weight across processes, and bitsandbytes' packed 4-bit weights partition only when stored in the"
            " compute dtype (bnb_4bit_quant_storage), a combination this pipeline does not test. Use"
            f" {section}.method=lora under ZeRO-3 (its 16-bit weights are partitioned instead), or keep qlora with"
            " accelerate_configs/ddp.yaml or accelerate_configs/deepspeed_zero2.yaml."
        )
    if global_batch_size % launch.processes:
        raise ConfigError(
            f"{section}.global_batch_size={global_batch_size} cannot be split over the {launch.processes} processes of "
            f"{launch.describe()}; use a multiple of {launch.processes}."
        )
