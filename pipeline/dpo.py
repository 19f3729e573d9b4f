"""DPO stage: preference tuning with TRL's DPOTrainer on top of the SFT artifact (LoRA, QLoRA, DoRA, full).

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
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `accelerate launch pipeline/dpo.py` runs this file as a script, with pipeline/ first on sys.path, where
    # pipeline/evaluate.py would shadow the `evaluate` library: run the package's module instead, as `-m` does.
    import runpy

    del sys.path[0]
    runpy.run_module("pipeline.dpo", run_name="__main__", alter_sys=True)
    raise SystemExit

from pipeline.core import artifacts, chat, cli, models, stages, training  # noqa: E402 - after the script hand-over
from pipeline.core.config import Recipe  # noqa: E402
from pipeline.core.errors import MissingArtifactError  # noqa: E402

STAGE = stages.get("dpo")
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
    merged = models.load_merged(source, adapter, recipe.model)
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


def _job(recipe: Recipe, run: artifacts.StageRun) -> training.Job:
    data_dir = recipe.run_dir / "data"
    if not (data_dir / artifacts.PREFERENCE_DATA_DIR).is_dir():
        raise MissingArtifactError(
            f"the data artifact {data_dir} has no preference pairs. Add a source with prompt/chosen/rejected columns "
            f"(or ShareGPT conversations + chosen + rejected) to data.sources and rerun "
            f"`{stages.get('data').command} --config {recipe.source_path}`."
        )
    import datasets
    from trl import DPOConfig, DPOTrainer

    pairs = datasets.load_from_disk(str(data_dir / artifacts.PREFERENCE_DATA_DIR))
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    start = run.work_dir / artifacts.DPO_BASE_DIR
    adapter = recipe.dpo.method != "full"

    def start_model(args):  # noqa: ANN001, ANN202
        state = training.processes()
        if state.is_main_process:
            # One process writes it; under ZeRO-3 the merge must load whole weights, not partition them across ranks.
            with training.zero3_partitioning_off(args):
                _materialise_base(*artifacts.model_location(recipe.run_dir / "sft"), start, recipe, tokenizer)
        state.wait_for_everyone()
        return start

    def finish(trainer, work):  # noqa: ANN001, ANN202
        if not adapter and training.processes().is_main_process:
            shutil.rmtree(work / artifacts.DPO_BASE_DIR)  # the trained full weights are in model/; the start is the SFT artifact
        last = next((e for e in reversed(trainer.state.log_history) if "rewards/margins" in e), {})
        rewards = {k.replace("/", "_"): last.get(k) for k in REWARD_KEYS}
        record = artifacts.model_record(artifacts.DPO_BASE_DIR if adapter else artifacts.MODEL_DIR, inside_artifact=True, adapter=adapter)
        words = f", reward margin {rewards['rewards_margins']:.3g}, reward accuracy {rewards['rewards_accuracies']:.3g}" if last else ""
        return record, rewards, words

    return training.Job(
        config_class=DPOConfig,
        trainer_class=DPOTrainer,
        splits=pairs,
        columns=["prompt", "chosen", "rejected", "tools"],  # TRL renders each pair with its tools
        tokenizer=tokenizer,
        start=start_model,
        plots={artifacts.LOSS_PLOT: ["loss", "eval_loss"], artifacts.REWARDS_PLOT: REWARD_KEYS},
        owned={"max_length": recipe.data.max_length},
        finish=finish,
    )


def run(recipe: Recipe, *, force: bool = False, allow_drift: bool = False, fresh: bool = False) -> stages.Outcome:
    return training.run_stage(
        STAGE, recipe, lambda run: _job(recipe, run), force=force, allow_drift=allow_drift, fresh=fresh
    )


main = cli.stage_main(STAGE, run)

if __name__ == "__main__":
    sys.exit(main())
