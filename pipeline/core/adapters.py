"""A run's fine-tune as one LoRA adapter over the run's base model, for serving many fine-tunes on one base.

Each adapter stage trains on the previous stage's merged weights: SFT's adapter (A1, B1, scaling s1) on the base W,
DPO's (A2, B2, s2) on W + s1 B1 A1. The sum of both is itself an adapter of rank r1 + r2, exactly:
W + s1 B1 A1 + s2 B2 A2 = W + [s1 B1 | s2 B2] [A1 ; A2], with the scalings folded into B and a scaling of 1.
A module only one stage adapted gets zeros in the other's rows and columns. Full fine-tuning changes every weight
(no low-rank form) and DoRA rescales whole weight columns (not a sum): neither has an exact adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import artifacts, stages
from pipeline.core.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from pipeline.core.schema import Recipe

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# PEFT's keys: <module path>.lora_A.weight / .lora_B.weight (saved without the adapter's name)
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class Link:
    """One trained stage of the chain: its name and its adapter folder."""

    stage: str
    adapter: Path


def chain(recipe: Recipe, final: stages.Stage) -> tuple[str | Path, list[Link]]:
    """The run's base model, and the adapter of every trained stage from it to `final`, in training order; a
    ConfigError naming the stage where one trained every weight (no adapter reaches back to the base then)."""
    links: list[Link] = []
    stage = final
    while True:
        base, adapter = artifacts.model_location(stage.folder(recipe))
        if adapter is None:
            raise ConfigError(
                f"an adapter over the run's base needs every trained stage to train an adapter, but {stage.name} "
                "trained every weight: use merged weights (export hf / onnx), or train it with lora or qlora."
            )
        links.insert(0, Link(stage.name, adapter))
        if not artifacts.read_manifest(stage.folder(recipe))["model"]["base_inside_artifact"]:
            return base, links  # the run's base (the base stage's model, a Hub id or a folder)
        stage = stages.newest_trained_before(stage, recipe)


def _scaling(config: dict[str, Any]) -> float:
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def _refusal(link: Link, config: dict[str, Any]) -> str | None:
    if config.get("use_dora"):
        return "it trained DoRA, which rescales whole weight columns: the result is not a sum of low-rank updates"
    if config.get("modules_to_save"):
        return f"it trains whole modules too ({', '.join(config['modules_to_save'])}), which an adapter cannot carry"
    if config.get("bias", "none") != "none":
        return f"it trains biases (bias={config['bias']})"
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "it sets per-module ranks or alphas (rank_pattern / alpha_pattern), which the stacking does not read"
    return None


def stack(chain: list[Link], base_reference: str, target: Path) -> dict[str, Any]:
    """Write the adapter equal to applying `chain`'s adapters one after the other to the base; its record."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    configs = [json.loads((link.adapter / CONFIG).read_text()) for link in chain]
    for link, config in zip(chain, configs):
        reason = _refusal(link, config)
        if reason:
            raise PipelineError(f"the {link.stage} adapter cannot be part of an exact adapter export: {reason}.")
    weights = [load_file(str(link.adapter / WEIGHTS)) for link in chain]
    embedding = [key for tensors in weights for key in tensors if "lora_embedding" in key]
    if embedding:
        raise PipelineError(
            f"an adapter trains embeddings ({embedding[0]}), which vLLM's LoRA serving does not load; leave "
            "embed_tokens / lm_head out of lora.target_modules to export an adapter."
        )
    modules = sorted({key.removesuffix(A_SUFFIX) for tensors in weights for key in tensors if key.endswith(A_SUFFIX)})
    stacked: dict[str, Any] = {}
    for module in modules:
        shape = next(
            (tensors[module + A_SUFFIX].shape[1], tensors[module + B_SUFFIX].shape[0])
            for tensors in weights
            if module + A_SUFFIX in tensors
        )
        a_parts, b_parts = [], []
        for config, tensors in zip(configs, weights):
            if module + A_SUFFIX in tensors:
                a_parts.append(tensors[module + A_SUFFIX].float())
                b_parts.append(tensors[module + B_SUFFIX].float() * _scaling(config))
            else:  # this stage left the module alone: zero rows and columns keep the rank uniform
                a_parts.append(torch.zeros(config["r"], shape[0]))
                b_parts.append(torch.zeros(shape[1], config["r"]))
        stacked[module + A_SUFFIX] = torch.cat(a_parts, dim=0).contiguous()
        stacked[module + B_SUFFIX] = torch.cat(b_parts, dim=1).contiguous()
    rank = sum(config["r"] for config in configs)
    targets = sorted({name for config in configs for name in _names(config["target_modules"])})
    target.mkdir(parents=True, exist_ok=True)
    # lora_alpha = r: a scaling of 1, the stages' own scalings being in B already.
    LoraConfig(
        r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_reference,
    ).save_pretrained(str(target))  # fmt: skip
    save_file(stacked, str(target / WEIGHTS), metadata={"format": "pt"})
    return {
        "rank": rank,
        "target_modules": targets,
        "stages": [link.stage for link in chain],
        "stage_ranks": [config["r"] for config in configs],
    }


def _names(target_modules: Any) -> list[str]:
    return [target_modules] if isinstance(target_modules, str) else list(target_modules)


def base_weights_hash(base: str | Path) -> str:
    """One hash over the base model's weight files (their names and contents): what an adapter export and a
    server compare to know they mean the same base. A Hub id that is not a local folder is hashed by its name."""
    folder = Path(base)
    if not folder.is_dir():
        return "name:" + hashlib.sha256(str(base).encode()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode() + b"\0" + artifacts.sha256_file(file).encode() + b"\0")
    return digest.hexdigest()
