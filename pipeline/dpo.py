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
from pipeline.core.errors import MissingArtifactError  # noqa: E402
from pipeline.core.schema import Recipe  # noqa: E402

STAGE = stages.DPO
REWARD_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]


def term_loss_key(loss_type: str) -> str:
    """Where the held-out loss of one term of a combined `dpo.loss_type` is logged (and drawn in loss.png)."""
    return f"eval_{loss_type}_loss"


def _trainer_class() -> type:
    from trl import DPOTrainer

    class DPOTrainerWithTerms(DPOTrainer):
        """TRL's DPOTrainer, whose evaluation also measures each term of a combined loss_type (e.g. sigmoid + sft)
        on its own, as `eval_<term>_loss` beside `eval_loss`. TRL logs only the weighted sum, which keeps falling
        through the SFT term even while preferences are not learned. One more pass over the held-out pairs per term,
        each with only that term in `loss_types` (TRL reads the list at every loss computation)."""

        def evaluation_loop(
            self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
        ):  # noqa: ANN001, ANN201 - Trainer's signature
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            if len(self.loss_types) < 2:
                return output
            types, weights = self.loss_types, self.loss_weights
            try:
                for loss_type in types:
                    self.loss_types, self.loss_weights = [loss_type], [1.0]
                    term = super().evaluation_loop(
                        dataloader, f"{description} ({loss_type} term)", True, ignore_keys, metric_key_prefix
                    )
                    output.metrics[f"{metric_key_prefix}_{loss_type}_loss"] = term.metrics[f"{metric_key_prefix}_loss"]
            finally:
                self.loss_types, self.loss_weights = types, weights
            return output

    return DPOTrainerWithTerms


def _job(recipe: Recipe, run: artifacts.StageRun) -> training.Job:
    data_dir = stages.DATA.folder(recipe)
    if not (data_dir / artifacts.PREFERENCE_DATA_DIR).is_dir():
        raise MissingArtifactError(
            f"the data artifact {data_dir} has no preference pairs. Add a source with prompt/chosen/rejected columns "
            "(or ShareGPT conversations + chosen + rejected) to data.sources and rerun "
            f"`{stages.DATA.command} --config {recipe.source_path}`."
        )
    import datasets
    from trl import DPOConfig

    pairs = datasets.load_from_disk(str(data_dir / artifacts.PREFERENCE_DATA_DIR))
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    start = training.ContinuedModel(recipe, "sft", run.work_dir, adapter=recipe.dpo.method != "full")
    loss_types = recipe.dpo.trainer.get("loss_type", [])  # TRL's default is one loss: nothing to split
    loss_types = [loss_types] if isinstance(loss_types, str) else loss_types
    terms = [term_loss_key(t) for t in loss_types] if len(loss_types) > 1 else []

    def finish(trainer, work):  # noqa: ANN001, ANN202
        last = next((e for e in reversed(trainer.state.log_history) if "rewards/margins" in e), {})
        rewards = {k.replace("/", "_"): last.get(k) for k in REWARD_KEYS}
        evaluated = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
        rewards.update({key: evaluated[key] for key in terms if key in evaluated})  # the held-out loss of each term
        record = start.record(work)
        words = (
            f", reward margin {rewards['rewards_margins']:.3g}, reward accuracy {rewards['rewards_accuracies']:.3g}"
            if last
            else ""
        )
        return record, rewards, words

    return training.Job(
        config_class=DPOConfig,
        trainer_class=_trainer_class(),
        splits=pairs,
        columns=["prompt", "chosen", "rejected", "tools"],  # TRL renders each pair with its tools
        tokenizer=tokenizer,
        start=start,
        plots={artifacts.LOSS_PLOT: ["loss", "eval_loss", *terms], artifacts.REWARDS_PLOT: REWARD_KEYS},
        owned={"max_length": recipe.data.max_length},
        finish=finish,
    )


def run(recipe: Recipe, options: stages.Options = stages.Options()) -> stages.Outcome:
    return training.run_stage(STAGE, recipe, lambda run: _job(recipe, run), options)


main = cli.stage_main(STAGE, run)

if __name__ == "__main__":
    sys.exit(main())
