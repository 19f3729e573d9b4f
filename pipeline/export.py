"""Export stage: merged full-precision weights for vLLM / transformers, and ONNX for CPU runtimes, each checked.

    python -m pipeline.export [--config configs/tiny.yaml] [--target hf --target onnx] [--force] [KEY=VALUE ...]

Exports the final model (DPO if present, else SFT). `hf`: adapters merged into the base reloaded in full
precision (never into 4-bit weights), safetensors only, tokenizer with chat template, `generation_config.json`
listing every stop token, and `serving.json` with what the server needs. `onnx`: ONNX Runtime GenAI's model
builder on the merged folder (fp32 and int4 for CPU); optimum's ONNX exporter cannot be installed beside
transformers 5, and `build_onnx` is the one place that would switch to it. The stage checks merge parity,
template parity and ONNX parity itself, fails on a broken export, and records the figures in its manifest.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import artifacts, chat, engines, models, training
from pipeline.cli import run_cli, stage_parser
from pipeline.config import Recipe, load_recipe
from pipeline.errors import ConfigError, MissingArtifactError, PipelineError

STAGE = "export"
SERVING_FILE = "serving.json"
ONNX_DIR = "onnx"
ADAPTER_DIR = "adapter"
PARITY_PROMPTS = 8
MERGE_TOLERANCE = 1e-4
ONNX_LOGIT_TOLERANCE = 1e-3


class ExportCheckFailed(PipelineError):
    """A parity check failed: the exported model would not behave like the trained one."""


def _final_stage(recipe: Recipe) -> str:
    for name in ("dpo", "sft"):
        if artifacts.manifest_is_complete(recipe.run_dir / name):
            return name
    raise MissingArtifactError(
        f"there is no trained model in {recipe.run_dir} to export (neither a complete 'dpo' nor 'sft' artifact). "
        f"Run `accelerate launch pipeline/sft.py --config {recipe.source_path}` first."
    )


def _check_gate(recipe: Recipe, force: bool) -> None:
    """With gates in the recipe, export needs an evaluation of the current settings that passed them."""
    if not recipe.evaluate.gates or force:
        return
    eval_dir = artifacts.require_stage(recipe.run_dir, "eval", STAGE, recipe)
    if not artifacts.read_manifest(eval_dir)["metrics"].get("gates_passed"):
        raise PipelineError(
            f"the evaluation gates failed for this run (see {eval_dir / 'report.md'}); export refuses a model that "
            f"failed its gates. Fix the model, relax evaluate.gates, or export anyway with --force."
        )


def _max_logit_difference(a: Any, b: Any, ids: list[list[int]]) -> float:
    import torch

    worst = 0.0
    with torch.no_grad():
        for row in ids:
            tensor = torch.tensor([row])
            worst = max(worst, (a(tensor).logits.float() - b(tensor).logits.float()).abs().max().item())
    return worst


def _merge_parity(base: Any, adapter: Path | None, exported: Path, dtype: str, ids: list[list[int]]) -> float:
    """Logits of the exported folder against the trained model as it was trained (adapter unmerged)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(base), dtype=models.torch_dtype(dtype))
    if adapter is not None:
        from peft import PeftModel

        reference = PeftModel.from_pretrained(reference, str(adapter))
    reloaded = AutoModelForCausalLM.from_pretrained(str(exported), dtype=models.torch_dtype(dtype))
    reference.eval(), reloaded.eval()
    return _max_logit_difference(reference, reloaded, ids)


