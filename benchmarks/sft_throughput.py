"""SFT throughput: the pipeline's SFT stage against a bare TRL SFTTrainer script, side by side.

    python benchmarks/sft_throughput.py [--steps 200] [--repeats 8] [--sequential]

Both train the same base model on the same tokenized rows of the default recipe with the same settings. By
default each pair runs at the same time, each program pinned to its own core with one thread, swapping cores
every pair: the machine's neighbours then slow both alike (run one after the other, identical runs differ by
up to 20% in wall time on this project's machines). --sequential runs them one after the other with every
core each, in ABBA order (pipeline, bare, bare, pipeline, ...). Tokens/s is non-padding tokens seen divided by
the wall time of `trainer.train()` in each; tokens per CPU-second is reported beside it. Also reports the padding
fraction of the default data at the recipe's batch size, and real-token throughput with packing on and off.
Exits 1 if the pipeline is slower than 0.95x bare TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.core import artifacts, stages

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BARE_TRL = r"""
import json, sys, time
import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
run_dir, seed = sys.argv[1], int(sys.argv[6])
steps, batch, lr, max_length = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
tokenizer = AutoTokenizer.from_pretrained(f"{run_dir}/data/tokenizer")
model = AutoModelForCausalLM.from_pretrained(f"{run_dir}/base")
columns = ["messages", "input_ids", "assistant_masks"]
train = datasets.load_from_disk(f"{run_dir}/data/sft")["train"].select_columns(columns)
args = SFTConfig(output_dir=f"{run_dir}/bare", max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                 lr_scheduler_type="cosine", warmup_steps=10, logging_steps=50, save_strategy="no", report_to="none",
                 use_cpu=True, bf16=False, assistant_only_loss=True, max_length=max_length, seed=seed,
                 include_num_input_tokens_seen="non_padding")
trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
start, cpu_start = time.time(), time.process_time()
trainer.train()
seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
result = {"tokens": int(trainer.state.num_input_tokens_seen), "seconds": seconds, "cpu_seconds": cpu_seconds}
print("RESULT " + json.dumps(result))
"""


def pipeline_command(config: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.sft", "--config", config, "--force", *overrides]


def pipeline_result(config: str, overrides: list[str]) -> dict:
    from pipeline.core import artifacts
    from pipeline.core.config import load_recipe

    metrics = artifacts.read_manifest(stages.SFT.folder(load_recipe(config, overrides)))["metrics"]
    return {
        "tokens": metrics["tokens_seen"],
        "seconds": metrics["train_seconds"],
        "cpu_seconds": metrics["train_cpu_seconds"],
    }


def bare_command(run_dir: Path, steps: int, batch: int, lr: float, max_length: int, seed: int) -> list[str]:
    return [sys.executable, "-c", BARE_TRL, str(run_dir), str(steps), str(batch), str(lr), str(max_length), str(seed)]


def bare_result(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def run_pipeline_sft(config: str, overrides: list[str]) -> dict:
    subprocess.run(pipeline_command(config, overrides), cwd=REPO, check=True, capture_output=True, text=True)
    return pipeline_result(config, overrides)


def run_concurrently(commands: dict[str, list[str]], cores: dict[str, int]) -> dict[str, str]:
    """Start the programs at once, each pinned to its own core with one thread; their stdout by name."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {
        name: subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda core=cores[name]: os.sched_setaffinity(0, {core}),
        )
        for name, command in commands.items()
    }
    outputs = {}
    for name, process in running.items():
        stdout, stderr = process.communicate()
        if process.returncode:
            raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
        outputs[name] = stdout
    return outputs


