"""Run the whole pipeline: every stage of the recipe in order, skipping what is up to date.

    python -m pipeline.run [--config configs/tiny.yaml] [--from STAGE] [--to STAGE] [--force]
                           [--allow-failed-gates] [KEY=VALUE ...]

Each stage decides from its manifest whether its inputs and settings changed, so a second run with nothing
changed runs nothing, and changing one SFT setting re-runs SFT and what follows it, not data prep. Training
stages go through `accelerate launch --config_file <launch_config> -m pipeline.<stage>` when the recipe's
`sft.launch_config` / `dpo.launch_config` names one. Ends with a table: stage, status (ran / skipped / stopped /
failed), wall time, headline.

Exit status: 0 when every stage ran or was up to date; 2 when one failed (its error is printed; a failed gate
stops the run before export unless --allow-failed-gates); 143 when SIGTERM stopped it: the stage in progress
saved a checkpoint if it trains, nothing after it started, and the same command resumes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from pipeline.core import cli, launch, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import GateFailure, PipelineError
from pipeline.core.schema import Recipe


class Stopped(Exception):
    """SIGTERM arrived while a stage that does not checkpoint was running: it stops where it is."""


def _launched(stage: stages.Stage, recipe: Recipe, overrides: Sequence[str], force: bool) -> stages.Outcome:
    """A training stage under `accelerate launch`, so the launch config decides processes and DeepSpeed. Recipe
    validation has already refused a method the launch cannot run, before any process starts."""
    if not force and stages.prepare(stage, recipe).up_to_date():
        print(f"{stage.name}: up to date ({stage.folder(recipe)}); use --force to rerun.")
        return stages.Outcome.SKIPPED
    config = launch.resolve_config_path(stage.section(recipe).launch_config)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "-m",
        stage.module,
        "--config",
        recipe.source_path,
        *(["--force"] if force else []),
        *overrides,
    ]
    child = subprocess.Popen(command)
    # A stop asked of the pipeline is a stop asked of the stage: the launcher passes SIGTERM to every rank.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == stages.STOPPED_EXIT_CODE:
        return stages.Outcome.STOPPED
    if code != 0:
        raise PipelineError(f"`{' '.join(command)}` failed with status {code}; see its output above.")
    return stages.Outcome.RAN


def _run_stage(
    stage: stages.Stage, recipe: Recipe, overrides: Sequence[str], force: bool, allow_failed_gates: bool
) -> stages.Outcome:
    import importlib

    section = stage.section(recipe) if stage.trains else None
    if section is not None and section.launch_config:
        return _launched(stage, recipe, overrides, force)
    options = stages.Options(force=force, allow_failed_gates=allow_failed_gates)
    return importlib.import_module(stage.module).run(recipe, options)


def run(
    recipe: Recipe,
    overrides: Sequence[str] = (),
    *,
    start: str = stages.NAMES[0],
    stop: str = stages.NAMES[-1],
    force: bool = False,
    allow_failed_gates: bool = False,
) -> list[dict[str, Any]]:
    """Run the stages from `start` to `stop`; the table's rows. Raises the failing stage's error after the table."""
    chosen = [s for s in stages.STAGES[stages.NAMES.index(start) : stages.NAMES.index(stop) + 1] if s.applies(recipe)]
    rows: list[dict[str, Any]] = []

    def stop_here(signum: int, frame: Any) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stop_here)
    try:
        for stage in chosen:
            started = time.time()
            try:
                outcome = _run_stage(stage, recipe, overrides, force, allow_failed_gates)
            except Stopped:
                outcome = stages.Outcome.STOPPED
            except PipelineError as error:
                if isinstance(error, GateFailure) and allow_failed_gates:
                    print(
                        f"{stage.name}: gates failed; going on to export because of --allow-failed-gates.\n{error}",
                        file=sys.stderr,
                    )
                    outcome = stages.Outcome.RAN
                else:
                    rows.append(
                        {
                            "stage": stage.name,
                            "status": "failed",
                            "seconds": time.time() - started,
                            "headline": str(error).split("\n")[0][:80],
                        }
                    )
                    _print_table(rows)
                    raise
            rows.append(
                {
                    "stage": stage.name,
                    "status": outcome.value,
                    "seconds": time.time() - started,
                    "headline": (
                        stages.headline(stage, recipe)
                        if outcome != stages.Outcome.STOPPED
                        else "stopped by SIGTERM; rerun to resume"
                    ),
                }
            )
            if outcome == stages.Outcome.STOPPED:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_table(rows)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'stage':8} {'status':8} {'seconds':>8}  headline")
    for row in rows:
        print(f"{row['stage']:8} {row['status']:8} {row['seconds']:8.1f}  {row['headline']}")


def main(argv: Sequence[str] | None = None) -> str:
    parser = cli.recipe_parser("python -m pipeline.run", __doc__.splitlines()[0])
    parser.add_argument(
        "--from", dest="start", choices=stages.NAMES, default=stages.NAMES[0], help="first stage to run"
    )
    parser.add_argument("--to", dest="stop", choices=stages.NAMES, default=stages.NAMES[-1], help="last stage to run")
    parser.add_argument(
        "--allow-failed-gates",
        action="store_true",
        help="export even if the evaluation gates fail; the export records it",
    )
    args = parser.parse_args(argv)
    cli.configure_output(args.verbose)
    if stages.NAMES.index(args.start) > stages.NAMES.index(args.stop):
        parser.error(f"--from {args.start} comes after --to {args.stop}")
    recipe = load_recipe(args.config, args.overrides)
    if args.print_config:
        return cli.print_config(recipe)
    rows = run(
        recipe,
        args.overrides,
        start=args.start,
        stop=args.stop,
        force=args.force,
        allow_failed_gates=args.allow_failed_gates,
    )
    return stages.Outcome.STOPPED if rows and rows[-1]["status"] == "stopped" else stages.Outcome.RAN


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
