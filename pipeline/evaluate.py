"""Evaluation stage: every model of the run side by side on the held-out split, a report, and gates.

    python -m pipeline.evaluate [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]

Generation metrics (exact match, ROUGE, BLEU) go through `evaluate` with metric modules shipped in the
package; perplexity comes from the model's loss on the assistant tokens; preference accuracy compares the
log-probabilities of chosen and rejected answers. Answers are generated greedily by vLLM's offline engine when
vLLM is installed (the engine that serves), else by batched HF `generate`. Writes `checkpoints/<run>/eval/`:
`metrics.json`, `predictions.jsonl`, `report.md` with PNG plots. A failed gate (`evaluate.gates`) exits
non-zero after writing everything, with a table of what failed.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import artifacts, chat, engines, models, scoring, training
from pipeline.cli import run_cli, stage_parser
from pipeline.config import Recipe, load_recipe
from pipeline.errors import MissingArtifactError, PipelineError

STAGE = "eval"
MODEL_STAGES = ("base", "sft", "dpo", "export")
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
METRICS_PLOT = "metrics.png"
HIGHER_IS_BETTER = {"perplexity": False}


class GateFailure(PipelineError):
    """One or more evaluation gates failed; the artifact is written and the table says which."""


def model_artifacts(run_dir: Path) -> dict[str, Path]:
    """Every complete model artifact of the run, in pipeline order."""
    return {name: run_dir / name for name in MODEL_STAGES if artifacts.manifest_is_complete(run_dir / name)}


def _model_dir(name: str, folder: Path, scratch: Path, dtype: str, tokenizer: Any) -> Path:
    """A folder with full weights for this model: the artifact itself, or an adapter merged into a scratch copy."""
    if name == "base":
        return folder
    if name == "export":
        return folder / artifacts.MODEL_DIR
    base, adapter = training.trained_model_location(folder)
    if adapter is None:
        return Path(base)
    target = scratch / name
    merged = models.load_merged(base, adapter, dtype)
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))  # vLLM loads the tokenizer from the model folder
    return target


def check_gates(gates: dict[str, float], results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """`MODEL.METRIC: minimum` or `A-B.METRIC: minimum difference` (perplexity: lower is better, so negated)."""
    rows = []
    for key, threshold in gates.items():
        subject, metric = key.split(".", 1)
        names = subject.split("-")
        sign = 1 if HIGHER_IS_BETTER.get(metric, True) else -1
        missing = [n for n in names if metric not in results.get(n, {})]
        if missing:
            rows.append({"gate": key, "threshold": threshold, "value": None, "passed": False, "why": f"no {metric} for {', '.join(missing)}"})
            continue
        value = results[names[0]][metric] - (results[names[1]][metric] if len(names) == 2 else 0.0)
        rows.append({"gate": key, "threshold": threshold, "value": value, "passed": sign * value >= sign * threshold})
    return rows


def _gate_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| gate | value | threshold | result |", "| --- | --- | --- | --- |"]
    for row in rows:
        value = "n/a" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(f"| {row['gate']} | {value} | {row['threshold']} | {'pass' if row['passed'] else 'FAIL ' + row.get('why', '')} |")
    return "\n".join(lines)


def _plots(results: dict[str, dict[str, float]], work: Path, run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["exact_match", "rougeL", "preference_accuracy"]
    names = list(results)
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(4 * (len(shown) + 1), 3.5))
    for ax, metric in zip(axes, [*shown, "perplexity"]):
        values = [results[n].get(metric, float("nan")) for n in names]
        ax.bar(names, values, color=["#999999", "#4c72b0", "#dd8452", "#55a868"][: len(names)])
        ax.set_title(metric + (" (lower is better)" if metric == "perplexity" else ""))
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(work / METRICS_PLOT, dpi=100)
    plt.close(fig)
    copied = [METRICS_PLOT]
    for stage, plot in (("sft", artifacts.LOSS_PLOT), ("dpo", artifacts.LOSS_PLOT), ("dpo", artifacts.REWARDS_PLOT)):
        source = run_dir / stage / plot
        if source.is_file():
            shutil.copy2(source, work / f"{stage}_{plot}")
            copied.append(f"{stage}_{plot}")
    return copied


def _report(recipe: Recipe, results: dict, backend: str, gates: list, plots: list[str], examples: list[dict]) -> str:
    metrics = sorted({m for r in results.values() for m in r if m != "pairs"})
    lines = [
        f"# Evaluation of run `{recipe.run.name}`",
        "",
        f"Held-out split of the data artifact; greedy decoding through **{backend}**, at most "
        f"{recipe.evaluate.max_new_tokens} new tokens. Perplexity is over assistant tokens (lower is better).",
        "",
        "| model | " + " | ".join(metrics) + " |",
        "| --- |" + " --- |" * len(metrics),
    ]
    for name, values in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" if m in values else "" for m in metrics) + " |")
    if gates:
        lines += ["", "## Gates", "", _gate_table(gates)]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Examples", "", "| prompt | reference | " + " | ".join(results) + " |", "| --- | --- |" + " --- |" * len(results)]
    for example in examples:
        cells = [example["prompt"][-1]["content"], example["reference"], *[example["answers"][n] for n in results]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run(recipe: Recipe, *, force: bool = False) -> Path:
    data_dir = artifacts.require_stage(recipe.run_dir, "data", STAGE, recipe)
    found = model_artifacts(recipe.run_dir)
    if not found:
        raise MissingArtifactError(
            f"no model artifacts in {recipe.run_dir} to evaluate. Run `accelerate launch pipeline/sft.py --config "
            f"{recipe.source_path}` first (and `python -m pipeline.base` for a recipe that builds its model)."
        )
    stage = artifacts.StageRun.for_recipe(STAGE, recipe)
    stage.add_input("data", data_dir)
    for name, folder in found.items():
        stage.add_input(name, folder)
    if not force and stage.up_to_date():
        print(f"eval: up to date ({stage.final_dir}); use --force to re-evaluate.")
        return stage.final_dir
    backend = engines.choose_backend(recipe.evaluate.backend)
    prompts, references, tools = engines.held_out_conversations(data_dir, recipe.evaluate.max_examples)
    if not any(r.strip() for r in references):
        raise PipelineError(
            f"the eval split of {data_dir} has no reference answers (every final assistant turn is empty), so "
            f"{', '.join(recipe.evaluate.metrics)} cannot be computed. Hold out rows whose last assistant turn has text."
        )
    work = stage.begin()
    scratch = work / ".merged"
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    ids = engines.prompt_ids(tokenizer, prompts, tools)
    pairs = scoring.held_out_pairs(data_dir, recipe.evaluate.max_examples) if (data_dir / artifacts.PREFERENCE_DATA_DIR).is_dir() else None
    import datasets

    sft_eval = datasets.load_from_disk(str(data_dir / artifacts.SFT_DATA_DIR))["eval"]
    if recipe.evaluate.max_examples is not None:
        sft_eval = sft_eval.select(range(min(recipe.evaluate.max_examples, len(sft_eval))))

    results: dict[str, dict[str, float]] = {}
    answers: dict[str, list[str]] = {}
    for name, folder in found.items():
        model_dir = _model_dir(name, folder, scratch, recipe.model.dtype, tokenizer)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=models.torch_dtype("float32"))
        stop_ids = model.generation_config.eos_token_id
        stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
        if backend == "hf":
            answers[name] = engines.hf_generate(model, tokenizer, ids, recipe.evaluate.max_new_tokens, recipe.evaluate.batch_size)
        else:
            answers[name] = engines.vllm_generate(model_dir, tokenizer, ids, recipe.evaluate.max_new_tokens, stop_ids)
        scores: dict[str, float] = {}
        for metric in recipe.evaluate.metrics:
            scores.update(scoring.compute_metric(metric, answers[name], references))
        scores["perplexity"] = scoring.perplexity(model, tokenizer, sft_eval, recipe.evaluate.batch_size)
        if pairs is not None:
            preference = scoring.preference_scores(model, tokenizer, pairs, recipe.evaluate.batch_size)
            scores.update(preference_accuracy=preference["preference_accuracy"], mean_margin=preference["mean_margin"])
        results[name] = scores
        print(f"eval: {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    shutil.rmtree(scratch, ignore_errors=True)

    gates = check_gates(recipe.evaluate.gates, results)
    with open(work / PREDICTIONS_FILE, "w", encoding="utf-8") as handle:
        for i, (prompt, reference) in enumerate(zip(prompts, references)):
            record = {"prompt": prompt, "reference": reference, "answers": {n: answers[n][i] for n in results}}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {"backend": backend, "examples": len(prompts), "models": results, "gates": gates,
               "gates_passed": all(g["passed"] for g in gates)}  # fmt: skip
    (work / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plots = _plots(results, work, recipe.run_dir)
    examples = [json.loads(line) for line in (work / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()[:8]]
    (work / REPORT_FILE).write_text(_report(recipe, results, backend, gates, plots, examples), encoding="utf-8")
    headline = {f"{n}_{m}": v for n, r in results.items() for m, v in r.items() if m in ("exact_match", "preference_accuracy")}
    final = stage.complete({"backend": backend, "gates_passed": summary["gates_passed"], **headline})
    print(f"eval: {len(results)} models on {len(prompts)} held-out prompts via {backend} -> {final / REPORT_FILE}")
    if not summary["gates_passed"]:
        raise GateFailure("evaluation gates failed (export refuses this run unless --force):\n" + _gate_table(gates))
    return final


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_parser("python -m pipeline.evaluate", __doc__.splitlines()[0]).parse_args(argv)
    run(load_recipe(args.config, args.overrides), force=args.force)


if __name__ == "__main__":
    sys.exit(run_cli(main))
