"""Recipe parsing: one YAML per run, strict, with dotted command-line overrides.

Precedence is defaults < YAML < command line. Every key is checked before any work starts: unknown keys
name the nearest valid ones, wrong types name the expected type, contradictory settings say which to change.
The `sft` and `dpo` sections take TRL's `SFTConfig` / `DPOConfig` field names directly (`learning_rate`,
`num_train_epochs`, ...) beside the pipeline's own keys, so nothing is renamed on the way to TRL.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.errors import ConfigError


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; recipes mean a float, as YAML 1.2 and JSON do."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


PREFERENCE_FORMATS = ("preference", "sharegpt_preference")
SourceFormat = Literal[
    "auto", "messages", "alpaca", "sharegpt", "prompt_completion", "preference", "sharegpt_preference"
]


@dataclass
class SourceConfig:
    """One input data set. Exactly one of `path` (local JSON/JSONL/Parquet/CSV) or `hub` (a dataset name)."""

    path: str | None = None  # a local .json, .jsonl, .parquet or .csv file, relative to the working folder
    hub: str | None = None  # a Hugging Face Hub dataset name (needs the Hub, or its cache)
    hub_config: str | None = None  # the dataset's configuration name, if it has several
    split: str = "train"  # the split read from a Hub dataset
    format: SourceFormat = "auto"  # detected from the columns when "auto"
    weight: float = 1.0  # training rows are repeated (or sub-sampled) by this factor after the split

    def validate(self, where: str) -> None:
        if (self.path is None) == (self.hub is None):
            raise ConfigError(f"{where}: give exactly one of 'path' (a local file) or 'hub' (a dataset name).")
        if self.weight <= 0:
            raise ConfigError(f"{where}.weight must be positive (got {self.weight}); remove the source to drop it.")

    @property
    def label(self) -> str:
        return self.path if self.path is not None else f"hub:{self.hub}"


@dataclass
class RunConfig:
    name: str = "tiny"  # artifacts go to <output_dir>/<name>/<stage>/
    seed: int = 42  # seeds data splits, model initialisation and every training stage
    output_dir: str = "checkpoints"  # where every run's folder goes
    # Experiment trackers every training stage and the evaluation report to (transformers' integration names, e.g.
    # tensorboard, trackio, wandb); their files go to <output_dir>/<name>/tracking/<stage>/. Empty: none.
    report_to: list[str] = field(default_factory=list)


@dataclass
class NearDuplicatesConfig:
    """Near-duplicate prompts by meaning (pipeline/core/near_duplicates.py): all-MiniLM-L6-v2 embeddings of each
    prompt's user turns, compared by cosine similarity with FAISS."""

    mode: Literal["off", "report", "drop"] = "off"  # report: counts and examples in stats.json; drop: also remove them
    threshold: float = 0.9  # cosine similarity at or above which two prompts are near twins
    # within_train: pairs of training prompts; held_out_vs_train: held-out prompts with a near twin in training
    scope: list[Literal["within_train", "held_out_vs_train"]] = field(
        default_factory=lambda: ["within_train", "held_out_vs_train"]
    )
    examples: int = 5  # closest (and least close) pairs per scope shown in stats.json

    def validate(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(
                f"data.near_duplicates.threshold must lie in (0, 1] (got {self.threshold}): it is a cosine similarity; "
                "at 0.9, 90-97% of the pairs flagged in benchmarks/near_duplicates.py were paraphrases."
            )
        if not self.scope or len(set(self.scope)) != len(self.scope):
            raise ConfigError(
                "data.near_duplicates.scope must list within_train, held_out_vs_train or both, once each (got "
                f"{self.scope}); to check nothing, set data.near_duplicates.mode: off."
            )
        if self.examples < 0:
            raise ConfigError(f"data.near_duplicates.examples must be 0 or more (got {self.examples}).")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # the data sets read, each described below
    eval_fraction: float = 0.05  # share of rows held out for evaluation
    max_length: int = 512  # tokens after the chat template; longer examples are dropped and counted
    on_error: Literal["fail", "skip"] = "fail"  # a malformed row stops the stage, or is skipped and counted
    min_keep_fraction: float = 0.5  # fail if fewer rows than this survive validation
    dedupe: bool = True  # exact de-duplication on normalised text
    num_proc: int = 1  # processes for tokenization
    near_duplicates: NearDuplicatesConfig = field(default_factory=NearDuplicatesConfig)  # by meaning, described below

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: list at least one source (a 'path' or a 'hub' name).")
        for index, source in enumerate(self.sources):
            source.validate(f"data.sources.{index}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must lie strictly between 0 and 1 (got {self.eval_fraction}).")
        if not 0 <= self.min_keep_fraction <= 1:
            raise ConfigError(f"data.min_keep_fraction must lie in [0, 1] (got {self.min_keep_fraction}).")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be at least 8 tokens (got {self.max_length}).")
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be at least 1 (got {self.num_proc}).")
        self.near_duplicates.validate()


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # a Hub model id or a local folder; or leave empty and give `init`
    init: dict[str, Any] | None = None  # build a fresh model from these transformers config fields (model_type first)
    tokenizer: str | None = None  # tokenizer id or folder; defaults to name_or_path
    train_tokenizer_vocab_size: int | None = None  # train a BPE tokenizer on the training text instead
    # "chatml" (shipped, with generation markers), a .jinja path, or the tokenizer's own
    chat_template: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights' dtype for training, evaluation and serving
    # transformers' attention implementation for every load (training, merge, HF evaluation): sdpa, eager,
    # flash_attention_2, flash_attention_3, flex_attention, or a hub kernel; None lets transformers choose.
    attn_implementation: str | None = None
    revision: str | None = None  # a Hub branch, tag or commit of name_or_path
    trust_remote_code: bool = False  # run the model repository's own code (only for repositories you trust)

    def validate(self) -> None:
        if (self.name_or_path is None) == (self.init is None):
            raise ConfigError(
                "model: give exactly one of 'name_or_path' (a pretrained model) or 'init' (config fields to "
                "build a fresh model from)."
            )
        if self.init is not None and "model_type" not in self.init:
            raise ConfigError("model.init needs 'model_type' (e.g. llama) to know which architecture to build.")
        if self.train_tokenizer_vocab_size is not None:
            if self.tokenizer is not None:
                raise ConfigError(
                    "model.tokenizer and model.train_tokenizer_vocab_size contradict each other: load a tokenizer "
                    "or train one, not both."
                )
            if self.name_or_path is not None:
                raise ConfigError(
                    "model.train_tokenizer_vocab_size is set with a pretrained model.name_or_path: a new tokenizer "
                    "would not match its embeddings. Train a tokenizer only with model.init."
                )
            if self.train_tokenizer_vocab_size < 64:
                raise ConfigError("model.train_tokenizer_vocab_size must be at least 64.")
            if self.chat_template is None:
                raise ConfigError(
                    "model.train_tokenizer_vocab_size is set but model.chat_template is empty: a trained tokenizer "
                    "has no chat template; set model.chat_template: chatml."
                )
        elif self.init is not None and self.tokenizer is None:
            raise ConfigError(
                "model.init builds a model without a tokenizer: set model.tokenizer (an id or folder) or "
                "model.train_tokenizer_vocab_size."
            )
        if self.attn_implementation is not None:
            from pipeline.core import models

            names = models.attention_names()
            if self.attn_implementation not in names and not models.is_hub_kernel(self.attn_implementation):
                raise ConfigError(
                    f"model.attn_implementation '{self.attn_implementation}' is not an attention implementation of "
                    f"transformers: use one of {', '.join(names)}, a Hub kernel as ORG/REPO (e.g. "
                    "kernels-community/flash-attn2), or leave it empty for transformers' default (sdpa)."
                )


# The adapter a LoRA-family method trains when the recipe names nothing else; any other peft.LoraConfig field
# can be set beside these (the pipeline sets use_dora and task_type itself).
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
PIPELINE_OWNED_LORA_FIELDS = frozenset({"use_dora", "task_type"})


@dataclass
class QuantizationSection:
    """Fields of transformers.BitsAndBytesConfig used for QLoRA (4-bit), same names."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"  # the 4-bit number format
    bnb_4bit_use_double_quant: bool = True  # quantize the quantization constants too (about 0.4 bits per weight less)
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the matmuls
    # storage dtype (FSDP/ZeRO-3 want the compute dtype)
    bnb_4bit_quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"


@dataclass
class TrainingSection:
    """Pipeline keys of a training stage; every other key must be a field of the TRL config class."""

    # which weights train: all, or an adapter (4-bit base for qlora)
    method: Literal["full", "lora", "qlora", "dora"] = "lora"
    # rows per optimizer step: per-device batch x accumulation x processes, whatever the launch
    global_batch_size: int = 16
    lora: dict[str, Any] = field(default_factory=lambda: dict(LORA_DEFAULTS))  # peft.LoraConfig fields
    quantization: QuantizationSection = field(default_factory=QuantizationSection)  # the 4-bit base of qlora
    # accelerate config file (accelerate_configs/) `python -m pipeline.run` launches with
    launch_config: str | None = None
    trainer: dict[str, Any] = field(default_factory=dict)  # TRL config fields, given flat in the YAML

    trl_config_class: typing.ClassVar[str] = ""

    def validate(self, section: str) -> None:
        if self.global_batch_size < 1:
            raise ConfigError(f"{section}.global_batch_size must be at least 1 (got {self.global_batch_size}).")
        per_device = self.trainer.get("per_device_train_batch_size")
        if per_device is not None and self.global_batch_size % per_device:
            raise ConfigError(
                f"{section}.per_device_train_batch_size={per_device} does not divide "
                f"{section}.global_batch_size={self.global_batch_size}."
            )
        if self.launch_config:
            from pipeline.core import launch

            launch.check_method(
                self.method,
                section,
                launch.from_config_file(self.launch_config, f"{section}.launch_config"),
                self.global_batch_size,
            )
        if self.trainer.get("packing") and self.trainer.get("packing_strategy") == "wrapped":
            raise ConfigError(
                f"{section}.packing_strategy 'wrapped' cuts the rows into fixed-length chunks in which every token "
                "attends to the rows before it: rows leak into each other. Use 'bfd' (TRL's default) or 'bfd_split', "
                "which keep each row apart."
            )
        for derived in ("gradient_accumulation_steps",):
            if derived in self.trainer:
                raise ConfigError(
                    f"{section}.{derived} is derived from {section}.global_batch_size and the number of processes; "
                    "remove it and set global_batch_size instead."
                )


@dataclass
class SFTSection(TrainingSection):
    trl_config_class: typing.ClassVar[str] = "SFTConfig"


@dataclass
class DPOSection(TrainingSection):
    trl_config_class: typing.ClassVar[str] = "DPOConfig"


GRPOGeneration = Literal["hf", "vllm-colocate", "vllm-server"]


def _grpo_default_generations() -> int:
    from trl import GRPOConfig

    return next(f.default for f in dataclasses.fields(GRPOConfig) if f.name == "num_generations")


@dataclass
class GRPOSection(TrainingSection):
    """Online RL with TRL's GRPOTrainer on the SFT rows' prompts, scored by verifiable rewards
    (pipeline/core/rewards.py). `global_batch_size` counts completions: each optimizer step sees
    global_batch_size / num_generations prompts."""

    # Built-in reward names or user functions as module:function; the stage runs only for a recipe that lists one.
    rewards: list[str] = field(default_factory=list)
    # Who samples the completions: HF generate (any device), or vLLM on a GPU, inside the training processes
    # (colocate) or from `trl vllm-serve` (server).
    generation: GRPOGeneration = "hf"
    # data.sources (by path or hub:name) whose prompts GRPO trains on; empty: all
    sources: list[str] = field(default_factory=list)
    # all: every training prompt; unsolved: only those the start model's greedy answer gets wrong (not the exact
    # reference text or tool calls), where a group's completions can differ and so teach something
    prompts: Literal["all", "unsolved"] = "all"

    trl_config_class: typing.ClassVar[str] = "GRPOConfig"

    def validate(self, section: str, source_labels: tuple[str, ...] = ()) -> None:
        super().validate(section)
        from pipeline.core import rewards

        for index, name in enumerate(self.rewards):
            rewards.check_name(name, f"{section}.rewards.{index}")
        weights = self.trainer.get("reward_weights")
        if weights is not None and len(weights) != len(self.rewards):
            raise ConfigError(
                f"{section}.reward_weights has {len(weights)} weights for the {len(self.rewards)} rewards of"
                f" {section}.rewards ({', '.join(self.rewards) or 'none'}): give one weight per reward, in the same"
                " order."
            )
        for key in ("use_vllm", "vllm_mode"):
            if key in self.trainer:
                raise ConfigError(
                    f"{section}.{key} is set by the pipeline from {section}.generation; remove it and set "
                    f"{section}.generation to hf, vllm-colocate or vllm-server."
                )
        generations = self.trainer.get("num_generations") or _grpo_default_generations()
        if self.global_batch_size % generations:
            raise ConfigError(
                f"{section}.global_batch_size={self.global_batch_size} counts completions, {generations} per prompt "
                f"({section}.num_generations), so it must be a multiple of {generations}: set it to "
                f"{max(1, self.global_batch_size // generations) * generations} or change {section}.num_generations."
            )
        unknown = [s for s in self.sources if s not in source_labels]
        if unknown:
            raise ConfigError(
                f"{section}.sources names {', '.join(unknown)}, which data.sources does not list. Name sources as "
                f"data.sources does ({', '.join(source_labels)}), or leave {section}.sources empty for all."
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
    from pipeline.core import models

    sft, name = recipe.sft, recipe.model.attn_implementation
    if not trains_padding_free(sft.trainer) or models.attends_within_rows(name):
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
    smaller = f"sft.per_device_train_batch_size: {fits[0]} ({fits[0]} x {length} tokens); " if fits else ""
    raise ConfigError(
        f"{how} trains padding-free micro-batches of up to {rows} rows x {length} tokens (data.max_length) ="
        f" {rows * length:,} tokens with model.attn_implementation {name or 'unset (sdpa)'}, which keeps the rows apart"
        " only under a dense mask over the whole micro-batch: its cost grows with the square of that length (allowed"
        f" up to {DENSE_ATTENTION_TOKEN_LIMIT:,} tokens). Set model.attn_implementation to one that attends within each"
        " row: flash_attention_2 or flash_attention_3 (CUDA; the flash-attn package, or the kernels package, which"
        " fetches the kernel from the Hub), kernels-community/flash-attn2 (that Hub kernel by name), or flex_attention"
        f" (CUDA; it has no backward pass on the CPU). Or set {smaller}or sft.packing: false and sft.padding_free:"
        " false (padded micro-batches)."
    )


@dataclass
class EvaluateConfig:
    # text metrics of the answers
    metrics: list[str] = field(default_factory=lambda: ["exact_match", "rouge", "sacrebleu"])
    backend: Literal["auto", "vllm", "hf"] = "auto"  # generation engine; auto: vLLM when installed, else transformers
    max_new_tokens: int = 32  # longest answer generated per held-out prompt
    batch_size: int = 64  # prompts per generation batch (transformers backend)
    max_examples: int | None = None  # evaluate on the first N held-out examples only
    gates: dict[str, float] = field(default_factory=dict)  # "dpo.exact_match": 0.6, "dpo-sft.exact_match": -0.02

    def validate(self, source_labels: tuple[str, ...] = ()) -> None:
        from pipeline.core.scoring import shipped_metrics

        shipped = shipped_metrics()
        for name in self.metrics:
            if name not in shipped:
                raise ConfigError(
                    f"evaluate.metrics: '{name}' is not shipped; the shipped metrics are: {', '.join(shipped)}."
                )
        from pipeline.core import stages

        models = tuple(stage.name for stage in stages.STAGES if stage.model or stage.name == "base")
        for key in self.gates:
            subject, dot, metric = key.partition(".")
            names = subject.split("-")
            if not dot or not metric or len(names) > 2 or any(n not in models for n in names):
                raise ConfigError(
                    f"evaluate.gates: '{key}' is not MODEL.METRIC (minimum) or MODEL-MODEL.METRIC (minimum difference) "
                    f"with models among {', '.join(models)}, e.g. dpo.exact_match, dpo-sft.exact_match, or "
                    "dpo-sft.exact_match@data/tools.jsonl for the held-out rows of one data source."
                )
            source = metric.partition("@")[2]
            if source and source not in source_labels:
                raise ConfigError(
                    f"evaluate.gates: '{key}' names the source '{source}', which data.sources does not have; its "
                    f"sources are: {', '.join(source_labels)}."
                )
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("evaluate.max_new_tokens and evaluate.batch_size must be at least 1.")


@dataclass
class ExportConfig:
    # merged weights for vLLM, ONNX
    targets: list[Literal["hf", "onnx"]] = field(default_factory=lambda: ["hf", "onnx"])
    # ONNX variants written
    onnx_precisions: list[Literal["fp32", "int4"]] = field(default_factory=lambda: ["fp32", "int4"])
    adapter_only: bool = False  # also export the adapter for vLLM's LoRA serving


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # bind address of the server (0.0.0.0 to serve other machines)
    port: int = 8000  # its port
    served_model_name: str | None = None  # defaults to run.name
    api_key_env: str = "PIPELINE_API_KEY"  # environment variable holding the API key, if any
    extra_args: list[str] = field(default_factory=list)  # passed through to vLLM's server
    shutdown_grace: float = 5.0  # seconds requests in flight may still run after SIGTERM; open streams then end
    max_n: int = 8  # most sequences one request may ask for (n times its prompts); more gets a 400
    max_tokens: int | None = None  # most new tokens one request may ask for; None: the model length

    def validate(self) -> None:
        if self.shutdown_grace < 0 or self.max_n < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ConfigError(
                f"serve.shutdown_grace must be at least 0 seconds (got {self.shutdown_grace}), serve.max_n at least 1 "
                f"(got {self.max_n}) and serve.max_tokens at least 1 or empty (got {self.max_tokens})."
            )


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source_path: str = field(default="<defaults>", compare=False, repr=False)

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.sft.validate("sft")
        self.dpo.validate("dpo")
        self.grpo.validate("grpo", tuple(source.label for source in self.data.sources))
        check_padding_free_attention(self)
        self.evaluate.validate(tuple(source.label for source in self.data.sources))
        self.serve.validate()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _section_to_dict(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.init and f.name != "source_path"
        }

    def section_hash(self, *sections: str) -> str:
        """A content hash of the named sections (dotted, e.g. 'run.seed'), for a stage's up-to-date check."""
        full = self.to_dict()
        picked = {}
        for name in sections:
            value: Any = full
            for part in name.split("."):
                value = value[part]
            picked[name] = value
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def _section_to_dict(section: Any) -> Any:
    if dataclasses.is_dataclass(section):
        out = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.name == "trainer":
                out.update(value)  # flat again, as written in the YAML
            else:
                out[f.name] = _section_to_dict(value)
        return out
    if isinstance(section, list):
        return [_section_to_dict(item) for item in section]
    return section


# --------------------------------------------------------------------------------------------- parsing


@functools.lru_cache(maxsize=None)
def library_field_types(module: str, class_name: str) -> dict[str, Any]:
    """Field names and types of a library's config dataclass (TRL's SFTConfig, peft's LoraConfig)."""
    import importlib

    cls = getattr(importlib.import_module(module), class_name)
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation we cannot resolve is checked by the library itself
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def trl_field_types(class_name: str) -> dict[str, Any]:
    return library_field_types("trl", class_name)


def _library_fields(
    value: Any, where: str, module: str, class_name: str, owned: frozenset[str], owner: str
) -> dict[str, Any]:
    """A mapping whose keys are fields of a library config class, each checked against that field's type."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of {class_name} fields, got {value!r}.")
    fields = library_field_types(module, class_name)
    checked = {}
    for key, item in value.items():
        path = f"{where}.{key}"
        if key in owned:
            raise ConfigError(f"{path} is set by the pipeline ({owner}); remove it from the recipe.")
        if key not in fields:
            raise ConfigError(
                f"unknown key '{path}' ({class_name} has no such"
                f" field).{_suggest(str(key), [f for f in fields if f not in owned])}"
            )
        checked[key] = _coerce(item, fields[key], path)
    return checked


# Fields of the TRL config that the pipeline sets itself, from its own keys or the artifact layout.
PIPELINE_OWNED_TRAINER_FIELDS = frozenset({"output_dir", "seed", "max_length", "assistant_only_loss"})


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if close:
        return f" Did you mean {', '.join(repr(c) for c in close)}?"
    return f" Valid keys: {', '.join(sorted(valid)[:40])}{' ...' if len(valid) > 40 else ''}."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "list of " + _type_name(typing.get_args(tp)[0])
    if origin is dict:
        return "mapping"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float). Raises ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}.")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}.")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{where}.{i}") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        _, value_type = typing.get_args(tp)
        return {k: _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}.")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    own = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("trainer", "source_path")]
    kwargs: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    trl_class = getattr(cls, "trl_config_class", "")
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key == "lora" and trl_class:
            kwargs[key] = {
                **LORA_DEFAULTS,
                **_library_fields(
                    value, path, "peft", "LoraConfig", PIPELINE_OWNED_LORA_FIELDS, f"from {where}.method"
                ),
            }
            continue
        if key in own:
            kwargs[key] = _coerce(value, hints[key], path)
            continue
        if trl_class:
            trl_fields = trl_field_types(trl_class)
            if key in PIPELINE_OWNED_TRAINER_FIELDS:
                raise ConfigError(
                    f"{path} is set by the pipeline (from run.seed, data.max_length, the chat template or the "
                    "artifact layout); remove it from the recipe."
                )
            if key in trl_fields:
                trainer[key] = _coerce(value, trl_fields[key], path)
                continue
            valid = own + [k for k in trl_fields if k not in PIPELINE_OWNED_TRAINER_FIELDS]
        else:
            valid = own
        raise ConfigError(f"unknown key '{path}'.{_suggest(str(key), valid)}")
    if trl_class:
        kwargs["trainer"] = trainer
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not KEY=VALUE (e.g. sft.learning_rate=1e-4).")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({error}).") from None
    parts = key.split(".")
    if parts[:2] == ["evaluate", "gates"] and len(parts) > 3:
        parts = [
            *parts[:2],
            ".".join(parts[2:]),
        ]  # a gate's name has a dot of its own: evaluate.gates.dpo.exact_match=0.6
    return parts, value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override '{text}': '{'.'.join(parts[: depth + 1])}' is not an index of a list of {len(node)}."
                )
            node = node[int(part)]
        else:
            if node.get(part) is None:  # `section:` with nothing under it reads as None
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{text}': '{last}' is not an index of a list of {len(node)}.")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override '{text}': '{'.'.join(parts[:-1])}' is a value, not a section.")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe, apply dotted overrides, check every key, type and cross-setting rule."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(str(p) for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        hint = f" Shipped recipes: {', '.join(shipped)}." if shipped else ""
        raise ConfigError(f"recipe {path} does not exist.{hint}")
    try:
        tree = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)}).") from None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: a recipe is a mapping of sections (run, data, model, ...), not {type(tree).__name__}."
        )
    for section, body in list(tree.items()):
        if body is None:
            tree[section] = {}
    for text in overrides:
        parts, value = _parse_override(text)
        _apply_override(tree, parts, value, text)
    try:
        recipe = _build(Recipe, tree, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    recipe.source_path = str(path)
    try:
        recipe.validate()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return recipe


# ----------------------------------------------------------------------------------- resolved recipe and reference


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe as the stages see it: every key, defaults filled in, overrides applied."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False, width=120)


TRAINER_CLASSES = {"sft": "trl.SFTConfig", "dpo": "trl.DPOConfig", "grpo": "trl.GRPOConfig"}


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the one on its line, else the comment lines just above it."""
    import inspect

    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+): [^=]+?(?:= .*?)?(?:  # (.*))?$", stripped)
        if match and line.startswith("    ") and not line.startswith("     "):
            comments[match.group(1)] = match.group(2) or " ".join(above)
        above = []
    return comments


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "see below"
    return f"`{json.dumps(value)}`"


def reference_markdown() -> str:
    """Every recipe key with its type, default and meaning, generated from the dataclasses above (docs/recipe.md)."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from `pipeline/core/config.py` by `python -m pipeline.core.config --reference > docs/recipe.md`;",
        "a test fails when this file is out of date. `--print-config` on any stage (or `pipeline.run`) prints a",
        "recipe resolved with every default. Besides the keys below, a training section (`sft`, `dpo`, `grpo`) takes",
        "any field of its TRL config class, written flat in the section (e.g. `sft.learning_rate`), except",
        f"{', '.join(f'`{name}`' for name in sorted(PIPELINE_OWNED_TRAINER_FIELDS))}, which the pipeline sets, and",
        "`gradient_accumulation_steps`, derived from `global_batch_size`.",
    ]
    hints = typing.get_type_hints

    def section(cls: type, prefix: str) -> None:
        doc = inspect_doc(cls)
        lines.extend(["", f"## `{prefix}`", ""])
        if doc:
            lines.extend([doc, ""])
        trainer = TRAINER_CLASSES.get(prefix)
        if trainer:
            lines.extend([f"Any `{trainer}` field is also accepted here.", ""])
        lines.extend(["| key | type | default | meaning |", "| --- | --- | --- | --- |"])
        comments = {k: v for base in reversed(cls.__mro__[:-1]) for k, v in _field_comments(base).items()}
        nested = []
        types_of = hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in ("source_path", "trainer"):
                continue
            tp = types_of[f.name]
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            if dataclasses.is_dataclass(inner):
                nested.append((inner, f"{prefix}.{f.name}" + ("[]" if inner is not tp else "")))
            meaning = comments.get(f.name, "").replace("|", "\\|")
            lines.append(
                f"| `{prefix}.{f.name}` | {_type_name(tp).replace('|', 'or')} | {_default_text(f)} | {meaning} |"
            )
        for inner, name in nested:
            section(inner, name)

    for f in dataclasses.fields(Recipe):
        if f.init and f.name != "source_path":
            section(typing.get_type_hints(Recipe)[f.name], f.name)
    return "\n".join(lines) + "\n"


def inspect_doc(cls: type) -> str:
    own = cls.__dict__.get("__doc__")
    return " ".join(own.split()) if own and not own.startswith(cls.__name__ + "(") else ""


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.core.config",
        description=(
            "Print a recipe resolved with every default (the same as --print-config on any stage), or the "
            "reference of every recipe key."
        ),
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="recipe YAML (default: configs/tiny.yaml)")
    parser.add_argument("--reference", action="store_true", help="print the recipe reference (docs/recipe.md) instead")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of recipe keys")
    args = parser.parse_args(argv)
    print(reference_markdown() if args.reference else resolved_yaml(load_recipe(args.config, args.overrides)), end="")


if __name__ == "__main__":
    import sys

    from pipeline.core.cli import run_cli

    sys.exit(run_cli(main))
