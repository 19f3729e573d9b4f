"""Export stage: merged full-precision weights for vLLM / transformers, ONNX and GGUF for other runtimes, each checked.

    python -m pipeline.export [--config configs/tiny.yaml] [--target hf --target onnx] [--force] [KEY=VALUE ...]

Exports the final model (DPO if present, else SFT). `hf`: adapters merged into the base reloaded in full
precision (never into 4-bit weights), safetensors only, tokenizer with chat template, `generation_config.json`
listing every stop token, and `serving.json` with what the server needs. `onnx`: ONNX Runtime GenAI's model
builder on the merged folder (fp32 and int4 for CPU). `optimum-onnx`: optimum's exporter
(`text-generation-with-past`, for ORTModelForCausalLM) in an environment of its own, since it cannot be installed
beside transformers 5 (pipeline.core.optimum_onnx). `gguf`: llama.cpp's converter, files checked in llama.cpp
(pipeline.core.gguf_export). `adapter`: every trained stage's adapter stacked into one over the run's base model
(pipeline.core.adapters), recorded with the base's weights hash in `serving.json`. The stage checks merge parity,
template parity, adapter parity and each runtime's parity with PyTorch itself, fails on a broken export, and
records the figures in its manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import runpy
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline.core import (
    adapters,
    artifacts,
    chat,
    cli,
    engines,
    gguf_export,
    models,
    optimum_onnx,
    runtime_parity,
    scoring,
    stages,
)
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.schema import Recipe

STAGE = stages.EXPORT
PARITY_PROMPTS = 8
# Merged weights (W + BA) round differently from the adapter applied beside W, and the difference grows with depth
# and with the logits' own size; so it is bounded relative to the largest logit. A wrong merge (the scaling, a
# module left out) is off by orders of magnitude more.
MERGE_TOLERANCE = 3e-5
# Full-precision runtimes (ONNX fp32, optimum's ONNX, GGUF f32 with an f32 KV cache) against PyTorch float32, measured
# under native AVX-512, ATEN_CPU_CAPABILITY=avx2 + ONEDNN_MAX_CPU_ISA=AVX2, =default + SSE41, and MKL_CBWR=COMPATIBLE:
# at most 1.2e-7 on the test recipe and 6.1e-5 on SmolLM2-135M (logits up to 35.5), every greedy answer equal.
ONNX_LOGIT_TOLERANCE = 1e-3
# llama.cpp on an f16 file against PyTorch float32, same four configurations: 3.6e-4 to 4.0e-4 of the largest logit
# (test recipe) and 1.0e-3 (SmolLM2). Its answers left PyTorch's once in 16 on the test recipe under three of the
# four (none under SSE41), where PyTorch's own margin between the two tokens was 0.04-0.07 of the file's logit
# error; q8_0's divergences reached 0.44 of its error. So an answer may leave PyTorch's only where that margin is
# within GGUF_TIE_FACTOR times the error.
GGUF_F16_RELATIVE_TOLERANCE = 1e-2
GGUF_TIE_FACTOR = 4
TARGETS = ("hf", "onnx", "adapter", "optimum-onnx", "gguf")


class ExportCheckFailed(PipelineError):
    """A parity check failed: the exported model would not behave like the trained one."""


def _max_logit_difference(a: Any, b: Any, ids: list[list[int]]) -> tuple[float, float]:
    """The largest difference between the logits of `a` and `b`, and the largest magnitude of `a`'s logits."""
    import torch

    worst = scale = 0.0
    with torch.no_grad():
        for row in ids:
            tensor = torch.tensor([row])
            expected = a(tensor).logits.float()
            worst = max(worst, (expected - b(tensor).logits.float()).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    return worst, scale


def _merge_parity(
    base: Any, adapter: Path | None, exported: Path, recipe: Recipe, ids: list[list[int]]
) -> tuple[float, float]:
    """Logits of the exported folder against the trained model as it was trained (adapter unmerged): the largest
    difference, and the largest logit."""
    reference = models.load(base, recipe.model)
    if adapter is not None:
        from peft import PeftModel

        reference = PeftModel.from_pretrained(reference, str(adapter))
    reloaded = models.load(exported, recipe.model)
    reference.eval(), reloaded.eval()
    return _max_logit_difference(reference, reloaded, ids)


def _template_parity(
    training_tokenizer: Any, exported: Path, conversations: list[tuple[list[dict], Any]], stop_ids: list[int]
) -> dict[str, Any]:
    """Token ids of each conversation, whole and as a prompt, from the training tokenizer and the exported one."""
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(str(exported))
    mismatches = sum(
        chat.render_ids(training_tokenizer, c, tools)["input_ids"] != chat.render_ids(served, c, tools)["input_ids"]
        or chat.render_ids(training_tokenizer, c[:-1], tools, add_generation_prompt=True)["input_ids"]
        != chat.render_ids(served, c[:-1], tools, add_generation_prompt=True)["input_ids"]
        for c, tools in conversations
    )
    end_of_turn = chat.end_of_turn_token_id(training_tokenizer)
    return {
        "conversations": len(conversations),
        "with_tools": sum(bool(t) for _, t in conversations),
        "mismatches": mismatches,
        "end_of_turn_is_stop": end_of_turn in stop_ids,
    }


def build_onnx(model_dir: Path, out_dir: Path, precision: str) -> None:
    """ONNX Runtime GenAI's model builder, run through its own command line in this process: a process per
    precision paid its imports each time (14 s of a 1M-parameter model's 15 s, twice per export on 2 cores), and
    its output is the same byte for byte."""
    arguments = ["-i", str(model_dir), "-o", str(out_dir), "-p", precision, "-e", "cpu"]
    log = io.StringIO()
    saved_argv = sys.argv
    sys.argv = ["onnxruntime_genai.models.builder", *arguments]
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=False)
    except NotImplementedError:
        raise  # an architecture the builder does not know: the caller skips ONNX
    except (Exception, SystemExit) as failure:
        raise PipelineError(
            f"the ONNX model builder failed for {precision} ({failure}):\n{log.getvalue()[-2000:]}"
        ) from None
    finally:
        sys.argv = saved_argv