def padding_fraction(run_dir: Path, batch: int, seed: int) -> float:
    """Share of padded positions when the shuffled training rows are batched and padded to each batch's longest."""
    import random

    import datasets

    lengths = datasets.load_from_disk(str(run_dir / stages.DATA.name / artifacts.SFT_DATA_DIR))["train"]["length"]
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=8, help="runs of each; pairs alternate which goes first")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help=(
            "run the pairs one after the other with all cores each (ABBA order) instead of at once, "
            "one core and one thread each; identical sequential runs differ by up to 20%% here"
        ),
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="3 steps, one pair: the logic, not the speed (the 0.95 goal is not applied)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats = 3, 1

    from pipeline import base, data
    from pipeline.core.config import load_recipe

    workdir = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    common = [f"run.output_dir={workdir}", f"sft.max_steps={args.steps}", "sft.save_steps=100000", "sft.method=full"]
    recipe = load_recipe(args.config, common)
    data.run(recipe)
    base.run(recipe)
    per_device = recipe.sft.global_batch_size
    lr = recipe.sft.trainer.get("learning_rate", 2e-5)

    pipeline_rates, bare_rates, cpu_ratios = [], [], []
    pipeline_args = (args.config, common)
    bare_args = (recipe.run_dir, args.steps, per_device, lr, recipe.data.max_length, recipe.run.seed)
    for repeat in range(args.repeats):
        if not args.sequential:
            # Both at once, one core each, swapping cores every pair: the machine's neighbours slow both alike.
            cores = {"pipeline": repeat % 2, "bare": 1 - repeat % 2}
            out = run_concurrently(
                {"pipeline": pipeline_command(*pipeline_args), "bare": bare_command(*bare_args)}, cores
            )
            measured = {"pipeline": pipeline_result(*pipeline_args), "bare": bare_result(out["bare"])}
        else:
            # ABBA order: whichever runs second in a pair must not always be the same program.
            order = ["pipeline", "bare"] if repeat % 2 == 0 else ["bare", "pipeline"]
            runs = {
                "pipeline": lambda: run_pipeline_sft(*pipeline_args),
                "bare": lambda: bare_result(
                    subprocess.run(
                        bare_command(*bare_args), cwd=REPO, check=True, capture_output=True, text=True
                    ).stdout
                ),
            }
            measured = {name: runs[name]() for name in order}
        pipeline_rates.append(measured["pipeline"]["tokens"] / measured["pipeline"]["seconds"])
        bare_rates.append(measured["bare"]["tokens"] / measured["bare"]["seconds"])
        # Tokens per CPU-second: what each program does with the CPU it gets, less exposed to the machine's
        # neighbours than wall time (identical runs differ by up to 20% in wall time here).
        cpu_ratios.append(
            (measured["pipeline"]["tokens"] / measured["pipeline"]["cpu_seconds"])
            / (measured["bare"]["tokens"] / measured["bare"]["cpu_seconds"])
        )
    ratio = statistics.median(p / b for p, b in zip(pipeline_rates, bare_rates))

    packed = run_pipeline_sft(args.config, common + ["sft.packing=true"])
    unpacked = run_pipeline_sft(args.config, common + ["sft.packing=false"])
    packing_gain = (packed["tokens"] / packed["seconds"]) / (unpacked["tokens"] / unpacked["seconds"])

    print(
        f"SFT throughput, {args.steps} steps x global batch {recipe.sft.global_batch_size}, full fine-tuning,"
        f" {args.repeats} runs each,"
        f" {'in ABBA order' if args.sequential else 'pairs run at once, one core each, cores swapped every pair'}"
    )
    print(f"  pipeline  tokens/s: {', '.join(f'{r:,.0f}' for r in pipeline_rates)}")
    print(f"  bare TRL  tokens/s: {', '.join(f'{r:,.0f}' for r in bare_rates)}")
    print(
        f"  ratio pipeline / bare TRL (median of pairs): {ratio:.3f}  (required >= 0.95:"
        f" {'PASS' if ratio >= 0.95 else 'FAIL'})"
    )
    print(
        f"  tokens per CPU-second, pipeline / bare TRL: {', '.join(f'{r:.3f}' for r in cpu_ratios)} "
        f"(median {statistics.median(cpu_ratios):.3f})"
    )
    print(
        f"  padding fraction of the default data at batch {per_device}:"
        f" {padding_fraction(recipe.run_dir, per_device, recipe.run.seed):.3f}"
    )
    print(
        f"  real tokens/s with packing: {packed['tokens'] / packed['seconds']:,.0f}, without:"
        f" {unpacked['tokens'] / unpacked['seconds']:,.0f} (packing / no packing = {packing_gain:.2f}x; packed steps"
        " carry more real tokens each)"
    )
    sys.exit(0 if ratio >= 0.95 or args.smoke else 1)


if __name__ == "__main__":
    main()
