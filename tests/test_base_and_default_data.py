"""The offline default: shipped data regenerates identically, the tokenizer and base-model artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import artifacts, base, data
from pipeline.config import load_recipe
from pipeline.errors import MissingArtifactError

from conftest import REPO, chat_rows, write_jsonl, write_recipe


def test_shipped_data_regenerates_byte_for_byte(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "data" / "make_data.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("sft.jsonl", "preference.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / name).read_bytes(), name


def test_shipped_data_sizes_and_answers_are_checkable() -> None:
    sft = [json.loads(line) for line in (REPO / "data" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (REPO / "data" / "preference.jsonl").read_text().splitlines()]
    assert len(sft) >= 5000 and len(pairs) >= 1000
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    successor = [r["messages"] for r in sft if r["messages"][-2]["content"].startswith("What number comes after")]
    for messages in successor[:50]:
        n = int(messages[-2]["content"].removeprefix("What number comes after ").rstrip("?"))
        assert messages[-1]["content"] == str(n + 1)


@pytest.fixture(scope="module")
def base_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, "object"]:
    tmp_path = tmp_path_factory.mktemp("base")
    recipe = load_recipe(write_recipe(tmp_path, [{"path": str(write_jsonl(tmp_path / "c.jsonl", chat_rows(30)))}]))
    data.run(recipe)
    return base.run(recipe), recipe


def test_base_artifact_layout_and_stop_tokens(base_artifact) -> None:
    folder, _ = base_artifact
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "manifest.json"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
    stop = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(stop) == sorted([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    assert json.loads((folder / artifacts.MANIFEST).read_text())["metrics"]["parameters"] == sum(p.numel() for p in model.parameters())


def test_base_is_seeded(base_artifact, tmp_path: Path) -> None:
    folder, recipe = base_artifact
    again = base.run(recipe, force=True)
    assert artifacts.sha256_file(again / "model.safetensors") == json.loads((again / "manifest.json").read_text())["outputs"]["model.safetensors"]["sha256"]
    first_hash = artifacts.sha256_file(again / "model.safetensors")
    base.run(recipe, force=True)
    assert artifacts.sha256_file(folder / "model.safetensors") == first_hash
    import dataclasses

    reseeded = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, seed=recipe.run.seed + 1))
    assert reseeded.section_hash(*artifacts.STAGE_CONFIG_SECTIONS['base']) != recipe.section_hash(*artifacts.STAGE_CONFIG_SECTIONS['base'])


def test_base_refuses_without_a_complete_data_artifact(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, [{"path": "data/sft.jsonl"}]))
    with pytest.raises(MissingArtifactError, match=r"needs the 'data' artifact, but .* does not exist\. Run `python -m pipeline\.data --config .*recipe\.yaml` first"):
        base.run(recipe)
    (recipe.run_dir / "data").mkdir(parents=True)
    (recipe.run_dir / "data" / "manifest.json").write_text('{"status": "running"}')
    with pytest.raises(MissingArtifactError, match="is incomplete"):
        base.run(recipe)
