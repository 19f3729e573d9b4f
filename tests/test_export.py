"""Export stage: merged safetensors with stop tokens and serving.json, ONNX via onnxruntime-genai, checks, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import dpo, export
from pipeline.core import adapters, artifacts, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError, MissingArtifactError

from conftest import run_module
from test_dpo import dpo_recipe, prepare_with_sft
from test_sft import no_pickles, prepare


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """SFT (QLoRA) -> DPO (LoRA) -> export to hf, onnx (fp32, int4) and one stacked adapter on a small model."""
    tmp_path = tmp_path_factory.mktemp("export")
    path = dpo_recipe(tmp_path, sft_method="qlora", sections={"export": {"targets": ["hf", "onnx", "adapter"]}})
    recipe = prepare_with_sft(path)
    dpo.run(recipe)
    export.run(recipe)
    return recipe.run_dir / "export", recipe


def test_hf_export_is_safetensors_with_every_stop_token_and_a_serving_file(exported) -> None:
    out, recipe = exported
    model_dir = out / artifacts.MODEL_DIR
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "chat_template.jinja").is_file()
    no_pickles(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(stops) == sorted([tokenizer.eos_token_id, end_of_turn])
    serving = json.loads((out / artifacts.SERVING_FILE).read_text())
    assert serving["max_model_len"] == recipe.data.max_length and serving["stop_token_ids"] == sorted(stops)
    assert serving["served_model_name"] == recipe.run.name and (out / serving["chat_template"]).is_file()
    lora = serving["lora"]
    assert lora["path"] == artifacts.ADAPTER_DIR and (out / artifacts.ADAPTER_DIR / "adapter_config.json").is_file()
    # One adapter over the run's base, SFT's and DPO's stacked: rank 8 + 8.
    assert lora["stages"] == ["sft", "dpo"] and lora["rank"] == 16 and lora["stage_ranks"] == [8, 8]
    assert Path(lora["base_model"]) == (recipe.run_dir / "base").resolve()
    assert lora["base_hash"] == adapters.base_weights_hash(recipe.run_dir / "base")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is 4 even or odd?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > ids["input_ids"].shape[1]


def test_the_stage_records_its_parity_checks(exported) -> None:
    out, _ = exported
    checks = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    assert checks["exported_from"] == "dpo"
    assert checks["merge_relative_logit_diff"] <= export.MERGE_TOLERANCE
    assert checks["template_parity"]["mismatches"] == 0 and checks["template_parity"]["end_of_turn_is_stop"]
    fp32 = checks["onnx"]["fp32"]
    assert fp32["agreement_rate"] == 1.0 and fp32["first_step_max_abs_logit_diff"] <= export.ONNX_LOGIT_TOLERANCE
    assert checks["onnx"]["int4"]["prompts"] == checks["onnx"]["fp32"]["prompts"] > 0
    assert checks["template_parity"]["with_tools"] == 0  # the test data declares no tools
    assert checks["tool_call_parser"] == "hermes" and checks["gates"] == "none"


def test_the_stacked_adapter_on_the_base_gives_the_merged_exports_logits(exported) -> None:
    out, _ = exported
    checks = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]["adapter"]
    assert checks["relative_logit_diff"] <= export.MERGE_TOLERANCE and checks["rank"] == 16


def test_an_adapter_stacked_without_the_stages_scalings_fails_its_parity_check(
    exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parity check can fail: with each stage's scaling (alpha / r = 2 here) left out of B, the adapter is
    another model."""
    _, recipe = exported
    monkeypatch.setattr(adapters, "_scaling", lambda config: 1.0)
    ids = [[1, 5, 9, 14, 20]]
    with pytest.raises(export.ExportCheckFailed, match="adapter parity failed"):
        export._export_adapter(recipe, stages.DPO, tmp_path, recipe.run_dir / "export" / artifacts.MODEL_DIR, ids)


