"""Shared fixtures: recipes written into a temporary folder, run from the repository root, fully offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# Nothing may reach the Hub: the tests build every model and tokenizer locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes name data paths relative to the repository root, as users run them."""
    monkeypatch.chdir(REPO)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_recipe(tmp_path: Path, sources: list[dict], **sections: dict) -> Path:
    """A small recipe: the given sources, a tiny model with a trained tokenizer, artifacts under tmp_path."""
    recipe = {
        "run": {"name": "t", "seed": 7, "output_dir": str(tmp_path / "checkpoints")},
        "data": {"sources": sources, "eval_fraction": 0.2, "max_length": 256, "min_keep_fraction": 0.0},
        "model": {"init": dict(TINY_MODEL), "train_tokenizer_vocab_size": 300, "chat_template": "chatml"},
    }
    for name, body in sections.items():
        recipe.setdefault(name, {}).update(body)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def chat_rows(count: int, offset: int = 0) -> list[dict]:
    """Distinct, valid chat rows (distinct prompts, so the split has something on both sides)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What number comes after {i}?"},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(offset, offset + count)
    ]


def preference_rows(count: int) -> list[dict]:
    return [
        {"prompt": f"Is {i} even or odd?", "chosen": "odd" if i % 2 else "even", "rejected": "even" if i % 2 else "odd"}
        for i in range(count)
    ]


def run_module(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def default_pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The offline default recipe (configs/tiny.yaml) through every stage once per session, as `make demo` runs it:
    the model that the tests of the default's figures, of serving and of tool calling share."""
    from pipeline import run
    from pipeline.core.config import load_recipe

    overrides = [f"run.output_dir={tmp_path_factory.mktemp('default')}"]
    recipe = load_recipe("configs/tiny.yaml", overrides)
    rows = run.run(recipe, overrides)
    return {"recipe": recipe, "overrides": overrides, "rows": rows}