def _onnx_greedy(onnx_dir: Path, ids: list[list[int]], max_new_tokens: int) -> runtime_parity.Greedy:
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
    return runtime_parity.Greedy(tokens, first_logits)


def _gate_status(recipe: Recipe, allow_failed_gates: bool) -> str:
    """'none' (the recipe sets no gates), 'passed', or 'failed' when exporting anyway was asked for."""
    if not recipe.evaluate.gates:
        return "none"
    eval_dir = stages.require(stages.EVAL, recipe, STAGE.name)
    if artifacts.read_manifest(eval_dir)["metrics"].get("gates_passed"):
        return "passed"
    if allow_failed_gates:
        return "failed"
    raise PipelineError(
        f"the evaluation gates failed for this run (see {eval_dir / artifacts.REPORT_FILE}); export refuses a model "
        "that failed its gates. Fix the model, relax evaluate.gates, or export anyway with --allow-failed-gates "
        "(recorded in the export's manifest and serving.json)."
    )


def run(recipe: Recipe, options: stages.Options = stages.Options()) -> stages.Outcome:
    targets = list(options.targets or recipe.export.targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown export target(s) {', '.join(unknown)}; the targets are {', '.join(TARGETS)}.")
    if "onnx" in targets and importlib.util.find_spec("onnxruntime_genai") is None:
        raise ConfigError(
            "the onnx target needs onnxruntime-genai, which is not installed: install the `onnx` extra "
            "(`pip install -e '.[onnx]'`), or export with --target hf."
        )
    if "gguf" in targets:
        gguf_export.check_installed()
    final = stages.newest_trained_before(STAGE, recipe)
    gates = _gate_status(recipe, options.allow_failed_gates)
    inputs = {
        # Which targets were built (--target can differ from export.targets) and whether the model passed its gates
        # are part of what the artifact is.
        "targets": artifacts.setting_record("targets", sorted(targets)),
        "gates": artifacts.setting_record("gates", gates),
    }
    return stages.execute(
        STAGE, recipe, lambda run: _export(recipe, run, final, targets, gates), force=options.force, inputs=inputs
    )


def _export(
    recipe: Recipe, run: artifacts.StageRun, final: stages.Stage, targets: list[str], gates: str
) -> stages.Result:
    work = run.begin()
    data_dir = stages.DATA.folder(recipe)
    model_dir = work / artifacts.MODEL_DIR
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    base, adapter = artifacts.model_location(final.folder(recipe))

    merged = models.load_merged(base, adapter, recipe.model)
    stop_ids = chat.stop_token_ids(tokenizer)
    merged.generation_config.eos_token_id = stop_ids
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    del merged

    held = scoring.HeldOut.load(data_dir, tokenizer, recipe)
    parity_rows = [row for rows in held.sets.values() for row in rows[:PARITY_PROMPTS]]
    ids = engines.prompt_ids(tokenizer, [r["prompt"] for r in parity_rows], [r["tools"] for r in parity_rows])
    checks: dict[str, Any] = {"exported_from": final.name, "gates": gates}
    difference, scale = _merge_parity(base, adapter, model_dir, recipe, ids)
    checks["merge_max_abs_logit_diff"] = difference
    checks["merge_relative_logit_diff"] = difference / max(scale, 1e-12)
    if checks["merge_relative_logit_diff"] > MERGE_TOLERANCE:
        raise ExportCheckFailed(
            f"merge parity failed: the merged model's logits differ from base + adapter by {difference:.2e}, "
            f"{checks['merge_relative_logit_diff']:.1e} of the largest logit {scale:.3g} (limit {MERGE_TOLERANCE:.0e});"
            " nothing was exported."
        )
    checks["template_parity"] = _template_parity(tokenizer, model_dir, _parity_conversations(held), stop_ids)
    if checks["template_parity"]["mismatches"] or not checks["template_parity"]["end_of_turn_is_stop"]:
        raise ExportCheckFailed(f"template parity failed: {checks['template_parity']}; nothing was exported.")
    parser = chat.tool_call_parser(tokenizer.chat_template)
    checks["tool_call_parser"] = parser
    if parser is None:
        print(
            "export: the chat template renders tool calls in no format a vLLM tool parser reads; the server will "
            "answer tool requests as plain text (see README, Tool calling)."
        )

    lora = None
    if "adapter" in targets:
        lora, checks["adapter"] = _export_adapter(recipe, final, work, model_dir, ids)
    artifacts.write_serving_file(
        work,
        served_model_name=recipe.serve.served_model_name or recipe.run.name,
        max_model_len=engines.served_context_length(recipe),
        dtype=recipe.model.dtype,
        stop_ids=stop_ids,
        stop_tokens=tokenizer.convert_ids_to_tokens(stop_ids),
        tool_call_parser=parser,
        lora=lora,
        gates=gates,
        exported_from=final.name,
    )

    runtimes = [t for t in ("onnx", "optimum-onnx", "gguf") if t in targets]
    if runtimes:
        reference = runtime_parity.Reference.measure(model_dir, ids, recipe.evaluate.max_new_tokens, stop_ids)
    if "onnx" in targets:
        checks["onnx"] = _export_onnx(recipe, work, model_dir, reference)
    if "optimum-onnx" in targets:
        checks["optimum_onnx"] = _export_optimum_onnx(work, model_dir, reference)
    if "gguf" in targets:
        prompts = [(r["prompt"], r["tools"]) for r in parity_rows]
        checks["gguf"] = gguf_export.export(
            model_dir,
            work / artifacts.GGUF_DIR,
            recipe.export.gguf_types,
            tokenizer,
            _parity_conversations(held),
            prompts,
            reference,
        )
        _require_gguf_parity(checks["gguf"])
    if "hf" not in targets and "adapter" in targets:
        # The adapter is served over the base: the merged weights go, what the server reads beside them stays
        # (tokenizer, chat template, the generation config with every stop token).
        for weights in model_dir.glob("*.safetensors"):
            weights.unlink()
    elif "hf" not in targets:
        shutil.rmtree(model_dir)  # the ONNX folders are self-contained; keep only what was asked for
        (work / artifacts.SERVING_FILE).unlink()
    onnx_summary = ", ".join(
        f"{label} {p} {v['agreement_rate']:.0%}"
        for label, key in (("ONNX", "onnx"), ("optimum", "optimum_onnx"), ("GGUF", "gguf"))
        for p, v in checks.get(key, {}).items()
        if isinstance(v, dict) and "agreement_rate" in v
    )
    warning = "; EXPORTED DESPITE FAILING GATES (--allow-failed-gates)" if gates == "failed" else ""
    return stages.Result(
        checks,
        f"export: {final.name} model (merge parity {checks['merge_max_abs_logit_diff']:.1e}, template parity "
        f"{checks['template_parity']['conversations']} conversations OK, tool parser {parser}"
        f"{', greedy agreement ' + onnx_summary if onnx_summary else ''}){warning}",
        extra={"targets": targets},
    )


def _export_adapter(
    recipe: Recipe, final: stages.Stage, work: Path, merged_dir: Path, ids: list[list[int]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fine-tune as one adapter over the run's base, checked against the merged export: (serving record,
    checks)."""
    from peft import PeftModel

    base, chain = adapters.chain(recipe, final)
    base_reference = str(Path(base).resolve()) if Path(base).exists() else str(base)
    record = adapters.stack(chain, base_reference, work / artifacts.ADAPTER_DIR)
    served = PeftModel.from_pretrained(models.load(base, recipe.model), str(work / artifacts.ADAPTER_DIR)).eval()
    merged = models.load(merged_dir, recipe.model).eval()
    difference, scale = _max_logit_difference(merged, served, ids)
    checks = {**record, "max_abs_logit_diff": difference, "relative_logit_diff": difference / max(scale, 1e-12)}
    if checks["relative_logit_diff"] > MERGE_TOLERANCE:
        raise ExportCheckFailed(
            f"adapter parity failed: the base plus the stacked adapter ({' + '.join(record['stages'])}, rank "
            f"{record['rank']}) differs from the merged export by {difference:.2e}, {checks['relative_logit_diff']:.1e}"
            f" of the largest logit (limit {MERGE_TOLERANCE:.0e}); nothing was exported."
        )
    lora = {
        "name": recipe.serve.served_model_name or recipe.run.name,
        "path": artifacts.ADAPTER_DIR,
        "base_model": base_reference,
        "base_hash": adapters.base_weights_hash(base),
        **record,
    }
    return lora, checks


def _parity_conversations(held: scoring.HeldOut) -> list[tuple[list[dict], Any]]:
    """Held-out conversations to render with both tokenizers: answers, and tool calls with their results."""
    answers = held.sets["answers"]
    chosen = answers[:PARITY_PROMPTS] + [row for row in answers if row["after_tool"]][:PARITY_PROMPTS]
    return [(row["prompt"] + [{"role": "assistant", "content": row["reference"]}], row["tools"]) for row in chosen]


def _export_onnx(recipe: Recipe, work: Path, model_dir: Path, reference: runtime_parity.Reference) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for precision in recipe.export.onnx_precisions:
        out = work / artifacts.ONNX_DIR / precision
        try:
            build_onnx(model_dir, out, precision)
        except NotImplementedError as reason:
            message = (
                f"ONNX export skipped: the ONNX Runtime GenAI builder does not support this architecture ({reason})"
            )
            print(f"export: {message}; the hf/vLLM export is complete.")
            shutil.rmtree(work / artifacts.ONNX_DIR, ignore_errors=True)
            return {"status": "unsupported", "message": message}
        results[precision] = reference.compare(_onnx_greedy(out, reference.ids, reference.max_new_tokens))
    _require_agreement("ONNX", results, ("fp32",), ONNX_LOGIT_TOLERANCE)
    return results


def _export_optimum_onnx(work: Path, model_dir: Path, reference: runtime_parity.Reference) -> dict[str, Any]:
    """optimum's ONNX model against PyTorch twice: transformers 4.57 in its environment (optimum's own reference) and
    this environment's transformers on the export (the model that was trained); the second also checks the copy
    that 4.57 read."""
    measured = optimum_onnx.export(model_dir, work / artifacts.OPTIMUM_ONNX_DIR, reference)
    results = {
        "environment": measured["versions"],
        "against_torch_in_environment": runtime_parity.compare(measured["torch"], measured["onnx"], reference.stop_ids),
        "torch_in_environment_against_export": reference.compare(measured["torch"]),
        **reference.compare(measured["onnx"]),
    }
    _require_agreement(
        "optimum ONNX",
        {"in its environment": results["against_torch_in_environment"], "against the export": results},
        ("in its environment", "against the export"),
        ONNX_LOGIT_TOLERANCE,
    )
    return results


def _require_agreement(what: str, results: dict[str, Any], exact: tuple[str, ...], logit_tolerance: float) -> None:
    """Full-precision runtimes must answer exactly as PyTorch and keep its logits within `logit_tolerance`."""
    for name in exact:
        parity = results.get(name)
        if parity and (parity["agreement_rate"] < 1 or parity["first_step_max_abs_logit_diff"] > logit_tolerance):
            raise ExportCheckFailed(
                f"{what} {name} parity failed against PyTorch: {parity['identical_greedy_outputs']} of "
                f"{parity['prompts']} greedy answers equal, logits differ by up to "
                f"{parity['first_step_max_abs_logit_diff']:.2e} (limit {logit_tolerance:.0e}); nothing was exported."
            )


def _require_gguf_parity(results: dict[str, Any]) -> None:
    """Every file: the chat template renders as in training, and chat completions reply as PyTorch wherever the
    greedy answers agree. f32 (f32 KV cache): answers and logits as ONNX fp32. f16 (f16 KV cache, as llama.cpp
    runs): logits within GGUF_F16_RELATIVE_TOLERANCE of the largest, and an answer may leave PyTorch's only at a
    near tie (GGUF_TIE_FACTOR). q8_0 and bf16 are measured."""
    for name, parity in results.items():
        if isinstance(parity, dict) and "chat" in parity:
            chat_check = parity["chat"]
            if chat_check["prompt_mismatches"] or chat_check["replies_differing_where_answers_equal"]:
                raise ExportCheckFailed(
                    f"GGUF {name}: llama.cpp's chat completion through the file's template does not reproduce the "
                    f"model's prompt or reply ({chat_check}); nothing was exported."
                )
    _require_agreement("GGUF", results, ("f32",), ONNX_LOGIT_TOLERANCE)
    f16 = results.get("f16")
    if not f16:
        return
    bound = GGUF_TIE_FACTOR * f16["first_step_max_abs_logit_diff"]
    broken = [d for d in f16["divergences"] if d["pytorch_margin"] is None or d["pytorch_margin"] > bound]
    if f16["first_step_relative_logit_diff"] > GGUF_F16_RELATIVE_TOLERANCE or broken:
        raise ExportCheckFailed(
            f"GGUF f16 parity failed against PyTorch: logits differ by {f16['first_step_relative_logit_diff']:.1e} of "
            f"the largest (limit {GGUF_F16_RELATIVE_TOLERANCE:.0e}); answers that leave PyTorch's where it was not "
            f"near a tie (margin over {bound:.2e}): {broken}; nothing was exported."
        )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        dest="targets",
        action="append",
        choices=TARGETS,
        help="export target (repeatable; default: export.targets)",
    )
    parser.add_argument(
        "--allow-failed-gates",
        action="store_true",
        help="export although the evaluation gates failed; recorded in the manifest and serving.json",
    )


main = cli.stage_main(STAGE, run, _arguments)

if __name__ == "__main__":
    sys.exit(main())
