"""Run the whole pipeline: data -> base -> SFT -> DPO -> evaluate -> export, skipping what is up to date.

    python -m pipeline.run [--config configs/tiny.yaml] [--from STAGE] [--to STAGE] [--force] [KEY=VALUE ...]

Each stage decides from its manifest whether its inputs and settings changed, so a second run with nothing
changed runs nothing, and changing one SFT setting re-runs SFT and what follows it, not data prep. SFT and
DPO go through `accelerate launch --config_file <launch_config>` when the recipe's `sft.launch_config` /
`dpo.launch_config` names one. Ends with a table: stage, status (ran / skipped / failed), wall time, headline.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline import artifacts, launch
from pipeline.cli import run_cli, stage_parser
from pipeline.config import Recipe, load_recipe
from pipeline.errors import PipelineError

ORDER = ("data", "base", "sft", "dpo", "eval", "export")


def _stage_runner(name: str) -> Callable[..., Path | None]:
    import importlib

    module = {"eval": "evaluate"}.get(name, name)
    return importlib.import_module(f"pipeline.{module}").run


def _headline(name: str, folder: Path) -> str:
    metrics = (artifacts.read_manifest(folder) or {}).get("metrics", {})
    picks = {
        "data": ("sft_train_rows", "preference_train_rows"),
        "base": ("parameters",),
        "sft": ("final_loss", "tokens_per_second"),
        "dpo": ("final_loss", "rewards_accuracies"),
        "eval": ("dpo_exact_match", "dpo_preference_accuracy", "sft_exact_match", "gates_passed"),
        "export": ("merge_max_abs_logit_diff",),
    }[name]
    shown = [f"{key} {metrics[key]:.4g}" if isinstance(metrics[key], float) else f"{key} {metrics[key]}" for key in picks if key in metrics]
    return ", ".join(shown)


def _launch(recipe: Recipe, name: str, launch_config: str, overrides: Sequence[str], force: bool) -> None:
    """SFT/DPO under `accelerate launch`, so the launch config decides processes and DeepSpeed. Recipe validation
    has already refused a method the launch cannot run, before any process starts."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch.resolve_config_path(launch_config)), str(Path(__file__).with_name(f"{name}.py")), "--config", recipe.source_path,
               *(["--force"] if force else []), *overrides]  # fmt: skip
    if subprocess.run(command).returncode != 0:
        raise PipelineError(f"`{' '.join(command)}` failed; see its output above.")


def run(recipe: Recipe, overrides: Sequence[str] = (), *, start: str = "data", stop: str = "export", force: bool = False) -> list[dict]:
    stages = [s for s in ORDER[ORDER.index(start) : ORDER.index(stop) + 1] if s != "base" or recipe.model.init is not None]
    rows: list[dict] = []
    for name in stages:
        folder = recipe.run_dir / name
        before = artifacts.read_manifest(folder) if artifacts.manifest_is_complete(folder) else None
        started = time.time()
        try:
            section = getattr(recipe, name, None) if name in ("sft", "dpo") else None
            if section is not None and section.launch_config:
                _launch(recipe, name, section.launch_config, overrides, force)
            else:
                _stage_runner(name)(recipe, force=force)
            # Export evaluates too once it exists: refresh the evaluation so the next run finds it up to date.
            if name == "export" and "eval" in stages:
                _stage_runner("eval")(recipe)
        except PipelineError as error:
            rows.append({"stage": name, "status": "failed", "seconds": time.time() - started, "headline": str(error).split("\n")[0][:80]})
            _print_table(rows)
            raise
        after = artifacts.read_manifest(folder)
        status = "skipped" if before is not None and after is not None and after.get("finished_at") == before.get("finished_at") else "ran"
        rows.append({"stage": name, "status": status, "seconds": time.time() - started, "headline": _headline(name, folder)})
    _print_table(rows)
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'stage':8} {'status':8} {'seconds':>8}  headline")
    for row in rows:
        print(f"{row['stage']:8} {row['status']:8} {row['seconds']:8.1f}  {row['headline']}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.run", __doc__.splitlines()[0])
    parser.add_argument("--from", dest="start", choices=ORDER, default="data", help="first stage to run")
    parser.add_argument("--to", dest="stop", choices=ORDER, default="export", help="last stage to run")
    args = parser.parse_args(argv)
    if ORDER.index(args.start) > ORDER.index(args.stop):
        parser.error(f"--from {args.start} comes after --to {args.stop}")
    run(load_recipe(args.config, args.overrides), args.overrides, start=args.start, stop=args.stop, force=args.force)


if __name__ == "__main__":
    sys.exit(run_cli(main))
