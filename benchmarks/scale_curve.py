"""How each stage's cost grows with model size: the pipeline at four sizes of one family, same training tokens.

    python benchmarks/scale_curve.py [--config configs/qwen2.5-0.5b-shape.yaml] [--output-dir DIR]
                                     [--out scale_curve.json] [--plot scale_curve.png]
    python benchmarks/scale_curve.py --smoke --config <a small recipe>   # two tiny sizes: the logic only

Runs every stage of the recipe as its own process, as a user runs them (`python -m pipeline.data`, ... export),
then starts vLLM's server on the export and asks it one question, at about 1M, 10M and 60M parameters (the Qwen2
family, 64-dimensional heads, the recipe's own vocabulary) and at the recipe's own model (the 0.36B body of
Qwen2.5-0.5B). Step counts and data are the recipe's at every size, so every size trains on the same tokens.

Per stage and size it prints the wall time (process start to exit: imports and start-up included), tokens/s for
training, the stage's peak resident memory (its manifest's, with child processes), the disk it wrote, and for
training the FLOP/s reached against the matmul peak measured in the same run (at its start and its end, the
higher) in the dtype it trained in. FLOPs are counted as the hardware does them (benchmarks/gpu_sft.py
`flops_per_token`): 4x the frozen parameters per token plus 6x the adapter's for LoRA, causal attention within each
row, and DPO's reference forward.
From the four sizes: each stage's fixed cost and marginal cost (a least-squares line of wall time over
parameters), and the growth exponent between the two largest sizes (log time ratio over log parameter ratio: above 1
the stage costs more than its work grows). Nothing is asserted about time: machines differ up to 2.4x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_sft import flops_per_token, matmul_peak  # noqa: E402

from pipeline.core import (  # noqa: E402
    artifacts,
    models,
    server_process,  # noqa: E402
    stages,
)

QWEN2 = {
    "model_type": "qwen2",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
# The smaller members of the family: 64-dimensional heads as in Qwen2.5-0.5B, key-value heads a fifth to a half.
SIZES: dict[str, dict[str, int] | None] = {
    "1m": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 2,
           "num_key_value_heads": 1},
    "10m": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 5, "num_attention_heads": 6,
            "num_key_value_heads": 2},
    "60m": {"hidden_size": 640, "intermediate_size": 2560, "num_hidden_layers": 10, "num_attention_heads": 10,
            "num_key_value_heads": 2},
    "recipe": None,  # the recipe's own model.init
}  # fmt: skip
SMOKE_SIZES: dict[str, dict[str, int] | None] = {
    "smoke-a": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
                "num_key_value_heads": 1},
    "smoke-b": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1},
}  # fmt: skip
STAGE_MODULES = ("data", "base", "sft", "dpo", "eval", "export")
TRAINING = ("sft", "dpo")
MATMUL_N = 1024  # large enough for a CPU's peak: 99 GFLOP/s fp32 on 2 AVX2 cores, as 512 and 1,024 gave alike
STAGE_TIMEOUT = 1800


def run_stage(name: str, config: Path, overrides: list[str], log: Path) -> float:
    """One stage as its own process; its wall time."""
    command = [sys.executable, "-m", stages.get(name).module, "--config", str(config), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    with open(log, "a") as handle:
        done = subprocess.run(
            command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=STAGE_TIMEOUT
        )
    if done.returncode:
        raise SystemExit(f"{name} failed (exit {done.returncode}); the end of {log}:\n{server_process.log_tail(log)}")
    return time.time() - started


def serve_once(export_dir: Path, log: Path) -> dict[str, float]:
    """vLLM's server on the export: seconds until it answers, one chat answer's seconds, the tree's peak memory."""
    port = server_process.free_port()
    started = time.time()
    server = server_process.start_vllm_server(export_dir, port, log)
    memory = artifacts.TreeMemory(server.pid)
    try:
        ready = server_process.wait_healthy(port, server, log)
        name = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30).read())["data"][0]
        body = {"model": name["id"], "messages": [{"role": "user", "content": "Reverse the word cat."}],
                "max_tokens": 16, "temperature": 0}  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        asked = time.time()
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())["choices"][0]["message"]
        answered = time.time() - asked
    finally:
        peak = memory.stop()
        server_process.stop(server)
    return {
        "wall_seconds": time.time() - started,
        "ready_seconds": ready,
        "answer_seconds": answered,
        "peak_memory_mb": peak,
        "answered": bool(answer.get("content") or answer.get("tool_calls")),
    }


