"""Many fine-tunes, one server: N LoRA adapters on one vLLM server against N merged models each on a server of its own.

    python benchmarks/multi_adapter.py [--config configs/tiny.yaml] [--adapters 1 4 8] [--concurrency 8 32]
                                       [--rank 16] [--output-tokens 64] [--prompt-tokens 64] [--json PATH]

The model is the serving benchmark's (benchmarks/llama_135m.py: Llama-shaped, about 135M parameters, random weights,
the default recipe's tokenizer); each adapter is a random LoRA adapter of --rank on every attention and MLP
projection, written as an adapter export (serving.json with the base's weights hash, as `export.targets: [adapter]`
writes it), so the servers are started exactly as users start them: `python -m serving.vllm_server --artifact A
--adapter B ...` and, merged, `--artifact M`. Both in the server's default (eager) mode and the same dtype.

What is measured, in one run, one server at a time:
  memory   of the whole server (its process and vLLM's engine process), after a warm-up request to every model:
           PSS (each shared page split between the processes sharing it) and USS (pages no other process maps).
           N merged servers are not started together (eight would not fit this machine's memory): their memory is
           N x USS of the one merged server plus its shared part (PSS - USS) once, what N such processes hold.
  tok/s    closed loop at each concurrency (benchmarks/serving.py's client: streamed /v1/completions, token-id
           prompts, exactly --output-tokens tokens each), requests spread round-robin over the N adapters; the
           merged server at the same concurrencies on its one model.
Goals (issue #32): 8 adapters in at most 1.25x the memory of one merged server; over 4 adapters at concurrency 32,
at least 0.7x the tokens/s of one merged model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.serving import SERVED_NAME, start_server, vllm_level, write_artifact  # noqa: E402
from pipeline.core import models, server_process  # noqa: E402

MEMORY_GOAL = 1.25  # 8 adapters on one server against one merged server
THROUGHPUT_GOAL = 0.7  # 4 adapters at concurrency 32 against one merged model
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(merged: Path, count: int, rank: int, scratch: Path) -> list[Path]:
    """`count` adapter exports over the merged folder's model, random LoRA weights (B scaled so that each adapter
    changes the logits, as a trained one does)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.core import adapters, artifacts

    base_dir = (merged / artifacts.MODEL_DIR).resolve()
    serving = artifacts.read_serving_file(merged)
    base_hash = adapters.base_weights_hash(base_dir)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)), config)
    folders = []
    for index in range(count):
        torch.manual_seed(index + 1)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                with torch.no_grad():
                    parameter.normal_(0.0, 0.02)
        folder = scratch / f"adapter-{index}"
        model.save_pretrained(str(folder / artifacts.ADAPTER_DIR))
        # What the server reads beside the adapter: the chat template and generation config, never base weights.
        (folder / artifacts.MODEL_DIR).mkdir(parents=True)
        for name in ("chat_template.jinja", "generation_config.json"):
            shutil.copy(base_dir / name, folder / artifacts.MODEL_DIR / name)
        artifacts.write_serving_file(
            folder,
            served_model_name=f"adapter-{index}",
            max_model_len=serving["max_model_len"],
            dtype=serving["dtype"],
            stop_ids=serving["stop_token_ids"],
            stop_tokens=[],
            tool_call_parser=None,
            lora={
                "name": f"adapter-{index}", "path": artifacts.ADAPTER_DIR, "base_model": str(base_dir),
                "base_hash": base_hash, "rank": rank, "stages": ["random"], "target_modules": TARGETS,
            },
        )  # fmt: skip
        folders.append(folder)
    return folders


def server_memory(server) -> dict[str, float]:  # noqa: ANN001 - a Popen
    """PSS and USS of the server and all its children, in MiB."""
    import psutil

    processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    pss = uss = 0
    for process in processes:
        info = process.memory_full_info()
        pss, uss = pss + info.pss, uss + info.uss
    return {"pss_mib": pss / 2**20, "uss_mib": uss / 2**20, "processes": len(processes)}


