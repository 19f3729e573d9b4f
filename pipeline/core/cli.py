"""The command line every stage shares: `--config`, `--force`, dotted overrides, clean user errors, exit codes.

Exit codes: 0 the stage ran or was up to date; 2 a user error (bad recipe, bad data, missing input, failed gate),
explained in one paragraph without a traceback; 143 (`stages.STOPPED_EXIT_CODE`) stopped by SIGTERM after a
checkpoint, rerun the same command to resume; 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.core import stages
from pipeline.core.errors import PipelineError

DEFAULT_CONFIG = "configs/tiny.yaml"
VERBOSE_ENV = "PIPELINE_VERBOSE"  # inherited by the processes a stage starts (accelerate launch, vLLM's engine)

# bitsandbytes warns on every import that an optional CPU kernel package (fetched from the Hub) is absent;
# its built-in CPU path is what runs here, so the warning says nothing a user can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# vLLM says on import, before its own logging is configured (so VLLM_LOGGING_LEVEL cannot hold it back), that the
# CPU has no Triton backend; it uses its own CPU kernels. Set here, at import, so that vLLM's engine process, which
# imports the server module again, is quiet too.
QUIET_LOGGERS = ("vllm.triton_utils.importing",)
# In the environment, so that child processes inherit them: vLLM's Triton shim touches a deprecated torch attribute
# on import, and multiprocessing's resource tracker reports at exit a semaphore vLLM's engine leaves to it.
QUIET_WARNINGS = "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning,ignore:resource_tracker:UserWarning"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure_output(show_everything: bool) -> None:
    """Quiet by default: a stage shows its progress bar and its one-line summary, and the libraries' known,
    harmless notices stay out of the way (each named below); `-v` shows everything. Called before the libraries
    are imported, since several read their settings from the environment then."""
    if show_everything:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    quiet = {
        "TORCH_CPP_LOG_LEVEL": "ERROR",  # vLLM's CPU backend: "NUMA binding: Using MEMBIND policy ..." per engine
        "VLLM_LOGGING_LEVEL": "ERROR",  # "Triton is installed, but doesn't include CPU backend" and start-up INFO lines
        "TRANSFORMERS_VERBOSITY": "error",
        "DATASETS_VERBOSITY": "error",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # TRL's tokenizing bars: the stage's own bar stays
    }
    for key, value in quiet.items():
        os.environ.setdefault(key, value)
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_WARNINGS]))
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*", category=FutureWarning)
    _quiet_loggers()
    # DeepSpeed announces on import that it found no GPU and uses the CPU.
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _quiet_loggers() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


if not verbose():
    _quiet_loggers()


def recipe_parser(prog: str, description: str, runs_stages: bool = True) -> argparse.ArgumentParser:
    """The command line of everything that reads a recipe (stages, the runner, the server): --config, overrides,
    -v, --print-config; and --force where it runs stages."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=(
            "Overrides are dotted KEY=VALUE pairs applied over the recipe, e.g. sft.learning_rate=1e-4 "
            "data.sources.0.weight=2. Values are parsed as YAML."
        ),
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"recipe YAML (default: {DEFAULT_CONFIG})")
    if runs_stages:
        parser.add_argument("--force", action="store_true", help="run even if the artifact is up to date")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every library message and training log line")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the recipe resolved with every default and override, and exit (keys: docs/recipe.md)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of recipe keys")
    return parser


def stage_parser(stage: stages.Stage) -> argparse.ArgumentParser:
    parser = recipe_parser(stage.command, stage.description)
    if stage.trains:
        parser.add_argument(
            "--allow-drift",
            action="store_true",
            help="resume an interrupted run even though the recipe or data changed",
        )
        parser.add_argument(
            "--fresh", action="store_true", help="discard an interrupted run's checkpoints and start over"
        )
    return parser


def print_config(recipe: Any) -> stages.Outcome:
    from pipeline.core.schema import resolved_yaml

    print(resolved_yaml(recipe), end="")
    return stages.Outcome.SKIPPED


def report_user_error(error: PipelineError) -> None:
    """The first paragraph wrapped; anything after a blank line (a table, say) printed as it is."""
    head, _, rest = str(error).partition("\n")
    print("\n".join(textwrap.wrap(f"error: {' '.join(head.split())}", width=110)), file=sys.stderr)
    if rest:
        print(rest, file=sys.stderr)


def exit_code(outcome: Any) -> int:
    return stages.STOPPED_EXIT_CODE if outcome == stages.Outcome.STOPPED else 0


def run_cli(entry: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run an entry point; a PipelineError becomes a readable message and exit code 2, a stop exit code 143."""
    main_process = stages.is_main_process()
    if not main_process:
        # Library warnings repeat rank 0's; errors and tracebacks still show.
        warnings.filterwarnings("ignore")
    try:
        return exit_code(entry(argv))
    except PipelineError as error:
        # Every process of a node checks the same recipe and files, so they raise the same error: each node says it
        # once (nodes of a multi-node job without a shared filesystem can differ: node 1 may lack an input).
        if os.environ.get("LOCAL_RANK", "0") == "0":
            report_user_error(error)
        return stages.USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stages.leave_process_group()


def stage_main(
    stage: stages.Stage,
    run: Callable[..., stages.Outcome],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Callable[[Sequence[str] | None], int]:
    """The `main` of a stage module: parse the stage's command line, load the recipe, run, map the outcome."""

    def entry(argv: Sequence[str] | None) -> stages.Outcome:
        from pipeline.core.config import load_recipe

        parser = stage_parser(stage)
        if add_arguments is not None:
            add_arguments(parser)
        args = vars(parser.parse_args(argv))
        configure_output(args.pop("verbose"))
        recipe = load_recipe(args.pop("config"), args.pop("overrides"))
        if args.pop("print_config"):
            return print_config(recipe)
        if args.get("targets") is not None:
            args["targets"] = tuple(args["targets"])
        return run(recipe, stages.Options(**args))

    return lambda argv=None: run_cli(entry, argv)
