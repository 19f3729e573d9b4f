"""DPO stage: preference tuning with TRL's DPOTrainer on top of the SFT artifact (LoRA, QLoRA, full).

    accelerate launch pipeline/dpo.py [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]
    python -m pipeline.dpo ...

With LoRA/QLoRA the SFT model (its adapter merged in full precision, never into 4-bit weights) is written to
`base_model/` in the artifact and a fresh adapter is trained on it; the reference model is that same policy
with the adapter disabled, so no second copy sits in memory. With full fine-tuning TRL loads a frozen copy as
the reference. Writes `checkpoints/<run>/dpo/` like SFT, plus `rewards.png`.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/dpo.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import artifacts, training
from pipeline.cli import is_main_rank, run_cli, training_parser
from pipeline.config import Recipe, load_recipe
from pipeline.errors import MissingArtifactError

STAGE = "dpo"
REWARD_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]


def _materialise_base(source: Path, adapter: Path | None, target: Path, recipe: Recipe, tokenizer) -> None:  # noqa: ANN001
    """Put the SFT model, full precision, into `target`: merged if SFT trained an adapter, else hard-linked."""
    if (target / "config.json").is_file():
        return  # left by an interrupted run that is now resuming
    if adapter is None:
        target.mkdir(parents=True)
        for path in Path(source).iterdir():
            if path.is_file():
                try:
                    os.link(path, target / path.name)
                except OSError:
                    shutil.copy2(path, target / path.name)
        return
    from pipeline import models

    merged = models.load_merged(source, adapter, recipe.model.dtype, recipe.model.trust_remote_code)
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


def run(recipe: Recipe, *, force: bool = False, allow_drift: bool = False, fresh: bool = False) -> Path | None:
    """Train; returns the artifact folder, or None when SIGTERM stopped the run after a checkpoint."""
    data_dir = artifacts.require_stage(recipe.run_dir, "data", STAGE, recipe)
    sft_dir = artifacts.require_stage(recipe.run_dir, "sft", STAGE, recipe)
    stage = artifacts.StageRun.for_recipe(STAGE, recipe)
    stage.add_input("data", data_dir)
    stage.add_input("sft", sft_dir)
    if not force and stage.up_to_date():
        if is_main_rank():
            print(f"dpo: up to date ({stage.final_dir}); use --force to retrain.")
        return stage.final_dir
    if not (data_dir / artifacts.PREFERENCE_DATA_DIR).is_dir():
        raise MissingArtifactError(
            f"the data artifact {data_dir} has no preference pairs. Add a source with prompt/chosen/rejected columns "
            f"(or ShareGPT conversations + chosen + rejected) to data.sources and rerun "
            f"`python -m pipeline.data --config {recipe.source_path}`."
        )

    import datasets
    from trl import DPOConfig, DPOTrainer

    from pipeline import chat

    pairs = datasets.load_from_disk(str(data_dir / artifacts.PREFERENCE_DATA_DIR))
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    args = training.trainer_arguments(DPOConfig, recipe, recipe.dpo, STAGE, stage.work_dir / training.CHECKPOINTS_DIR,
                                      max_length=recipe.data.max_length)  # fmt: skip
    resume_from = training.begin_or_resume(stage, allow_drift=allow_drift, fresh=fresh)
    sft_base, sft_adapter = training.trained_model_location(sft_dir)
    start = stage.work_dir / artifacts.DPO_BASE_DIR
    state = training.processes()
    if state.is_main_process:
        # One process writes it; under ZeRO-3 the merge must load whole weights, not partition them across ranks.
        with training.zero3_partitioning_off():
            _materialise_base(sft_base, sft_adapter, start, recipe, tokenizer)
    state.wait_for_everyone()
    model = training.load_trainable_model(recipe, recipe.dpo, STAGE, start)
    columns = ["prompt", "chosen", "rejected"]
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs["train"].select_columns(columns),
        eval_dataset=pairs["eval"].select_columns(columns) if args.eval_strategy != "no" and "eval" in pairs else None,
        processing_class=tokenizer,
        peft_config=training.peft_config(recipe.dpo),
    )
    plots = {artifacts.LOSS_PLOT: ["loss"], artifacts.REWARDS_PLOT: REWARD_KEYS}
    metrics = training.train_and_save(trainer, stage, resume_from, plots)
    if metrics is None:
        return None
    adapter = recipe.dpo.method != "full"
    if not adapter and state.is_main_process:
        shutil.rmtree(start)  # the trained full weights are in model/; the starting point is the SFT artifact
    last = next((e for e in reversed(trainer.state.log_history) if "rewards/margins" in e), {})
    metrics.update(method=recipe.dpo.method, **{k.replace("/", "_"): last.get(k) for k in REWARD_KEYS})
    record = training.model_record(artifacts.DPO_BASE_DIR if adapter else artifacts.MODEL_DIR, inside_artifact=True, adapter=adapter)
    return training.complete_stage(
        stage, metrics, record,
        f"dpo: {recipe.dpo.method}, {metrics['optimizer_steps']} steps, final loss {metrics['final_loss']:.4f}, "
        f"reward margin {metrics['rewards_margins']}, reward accuracy {metrics['rewards_accuracies']} in "
        f"{metrics['train_seconds']:.0f} s",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    args = training_parser("accelerate launch pipeline/dpo.py", __doc__.splitlines()[0]).parse_args(argv)
    run(load_recipe(args.config, args.overrides), force=args.force, allow_drift=args.allow_drift, fresh=args.fresh)


if __name__ == "__main__":
    sys.exit(run_cli(main))
