"""Base-model stage: build a fresh model from `model.init` with the tokenizer of the data artifact.

    python -m pipeline.base [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]

Only for recipes that initialise a model from a config (the offline tiny default); a recipe with
`model.name_or_path` trains a pretrained model and has no base artifact. Writes `checkpoints/<run>/base/`:
safetensors weights, config, generation config (every stop token), tokenizer with chat template, manifest.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import artifacts, chat, models
from pipeline.cli import run_cli, stage_parser
from pipeline.config import Recipe, load_recipe
from pipeline.errors import ConfigError

STAGE = "base"


def run(recipe: Recipe, *, force: bool = False) -> Path:
    if recipe.model.init is None:
        raise ConfigError(
            f"model.name_or_path is {recipe.model.name_or_path!r}: a pretrained model needs no base stage. Run the SFT "
            f"stage next (`accelerate launch pipeline/sft.py --config {recipe.source_path}`)."
        )
    data_dir = artifacts.require_stage(recipe.run_dir, "data", STAGE, recipe)
    stage = artifacts.StageRun.for_recipe(STAGE, recipe)
    stage.add_input("data", data_dir)
    if not force and stage.up_to_date():
        print(f"base: up to date ({stage.final_dir}); use --force to rebuild.")
        return stage.final_dir
    work = stage.begin()
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    stop_ids = sorted({tokenizer.eos_token_id, chat.end_of_turn_token_id(tokenizer)})
    model = models.build_from_config(recipe.model.init, tokenizer, stop_ids, recipe.run.seed, recipe.model.dtype)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    parameters = models.parameter_count(model)
    final = stage.complete({"parameters": parameters, "stop_token_ids": stop_ids})
    print(f"base: {model.config.model_type} with {parameters:,} parameters, vocab {len(tokenizer)} -> {final}")
    return final


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_parser("python -m pipeline.base", __doc__.splitlines()[0]).parse_args(argv)
    run(load_recipe(args.config, args.overrides), force=args.force)


if __name__ == "__main__":
    sys.exit(run_cli(main))
