"""SFT stage: supervised fine-tuning with TRL's SFTTrainer (full, LoRA, QLoRA, DoRA), assistant-only loss.

    accelerate launch pipeline/sft.py [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]
    python -m pipeline.sft ...

Reads the data artifact (and the base artifact of a recipe that builds its model), writes
`checkpoints/<run>/sft/`: `model/` (adapter or full weights as safetensors, tokenizer with chat template),
`log_history.json`, `loss.png`, `manifest.json`. Re-running after a crash or kill resumes from the newest
checkpoint; SIGTERM saves one and exits with status 143.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # `accelerate launch pipeline/sft.py` runs this file as a script, with pipeline/ first on sys.path, where
    # pipeline/evaluate.py would shadow the `evaluate` library: run the package's module instead, as `-m` does.
    import runpy

    del sys.path[0]
    runpy.run_module("pipeline.sft", run_name="__main__", alter_sys=True)
    raise SystemExit

from pipeline.core import artifacts, chat, cli, stages, training  # noqa: E402 - after the script hand-over
from pipeline.core.errors import MissingArtifactError  # noqa: E402
from pipeline.core.schema import Recipe  # noqa: E402

STAGE = stages.SFT


def _job(recipe: Recipe, run: artifacts.StageRun) -> training.Job:
    data_dir = stages.DATA.folder(recipe)
    if not (data_dir / artifacts.SFT_DATA_DIR).is_dir():
        raise MissingArtifactError(
            f"the data artifact {data_dir} has no SFT rows: add a chat, alpaca, ShareGPT or prompt/completion source "
            f"to data.sources and rerun `{stages.DATA.command} --config {recipe.source_path}`."
        )
    import datasets
    from trl import SFTConfig, SFTTrainer

    splits = datasets.load_from_disk(str(data_dir / artifacts.SFT_DATA_DIR))
    trainer_fields = recipe.sft.trainer
    base = training.base_model_path(recipe)
    adapter = recipe.sft.method != "full"

    def finish(trainer, work):  # noqa: ANN001, ANN202
        record = artifacts.model_record(
            base if adapter else artifacts.MODEL_DIR, inside_artifact=not adapter, adapter=adapter
        )
        return record, {}, ""

    return training.Job(
        config_class=SFTConfig,
        trainer_class=SFTTrainer,
        splits=splits,
        # `messages` stays so TRL recognises conversational data and checks the template; training reads the
        # token ids and assistant masks the data stage made with that same template.
        columns=["messages", "input_ids", "assistant_masks"],
        tokenizer=chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR),
        start=lambda args: base,
        plots={artifacts.LOSS_PLOT: ["loss", "eval_loss"]},
        owned={
            # Padding-free rows are never truncated by TRL (it refuses a max_length then); the data stage has
            # already dropped every row longer than data.max_length.
            "max_length": (
                None
                if trainer_fields.get("padding_free") and not trainer_fields.get("packing")
                else recipe.data.max_length
            ),
            "assistant_only_loss": True,
        },
        finish=finish,
    )


def run(recipe: Recipe, options: stages.Options = stages.Options()) -> stages.Outcome:
    return training.run_stage(
        STAGE, recipe, lambda run: _job(recipe, run), options, inputs=training.pretrained_input(recipe)
    )


main = cli.stage_main(STAGE, run)

if __name__ == "__main__":
    sys.exit(main())
