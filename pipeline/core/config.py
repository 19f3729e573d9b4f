"""Reading a recipe: one YAML per run, dotted command-line overrides, every rule checked before any work starts.

Precedence is defaults < YAML < command line; a YAML with `extends: OTHER.yaml` is OTHER's keys with its own
merged over them. The schema (`pipeline.core.schema`) refuses unknown keys (naming the
nearest valid ones), wrong types (naming the expected type) and contradictions within the recipe; the rules that
need another module's knowledge are applied here, from that module: attention implementations and padding-free
micro-batches (models), reward names (rewards), launch configs (launch), metric and gate names (scoring, stages).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import harness, launch, models, rewards, scoring, stages
from pipeline.core.errors import ConfigError
from pipeline.core.schema import Recipe, build_recipe


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
        # A gate's name has a dot of its own: evaluate.gates.dpo.exact_match=0.6
        parts = [*parts[:2], ".".join(parts[2:])]
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


def check_with_modules(recipe: Recipe) -> None:
    """The rules that need another module's knowledge; each lives with the module that has it."""
    models.check_attention(recipe.model)
    if recipe.model.gguf is not None:
        models.GGUFFile.resolve(recipe.model.gguf)
    for name, section in (("sft", recipe.sft), ("dpo", recipe.dpo), ("grpo", recipe.grpo)):
        if section.launch_config:
            found = launch.from_config_file(section.launch_config, f"{name}.launch_config")
            launch.check_method(section.method, name, found, section.global_batch_size)
    for index, reward in enumerate(recipe.grpo.rewards):
        rewards.check_name(reward, f"grpo.rewards.{index}")
    models.check_padding_free_attention(recipe)
    scoring.check_evaluate_section(recipe.evaluate, stages.model_names())
    harness.check_section(recipe.evaluate)
    if "adapter" in recipe.export.targets:
        for stage in stages.trained_stages():
            method = stage.section(recipe).method
            if stage.applies(recipe) and method in ("full", "dora"):
                raise ConfigError(
                    f"export.targets has adapter, but {stage.name}.method is {method}: "
                    + ("full fine-tuning changes every weight, which no low-rank adapter carries"
                       if method == "full" else "DoRA rescales whole weight columns, which is not a sum of "
                       "low-rank updates vLLM can apply")
                    + ". Train with lora or qlora, or export hf / onnx only."
                )  # fmt: skip


def _read_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A recipe file's keys; with `extends: OTHER.yaml` (a path beside it), its keys merged over OTHER's: mappings
    key by key, anything else (lists included) replaced."""
    try:
        tree = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"{seen[-1]}: extends {path}, which cannot be read ({error.strerror}).") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)}).") from None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: a recipe is a mapping of sections (run, data, model, ...), not {type(tree).__name__}."
        )
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends names one recipe file (a path beside it), not {parent!r}.")
    other = (path.parent / parent).resolve()
    if other in (*seen, path.resolve()):
        raise ConfigError(f"{path}: extends {parent}, which extends it back.")
    return _merged(_read_tree(other, (*seen, path.resolve())), tree)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both else value
    return merged


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe, apply dotted overrides, check every key, type and cross-setting rule."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(str(p) for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        hint = f" Shipped recipes: {', '.join(shipped)}." if shipped else ""
        raise ConfigError(f"recipe {path} does not exist.{hint}")
    tree = _read_tree(path, ())
    for section, body in list(tree.items()):
        if body is None:
            tree[section] = {}
    for text in overrides:
        parts, value = _parse_override(text)
        _apply_override(tree, parts, value, text)
    model = tree.get("model")
    if isinstance(model, dict) and model.get("dtype") == "auto":
        model["dtype"] = models.native_dtype()  # manifests and config hashes record what ran, not "auto"
    recipe = build_recipe(tree, str(path))
    try:
        check_with_modules(recipe)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return recipe
