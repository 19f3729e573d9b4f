"""SFT stage: supervised fine-tuning with TRL's SFTTrainer (full, LoRA, QLoRA, DoRA), assistant-only loss.

    accelerate launch pipeline/sft.py [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]
    python -m pipeline.sft ...

Reads the data artifact (and the base artifact of a recipe that builds its model), writes
`checkpoints/<run>/sft/`: `model/` (adapter or full weights as safetensors, tokenizer with chat template),
`log_history.json`, `loss.png`, `manifest.json`. Re-running after a crash or kill resumes from the newest
checkpoint; SIGTERM saves one and exits 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/sft.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import artifacts, training
from pipeline.cli import is_main_rank, run_cli, training_parser
from pipeline.config import Recipe, load_recipe
from pipeline.errors import MissingArtifactError

STAGE = "sft"


def run(recipe: Recipe, *, force: bool = False, allow_drift: bool = False, fresh: bool = False) -> Path | None:
    """Train; returns the artifact folder, or None when SIGTERM stopped the run after a checkpoint."""
    data_dir = artifacts.require_stage(recipe.run_dir, "data", STAGE, recipe)
    stage = artifacts.StageRun.for_recipe(STAGE, recipe)
    stage.add_input("data", data_dir)
    model_path = training.base_model_path(recipe, stage)
    if not force and stage.up_to_date():
        if is_main_rank():
            print(f"sft: up to date ({stage.final_dir}); use --force to retrain.")
        return stage.final_dir
    if not (data_dir / artifacts.SFT_DATA_DIR).is_dir():
        raise MissingArtifactError(
            f"the data artifact {data_dir} has no SFT rows: add a chat, alpaca, ShareGPT or prompt/completion source "
            f"to data.sources and rerun `python -m pipeline.data --config {recipe.source_path}`."
        )

    import datasets
    from trl import SFTConfig, SFTTrainer

    from pipeline import chat

    splits = datasets.load_from_disk(str(data_dir / artifacts.SFT_DATA_DIR))
    # `messages` stays so TRL recognises conversational data and checks the template; training reads the
    # token ids and assistant masks the data stage made with that same template.
    columns = ["messages", "input_ids", "assistant_masks"]
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    args = training.trainer_arguments(
        SFTConfig, recipe, recipe.sft, STAGE, stage.work_dir / training.CHECKPOINTS_DIR,
        max_length=recipe.data.max_length, assistant_only_loss=True,
    )  # fmt: skip
    resume_from = training.begin_or_resume(stage, allow_drift=allow_drift, fresh=fresh)
    model = training.load_trainable_model(recipe, recipe.sft, STAGE, model_path)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"].select_columns(columns),
        eval_dataset=splits["eval"].select_columns(columns) if args.eval_strategy != "no" and "eval" in splits else None,
        processing_class=tokenizer,
        peft_config=training.peft_config(recipe.sft),
    )
    metrics = training.train_and_save(trainer, stage, resume_from, {artifacts.LOSS_PLOT: ["loss"]})
    if metrics is None:
        return None
    metrics["method"] = recipe.sft.method
    adapter = recipe.sft.method != "full"
    record = training.model_record(
        model_path if adapter else artifacts.MODEL_DIR, inside_artifact=not adapter, adapter=adapter
    )
    return training.complete_stage(
        stage, metrics, record,
        f"sft: {recipe.sft.method}, {metrics['optimizer_steps']} steps, final loss {metrics['final_loss']:.4f}, "
        f"{metrics['tokens_seen']:,} tokens at {metrics['tokens_per_second']:,.0f} tokens/s in "
        f"{metrics['train_seconds']:.0f} s",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    args = training_parser("accelerate launch pipeline/sft.py", __doc__.splitlines()[0]).parse_args(argv)
    run(load_recipe(args.config, args.overrides), force=args.force, allow_drift=args.allow_drift, fresh=args.fresh)


if __name__ == "__main__":
    sys.exit(run_cli(main))
