"""Evaluation stage: every model of the run side by side on the held-out split, a report, and gates.

    python -m pipeline.evaluate [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]

Each model (base, SFT, DPO: whichever exist) answers the held-out prompts greedily, through vLLM's offline engine
when vLLM is installed (the engine that serves, with the serving engine's settings) or batched HF `generate`:
- answers to the held-out SFT conversations: exact match, ROUGE, BLEU (`evaluate` modules shipped in the package);
- tool calls where a held-out conversation makes one (or declares tools and needs none): call emitted, name,
  arguments, and no call where none is due;
- answers to the held-out preference prompts: `chosen_match`, the share equal to the chosen answer, which shows
  what preference tuning taught that SFT did not;
plus perplexity on the assistant tokens and preference accuracy (log-probability of chosen above rejected), and
the lm-evaluation-harness tasks of `evaluate.harness`, run by lm-eval against the project's server started on each
model in turn (`pipeline.core.harness`).

A model already evaluated with the same weights, settings, engine and held-out data is not generated again: its
results come from the previous evaluation's cache, so a gate change re-checks in seconds. Writes
`checkpoints/<run>/eval/`: `metrics.json`, `predictions.jsonl`, `report.md` with PNG plots, and with benchmarks
`harness/` (the held-out rows as the shipped tasks read them, each model's answers per task). A failed gate
(`evaluate.gates`) exits with status 2 after writing everything, with a table of what failed.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import (
    adapters,
    artifacts,
    chat,
    cli,
    engines,
    harness,
    models,
    report,
    scoring,
    server_process,
    stages,
    tracking,
)
from pipeline.core.errors import ConfigError, GateFailure, PipelineError
from pipeline.core.schema import Recipe

STAGE = stages.EVAL
HEADLINE = ("exact_match", "chosen_match", "preference_accuracy", "tool_arguments_accuracy")


def check_gates(gates: dict[str, float], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """`MODEL.METRIC: minimum` or `A-B.METRIC: minimum difference` (perplexity: lower is better, so negated);
    `METRIC@SOURCE` reads the metric on one data source's held-out rows (the report's "By source" table);
    `harness.TASK.METRIC` a benchmark's (its direction as lm-eval states it)."""
    rows = []
    for key, threshold in gates.items():
        subject, measure = key.split(".", 1)
        metric, _, source = measure.partition("@")
        names = subject.split("-")
        if metric.startswith(harness.GATE_PREFIX):
            found = {n: harness.gate_value(results.get(n, {}), metric) for n in names}
            values = {n: value for n, (value, _) in found.items()}
            sign = 1 if all(better for _, better in found.values()) else -1
        else:
            sign = 1 if scoring.higher_is_better(metric) else -1
            values = {
                n: (results.get(n, {}).get("by_source", {}).get(source, {}) if source else results.get(n, {})).get(
                    metric
                )
                for n in names
            }
        missing = [n for n, v in values.items() if v is None]
        if missing:
            where = f" on source {source}" if source else ""
            rows.append(
                {
                    "gate": key,
                    "threshold": threshold,
                    "value": None,
                    "passed": False,
                    "why": f"no {metric}{where} for {', '.join(missing)}",
                }
            )
            continue
        value = values[names[0]] - (values[names[1]] if len(names) == 2 else 0.0)
        rows.append({"gate": key, "threshold": threshold, "value": value, "passed": sign * value >= sign * threshold})
    return rows


def gate_failure_message(recipe: Recipe, gates: list[dict[str, Any]]) -> str:
    """What failed, and the commands that export and serve the model anyway; then the gate table."""
    failed = ", ".join(
        f"{g['gate']} = {'n/a' if g['value'] is None else round(g['value'], 4)} (needs {g['threshold']})"
        for g in gates
        if not g["passed"]
    )
    config = recipe.source_path
    return (
        f"evaluation gates failed: {failed}; see {STAGE.folder(recipe) / artifacts.REPORT_FILE}. Export refuses a "
        "model that failed its gates. To export and serve it anyway (the export records that its gates failed):\n"
        f"    python -m pipeline.export --config {config} --allow-failed-gates\n"
        f"    python -m serving.demo --config {config}\n"
        "(or rerun the pipeline with --allow-failed-gates)\n\n" + report.gate_table(gates)
    )


def _full_weights_dir(
    folder: Path, scratch: Path, recipe: Recipe, settings: engines.EngineSettings, tokenizer: Any
) -> Path:
    """A folder with full weights for this model: the artifact itself, or an adapter merged into a scratch copy."""
    base, adapter = artifacts.model_location(folder)
    if adapter is None:
        return Path(base)
    target = scratch / folder.name
    if not target.is_dir():
        models.save_merged(base, adapter, recipe.model, target, tokenizer, settings.dtype)
    return target


