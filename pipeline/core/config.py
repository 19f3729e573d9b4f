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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import re

import yaml

from pipeline.errors import ConfigError


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
SourceFormat = Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion", "preference", "sharegpt_preference"]


@dataclass
class SourceConfig:
    """One input data set. Exactly one of `path` (local JSON/JSONL/Parquet/CSV) or `hub` (a dataset name)."""

    path: str | None = None
    hub: str | None = None
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
    seed: int = 42
    output_dir: str = "checkpoints"


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    eval_fraction: float = 0.05  # share of rows held out for evaluation
    max_length: int = 512  # tokens after the chat template; longer examples are dropped and counted
    on_error: Literal["fail", "skip"] = "fail"  # a malformed row stops the stage, or is skipped and counted
    min_keep_fraction: float = 0.5  # fail if fewer rows than this survive validation
    dedupe: bool = True  # exact de-duplication on normalised text
    num_proc: int = 1  # processes for tokenization

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


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # a Hub model id or a local folder; or leave empty and give `init`
    init: dict[str, Any] | None = None  # build a fresh model from these transformers config fields (model_type first)
    tokenizer: str | None = None  # tokenizer id or folder; defaults to name_or_path
    train_tokenizer_vocab_size: int | None = None  # train a BPE tokenizer on the training text instead
    chat_template: str | None = None  # "chatml" (shipped, with generation markers), a .jinja path, or the tokenizer's own
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False

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


@dataclass
class LoraConfigSection:
    """Fields of peft.LoraConfig, same names."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class QuantizationSection:
    """Fields of transformers.BitsAndBytesConfig used for QLoRA (4-bit), same names."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bnb_4bit_quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"


@dataclass
class TrainingSection:
    """Pipeline keys of a training stage; every other key must be a field of the TRL config class."""

    method: Literal["full", "lora", "qlora", "dora"] = "lora"
    global_batch_size: int = 16  # per-device batch x accumulation x processes, whatever the launch
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    launch_config: str | None = None  # accelerate config file used by `python -m pipeline.run`
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
            from pipeline import launch

            launch.check_method(self.method, section, launch.from_config_file(self.launch_config, f"{section}.launch_config"),
                                self.global_batch_size)  # fmt: skip
        for derived in ("gradient_accumulation_steps",):
            if derived in self.trainer:
                raise ConfigError(
                    f"{section}.{derived} is derived from {section}.global_batch_size and the number of processes; "
                    f"remove it and set global_batch_size instead."
                )


@dataclass
class SFTSection(TrainingSection):
    trl_config_class: typing.ClassVar[str] = "SFTConfig"


@dataclass
class DPOSection(TrainingSection):
    trl_config_class: typing.ClassVar[str] = "DPOConfig"


@dataclass
class EvaluateConfig:
    metrics: list[str] = field(default_factory=lambda: ["exact_match", "rouge", "sacrebleu"])
    backend: Literal["auto", "vllm", "hf"] = "auto"
    max_new_tokens: int = 32
    batch_size: int = 64
    max_examples: int | None = None  # evaluate on the first N held-out examples only
    gates: dict[str, float] = field(default_factory=dict)  # "dpo.exact_match": 0.6, "dpo-sft.exact_match": -0.02

    def validate(self) -> None:
        from pipeline.scoring import shipped_metrics

        shipped = shipped_metrics()
        for name in self.metrics:
            if name not in shipped:
                raise ConfigError(f"evaluate.metrics: '{name}' is not shipped; the shipped metrics are: {', '.join(shipped)}.")
        models = ("base", "sft", "dpo", "export")
        for key in self.gates:
            subject, dot, metric = key.partition(".")
            names = subject.split("-")
            if not dot or not metric or len(names) > 2 or any(n not in models for n in names):
                raise ConfigError(
                    f"evaluate.gates: '{key}' is not MODEL.METRIC (minimum) or MODEL-MODEL.METRIC (minimum difference) "
                    f"with models among {', '.join(models)}, e.g. dpo.exact_match or dpo-sft.exact_match."
                )
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("evaluate.max_new_tokens and evaluate.batch_size must be at least 1.")


@dataclass
class ExportConfig:
    targets: list[Literal["hf", "onnx"]] = field(default_factory=lambda: ["hf", "onnx"])
    onnx_precisions: list[Literal["fp32", "int4"]] = field(default_factory=lambda: ["fp32", "int4"])
    adapter_only: bool = False  # also export the adapter for vLLM's LoRA serving


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # defaults to run.name
    api_key_env: str = "PIPELINE_API_KEY"  # environment variable holding the API key, if any
    extra_args: list[str] = field(default_factory=list)  # passed through to vLLM's server


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source_path: str = field(default="<defaults>", compare=False, repr=False)

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.sft.validate("sft")
        self.dpo.validate("dpo")
        self.evaluate.validate()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _section_to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init and f.name != "source_path"}

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
def trl_field_types(class_name: str) -> dict[str, Any]:
    """Field names and types of a TRL config class (imports trl.trainer.*_config only, not the trainers)."""
    import trl

    cls = getattr(trl, class_name)
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation we cannot resolve is checked by TRL itself
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


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
        if key in own:
            kwargs[key] = _coerce(value, hints[key], path)
            continue
        if trl_class:
            trl_fields = trl_field_types(trl_class)
            if key in PIPELINE_OWNED_TRAINER_FIELDS:
                raise ConfigError(
                    f"{path} is set by the pipeline (from run.seed, data.max_length, the chat template or the "
                    f"artifact layout); remove it from the recipe."
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
    return key.split("."), value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{text}': '{'.'.join(parts[: depth + 1])}' is not an index of a list of {len(node)}.")
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
        raise ConfigError(f"{path}: a recipe is a mapping of sections (run, data, model, ...), not {type(tree).__name__}.")
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