def _template_parity(training_tokenizer: Any, exported: Path, conversations: list[list[dict]], stop_ids: list[int]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(str(exported))
    mismatches = sum(
        chat.render_ids(training_tokenizer, c)["input_ids"] != chat.render_ids(served, c)["input_ids"]
        or chat.render_ids(training_tokenizer, c[:-1], add_generation_prompt=True)["input_ids"]
        != chat.render_ids(served, c[:-1], add_generation_prompt=True)["input_ids"]
        for c in conversations
    )
    end_of_turn = chat.end_of_turn_token_id(training_tokenizer)
    return {"conversations": len(conversations), "mismatches": mismatches, "end_of_turn_is_stop": end_of_turn in stop_ids}


def build_onnx(model_dir: Path, out_dir: Path, precision: str) -> None:
    """ONNX Runtime GenAI's model builder. (optimum-onnx would slot in here once it supports transformers 5.)"""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
               "-p", precision, "-e", "cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        unsupported = next((l for l in result.stderr.splitlines() if "is not currently supported" in l), None)
        if unsupported:
            raise NotImplementedError(unsupported.split(":", 1)[-1].strip())
        raise PipelineError(f"the ONNX model builder failed for {precision}:\n{result.stderr[-2000:]}")


def _onnx_greedy(onnx_dir: Path, ids: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[Any]]:
    """Greedy tokens of each prompt with onnxruntime-genai, and the logits of the first generated position."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    tokens, first_logits = [], []
    for prompt in ids:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        first_logits.append(np.asarray(generator.get_output("logits"))[0, -1].astype(np.float32))
        generated = []
        while not generator.is_done():
            generator.generate_next_token()
            generated.append(int(generator.get_next_tokens()[0]))
        tokens.append(generated)
    return tokens, first_logits


def _torch_greedy(model_dir: Path, ids: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    stop_ids = set(model.generation_config.eos_token_id)
    tokens, first_logits = [], []
    with torch.no_grad():
        for prompt in ids:
            first_logits.append(model(torch.tensor([prompt])).logits[0, -1].numpy())
            output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=list(stop_ids), pad_token_id=model.generation_config.pad_token_id)  # fmt: skip
            tokens.append(output[0, len(prompt) :].tolist())
    return tokens, first_logits


def _onnx_parity(model_dir: Path, onnx_dir: Path, ids: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> dict[str, Any]:
    import numpy as np

    want_tokens, want_logits = _torch_greedy(model_dir, ids, max_new_tokens)
    got_tokens, got_logits = _onnx_greedy(onnx_dir, ids, max_new_tokens)
    # onnxruntime-genai keeps the stop token it ended on and may stop one step later; compare up to the stop.
    def trim(seq: list[int]) -> list[int]:
        cut = next((i for i, t in enumerate(seq) if t in stop_ids), len(seq))
        return seq[: cut + 1]

    same = [trim(a) == trim(b) for a, b in zip(want_tokens, got_tokens)]
    return {
        "prompts": len(ids),
        "identical_greedy_outputs": sum(same),
        "agreement_rate": sum(same) / len(same),
        "first_step_max_abs_logit_diff": float(max(np.abs(a - b).max() for a, b in zip(want_logits, got_logits))),
    }


def write_serving_file(
    folder: Path, *, served_model_name: str, max_model_len: int, dtype: str, stop_ids: list[int], stop_tokens: list[str],
    lora: dict[str, str] | None,
) -> None:
    """The serving.json `serving.vllm_server` starts vLLM from: paths are relative to `folder`."""
    record = {
        "served_model_name": served_model_name,
        "model": artifacts.MODEL_DIR,
        "max_model_len": max_model_len,
        "chat_template": f"{artifacts.MODEL_DIR}/chat_template.jinja",
        "stop_token_ids": stop_ids,
        "stop_tokens": stop_tokens,
        "dtype": dtype,
        "lora": lora,
    }
    (folder / SERVING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def run(recipe: Recipe, *, force: bool = False, targets: Sequence[str] | None = None) -> Path:
    targets = list(targets or recipe.export.targets)
    unknown = [t for t in targets if t not in ("hf", "onnx")]
    if unknown:
        raise ConfigError(f"unknown export target(s) {', '.join(unknown)}; the targets are hf and onnx.")
    if "onnx" in targets and importlib.util.find_spec("onnxruntime_genai") is None:
        raise ConfigError(
            "the onnx target needs onnxruntime-genai, which is not installed: install the `onnx` extra "
            "(`pip install -e '.[onnx]'`), or export with --target hf."
        )
    data_dir = artifacts.require_stage(recipe.run_dir, "data", STAGE, recipe)
    final_name = _final_stage(recipe)
    final_dir = recipe.run_dir / final_name
    _check_gate(recipe, force)
    stage = artifacts.StageRun.for_recipe(STAGE, recipe)
    # --target can differ from export.targets: which targets were built is part of what the artifact is.
    stage.inputs["targets"] = {"kind": "setting", "path": "targets", "sha256": ",".join(sorted(targets))}
    stage.add_input("data", data_dir)
    stage.add_input(final_name, final_dir)
    if not force and stage.up_to_date():
        print(f"export: up to date ({stage.final_dir}); use --force to re-export.")
        return stage.final_dir
    work = stage.begin()
    model_dir = work / artifacts.MODEL_DIR
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    base, adapter = training.trained_model_location(final_dir)

    merged = models.load_merged(base, adapter, recipe.model.dtype, recipe.model.trust_remote_code)
    stop_ids = sorted({tokenizer.eos_token_id, chat.end_of_turn_token_id(tokenizer)})
    merged.generation_config.eos_token_id = stop_ids
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    del merged

    prompts, references, tools = engines.held_out_conversations(data_dir, PARITY_PROMPTS)
    ids = engines.prompt_ids(tokenizer, prompts, tools)
    checks: dict[str, Any] = {"exported_from": final_name}
    checks["merge_max_abs_logit_diff"] = _merge_parity(base, adapter, model_dir, recipe.model.dtype, ids)
    if checks["merge_max_abs_logit_diff"] > MERGE_TOLERANCE:
        raise ExportCheckFailed(
            f"merge parity failed: the merged model's logits differ from base + adapter by "
            f"{checks['merge_max_abs_logit_diff']:.2e} (limit {MERGE_TOLERANCE:.0e}); nothing was exported."
        )
    conversations = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, references)]
    checks["template_parity"] = _template_parity(tokenizer, model_dir, conversations, stop_ids)
    if checks["template_parity"]["mismatches"] or not checks["template_parity"]["end_of_turn_is_stop"]:
        raise ExportCheckFailed(f"template parity failed: {checks['template_parity']}; nothing was exported.")

    lora = None
    if recipe.export.adapter_only and adapter is not None:
        shutil.copytree(adapter, work / ADAPTER_DIR)
        lora = {"name": f"{recipe.serve.served_model_name or recipe.run.name}-lora", "path": ADAPTER_DIR, "base_model": str(Path(base).resolve())}
    write_serving_file(
        work, served_model_name=recipe.serve.served_model_name or recipe.run.name, max_model_len=recipe.data.max_length,
        dtype=recipe.model.dtype, stop_ids=stop_ids, stop_tokens=tokenizer.convert_ids_to_tokens(stop_ids), lora=lora,
    )  # fmt: skip

    if "onnx" in targets:
        checks["onnx"] = {}
        for precision in recipe.export.onnx_precisions:
            out = work / ONNX_DIR / precision
            try:
                build_onnx(model_dir, out, precision)
            except NotImplementedError as reason:
                message = f"ONNX export skipped: the ONNX Runtime GenAI builder does not support this architecture ({reason})"
                print(f"export: {message}; the hf/vLLM export is complete.")
                checks["onnx"] = {"status": "unsupported", "message": message}
                shutil.rmtree(work / ONNX_DIR, ignore_errors=True)
                break
            parity = _onnx_parity(model_dir, out, ids, recipe.evaluate.max_new_tokens, stop_ids)
            checks["onnx"][precision] = parity
            if precision == "fp32" and (
                parity["agreement_rate"] < 1 or parity["first_step_max_abs_logit_diff"] > ONNX_LOGIT_TOLERANCE
            ):
                raise ExportCheckFailed(f"ONNX fp32 parity failed against PyTorch: {parity}; nothing was exported.")
    if "hf" not in targets:
        shutil.rmtree(model_dir)  # the ONNX folders are self-contained; keep only what was asked for
        (work / SERVING_FILE).unlink()
    final = stage.complete(checks, extra={"targets": targets})
    onnx_summary = ", ".join(
        f"{p} {v['agreement_rate']:.0%} greedy agreement" for p, v in checks.get("onnx", {}).items() if isinstance(v, dict)
    )
    print(
        f"export: {final_name} model -> {final} (merge parity {checks['merge_max_abs_logit_diff']:.1e}, template parity "
        f"{checks['template_parity']['conversations']} conversations OK{', ONNX ' + onnx_summary if onnx_summary else ''})"
    )
    return final


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.export", __doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=("hf", "onnx"), help="export target (repeatable; default: export.targets)")
    args = parser.parse_args(argv)
    run(load_recipe(args.config, args.overrides), force=args.force, targets=args.target)


if __name__ == "__main__":
    sys.exit(run_cli(main))
