"""The spread of the default recipe's figures: seeds, and the CPU kernel families this machine can be forced into.

    python benchmarks/seed_spread.py [--config configs/tiny.yaml] [--seeds 42 1 2 3 4]
                                     [--families native avx2 default] [--mkl native COMPATIBLE]
                                     [--out spread.json] [--parallel 1]

Each machine is deterministic by itself, and machines differ: their CPUs offer different instruction sets, and
PyTorch and oneDNN pick different floating-point kernels on each, so thousands of optimizer steps end in
different models. This runs the default pipeline (data, base, SFT, DPO, evaluation) once per seed and kernel
family, forcing the family with ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA (a stand-in for the other machines),
and once per MKL code path (`--mkl`: torch's BLAS is MKL, which picks its own branch per CPU model and vendor,
beyond what the other two variables force; MKL_CBWR forces one), then prints, per metric, the mean, minimum,
maximum and standard deviation over every run, each run's figures and its gate results, and the value 3 standard
deviations below the mean that a gate should sit under.
Thread count changes nothing (measured: 1 and 2 threads end at the same loss to the last digit), so with
`--parallel 2` two runs share the machine, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.core import artifacts, models, stages

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The family names ATEN_CPU_CAPABILITY takes, and the oneDNN ISA cap that matches each.
FAMILIES = {"avx512": "AVX512_CORE", "avx2": "AVX2", "default": "SSE41"}
# Figures the spread reports beside every gate metric: how long the stages took, and where training ended.
STAGE_FIGURES = {
    "sft": ("final_loss", "train_seconds"),
    "dpo": ("final_loss", "train_seconds", "rewards_accuracies"),
    "grpo": ("final_loss", "train_seconds"),
}
COMPARED = (
    "exact_match",
    "contains_answer",
    "chosen_match",
    "preference_accuracy",
    "tool_arguments_accuracy",
    "tool_answer_match",
)


def native_family() -> str:
    flags = models.cpu_flags()
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "default"


def native_mkl_branch() -> str:
    return {"avx512": "AVX512", "avx2": "AVX2"}.get(native_family(), "COMPATIBLE")


def kernels_label(family: str, mkl: str) -> str:
    """A run's kernel choice as named in the table and the run folders: the family, and MKL's branch if forced."""
    return family if mkl == "native" else f"{family}+mkl-{mkl}"


def family_environment(family: str, threads: int | None, mkl: str = "native") -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if family != "native":
        env.update(ATEN_CPU_CAPABILITY=family, ONEDNN_MAX_CPU_ISA=FAMILIES[family])
    if mkl != "native":
        env["MKL_CBWR"] = mkl
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def one_run(config: str, family: str, mkl: str, seed: int, output: Path, threads: int | None) -> dict:
    label = kernels_label(family, mkl)
    name = f"{label}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "pipeline.run",
        "--config",
        config,
        "--to",
        "eval",
        "--allow-failed-gates",
        f"run.seed={seed}",
        f"run.name={name}",
        f"run.output_dir={output}",
    ]
    started = time.time()
    log = output / f"{name}.log"
    with open(log, "w") as handle:
        code = subprocess.run(
            command, cwd=REPO, env=family_environment(family, threads, mkl), stdout=handle, stderr=subprocess.STDOUT
        ).returncode
    record = read_run(output, label, seed)
    record.update(exit_code=code, seconds=round(time.time() - started, 1))
    print(
        f"{name}: {record['seconds']:.0f} s, gates {'passed' if record.get('gates_passed') else 'FAILED'}", flush=True
    )
    return record


def read_run(output: Path, family: str, seed: int) -> dict:
    """The figures of one finished run, from its artifacts."""
    name = f"{family}-seed{seed}"
    run_dir = output / name
    record: dict = {"family": family, "seed": seed, "log": str(output / f"{name}.log")}
    metrics_file = run_dir / stages.EVAL.name / artifacts.METRICS_FILE
    if not metrics_file.is_file():
        record["error"] = f"no evaluation; see {record['log']}"
        return record
    summary = json.loads(metrics_file.read_text())
    record["metrics"] = {
        f"{model}.{metric}": value
        for model, scores in summary["models"].items()
        for metric, value in scores.items()
        if isinstance(value, float)
    }
    # By source, named as a gate names them (MODEL.METRIC@SOURCE).
    record["metrics"].update(
        {
            f"{model}.{metric}@{source}": value
            for model, scores in summary["models"].items()
            for source, by_metric in scores.get("by_source", {}).items()
            for metric, value in by_metric.items()
        }
    )
    record["gates"] = summary["gates"]
    record["gates_passed"] = summary["gates_passed"]
    ran = [s for s in ("data", *stages.model_names(), "eval") if (run_dir / s / artifacts.MANIFEST).is_file()]
    for stage in ran:
        manifest = json.loads((run_dir / stage / artifacts.MANIFEST).read_text())
        record["metrics"][f"seconds:{stage}"] = manifest["wall_seconds"]
        record["metrics"].update(
            {
                f"{stage}:{key}": manifest["metrics"][key]
                for key in STAGE_FIGURES.get(stage, ())
                if manifest["metrics"].get(key) is not None
            }
        )
    # Gate-style differences, so their spread is measured too: each model against the one it trained from.
    m = record["metrics"]
    trained = [stage for stage in stages.model_names() if stage in ran]  # pipeline order: each from the one before
    for earlier, later in zip(trained, trained[1:]):
        for key in [k for k in m if k.startswith(f"{later}.") and k.split(".", 1)[1].split("@")[0] in COMPARED]:
            measure = key.split(".", 1)[1]
            if f"{earlier}.{measure}" in m:
                m[f"{later}-{earlier}.{measure}"] = m[key] - m[f"{earlier}.{measure}"]
    return record


def table(runs: list[dict], metrics: list[str] | None = None) -> str:
    """Per metric over every run: mean, minimum, maximum, standard deviation, mean - 3 std, and each kernel
    family's range (families differ in their floating-point kernels, seeds in everything else)."""
    complete = [r for r in runs if "metrics" in r]
    keys = metrics or sorted({k for r in complete for k in r["metrics"]})
    families = list(dict.fromkeys(r["family"] for r in complete))
    lines = [
        "| metric | mean | min | max | std | mean - 3 std | "
        + " | ".join(f"{f} ({sum(r['family'] == f for r in complete)} runs)" for f in families)
        + " |",
        "| --- " * (6 + len(families)) + "|",
    ]
    for key in keys:
        values = [r["metrics"][key] for r in complete if key in r["metrics"]]
        if not values:
            continue
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ranges = []
        for family in families:
            own = [r["metrics"][key] for r in complete if r["family"] == family and key in r["metrics"]]
            ranges.append(f"{min(own):.3f} - {max(own):.3f}" if own else "")
        lines.append(
            f"| {key} | {mean:.4f} | {min(values):.4f} | {max(values):.4f} | {std:.4f} | {mean - 3 * std:.4f} | "
            + " | ".join(ranges)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="kernel families: native (no forcing), avx512, avx2, default (default: native and every lower one)",
    )
    parser.add_argument(
        "--mkl",
        nargs="+",
        default=None,
        help=(
            "MKL code paths (MKL_CBWR): native (no forcing), AVX512, AVX2, COMPATIBLE (default: native and every "
            "lower one); every family runs with every path"
        ),
    )
    parser.add_argument(
        "--parallel", type=int, default=1, help="runs at once; with more than one, each gets one thread"
    )
    parser.add_argument("--output-dir", type=Path, help="where the runs' artifacts go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("spread.json"), help="every run's figures, as JSON")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: read the finished runs in --output-dir (e.g. of an interrupted spread) and report them",
    )
    parser.add_argument(
        "--metrics", nargs="+", help="only these rows of the table (e.g. sft.exact_match dpo-sft.chosen_match)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these runs to the ones already in --out (to measure a spread in parts) and report them all",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="one run: the first seed, native kernels (use with a small --config)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.families, args.mkl = args.seeds[:1], ["native"], ["native"]
    native = native_family()
    families = args.families or [
        "native",
        *[f for f in FAMILIES if list(FAMILIES).index(f) > list(FAMILIES).index(native)],
    ]
    mkl_branches = ["AVX512", "AVX2", "COMPATIBLE"]
    mkls = args.mkl or ["native", *mkl_branches[mkl_branches.index(native_mkl_branch()) + 1 :]]
    output = args.output_dir or Path(tempfile.mkdtemp(prefix="spread-"))
    output.mkdir(parents=True, exist_ok=True)
    print(
        f"native kernels: {native}, MKL {native_mkl_branch()}; families {', '.join(families)}; MKL paths"
        f" {', '.join(mkls)}; seeds {args.seeds}; artifacts in {output}",
        flush=True,
    )
    jobs = [(family, mkl, seed) for family in families for mkl in mkls for seed in args.seeds]
    threads = 1 if args.parallel > 1 else None
    if args.collect:
        labelled = [(kernels_label(family, mkl), seed) for family, mkl, seed in jobs]
        runs = [read_run(output, label, seed) for label, seed in labelled if (output / f"{label}-seed{seed}").is_dir()]
    else:
        with ThreadPoolExecutor(args.parallel) as pool:
            runs = list(pool.map(lambda job: one_run(args.config, *job, output, threads), jobs))
    if args.append and args.out.is_file():
        runs = json.loads(args.out.read_text())["runs"] + runs
    args.out.write_text(json.dumps({"native": native, "runs": runs}, indent=1) + "\n")
    print("\n" + table(runs, args.metrics))
    print("\n| run | seconds | gates |\n| --- | --- | --- |")
    for r in runs:
        gates = ", ".join(
            f"{g['gate']} {'pass' if g['passed'] else 'FAIL'} ({g['value']:.3f})"
            for g in r.get("gates", [])
            if g["value"] is not None
        )
        print(
            f"| {r['family']}-seed{r['seed']} | {r.get('seconds', float('nan')):.0f} | {gates or r.get('error', '')} |"
        )
    failed = [r for r in runs if "error" in r or not all(g["passed"] for g in r["gates"])]
    print(f"\n{len(runs) - len(failed)} of {len(runs)} runs passed every gate; figures in {args.out}")


if __name__ == "__main__":
    main()
