"""DPO stage: preference tuning with TRL's DPOTrainer on top of the SFT artifact (LoRA, QLoRA, DoRA, full).

    accelerate launch pipeline/dpo.py [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]
    python -m pipeline.dpo ...

With LoRA/QLoRA the SFT model (its adapter merged in full precision, never into 4-bit weights) is written to
`base_model/` in the artifact and a fresh adapter is trained on it; the reference model is that same policy
with the adapter disabled, so no second copy sits in memory. With full fine-tuning TRL loads a frozen copy as
the reference. Writes `checkpoints/<run>/dpo/` like SFT, plus `rewards.png`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # `accelerate launch pipeline/dpo.py` runs this file as a script, with pipeline/ first on sys.path, where
    # pipeline/evaluate.py would shadow the `evaluate` library: run the package's module instead, as `-m` does.
    import runpy

    del sys.path[0]
    runpy.run_module("pipeline.dpo", run_name="__main__", alter_sys=True)
    raise SystemExit

from pipeline.core import artifacts, chat, cli, stages, training  # noqa: E402 - after the script hand-over
from pipeline.core.config import Recipe  # noqa: E402
from pipeline.core.errors import MissingArtifactError  # noqa: E402

STAGE = stages.get("dpo")
REWARD_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]


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
    start = training.ContinuedModel(recipe, "sft", run.work_dir, adapter=recipe.dpo.method != "full")

    def finish(trainer, work):  # noqa: ANN001, ANN202
        last = next((e for e in reversed(trainer.state.log_history) if "rewards/margins" in e), {})
        rewards = {k.replace("/", "_"): last.get(k) for k in REWARD_KEYS}
        record = start.record(work)
        words = f", reward margin {rewards['rewards_margins']:.3g}, reward accuracy {rewards['rewards_accuracies']:.3g}" if last else ""
        return record, rewards, words

    return training.Job(
        config_class=DPOConfig,
        trainer_class=DPOTrainer,
        splits=pairs,
        columns=["prompt", "chosen", "rejected", "tools"],  # TRL renders each pair with its tools
        tokenizer=tokenizer,
        start=start,
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
