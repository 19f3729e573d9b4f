"""The end of `make demo`: serve the export, ask one held-out question through the `openai` client, stop.

    python -m serving.demo [--config configs/tiny.yaml]

Prints the question, the reference answer, the served model's answer and the evaluation table, then stops
the server with SIGTERM and waits for it, so nothing is left running.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence

from pipeline import artifacts, engines
from pipeline.cli import DEFAULT_CONFIG, run_cli
from pipeline.config import load_recipe
from serving import server_process


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config)
    export_dir = artifacts.require_stage(recipe.run_dir, "export", "demo", recipe)
    prompts, references, _ = engines.held_out_conversations(recipe.run_dir / "data", 1)
    port = server_process.free_port()
    started = time.time()
    server = subprocess.Popen([sys.executable, "-m", "serving.vllm_server", "--config", args.config, "--port", str(port)])
    try:
        server_process.wait_healthy(port, server)
        from openai import OpenAI

        name = json.loads((export_dir / "serving.json").read_text())["served_model_name"]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(model=name, messages=prompts[0], temperature=0)
        answer = reply.choices[0].message.content
    finally:
        server_process.stop(server)
    print(f"\nserved {name} (healthy after {time.time() - started:.0f} s), asked one held-out question:")
    print(f"  question:  {prompts[0][-1]['content']}\n  reference: {references[0]}\n  answer:    {answer}\n")
    metrics = json.loads((recipe.run_dir / "eval" / "metrics.json").read_text())
    columns = ["exact_match", "rougeL", "perplexity", "preference_accuracy"]
    print(f"{'model':8}" + "".join(f"{c:>22}" for c in columns))
    for model_name, values in metrics["models"].items():
        print(f"{model_name:8}" + "".join(f"{values.get(c, float('nan')):>22.4f}" for c in columns))


if __name__ == "__main__":
    sys.exit(run_cli(main))