@pytest.mark.parametrize("method", ["full", "dora"])
def test_the_adapter_target_is_refused_for_a_stage_without_an_exact_adapter(tmp_path: Path, method: str) -> None:
    path = dpo_recipe(tmp_path, sft_method=method, sections={"export": {"targets": ["adapter"]}})
    with pytest.raises(ConfigError, match=f"export.targets has adapter, but sft.method is {method}"):
        load_recipe(path)


def test_a_qlora_trained_adapter_merges_into_full_precision_weights(exported) -> None:
    out, _ = exported
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(out / artifacts.MODEL_DIR / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert not [k for k in weights if "absmax" in k or "quant_state" in k or "lora_" in k]


def test_onnx_export_tokenizes_and_generates_as_pytorch_does(exported) -> None:
    """The ONNX folder is self-contained: its own tokenizer gives the training tokenizer's ids, and its greedy
    continuation equals PyTorch's."""
    import numpy as np
    import onnxruntime_genai as og

    from pipeline.core import chat

    out, _ = exported
    model = og.Model(str(out / artifacts.ONNX_DIR / "fp32"))
    text = "<|im_start|>user\nIs 4 even or odd?<|im_end|>\n<|im_start|>assistant\n"
    prompt = [int(t) for t in og.Tokenizer(model).encode(text)]
    training_tokenizer = chat.load_tokenizer(out / artifacts.MODEL_DIR)
    assert prompt == training_tokenizer(text, add_special_tokens=False)["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 8)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    onnx_tokens = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
    torch_tokens, _ = export._torch_greedy(out / artifacts.MODEL_DIR, [prompt], 8)
    stops = set(artifacts.read_serving_file(out)["stop_token_ids"])

    def until_stop(tokens: list[int]) -> list[int]:
        return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]

    assert until_stop(onnx_tokens) == until_stop(torch_tokens[0])


def test_export_with_no_trained_model(tmp_path: Path) -> None:
    recipe = prepare(dpo_recipe(tmp_path))
    with pytest.raises(
        MissingArtifactError,
        match=(
            r"the export stage needs a trained model, but .* has no complete dpo or sft artifact\. Run `accelerate"
            r" launch pipeline/sft\.py"
        ),
    ):
        export.run(recipe, stages.Options(targets=("hf",)))


def test_onnx_target_without_onnxruntime_genai_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(dpo_recipe(tmp_path))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"needs onnxruntime-genai.*install the `onnx` extra"):
        export.run(recipe, stages.Options(targets=("onnx",)))


def test_unsupported_architecture_skips_onnx_and_still_exports_hf(tmp_path: Path) -> None:
    gpt2 = {"init": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256}}
    path = dpo_recipe(tmp_path, sft_method="full", sections={"model": gpt2})
    recipe = prepare_with_sft(path)
    export.run(
        recipe,
        stages.Options(
            targets=(
                "hf",
                "onnx",
            )
        ),
    )
    out = recipe.run_dir / "export"
    checks = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    assert (
        checks["onnx"]["status"] == "unsupported" and "does not support this architecture" in checks["onnx"]["message"]
    )
    assert (out / artifacts.MODEL_DIR / "model.safetensors").is_file() and not (out / artifacts.ONNX_DIR).exists()


def test_export_refuses_a_failed_gate_unless_allowed_and_records_it(tmp_path: Path) -> None:
    path = dpo_recipe(
        tmp_path, sft_method="full", sections={"evaluate": {"backend": "hf", "gates": {"sft.exact_match": 0.99}}}
    )
    prepare_with_sft(path)
    assert run_module("pipeline.evaluate", "--config", str(path)).returncode == 2
    refused = run_module("pipeline.export", "--config", str(path), "--target", "hf")
    assert refused.returncode == 2 and "export refuses a model that failed its gates" in " ".join(
        refused.stderr.split()
    )
    assert "--allow-failed-gates" in refused.stderr
    allowed = run_module("pipeline.export", "--config", str(path), "--target", "hf", "--allow-failed-gates")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "EXPORTED DESPITE FAILING GATES" in allowed.stdout
    out = load_recipe(path).run_dir / "export"
    assert (
        artifacts.read_manifest(out)["metrics"]["gates"] == "failed"
        and artifacts.read_serving_file(out)["gates"] == "failed"
    )