def row_lengths(data_dir: Path) -> dict[str, list[int]]:
    """Non-padding lengths of the rows each training stage sees: SFT rows, and DPO's chosen and rejected rows."""
    import datasets

    sft = datasets.load_from_disk(str(data_dir / artifacts.SFT_DATA_DIR))["train"]
    pairs = datasets.load_from_disk(str(data_dir / artifacts.PREFERENCE_DATA_DIR))["train"]
    dpo = [p + c for p, c in zip(pairs["prompt_length"], pairs["chosen_length"])]
    dpo += [p + r for p, r in zip(pairs["prompt_length"], pairs["rejected_length"])]
    return {"sft": list(sft["length"]), "dpo": dpo}


def stage_figures(run_dir: Path, stage: str, seconds: float, fields: dict, lengths: dict) -> dict:
    manifest = artifacts.read_manifest(run_dir / stage) or {}
    figures: dict[str, Any] = {
        "wall_seconds": round(seconds, 1),
        "peak_memory_mb": manifest.get("peak_memory_with_children_mb", manifest.get("peak_memory_mb")),
        "disk_mb": round(sum(o["bytes"] for o in manifest.get("outputs", {}).values()) / 2**20, 1),
    }
    if stage in TRAINING:
        metrics = manifest["metrics"]
        method = "full" if manifest["config"][stage]["method"] == "full" else "lora"  # qlora, dora: adapters too
        per_token = flops_per_token(fields, method, lengths[stage], metrics["trainable_parameters"])
        if stage == "dpo":  # the reference model (the adapter switched off) scores every row once more
            per_token += flops_per_token(fields, "forward", lengths[stage], 0)
        dtype = manifest["config"]["model"]["dtype"]
        flops = metrics["tokens_seen"] * per_token / metrics["train_seconds"]
        figures.update(
            tokens=metrics["tokens_seen"],
            tokens_per_second=metrics["tokens_per_second"],
            train_seconds=metrics["train_seconds"],
            gflops=round(flops / 1e9, 2),
            dtype=dtype,
        )
    return figures


def fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least-squares wall time = fixed + marginal x parameters; and the growth exponent between the two largest."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    marginal = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    (x1, y1), (x2, y2) = sorted(points)[-2:]
    exponent = math.log(y2 / y1) / math.log(x2 / x1) if x2 > x1 and y1 > 0 and y2 > 0 else float("nan")
    return {"fixed_seconds": mean_y - marginal * mean_x, "seconds_per_parameter": marginal, "exponent": exponent}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = list(results["sizes"].values())
    for stage in [*STAGE_MODULES, "serve"]:
        points = [(s["parameters"], s["stages"][stage]["wall_seconds"]) for s in sizes if stage in s["stages"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=stage)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("wall seconds (process start to exit)")
    ax.set_title("cost of each stage by model size, same training tokens")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: dict) -> None:
    peaks = results["matmul_peak_gflops"]
    print(
        f"\nmatmul peak ({MATMUL_N}x{MATMUL_N}, the higher of the run's start and end): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
    )
    print(f"\n{'size':8} {'params':>12} {'stage':7} {'wall s':>8} {'tok/s':>8} {'peak MiB':>9} {'disk MiB':>9} "
          f"{'GFLOP/s':>8} {'of peak':>8}")  # fmt: skip
    for size, entry in results["sizes"].items():
        for stage, f in entry["stages"].items():
            tokens = f"{f['tokens_per_second']:.1f}" if "tokens_per_second" in f else "-"
            gflops = f"{f['gflops']:.1f}" if "gflops" in f else "-"
            share = f"{f['share_of_peak']:.1%}" if f.get("share_of_peak") is not None else "-"
            print(
                f"{size:8} {entry['parameters']:>12,} {stage:7} {f['wall_seconds']:>8.1f} {tokens:>8} "
                f"{f['peak_memory_mb'] or 0:>9.0f} {f.get('disk_mb', 0):>9.1f} {gflops:>8} {share:>8}"
            )
    print(f"\n{'stage':7} {'fixed s':>8} {'marginal':>28} {'exponent (two largest)':>23}")
    for stage, f in results["fits"].items():
        if stage in TRAINING:
            marginal = f"{f['microseconds_per_parameter_token'] * 1e3:.3f} ns per param-token"
        else:
            marginal = f"{f['seconds_per_parameter'] * 1e6:.3f} s per 1M params"
        flag = "  grows faster than its work" if f["exponent"] > 1.05 else ""
        print(f"{stage:7} {f['fixed_seconds']:>8.1f} {marginal:>28} {f['exponent']:>23.2f}{flag}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/qwen2.5-0.5b-shape.yaml"))
    parser.add_argument("--output-dir", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("scale_curve.json"))
    parser.add_argument("--plot", type=Path, default=Path("scale_curve.png"))
    parser.add_argument("--smoke", action="store_true", help="two tiny sizes, two steps: the logic, not the speed")
    args = parser.parse_args(argv)
    root = args.output_dir or Path(tempfile.mkdtemp(prefix="scale-curve-"))
    root.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE_SIZES if args.smoke else SIZES
    steps = ["sft.max_steps=2", "dpo.max_steps=2", "evaluate.max_examples=4"] if args.smoke else []
    dtypes = ("float32",) if args.smoke else ("float32", "bfloat16")
    results: dict[str, Any] = {
        "config": str(args.config),
        "machine": {"cpu_flags": sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & models.cpu_flags())},
        "matmul_peak_gflops_at_start": measure_peaks(args.smoke, dtypes),
        "sizes": {},
    }
    for size, shape in sizes.items():
        name = f"scale-{size}"
        overrides = [f"run.output_dir={root}", f"run.name={name}", "run.report_to=[]", *steps]
        if shape is not None:
            overrides.append("model.init=" + json.dumps({**QWEN2, **shape}))
        run_dir, log = root / name, root / f"{name}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"stages": {}}
        timings = {}
        for stage in STAGE_MODULES:
            print(f"{size}: {stage} ...", flush=True)
            timings[stage] = run_stage(stage, args.config, overrides, log)
        fields = json.loads((run_dir / stages.BASE.name / "config.json").read_text())
        entry["parameters"] = artifacts.read_manifest(run_dir / stages.BASE.name)["metrics"]["parameters"]
        lengths = row_lengths(run_dir / stages.DATA.name)
        for stage, seconds in timings.items():
            entry["stages"][stage] = stage_figures(run_dir, stage, seconds, fields, lengths)
        print(f"{size}: serve ...", flush=True)
        entry["stages"]["serve"] = serve_once(run_dir / stages.EXPORT.name, root / f"{name}-server.log")
        results["sizes"][size] = entry
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    # Shared machines: a peak measured once can land on a busy moment (72 and 99 GFLOP/s fp32 on one machine, an
    # hour apart), so it is measured again at the end and the higher of the two is the peak.
    results["matmul_peak_gflops_at_end"] = measure_peaks(args.smoke, dtypes)
    peaks = {d: max(results["matmul_peak_gflops_at_start"][d], results["matmul_peak_gflops_at_end"][d]) for d in dtypes}
    results["matmul_peak_gflops"] = peaks
    for entry in results["sizes"].values():
        for figures in entry["stages"].values():
            if "gflops" in figures and figures["dtype"] in peaks:
                figures["share_of_peak"] = round(figures["gflops"] / peaks[figures["dtype"]], 3)
    fits = {}
    for stage in [*STAGE_MODULES, "serve"]:
        points = [(e["parameters"], e["stages"][stage]["wall_seconds"]) for e in results["sizes"].values()]
        fits[stage] = fit(points)
        if stage in TRAINING:
            tokens = next(iter(results["sizes"].values()))["stages"][stage]["tokens"]
            fits[stage]["microseconds_per_parameter_token"] = fits[stage]["seconds_per_parameter"] / tokens * 1e6
    results["fits"] = fits
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    report(results)
    print(f"\nscale curve: {len(results['sizes'])} sizes, written to {args.out} and {args.plot}")


def measure_peaks(smoke: bool, dtypes: tuple[str, ...]) -> dict[str, float]:
    return {dtype: matmul_peak(256 if smoke else MATMUL_N, dtype) / 1e9 for dtype in dtypes}


if __name__ == "__main__":
    main()
