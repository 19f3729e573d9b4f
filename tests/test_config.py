"""Recipe strictness: shipped recipes parse; unknown keys, wrong types and contradictions fail early."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pydantic
import pytest
import yaml

from pipeline.core import models, schema
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError
from pipeline.core.schema import reference_markdown

from conftest import REPO, write_recipe

# Recipes with lm-eval benchmarks whose data is on the Hub: refused offline, valid where the Hub is reachable.
HUB_RECIPES = {"smollm2-135m-benchmarks.yaml"}


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if recipe.name in HUB_RECIPES:
        with pytest.raises(ConfigError, match=r"the lm-eval task 'gsm8k' reads its data from the Hub"):
            load_recipe(recipe)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    parsed = load_recipe(recipe)
    assert parsed.data.sources, "a recipe without data cannot run"
    assert parsed.sft.trainer, "training settings reach TRL"


def test_tiny_is_the_default_and_builds_a_model_offline() -> None:
    recipe = load_recipe("configs/tiny.yaml")
    assert recipe.model.init is not None and recipe.model.train_tokenizer_vocab_size
    assert recipe.model.chat_template == "chatml"


def test_dtype_auto_is_decided_when_the_recipe_is_read() -> None:
    recipe = load_recipe("configs/tiny.yaml", ["model.dtype=auto"])
    assert recipe.model.dtype == models.native_dtype()  # the manifests record what ran, never "auto"
    assert models.native_dtype({"avx2", "avx512f", "avx512_bf16"}) == "bfloat16"  # a CPU with these flags
    assert models.native_dtype({"avx2", "amx_bf16"}) == "bfloat16"
    assert models.native_dtype({"avx2", "avx512f"}) == "float32"


def _recipe(tmp_path: Path, **sections: dict) -> Path:
    return write_recipe(tmp_path, [{"path": "data/sft.jsonl"}], **sections)


def test_unknown_key_names_the_key_and_the_nearest_valid_one(tmp_path: Path) -> None:
    path = _recipe(tmp_path, sft={"learnig_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"unknown key 'sft\.learnig_rate'\. Did you mean 'learning_rate'\?"):
        load_recipe(path)


def test_unknown_key_in_pipeline_section(tmp_path: Path) -> None:
    path = _recipe(tmp_path, data={"eval_fration": 0.1})
    with pytest.raises(ConfigError, match=r"unknown key 'data\.eval_fration'\. Did you mean 'eval_fraction'"):
        load_recipe(path)


def test_unknown_section(tmp_path: Path) -> None:
    path = _recipe(tmp_path, trainer={"x": 1})
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'"):
        load_recipe(path)


def test_wrong_type_names_the_expected_type(tmp_path: Path) -> None:
    path = _recipe(tmp_path, data={"max_length": "long"})
    with pytest.raises(ConfigError, match=r"data\.max_length: expected int, got 'long'"):
        load_recipe(path)


def test_literal_choices_are_listed(tmp_path: Path) -> None:
    path = _recipe(tmp_path, sft={"method": "lora8"})
    with pytest.raises(ConfigError, match=r"sft\.method: expected one of 'full', 'lora', 'qlora', 'dora'"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}}, "give exactly one of 'name_or_path'"),
        ({"data": {"eval_fraction": 1.5}}, r"data\.eval_fraction must lie strictly between 0 and 1"),
        ({"sft": {"gradient_accumulation_steps": 4}}, r"derived from sft\.global_batch_size"),
        ({"sft": {"global_batch_size": 10, "per_device_train_batch_size": 4}}, "does not divide"),
        ({"sft": {"output_dir": "x"}}, r"sft\.output_dir is set by the pipeline"),
        ({"data": {"sources": [{"path": "a.jsonl", "hub": "b/c"}]}}, r"data\.sources\.0: give exactly one of 'path'"),
        ({"data": {"sources": [{"path": "a.jsonl", "weight": 0}]}}, r"data\.sources\.0\.weight must be positive"),
    ],
)
def test_contradictory_settings_fail_before_work(tmp_path: Path, sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe(tmp_path, **sections))


def test_trained_tokenizer_with_pretrained_model_is_refused(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"] = {"name_or_path": "some/model", "train_tokenizer_vocab_size": 500, "chat_template": "chatml"}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="would not match its embeddings"):
        load_recipe(path)


def test_precedence_defaults_then_yaml_then_command_line(tmp_path: Path) -> None:
    path = _recipe(tmp_path, sft={"learning_rate": 1e-3})
    recipe = load_recipe(path, ["sft.learning_rate=5e-4", "data.sources.0.weight=2", "evaluate.max_new_tokens=7"])
    assert recipe.sft.trainer["learning_rate"] == 5e-4  # CLI beats YAML
    assert recipe.data.sources[0].weight == 2.0
    assert recipe.evaluate.max_new_tokens == 7
    assert recipe.data.on_error == "fail"  # untouched default
    assert isinstance(load_recipe(path, ["sft.weight_decay=1e-2"]).sft.trainer["weight_decay"], float)
    assert load_recipe(path).sft.trainer["learning_rate"] == 1e-3  # YAML beats default


def test_override_errors(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_recipe(path, ["sft.learning_rate"])
    with pytest.raises(ConfigError, match=r"is not an index of a list of 1"):
        load_recipe(path, ["data.sources.3.weight=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'sft\.lerning_rate'"):
        load_recipe(path, ["sft.lerning_rate=1"])


def test_missing_recipe_lists_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"recipe nope\.yaml does not exist\. Shipped recipes: .*configs/tiny\.yaml"):
        load_recipe("nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\n  seed: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_recipe(path)


def test_resolved_config_round_trips_flat_trainer_keys(tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, sft={"learning_rate": 1e-3}))
    resolved = recipe.to_dict()
    assert resolved["sft"]["learning_rate"] == 1e-3 and "trainer" not in resolved["sft"]
    assert recipe.section_hash("data") == load_recipe(_recipe(tmp_path, sft={"learning_rate": 9.0})).section_hash(
        "data"
    )
    assert recipe.section_hash("sft") != load_recipe(_recipe(tmp_path, sft={"learning_rate": 9.0})).section_hash("sft")


def test_recipe_reference_is_current_and_explains_every_key() -> None:
    generated = reference_markdown()
    assert (REPO / "docs" / "recipe.md").read_text(encoding="utf-8") == generated, (
        "docs/recipe.md is out of date: python -m pipeline.recipe --reference > docs/recipe.md"
    )
    rows = [line for line in generated.splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    unexplained = [row.split("|")[1].strip() for row in rows if not row.rstrip("|").rsplit("|", 1)[-1].strip()]
    assert unexplained == []


def test_print_config_resolves_defaults_and_overrides() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.sft", "--print-config", "sft.learning_rate=0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    resolved = yaml.safe_load(result.stdout)
    assert resolved["sft"]["learning_rate"] == 0.5
    assert resolved["data"]["near_duplicates"]["mode"] == "off"  # a default the recipe does not write
    assert resolved["data"]["sources"][0]["weight"] == 1.0
    assert load_recipe(REPO / "configs" / "tiny.yaml", ["sft.learning_rate=0.5"]).to_dict() == resolved


def test_a_gate_is_overridden_by_its_dotted_name() -> None:
    recipe = load_recipe(
        REPO / "configs" / "tiny.yaml",
        ["evaluate.gates.sft-base.exact_match=0.4", "evaluate.gates.dpo.tool_call_rate=0.9"],
    )
    assert recipe.evaluate.gates["sft-base.exact_match"] == 0.4 and recipe.evaluate.gates["dpo.tool_call_rate"] == 0.9


def test_reading_a_recipe_imports_no_training_library_once_its_fields_are_cached(tmp_path: Path) -> None:
    """Every stage reads and checks the whole recipe, TRL's keys included; the field tables are cached per
    library version so that the stages which never train do not pay TRL's import (10 s on 2 cores)."""
    script = (
        "import sys; from pipeline.core.config import load_recipe; "
        "load_recipe('configs/tiny-grpo.yaml', ['sft.lr_scheduler_type=cosine', 'sft.lora.r=4']); "
        "print(sorted(m for m in ('trl', 'peft', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert runs[0].stdout.split("\n")[-2] == "['peft', 'transformers', 'trl']"
    assert runs[1].stdout.split("\n")[-2] == "[]"
    cached = sorted(p.name.split("-")[0] + ":" + p.stem.split("-")[-1] for p in tmp_path.rglob("*.json"))
    assert cached == ["peft:LoraConfig", "trl:DPOConfig", "trl:GRPOConfig", "trl:SFTConfig"]


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("lr_scheduler_type", "cosine", True),  # an enum of TRL's, or a str
        ("lr_scheduler_type", 3, False),
        ("report_to", ["none"], True),
        ("gradient_checkpointing_kwargs", {"use_reentrant": False}, True),
        ("max_grad_norm", 1, True),  # an int where a float is asked
        ("max_grad_norm", "1.0", False),
        ("eval_steps", None, True),
    ],
)
def test_a_cached_field_type_checks_as_the_library_type_does(key: str, value: object, accepted: bool) -> None:
    from trl import SFTConfig

    library = typing.get_type_hints(SFTConfig)[key]
    cached = schema.annotation_of(schema.portable_type(library))
    assert cached == schema.library_fields("trl", "SFTConfig")[key]
    checker = pydantic.TypeAdapter(cached, config=pydantic.ConfigDict(strict=True))
    try:
        checker.validate_python(value)
        checked = True
    except pydantic.ValidationError:
        checked = False
    assert checked == accepted


def test_a_recipe_extends_another_section_by_section_with_lists_replaced(tmp_path: Path) -> None:
    base = write_recipe(tmp_path, [{"path": "data/sft.jsonl"}, {"path": "data/tools.jsonl"}], sft={"max_steps": 5})
    child = tmp_path / "child.yaml"
    child.write_text(
        f"extends: {base.name}\nsft:\n  learning_rate: 0.002\ndata:\n  sources: [{{path: data/sft.jsonl}}]\n"
    )
    parent, extended = load_recipe(base), load_recipe(child)
    assert extended.sft.trainer["max_steps"] == 5 and extended.sft.trainer["learning_rate"] == 0.002
    assert [s.path for s in extended.data.sources] == ["data/sft.jsonl"]
    assert extended.model == parent.model and extended.run.name == parent.run.name
    base.write_text(base.read_text() + "extends: child.yaml\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: extends child.yaml, which extends it back"):
        load_recipe(child)
