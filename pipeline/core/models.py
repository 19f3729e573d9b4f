"""Model construction and loading: the one place that turns the `model` section into a torch model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}[name]


def build_from_config(
    init: dict[str, Any], tokenizer: PreTrainedTokenizerBase, stop_token_ids: list[int], seed: int, dtype: str
) -> PreTrainedModel:
    """A freshly initialised model whose vocabulary and special tokens match `tokenizer`, seeded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    fields = dict(init)
    model_type = fields.pop("model_type")
    fields.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model.init could not build a '{model_type}' config: {error}") from None
    unknown = sorted(k for k in fields if not hasattr(config, k))
    if unknown:
        raise ConfigError(f"model.init has keys that a '{model_type}' config does not know: {', '.join(unknown)}.")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=stop_token_ids, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    return model


def parameter_count(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def load_merged(base_path: str | Path, adapter_dir: Path | None, dtype: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """A trained model in full precision: the base reloaded unquantized, with the adapter (if any) merged in.

    QLoRA adapters were trained against 4-bit weights, but merging into 4-bit weights would round the update
    away, so the base is always reloaded in `dtype` first.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
