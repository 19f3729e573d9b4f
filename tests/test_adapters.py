"""Many fine-tunes, one server: runs of the default recipe with LoRA stages, exported as adapters over one base and
served side by side by one vLLM server, each answering as its own run's merged export served alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pipeline import base, data, dpo, export, sft
from pipeline.core import artifacts, chat, scoring
from pipeline.core.config import load_recipe
from serving import server_process

from conftest import REPO

API_KEY = "adapters-key"
# Prompt log-probabilities of the same text, through vLLM's LoRA path and through the merged weights: the two round
# differently (x W + (x A) B against x (W + B A)). Measured 9.5e-7 at most on the default model; 100x that allowed.
LOGPROB_TOLERANCE = 1e-4
PROMPTS = 6


def lora_run(root: Path, name: str, *overrides: str, stages: tuple = (sft, dpo)):
    """A short run of the default recipe with LoRA stages, exported merged and as one adapter."""
    recipe = load_recipe(
        REPO / "configs" / "tiny.yaml",
        [
            f"run.output_dir={root}", f"run.name={name}", "sft.method=lora", "sft.max_steps=4", "dpo.max_steps=4",
            "export.targets=[hf,adapter]", "evaluate.gates={}", *overrides,
        ],
    )  # fmt: skip
    for stage in (data, base, *stages, export):
        stage.run(recipe)
    return recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    return {
        # Two fine-tunes of one base (the same seed builds the same base weights): SFT + DPO, and SFT alone.
        "tiny-a": lora_run(root, "tiny-a"),
        "tiny-b": lora_run(root, "tiny-b", "sft.learning_rate=3e-3", stages=(sft,)),
        # Another base (another seed).
        "tiny-c": lora_run(root, "tiny-c", "run.seed=8", stages=(sft,)),
    }


def start(export_dir: Path, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = server_process.free_port()
    process = server_process.start_vllm_server(
        export_dir, port, log, ("--config", "configs/tiny.yaml", *options), env={"PIPELINE_API_KEY": API_KEY}
    )
    server_process.wait_healthy(port, process, log, timeout=300)
    return process, f"http://127.0.0.1:{port}"


def teacher_forced(url: str, model: str, conversations: list[list[int]]) -> list[list[float]]:
    """The log-probability of every token of each conversation after the first, as the served model gives it."""
    found = []
    for ids in conversations:
        answer = httpx.post(
            f"{url}/v1/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        found.append([next(iter(d.values()))["logprob"] for d in answer.json()["choices"][0]["prompt_logprobs"] if d])
    return found


def held_out_conversations(recipe) -> list[list[int]]:
    """Token ids of held-out prompts with their reference answers, rendered as the model was trained on them."""
    tokenizer = chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR)
    rows = scoring.HeldOut.load(recipe.run_dir / "data", tokenizer, recipe).sets["answers"][:PROMPTS]
    answered = [(r["prompt"] + [{"role": "assistant", "content": r["reference"]}], r["tools"]) for r in rows]
    return [chat.render_ids(tokenizer, conversation, tools)["input_ids"] for conversation, tools in answered]


@pytest.mark.slow
def test_one_server_serves_each_runs_adapter_as_its_merged_export_answers(runs: dict, tmp_path: Path) -> None:
    a, b = runs["tiny-a"], runs["tiny-b"]
    exports = {name: recipe.run_dir / "export" for name, recipe in runs.items()}
    lora = {name: artifacts.read_serving_file(folder)["lora"] for name, folder in exports.items()}
    assert lora["tiny-a"]["stages"] == ["sft", "dpo"] and lora["tiny-b"]["stages"] == ["sft"]
    assert lora["tiny-a"]["base_hash"] == lora["tiny-b"]["base_hash"] != lora["tiny-c"]["base_hash"]
    texts = held_out_conversations(a)

    server, url = start(exports["tiny-a"], tmp_path / "both.log", "--adapter", str(exports["tiny-b"]))
    try:
        listing = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()
        models = {m["id"]: m.get("pipeline") for m in listing["data"]}
        assert set(models) == {"tiny-a-base", "tiny-a", "tiny-b"}
        assert models["tiny-a"]["stages"] == ["sft", "dpo"] and models["tiny-b"]["rank"] == lora["tiny-b"]["rank"]
        together = {name: teacher_forced(url, name, texts) for name in ("tiny-a", "tiny-b", "tiny-a-base")}
    finally:
        server_process.stop(server)
    assert together["tiny-a"] != together["tiny-b"] != together["tiny-a-base"]  # three different models answered

    for name, recipe in (("tiny-a", a), ("tiny-b", b)):
        alone, url = start(exports[name], tmp_path / f"{name}.log")  # the merged export, on a server of its own
        try:
            merged = teacher_forced(url, name, texts)
        finally:
            server_process.stop(alone)
        worst = max(abs(x - y) for got, want in zip(together[name], merged) for x, y in zip(got, want))
        print(f"{name}: adapter on the shared server against the merged export alone: {worst:.1e} at most")
        assert worst <= LOGPROB_TOLERANCE, f"{name}: served as an adapter, log-probabilities differ by {worst:.1e}"


def test_an_adapter_of_another_base_is_refused_at_start_naming_both(runs: dict) -> None:
    exports = {name: recipe.run_dir / "export" for name, recipe in runs.items()}
    result = subprocess.run(
        [sys.executable, "-m", "serving.vllm_server", "--config", "configs/tiny.yaml", "--artifact",
         str(exports["tiny-a"]), "--adapter", str(exports["tiny-c"])],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PIPELINE_API_KEY": "k"},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "tiny-c" in message and "another base" in message
    for name in ("tiny-a", "tiny-c"):
        base_hash = artifacts.read_serving_file(exports[name])["lora"]["base_hash"]
        assert base_hash[:12] in message