def _cache_key(folder: Path, recipe: Recipe, backend: str, settings: engines.EngineSettings, data_identity: str) -> str:
    """What the results of one model depend on: its weights, the evaluation settings (not the gates), the engine
    and the held-out data."""
    measured = {k: v for k, v in recipe.to_dict()["evaluate"].items() if k not in ("gates", "harness")}
    record = {
        "weights": artifacts.weights_identity(folder),
        "evaluate": measured,
        "backend": backend,
        "context_length": engines.served_context_length(recipe),
        "engine": settings.as_dict(),
        "attn_implementation": recipe.model.attn_implementation,
        "data": data_identity,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _harness_key(
    folder: Path, recipe: Recipe, backend: str, settings: engines.EngineSettings, data_identity: str
) -> str:
    """What a model's benchmark results depend on: its weights, the tasks, how it generates, and the held-out data
    (the shipped tasks read it); a change of the other evaluation settings or of the gates re-runs none of them."""
    record = {
        "weights": artifacts.weights_identity(folder),
        "harness": recipe.to_dict()["evaluate"]["harness"],
        "max_new_tokens": recipe.evaluate.max_new_tokens,
        "backend": backend,
        "context_length": engines.served_context_length(recipe),
        "engine": settings.as_dict(),
        "data": data_identity,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _LoraRoute:
    """How a server with adapters serves a model: its base, plus the run's stages' adapters stacked into one (None
    for the base itself)."""

    base: str | Path
    adapter: Path | None
    rank: int


def _lora_routes(found: dict[str, Path], recipe: Recipe, scratch: Path) -> dict[str, _LoraRoute]:
    """The LoRA route of each model a server with adapters serves so (evaluate.through_lora): the base, and every
    model trained as adapters from it. A model trained in full has none: it is served as its own merged weights."""
    routes: dict[str, _LoraRoute] = {}
    for name, folder in found.items():
        stage = stages.get(name)
        if stage is stages.BASE:
            routes[name] = _LoraRoute(folder, None, 0)
            continue
        try:
            base, links = adapters.chain(recipe, stage)
        except ConfigError:
            continue
        record = adapters.stack(links, str(base), scratch / f"{name}-adapter")
        routes[name] = _LoraRoute(base, scratch / f"{name}-adapter", record["rank"])
    return routes


def _evaluate_model(
    folder: Path,
    recipe: Recipe,
    held: scoring.HeldOut,
    tokenizer: Any,
    backend: str,
    settings: engines.EngineSettings,
    scratch: Path,
    shared: _SharedEngine,
    route: _LoraRoute | None,
    lora_rank: int,
) -> dict[str, Any]:
    """Generate with one model on every held-out set (through its LoRA route where it has one) and score it."""
    model_dir = _full_weights_dir(folder, scratch, recipe, settings, tokenizer)
    model = models.load(model_dir, recipe.model, settings.dtype, device="cuda" if engines.on_gpu() else None)
    stop_ids = engines.model_stop_ids(model)
    sets = held.generation_sets()
    limit = recipe.evaluate.max_new_tokens
    context = engines.served_context_length(recipe)
    if backend == "hf":
        outputs = {
            name: engines.hf_generate(model, tokenizer, ids, limit, recipe.evaluate.batch_size, context)
            for name, ids in sets.items()
        }
    elif route is not None:
        engine = shared.on(route.base, settings, context, lora_rank)
        outputs = {name: engine.generate(tokenizer, ids, limit, stop_ids, route.adapter) for name, ids in sets.items()}
    else:
        engine = shared.on(model_dir, settings, context)
        outputs = {name: engine.generate(tokenizer, ids, limit, stop_ids) for name, ids in sets.items()}
    scores = held.score(outputs, recipe.evaluate.metrics)
    scores.update(held.likelihood_scores(model, tokenizer, recipe.evaluate.batch_size))
    return {"scores": scores, "outputs": outputs}


def _benchmark_model(
    name: str,
    folder: Path,
    recipe: Recipe,
    tokenizer: Any,
    backend: str,
    settings: engines.EngineSettings,
    scratch: Path,
    heldout_dir: Path,
) -> dict[str, Any]:
    """evaluate.harness on one model, through the project's server started on it (`serving.vllm_server`: the engine,
    settings, template and middleware that serve an export), by lm-eval's OpenAI-compatible completions client; by
    lm-eval's HF backend where the evaluation runs without vLLM."""
    model_dir = _full_weights_dir(folder, scratch, recipe, settings, tokenizer)
    tokenizer_dir = stages.DATA.folder(recipe) / artifacts.TOKENIZER_DIR
    context = engines.served_context_length(recipe)
    samples_dir = heldout_dir / name
    if backend == "hf":
        return harness.run_tasks(
            harness.in_process_model(
                model_dir, tokenizer_dir, settings.dtype, context, "cuda" if engines.on_gpu() else "cpu"
            ),
            recipe.evaluate.harness,
            heldout_dir,
            recipe.evaluate.max_new_tokens,
            samples_dir,
        )
    served = _serving_folder(name, model_dir, recipe, tokenizer, scratch)
    port = server_process.free_port()
    log = scratch / f"{name}-server.log"
    api_key = secrets.token_hex(16)
    server = server_process.start_vllm_server(
        served, port, log, ("--config", str(served / "recipe.yaml")), env={recipe.serve.api_key_env: api_key},
        cwd=Path.cwd(),
    )  # fmt: skip
    try:
        server_process.wait_healthy(port, server, log)
        client = harness.served_model(f"http://127.0.0.1:{port}/v1/completions", name, api_key, tokenizer_dir, context)
        return harness.run_tasks(
            client, recipe.evaluate.harness, heldout_dir, recipe.evaluate.max_new_tokens, samples_dir
        )
    finally:
        server_process.stop(server)


def _serving_folder(name: str, model_dir: Path, recipe: Recipe, tokenizer: Any, scratch: Path) -> Path:
    """What `serving.vllm_server` serves one model from, as an export would hold it: the model's folder (linked),
    `serving.json` naming the model, and the recipe with this run's overrides applied (the server reads its serve
    section)."""
    import yaml
    from transformers import GenerationConfig

    folder = scratch / "serve" / name
    folder.mkdir(parents=True)
    (folder / artifacts.MODEL_DIR).symlink_to(model_dir.resolve(), target_is_directory=True)
    stop_ids = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
    artifacts.write_serving_file(
        folder,
        served_model_name=name,
        max_model_len=engines.served_context_length(recipe),
        dtype=recipe.model.dtype,
        stop_ids=stop_ids,
        stop_tokens=tokenizer.convert_ids_to_tokens(stop_ids),
        tool_call_parser=chat.tool_call_parser(tokenizer.chat_template),
        lora=None,
        exported_from=name,
    )
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    return folder


class _SharedEngine:
    """One vLLM engine for the models of a run, which share their base's architecture: each model's weights are
    read into it in turn, instead of an engine started per model."""

    def __init__(self) -> None:
        self.engine: engines.VLLMEngine | None = None

    def on(
        self, model_dir: Path | str, settings: engines.EngineSettings, context: int, lora_rank: int | None = None
    ) -> engines.VLLMEngine:
        """An engine on `model_dir`; with `lora_rank`, one that generates through LoRA adapters over it."""
        if lora_rank:
            if self.engine is None or (self.engine.model, self.engine.lora_rank) != (
                engines.model_reference(model_dir),
                lora_rank,
            ):
                self.close()
                self.engine = engines.VLLMEngine(model_dir, settings, context, lora_rank)
            return self.engine
        if self.engine is None or self.engine.lora_rank or not self.engine.switch_to(model_dir):
            self.close()
            self.engine = engines.VLLMEngine(model_dir, settings, context)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def run(recipe: Recipe, options: stages.Options = stages.Options()) -> stages.Outcome:
    found = {stage.name: stage.folder(recipe) for stage in stages.model_inputs(STAGE, recipe)}
    return stages.execute(STAGE, recipe, lambda run: _evaluate(recipe, run, found), force=options.force)


def _evaluate(recipe: Recipe, run: artifacts.StageRun, found: dict[str, Path]) -> stages.Result:
    data_dir = stages.DATA.folder(recipe)
    backend = engines.choose_backend(recipe.evaluate.backend)
    settings = engines.engine_settings(recipe.model.dtype, engines.on_gpu())
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    held = scoring.HeldOut.load(data_dir, tokenizer, recipe)
    if held.empty():
        raise PipelineError(
            f"the eval split of {data_dir} has nothing to evaluate: no held-out answer with text, no tool call and no "
            f"preference pair, so {', '.join(recipe.evaluate.metrics)} cannot be computed. Hold out rows whose last "
            "assistant turn has text (raise data.eval_fraction)."
        )
    previous_cache = run.final_dir / artifacts.EVAL_CACHE_DIR
    work = run.begin()
    (work / artifacts.EVAL_CACHE_DIR).mkdir()
    scratch = work / ".merged"
    data_identity = run.inputs["data"]["sha256"]
    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, list[str]]] = {}
    reused: list[str] = []
    reused_benchmarks: list[str] = []
    round_trips: dict[str, int] = {}
    records: dict[str, dict[str, Any]] = {}
    stored: dict[str, dict[str, Any]] = {}  # the previous evaluation's cache, by model
    shared = _SharedEngine()
    routes = _lora_routes(found, recipe, scratch) if recipe.evaluate.through_lora else {}
    if routes and backend != "vllm":
        raise ConfigError(
            "evaluate.through_lora generates through vLLM's LoRA path, but the evaluation runs on transformers "
            f"(evaluate.backend={recipe.evaluate.backend}"
            f"{', and vLLM is not installed' if recipe.evaluate.backend == 'auto' else ''}): "
            "install the serve-cpu (or serve-gpu) extra and set evaluate.backend to auto or vllm."
        )
    lora_rank = engines.lora_rank_slot(max(route.rank for route in routes.values())) if routes else 0
    try:
        for name, folder in found.items():
            key = _cache_key(folder, recipe, backend, settings, data_identity)
            stored[name] = _read_cache(previous_cache / f"{name}.json")
            cached = stored[name] if stored[name].get("key") == key else None
            started = time.time()
            if cached is None:
                cached = {
                    "key": key,
                    **_evaluate_model(
                        folder, recipe, held, tokenizer, backend, settings, scratch, shared, routes.get(name), lora_rank
                    ),
                }
                print(f"eval: {name} in {time.time() - started:.0f} s: {scoring.describe(cached['scores'])}")
            else:
                # The outputs are what the cache saves work on; scores are recomputed from them, so a change in how
                # answers are scored reaches reused results too.
                cached["scores"] = {**cached["scores"], **held.score(cached["outputs"], recipe.evaluate.metrics)}
                reused.append(name)
                print(
                    f"eval: {name} unchanged since its last evaluation; results reused:"
                    f" {scoring.describe(cached['scores'])}"
                )
            records[name] = cached
            results[name], outputs[name] = cached["scores"], cached["outputs"]
    finally:
        shared.close()
    if recipe.evaluate.harness:
        heldout_dir = work / artifacts.HARNESS_DIR
        round_trips = harness.write_heldout_rows(held, heldout_dir)
        for name, folder in found.items():
            key = _harness_key(folder, recipe, backend, settings, data_identity)
            previous = stored[name].get("harness", {})
            if previous.get("key") == key:
                benchmarks = previous["results"]
                reused_benchmarks.append(name)
                answers = run.final_dir / artifacts.HARNESS_DIR / name
                if answers.is_dir():
                    shutil.copytree(answers, heldout_dir / name)
            else:
                started = time.time()
                benchmarks = _benchmark_model(name, folder, recipe, tokenizer, backend, settings, scratch, heldout_dir)
                print(f"eval: {name} benchmarks in {time.time() - started:.0f} s: {harness.describe(benchmarks)}")
            records[name]["harness"] = {"key": key, "results": benchmarks}
            results[name] = {**results[name], "harness": benchmarks}
    for name, record in records.items():
        (work / artifacts.EVAL_CACHE_DIR / f"{name}.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
    shutil.rmtree(scratch, ignore_errors=True)

    gates = check_gates(recipe.evaluate.gates, results)
    passed = all(g["passed"] for g in gates)
    held.write_predictions(work / artifacts.PREDICTIONS_FILE, outputs)
    engine = {"backend": backend, **settings.as_dict(), "through_lora": sorted(name for name in routes)}
    summary = {
        "engine": engine,
        "examples": held.sizes(),
        "models": results,
        "gates": gates,
        "gates_passed": passed,
        "reused": reused,
    }
    if recipe.evaluate.harness:
        summary["harness"] = {
            "tasks": recipe.to_dict()["evaluate"]["harness"],
            "lm_eval": harness.version(),
            "reused": reused_benchmarks,
            "heldout_rows": round_trips,
        }
    (work / artifacts.METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    report.write(work, recipe, summary, held, outputs)
    tracking.log_evaluation(recipe, STAGE.name, results)
    headline = {f"{n}_{m}": v for n, r in results.items() for m, v in r.items() if m in HEADLINE}
    failure = None if passed else GateFailure(gate_failure_message(recipe, gates))
    return stages.Result(
        {"backend": backend, "gates_passed": passed, **headline},
        f"eval: {len(results)} models on {held.describe()} via {backend} ({settings.dtype}"
        f"{', eager' if settings.enforce_eager else ''}){'; reused ' + ', '.join(reused) if reused else ''}; "
        f"report {artifacts.REPORT_FILE}",
        error=failure,
    )


def _read_cache(path: Path) -> dict[str, Any]:
    """A model's cached results, with the keys they were measured under (empty where there are none)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


main = cli.stage_main(STAGE, run)

if __name__ == "__main__":
    sys.exit(main())
