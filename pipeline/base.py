"""Base-model stage: build a fresh model from `model.init` with the tokenizer of the data artifact.

    python -m pipeline.base [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]

Only for recipes that initialise a model from a config (the offline tiny default); a recipe with
`model.name_or_path` trains a pretrained model and has no base artifact. Writes `checkpoints/<run>/base/`:
safetensors weights, config, generation config (every stop token), tokenizer with chat template, manifest.
"""

from __future__ import annotations

import sys

from pipeline.core import artifacts, chat, cli, models, stages
from pipeline.core.errors import ConfigError
from pipeline.core.schema import Recipe

STAGE = stages.BASE


def run(recipe: Recipe, options: stages.Options = stages.Options()) -> stages.Outcome:
    if not STAGE.applies(recipe):
        raise ConfigError(
            f"model.name_or_path is {recipe.model.name_or_path!r}: a pretrained model needs no base stage. Run the SFT "
            f"stage next (`{stages.SFT.command} --config {recipe.source_path}`)."
        )

    def work(run: artifacts.StageRun) -> stages.Result:
        out = run.begin()
        tokenizer = chat.load_tokenizer(stages.DATA.folder(recipe) / artifacts.TOKENIZER_DIR)
        stop_ids = chat.stop_token_ids(tokenizer)
        model = models.build_from_config(recipe.model.init, tokenizer, stop_ids, recipe.run.seed, recipe.model.dtype)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        parameters = models.parameter_count(model)
        return stages.Result(
            {"parameters": parameters, "stop_token_ids": stop_ids},
            f"base: {model.config.model_type} with {parameters:,} parameters, vocab {len(tokenizer)}",
        )

    return stages.execute(STAGE, recipe, work, force=options.force)


main = cli.stage_main(STAGE, run)

if __name__ == "__main__":
    sys.exit(main())
