"""The command-line shape every stage shares: `--config`, `--force`, dotted overrides, clean user errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence

from pipeline.errors import PipelineError

DEFAULT_CONFIG = "configs/tiny.yaml"

# bitsandbytes warns on every import that an optional CPU kernel package (fetched from the Hub) is absent;
# its built-in CPU path is what runs here, so the warning says nothing a user can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Overrides are dotted KEY=VALUE pairs applied over the recipe, e.g. sft.learning_rate=1e-4 "
        "data.sources.0.weight=2. Values are parsed as YAML.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"recipe YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument("--force", action="store_true", help="run even if the artifact is up to date")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of recipe keys")
    return parser


def training_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = stage_parser(prog, description)
    parser.add_argument(
        "--allow-drift", action="store_true", help="resume an interrupted run even though the recipe or data changed"
    )
    parser.add_argument("--fresh", action="store_true", help="discard an interrupted run's checkpoints and start over")
    return parser


def is_main_rank() -> bool:
    """True except in the non-main processes of a multi-process launch, whose output would repeat rank 0's."""
    return os.environ.get("RANK", "0") == "0"


def report_user_error(error: PipelineError) -> None:
    """The first paragraph wrapped; anything after a blank line (a table, say) printed as it is."""
    head, _, rest = str(error).partition("\n")
    print("\n".join(textwrap.wrap(f"error: {' '.join(head.split())}", width=110)), file=sys.stderr)
    if rest:
        print(rest, file=sys.stderr)


def run_cli(entry: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a stage entry point; a PipelineError becomes a readable message and exit code 2."""
    if not is_main_rank():
        # Library warnings repeat rank 0's; errors and tracebacks still show.
        warnings.filterwarnings("ignore")
    try:
        entry(argv)
    except PipelineError as error:
        # Every process checks the same recipe and files, so every process raises the same error: say it once.
        if is_main_rank():
            report_user_error(error)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
