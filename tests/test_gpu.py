"""On a CUDA GPU: every method trains in bf16 there, QLoRA's 4-bit layers sit on it, a QLoRA adapter merges with
parity on it, HF evaluation generates on it, and packed rows train there as separate rows. Skipped without CUDA;
the same helpers run on the CPU (the last test here, and tests/test_packing.py), with the CPU's expectations
(float32, everything on the CPU), so their logic is tested everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import base, data, evaluate, sft
from pipeline.core import artifacts, engines, models, stages, training
from pipeline.core.config import load_recipe

from conftest import chat_rows, write_jsonl, write_recipe
from test_packing import GRADIENT_TOLERANCE, LOG_PROB_TOLERANCE, packed_against_separate


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")


def _prepared(tmp_path: Path, method: str):
    """A small chat recipe asking for bf16 mixed precision (the pipeline drops it on the CPU), data and base built."""
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(64))
    sft_section = {
        "method": method,
        "global_batch_size": 8,
        "learning_rate": 5e-3,
        "max_steps": 12,
        "logging_steps": 1,
        "save_steps": 100,
        "bf16": True,
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "quantization": {"bnb_4bit_compute_dtype": "bfloat16"},
    }
    path = write_recipe(
        tmp_path, [{"path": str(source)}], sft=sft_section, evaluate={"backend": "hf", "max_new_tokens": 8}
    )
    recipe = load_recipe(path)
    data.run(recipe)
    base.run(recipe)
    return recipe


def _train(recipe, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run the SFT stage and report where and in what precision its decoder layers ran, and the losses."""
    import torch

    seen: dict = {}
    train_and_save = training.train_and_save

    def observed(trainer, *args, **kwargs):  # noqa: ANN001, ANN202 - the runner's own signature
        layer = next(m for m in trainer.model.modules() if type(m).__name__.endswith("DecoderLayer"))

        def record(module, inputs):  # noqa: ANN001, ANN202 - a forward pre-hook
            kind = inputs[0].device.type
            seen.setdefault("device", kind)
            seen.setdefault("autocast", torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)

        layer.register_forward_pre_hook(record)  # inside the Trainer's autocast, which wraps the model's forward
        return train_and_save(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "train_and_save", observed)
    sft.run(recipe, stages.Options(force=True))
    history = json.loads((recipe.run_dir / "sft" / artifacts.LOG_HISTORY).read_text())
    seen["losses"] = [e["loss"] for e in history if "loss" in e]
    return seen


def _four_bit_devices(recipe) -> set[str]:
    """Devices of the 4-bit weights (and their quantization statistics) of the model QLoRA trains."""
    import bitsandbytes as bnb

    model = training.load_trainable_model(recipe, recipe.sft, "sft", training.base_model_path(recipe))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no 4-bit layers"
    return {m.weight.device.type for m in layers} | {m.weight.quant_state.absmax.device.type for m in layers}


def _merge_difference(recipe, device: str) -> float:
    """Largest logit difference on `device` between the merged model and the base with the adapter unmerged, relative
    to the largest logit (as export checks it)."""
    import torch
    from peft import PeftModel

    base_dir, adapter = artifacts.model_location(recipe.run_dir / "sft")
    assert adapter is not None
    merged = models.load_merged(base_dir, adapter, recipe.model).to(device).eval()
    reference = PeftModel.from_pretrained(models.load(base_dir, recipe.model, device=device), str(adapter)).eval()
    ids = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected = reference(ids).logits.float()
        return ((merged(ids).logits.float() - expected).abs().max() / expected.abs().max()).item()


def _evaluation_devices(recipe, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Run the evaluation stage (HF backend) and report the devices of the models it generated with."""
    devices = set()
    generate = engines.hf_generate

    def observed(model, *args, **kwargs):  # noqa: ANN001, ANN202
        devices.add(model.device.type)
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(engines, "hf_generate", observed)
    evaluate.run(recipe, stages.Options(force=True))
    return devices


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora"])
def test_each_method_trains_in_bf16_on_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    import torch

    seen = _train(_prepared(tmp_path, method), monkeypatch)
    assert seen["device"] == "cuda" and seen["autocast"] == torch.bfloat16
    assert all(loss == loss for loss in seen["losses"]) and seen["losses"][-1] < seen["losses"][0]


@pytest.fixture(scope="module")
def qlora_on_gpu(tmp_path_factory: pytest.TempPathFactory):
    """One QLoRA SFT run on the GPU that the checks below share."""
    recipe = _prepared(tmp_path_factory.mktemp("qlora-gpu"), "qlora")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _train(recipe, monkeypatch)
    return recipe


@pytest.mark.gpu
@needs_cuda
def test_qlora_4bit_layers_sit_on_the_gpu(qlora_on_gpu) -> None:
    assert _four_bit_devices(qlora_on_gpu) == {"cuda"}


@pytest.mark.gpu
@needs_cuda
def test_a_qlora_adapter_merges_with_parity_on_the_gpu(qlora_on_gpu) -> None:
    from pipeline import export

    # float32 weights and TF32 off (torch's default for matmuls): the merge changes only the order of additions.
    assert _merge_difference(qlora_on_gpu, "cuda") <= export.MERGE_TOLERANCE


@pytest.mark.gpu
@needs_cuda
def test_hf_evaluation_generates_on_the_gpu(qlora_on_gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _evaluation_devices(qlora_on_gpu, monkeypatch) == {"cuda"}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attn_implementation", ["flex_attention", "sdpa"])
def test_packed_rows_train_as_separate_rows_on_the_gpu(attn_implementation: str) -> None:
    """flex_attention is what packed rows train with on a GPU without flash-attn (benchmarks/gpu_sft.py); sdpa keeps
    them apart under its dense mask. float32 with TF32 off (torch's default); GPU kernels split their reductions
    otherwise than the CPU's, hence 10x the CPU tolerances, still 100x below what a leak moves."""
    log_probs, gradients = packed_against_separate(attn_implementation, "cuda", pad_to_multiple_of=128)
    assert log_probs <= 10 * LOG_PROB_TOLERANCE and gradients <= 10 * GRADIENT_TOLERANCE


@pytest.mark.skipif(_cuda(), reason="with CUDA, the tests above run these checks with the GPU's expectations")
def test_the_gpu_checks_hold_their_cpu_expectations_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helpers above on the CPU: bf16 dropped (no autocast), 4-bit layers, merge and generation on the CPU."""
    from pipeline import export

    recipe = _prepared(tmp_path, "qlora")
    seen = _train(recipe, monkeypatch)
    assert seen["device"] == "cpu" and seen["autocast"] is None
    assert seen["losses"][-1] < seen["losses"][0]
    assert _four_bit_devices(recipe) == {"cpu"}
    assert _merge_difference(recipe, "cpu") <= export.MERGE_TOLERANCE
    assert _evaluation_devices(recipe, monkeypatch) == {"cpu"}