def measure(
    name: str,
    artifact: Path,
    options: tuple[str, ...],
    served: tuple[str, ...],
    config: str,
    levels: list[int],
    prompts: dict,
    warmups: dict,
    output_tokens: int,
    scratch: Path,
) -> dict:
    port = server_process.free_port()
    log_path = scratch / f"{name}.log"
    server = start_server(artifact, config, port, log_path, compile_graphs=False, options=options)
    try:
        started = server_process.wait_healthy(port, server, log_path)
        # One request to every model first: an adapter is read into its slot on its first request.
        asyncio.run(vllm_level(port, warmups[levels[0]][: len(served)], [], len(served), 2, served))
        memory = server_memory(server)
        throughput = {
            c: asyncio.run(vllm_level(port, prompts[c], warmups[c], c, output_tokens, served)) for c in levels
        }
    except BaseException:
        print(f"{name}: the end of the server's log:\n{server_process.log_tail(log_path)}", file=sys.stderr)
        raise
    finally:
        server_process.stop(server)
    rates = ", ".join(f"c={c} {throughput[c]['tokens_per_s']:.1f} tok/s" for c in levels)
    print(
        f"  {name}: healthy after {started:.0f} s, PSS {memory['pss_mib']:.0f} MiB (USS {memory['uss_mib']:.0f}, "
        f"{memory['processes']} processes); {rates}",
        flush=True,
    )
    return {"memory": memory, "throughput": throughput, "start_s": started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="recipe whose data stage holds the tokenizer")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=models.native_dtype(models.cpu_flags()))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model, 2 adapters, 4 tokens: the logic")
    args = parser.parse_args()
    if args.smoke:
        args.adapters, args.concurrency, args.output_tokens, args.prompt_tokens = [2], [2], 4, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.core import artifacts, stages
    from pipeline.core.config import load_recipe

    recipe = load_recipe(args.config)
    tokenizer_dir = stages.require(stages.DATA, recipe, "benchmark") / artifacts.TOKENIZER_DIR
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    levels = sorted(set(args.concurrency))
    prompts, warmups = {}, {}
    for c in levels:
        rng = random.Random(c)
        prompts[c] = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(2 * c)]
        warmups[c] = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(max(c, 8))]
    print(
        f"{os.cpu_count()} CPUs; {args.dtype}; adapters of rank {args.rank} on {len(TARGETS)} projections; prompts "
        f"{args.prompt_tokens} tokens, outputs exactly {args.output_tokens}; concurrency {levels}, 2x requests each"
    )
    load_before = os.getloadavg()
    results: dict = {"adapters": {}}
    with tempfile.TemporaryDirectory(prefix="multi-adapter-") as scratch:
        scratch = Path(scratch)
        began = time.time()
        merged = write_artifact(
            scratch / "merged", tokenizer_dir, args.prompt_tokens + args.output_tokens + 16, args.dtype, args.smoke
        )
        exports = write_adapters(merged, max(args.adapters), args.rank, scratch)
        print(f"built the model and {len(exports)} adapters in {time.time() - began:.0f} s")
        common = (args.config, levels, prompts, warmups, args.output_tokens, scratch)
        results["merged"] = measure("1 merged model", merged, (), (SERVED_NAME,), *common)
        for count in sorted(set(args.adapters)):
            chosen = exports[:count]
            options = tuple(option for folder in chosen[1:] for option in ("--adapter", str(folder)))
            served = tuple(f"adapter-{index}" for index in range(count))
            results["adapters"][count] = measure(f"{count} adapters", chosen[0], options, served, *common)
    load_after = os.getloadavg()

    one = results["merged"]
    shared = one["memory"]["pss_mib"] - one["memory"]["uss_mib"]
    print(f"\n{'N':>3} | {'one server, N adapters':>22} | {'N merged servers':>16} | {'x one merged':>12} | tok/s by c")
    for count, measured in results["adapters"].items():
        alone = shared + count * one["memory"]["uss_mib"]
        speeds = {c: measured["throughput"][c]["tokens_per_s"] for c in levels}
        rates = " ".join(f"c={c}: {v:.1f} ({v / one['throughput'][c]['tokens_per_s']:.2f}x)" for c, v in speeds.items())
        measured["merged_servers_mib"] = alone
        measured["memory_vs_one_merged"] = measured["memory"]["pss_mib"] / one["memory"]["pss_mib"]
        print(
            f"{count:>3} | {measured['memory']['pss_mib']:>18.0f} MiB | {alone:>12.0f} MiB | "
            f"{measured['memory_vs_one_merged']:>11.2f}x | {rates}"
        )
    print("merged, one model: " + ", ".join(f"c={c} {one['throughput'][c]['tokens_per_s']:.1f} tok/s" for c in levels))
    print(
        f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.1f}' for x in load_after)}"
    )
    verdicts = []
    if 8 in results["adapters"]:
        ratio = results["adapters"][8]["memory_vs_one_merged"]
        verdicts.append(f"8 adapters' memory {ratio:.2f}x one merged server (goal <= {MEMORY_GOAL}): "
                        f"{'MET' if ratio <= MEMORY_GOAL else 'NOT MET'}")  # fmt: skip
    if 4 in results["adapters"] and 32 in levels:
        ratio = results["adapters"][4]["throughput"][32]["tokens_per_s"] / one["throughput"][32]["tokens_per_s"]
        verdicts.append(f"4 adapters at c=32 {ratio:.2f}x one merged model's tok/s (goal >= {THROUGHPUT_GOAL}): "
                        f"{'MET' if ratio >= THROUGHPUT_GOAL else 'NOT MET'}")  # fmt: skip
    for verdict in verdicts:
        print(verdict)
    print(f"multi-adapter: {len(results['adapters'])} adapter counts against one merged server")
    if args.json:
        args.json.write_text(json.dumps({**results, "load_before": load_before, "load_after": load_after}, indent=2))


if __name__ == "__main__":
    main()
