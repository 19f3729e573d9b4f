"""Where a training step's time goes: the recipe's SFT and DPO under torch.profiler, by kind of work.

    python benchmarks/train_profile.py [--config configs/qwen2.5-0.5b-shape.yaml] [--steps 4] [--output-dir DIR]
    python benchmarks/train_profile.py --smoke --config <a small recipe>   # two steps each: the logic only

Runs the data and base stages, then SFT and DPO for `--steps` optimizer steps each, in this process, as the stages
run them (the recipe's batch, dtype, LoRA and attention). The first step of each is left out (allocations, one-time
set-up); the others are profiled op by op. Prints, per stage, the share of the profiled time spent in each kind of
work (matmuls, attention, elementwise and normalisation, the optimizer, data movement, the rest), the FLOP/s of the
whole steps and of the matmuls alone against a matmul peak measured in the same run (before and after, the
higher), and the ten ops that cost the most.
The scale curve (benchmarks/scale_curve.py) says how far a stage is from the peak; this says where the rest goes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_sft import matmul_peak  # noqa: E402

from pipeline.core import stages  # noqa: E402
from pipeline.core.config import load_recipe  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
KINDS = {
    "matmul": MATMULS,
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax", "aten::softmax"),
    "optimizer": ("aten::_foreach", "aten::_fused_adam", "Optimizer."),
    "data movement": ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous", "aten::to", "aten::_to_copy",
                      "aten::index", "aten::gather", "aten::scatter", "aten::fill_", "aten::zero_", "aten::empty"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::silu", "aten::pow",
                    "aten::rsqrt", "aten::mean", "aten::sum", "aten::exp", "aten::log", "aten::where",
                    "aten::sigmoid", "aten::masked", "aten::threshold", "aten::embedding", "aten::_log_softmax",
                    "aten::nll_loss", "aten::logsigmoid", "aten::sort", "aten::max", "aten::rms"),
}  # fmt: skip


def kind_of(name: str) -> str:
    return next((kind for kind, prefixes in KINDS.items() if name.startswith(prefixes)), "other")


class StepProfiler:
    """A TrainerCallback that profiles every optimizer step but the first."""

    def __init__(self, steps: int) -> None:
        import torch

        self.profile = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            schedule=torch.profiler.schedule(wait=1, warmup=0, active=max(1, steps - 1), repeat=1),
            with_flops=True,
        )
        self.seconds: list[float] = []

    def callback(self) -> Any:
        import time

        from transformers import TrainerCallback

        profiler = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ARG002
                profiler.profile.start()

            def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ARG002
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ARG002
                profiler.seconds.append(time.perf_counter() - self.started)
                profiler.profile.step()

            def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ARG002
                profiler.profile.stop()

        return Callback()


def run_stage(name: str, recipe: Any) -> None:
    importlib.import_module(stages.get(name).module).run(recipe, stages.Options(force=True))


def profile_stage(name: str, recipe: Any, steps: int) -> dict[str, Any]:
    import transformers

    profiler = StepProfiler(steps)
    original = transformers.Trainer.train

    def train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        trainer.add_callback(profiler.callback())
        return original(trainer, *args, **kwargs)

    transformers.Trainer.train = train
    try:
        run_stage(name, recipe)
    finally:
        transformers.Trainer.train = original
    events = [e for e in profiler.profile.key_averages() if e.key != "ProfilerStep*"]
    top_level = sum(e.self_cpu_time_total for e in events)  # microseconds, every op's own time once
    by_kind: dict[str, float] = {}
    for event in events:
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + event.self_cpu_time_total
    matmul_seconds = by_kind.get("matmul", 0.0) / 1e6
    matmul_flops = sum(e.flops for e in events if e.key in MATMULS)
    profiled_steps = profiler.seconds[1:]
    return {
        "profiled_steps": len(profiled_steps),
        "seconds_per_step": sum(profiled_steps) / max(1, len(profiled_steps)),
        # every matmul's FLOPs over the whole steps' time: what the step as a whole reached
        "step_gflops": matmul_flops / sum(profiled_steps) / 1e9 if profiled_steps else 0.0,
        "share": {kind: seconds / top_level for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "matmul_gflops": matmul_flops / matmul_seconds / 1e9 if matmul_seconds else 0.0,
        "top_ops": [
            {"op": e.key, "share": e.self_cpu_time_total / top_level, "calls": e.count}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/qwen2.5-0.5b-shape.yaml"))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage; the first is not profiled")
    parser.add_argument("--output-dir", type=Path, help="where the run goes (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("train_profile.json"))
    parser.add_argument("--smoke", action="store_true", help="two steps each, a small peak: the logic, not the speed")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 2
    root = args.output_dir or Path(tempfile.mkdtemp(prefix="train-profile-"))
    overrides = [
        f"run.output_dir={root}", "run.report_to=[]", f"sft.max_steps={args.steps}", f"dpo.max_steps={args.steps}",
        "sft.save_steps=1000", "dpo.save_steps=1000", *args.overrides,
    ]  # fmt: skip
    recipe = load_recipe(args.config, overrides)
    dtype = recipe.model.dtype
    # On a shared machine one measurement can land on a busy moment: the peak is measured before and after, the
    # higher kept (as benchmarks/scale_curve.py does).
    size = 256 if args.smoke else 1024
    peak_before = matmul_peak(size, dtype)
    for name in ("data", "base"):
        run_stage(name, recipe)
    results: dict[str, Any] = {"config": str(args.config), "dtype": dtype, "stages": {}}
    for name in ("sft", "dpo"):
        results["stages"][name] = profile_stage(name, recipe, args.steps)
    results["matmul_peak_gflops"] = max(peak_before, matmul_peak(size, dtype)) / 1e9
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    peak = results["matmul_peak_gflops"]
    print(f"\nmatmul peak ({dtype}): {peak:.1f} GFLOP/s")
    for name, figures in results["stages"].items():
        print(
            f"\n{name}: {figures['profiled_steps']} steps profiled, {figures['seconds_per_step']:.1f} s each, "
            f"{figures['step_gflops']:.1f} GFLOP/s ({figures['step_gflops'] / peak:.0%} of peak); the matmuls alone "
            f"{figures['matmul_gflops']:.1f} GFLOP/s ({figures['matmul_gflops'] / peak:.0%})"
        )
        print("  " + ", ".join(f"{kind} {share:.1%}" for kind, share in figures["share"].items()))
        for op in figures["top_ops"]:
            print(f"  {op['share']:6.1%}  {op['calls']:>7}  {op['op']}")
    print(f"\ntrain profile: sft and dpo, {args.steps} steps each, written to {args.out}")


if __name__ == "__main__":
    main()
