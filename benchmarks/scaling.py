"""SFT scaling: one process against two under DDP, DeepSpeed ZeRO-2 and ZeRO-3, plus DeepSpeed's memory estimates.

    python benchmarks/scaling.py [--config configs/tiny.yaml] [--steps 60]

Runs the pipeline's SFT stage on the default recipe's data and base model under each launch config in
accelerate_configs/, side by side in one run, for a fixed number of optimizer steps with the same global batch,
and reports non-padding tokens/s (from the stage's manifest: tokens seen / wall time of training), the peak
memory of each process (resident set size on the CPU, allocated memory on a GPU), and the final loss. On a
2-core machine two processes share the two cores that one process uses alone (torchrun gives each rank one
thread), so this measures the parallel overhead here, not a speed-up.

Then prints DeepSpeed's own estimate of model-state memory per process (parameters, gradients, optimizer
state; no activations) for full fine-tuning of a 0.5B and a 7B model (Qwen2.5 shapes, counted on the meta
device, nothing downloaded) under ZeRO-2 and ZeRO-3, with and without CPU offload, on 1, 2 and 8 GPUs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core import artifacts, stages

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LAUNCHES = (
    ("1 process", "single_process.yaml"),
    ("DDP x2", "ddp.yaml"),
    ("ZeRO-2 x2", "deepspeed_zero2.yaml"),
    ("ZeRO-3 x2", "deepspeed_zero3.yaml"),
)

# Qwen2.5 configurations (from their config.json), so parameter counts need no download.
REFERENCE_MODELS = {
    "0.5B (Qwen2.5-0.5B)": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7B (Qwen2.5-7B)": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


def prepare_default(config: str) -> Path:
    """The default recipe's data and base artifacts (made if missing); the benchmark only trains."""
    from pipeline import run
    from pipeline.core.config import load_recipe

    recipe = load_recipe(config)
    run.run(recipe, start="data", stop="base")
    return recipe.run_dir


def measure(config: str, run_dir: Path, launch_config: str, steps: int, scratch: Path) -> dict:
    """SFT under one launch config, in its own output folder seeded with the default data and base artifacts."""
    output = scratch / launch_config.removesuffix(".yaml")
    for stage in ("data", "base"):
        shutil.copytree(run_dir / stage, output / run_dir.name / stage)
    overrides = [f"run.output_dir={output}", f"sft.max_steps={steps}", "sft.save_steps=100000", "sft.logging_steps=10"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / launch_config),
        str(REPO / "pipeline" / "sft.py"),
        "--config",
        config,
        *overrides,
    ]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{launch_config} failed:\n{result.stderr[-3000:]}")
    manifest = json.loads((output / run_dir.name / stages.SFT.name / artifacts.MANIFEST).read_text())
    return {**manifest["metrics"], "launch_seconds": round(time.time() - started, 1)}


def reference_parameters(shape: dict) -> tuple[int, int]:
    """(total parameters, largest layer's parameters) of a Qwen2 model of this shape, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def deepspeed_estimates() -> list[dict]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for name, shape in REFERENCE_MODELS.items():
        total, largest = reference_parameters(shape)
        for gpus in (1, 2, 8):
            for offload in (False, True):
                _, zero2_gpu = estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=offload)
                zero3_cpu, zero3_gpu, _ = estimate_zero3_model_states_mem_needs(
                    total, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload
                )
                rows.append(
                    {
                        "model": name,
                        "parameters": total,
                        "gpus": gpus,
                        "offload": offload,
                        "zero2_gb_per_gpu": zero2_gpu / 2**30,
                        "zero3_gb_per_gpu": zero3_gpu / 2**30,
                        "ddp_gb_per_gpu": 16 * total / 2**30,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--smoke", action="store_true", help="2 steps per launch: the logic, not the speed")
    args = parser.parse_args()
    if args.smoke:
        args.steps = 2

    run_dir = prepare_default(args.config)
    results = {}
    with tempfile.TemporaryDirectory(prefix="scaling-") as scratch:
        for label, launch_config in LAUNCHES:
            results[label] = measure(args.config, run_dir, launch_config, args.steps, Path(scratch))
            print(f"measured {label}: {results[label]['tokens_per_second']:,.0f} tokens/s", flush=True)

    reference = results["1 process"]["tokens_per_second"]
    print(f"\nSFT, default recipe, {args.steps} steps, global batch unchanged")
    print(
        f"{'launch':11} {'procs':>5} {'tokens/s':>9} {'vs 1 proc':>9} {'peak MB per process':>22} {'final loss':>10}"
        f" {'launch s':>8}"
    )
    for label, m in results.items():
        memory = " / ".join(f"{mb:,.0f}" for mb in m["peak_memory_mb_per_process"])
        print(
            f"{label:11} {m['processes']:>5} {m['tokens_per_second']:>9,.0f}"
            f" {m['tokens_per_second'] / reference:>8.2f}x {memory:>22} {m['final_loss']:>10.4f}"
            f" {m['launch_seconds']:>8.1f}"
        )

    print("\nDeepSpeed's estimate of model-state memory per GPU, full fine-tuning with Adam (DDP: 16 bytes/parameter)")
    print(f"{'model':20} {'params':>8} {'GPUs':>4} {'offload':>7} {'DDP GB':>7} {'ZeRO-2 GB':>9} {'ZeRO-3 GB':>9}")
    for row in deepspeed_estimates():
        print(
            f"{row['model']:20} {row['parameters'] / 1e9:>7.2f}B {row['gpus']:>4} {str(row['offload']):>7} "
            f"{row['ddp_gb_per_gpu']:>7.1f} {row['zero2_gb_per_gpu']:>9.1f} {row['zero3_gb_per_gpu']:>9.1f}"
        )
    multi = {label: m["tokens_per_second"] / reference for label, m in results.items() if m["processes"] > 1}
    slowest = min(multi, key=multi.get)
    print(
        f"\nscaling: 2 processes reach {min(multi.values()):.2f}-{max(multi.values()):.2f}x the tokens/s of one process"
        f" on this machine (slowest: {slowest}); DeepSpeed's estimates include its 1.5x buffer factor"
    )


if __name__ == "__main__":
    main()
