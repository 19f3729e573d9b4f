"""Print a recipe resolved with every default and override (what `--print-config` on any stage prints), or the
reference of every recipe key, generated from the schema (docs/recipe.md).

    python -m pipeline.recipe [--config configs/tiny.yaml] [KEY=VALUE ...]
    python -m pipeline.recipe --reference > docs/recipe.md
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.core import cli
from pipeline.core.schema import reference_markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.recipe_parser("python -m pipeline.recipe", __doc__.splitlines()[0], runs_stages=False)
    parser.add_argument("--reference", action="store_true", help="print the recipe reference (docs/recipe.md) instead")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference_markdown(), end="")
        return
    from pipeline.core.config import load_recipe

    cli.print_config(load_recipe(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
