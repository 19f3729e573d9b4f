"""The end of `make demo`: serve the export, ask one held-out question through the `openai` client, stop.

    python -m serving.demo [--config configs/tiny.yaml]

Prints the question, the reference answer, the served model's answer and the evaluation table, then stops
the server with SIGTERM and waits for it, so nothing is left running. When the run has no export because the
evaluation gates failed, it says which gates failed and the commands that export and serve it anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from pipeline import evaluate
from pipeline.core import artifacts, chat, report, scoring, server_process, stages
from pipeline.core.cli import DEFAULT_CONFIG, run_cli
from pipeline.core.config import load_recipe
from pipeline.core.errors import PipelineError
from serving import middleware

COLUMNS = ["exact_match", "chosen_match", "preference_accuracy", "tool_arguments_accuracy", "perplexity"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config)
    try:
        export_dir = stages.require(stages.EXPORT, recipe, "demo")
    except PipelineError:
        evaluation = artifacts.read_manifest(stages.EVAL.folder(recipe))
        if evaluation and not evaluation["metrics"].get("gates_passed", True):
            gates = json.loads((stages.EVAL.folder(recipe) / artifacts.METRICS_FILE).read_text())["gates"]
            raise PipelineError(evaluate.gate_failure_message(recipe, gates)) from None
        raise
    data_dir = stages.DATA.folder(recipe)
    question = scoring.HeldOut.load(data_dir, chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR), recipe).sets[
        "answers"
    ][0]
    port = server_process.free_port()
    started = time.time()
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.vllm_server", "--config", args.config, f"serve.port={port}"]
    )
    try:
        server_process.wait_healthy(port, server)
        from openai import OpenAI

        name = artifacts.read_serving_file(export_dir)["served_model_name"]
        # The first key the server requires, if the recipe's serve.api_key_env holds any (the server inherits this
        # environment).
        keys = middleware.parse_api_keys(os.environ.get(recipe.serve.api_key_env))
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys[0] if keys else "none")
        reply = client.chat.completions.create(model=name, messages=question["prompt"], temperature=0)
        answer = reply.choices[0].message.content
    finally:
        server_process.stop(server)
    print(f"\nserved {name} (healthy after {time.time() - started:.0f} s), asked one held-out question:")
    print(
        f"  question:  {question['prompt'][-1]['content']}\n  reference: {question['reference']}\n  answer:   "
        f" {answer}\n"
    )
    summary = json.loads((stages.EVAL.folder(recipe) / artifacts.METRICS_FILE).read_text())
    print(f"{'model':8}" + "".join(f"{c:>26}" for c in COLUMNS))
    for model_name, values in summary["models"].items():
        print(f"{model_name:8}" + "".join(f"{values.get(c, float('nan')):>26.4f}" for c in COLUMNS))
    print("\n" + "\n".join(report.verdicts(summary["models"])))


if __name__ == "__main__":
    sys.exit(run_cli(main))
