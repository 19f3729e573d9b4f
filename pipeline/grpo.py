"""GRPO stage: online RL with TRL's GRPOTrainer and verifiable rewards, on the newest trained model before it (the
DPO artifact, else the SFT one), with LoRA, QLoRA, DoRA or full fine-tuning.

    accelerate launch pipeline/grpo.py [--config configs/tiny-grpo.yaml] [--force] [KEY=VALUE ...]
    python -m pipeline.grpo ...

Runs only for a recipe whose `grpo.rewards` names a reward. The prompts are the SFT training conversations' (the
data artifact), each with the reference answer and tool calls the rewards check (pipeline/core/rewards.py); with
`grpo.prompts: unsolved`, only those the start model answers wrong (greedy, before training); the
policy samples `num_generations` completions per prompt with HF generate, or vLLM on a GPU (`grpo.generation`).
The start model is put in place as DPO puts its own: merged in full precision into `base_model/` for adapter
methods. Writes `checkpoints/<run>/grpo/` like DPO, with `rewards.png`, `kl.png` (when grpo.beta > 0) and
`completion_length.png`; resumes after a kill, and SIGTERM saves a checkpoint and exits with status 143.
"""

from __future__ import annotations

import sys
import warnings

if __name__ == "__main__" and not __package__:
    # `accelerate launch pipeline/grpo.py` runs this file as a script, with pipeline/ first on sys.path, where
    # pipeline/evaluate.py would shadow the `evaluate` library: run the package's module instead, as `-m` does.
    import runpy

    del sys.path[0]
    runpy.run_module("pipeline.grpo", run_name="__main__", alter_sys=True)
    raise SystemExit

from pipeline.core import (
    artifacts,
    chat,
    cli,
    engines,
    models,
    rewards,
    stages,
    training,
)  # noqa: E402 - after the script hand-over
from pipeline.core.errors import ConfigError, MissingArtifactError  # noqa: E402
from pipeline.core.schema import Recipe  # noqa: E402

STAGE = stages.GRPO


def _check_generation(section) -> None:  # noqa: ANN001 - the recipe's grpo section
    if section.generation == "hf":
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"grpo.generation is {section.generation}, which samples with vLLM on a CUDA GPU, and this machine has"
            " none. Set grpo.generation: hf to sample with transformers' generate (CPU or GPU)."
        )
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"grpo.generation is {section.generation}, which needs vLLM: install it (`pip install vllm`) or set "
            "grpo.generation: hf."
        )


def _unsolved(rows: list[dict], recipe: Recipe, start_from: stages.Stage, tokenizer, max_new_tokens: int) -> list[dict]:  # noqa: ANN001
    """The rows whose prompt the start model answers wrong, greedily. After SFT and DPO most prompts are solved, and
    a group of completions that all score the same has no advantage to learn from (the README's GRPO section has the
    figures). Every process filters the same rows (greedy decoding)."""
    from accelerate import PartialState

    base, adapter = artifacts.model_location(start_from.folder(recipe))
    model = models.load_merged(base, adapter, recipe.model).to(PartialState().device)
    model.generation_config.eos_token_id = chat.stop_token_ids(tokenizer)
    ids = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    answers = engines.hf_generate(
        model, tokenizer, ids, max_new_tokens, context_length=engines.served_context_length(recipe)
    )
    return [row for row, answer in zip(rows, answers) if not rewards.solved(row, answer)]


def _prompts(recipe: Recipe, tokenizer, start_from: stages.Stage, max_new_tokens: int) -> tuple[object, dict[str, int]]:  # noqa: ANN001
    import datasets

    data_dir = stages.DATA.folder(recipe)
    if not (data_dir / artifacts.SFT_DATA_DIR).is_dir():
        raise MissingArtifactError(
            f"the data artifact {data_dir} has no SFT rows, whose prompts and reference answers GRPO trains on: add a "
            "chat, alpaca, ShareGPT or prompt/completion source to data.sources and rerun "
            f"`{stages.DATA.command} --config {recipe.source_path}`."
        )
    labels = [source.label for source in recipe.data.sources]
    chosen = {labels.index(label) for label in recipe.grpo.sources} if recipe.grpo.sources else None
    splits = datasets.load_from_disk(str(data_dir / artifacts.SFT_DATA_DIR))
    rows = {name: rewards.prompt_rows(split, tokenizer, chosen) for name, split in splits.items()}
    if not rows["train"]:
        raise ConfigError(
            f"grpo.sources ({', '.join(recipe.grpo.sources)}) gives no training prompt: none of the SFT training rows "
            "comes from these sources. Name sources with chat rows, or leave grpo.sources empty for all."
        )
    counts = {"prompts_available": len(rows["train"])}
    if recipe.grpo.prompts == "unsolved":
        rows["train"] = _unsolved(rows["train"], recipe, start_from, tokenizer, max_new_tokens)
        if not rows["train"]:
            raise ConfigError(
                f"grpo.prompts is unsolved, and the {start_from.name} model already answers all"
                f" {counts['prompts_available']} training prompts right: GRPO has nothing to learn from them. Set"
                " grpo.prompts: all, or add harder prompts."
            )
    counts["prompts_trained"] = len(rows["train"])
    return (
        datasets.DatasetDict({name: datasets.Dataset.from_list(found) for name, found in rows.items() if found}),
        counts,
    )


def _job(recipe: Recipe, run: artifacts.StageRun, start_from: stages.Stage) -> training.Job:
    section = recipe.grpo
    _check_generation(section)
    if section.generation == "hf":
        # TRL checks the installed vLLM's version as it imports GRPO and warns, five times, when it is newer than
        # TRL was tested with; HF generation does not use vLLM.
        warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    from trl import GRPOConfig, GRPOTrainer

    data_dir = stages.DATA.folder(recipe)
    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    reward_functions = rewards.load(section.rewards, tokenizer)
    # Answers as long as evaluation lets them be, unless the recipe says otherwise (TRL's default is 512).
    max_completion_length = section.trainer.get("max_completion_length", recipe.evaluate.max_new_tokens)
    splits, prompt_counts = _prompts(recipe, tokenizer, start_from, max_completion_length)
    start = training.ContinuedModel(recipe, start_from.name, run.work_dir, adapter=section.method != "full")

    def finish(trainer, work):  # noqa: ANN001, ANN202
        logged = [e for e in trainer.state.log_history if "reward" in e]
        last = logged[-1] if logged else {}
        # GRPO counts the prompt and completion tokens it trained on (`num_tokens`, cumulative); the Trainer's own
        # count is off (see `owned` below), so the shared tokens figures come from it.
        tokens = int(max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0))
        runtime = next((e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e), None)
        figures = {
            "tokens_seen": tokens,
            "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
            "started_from": start_from.name,
            **prompt_counts,
            "reward_start": logged[0]["reward"] if logged else None,
            "reward_end": last.get("reward"),
            "kl": last.get("kl"),
            "completion_length": last.get("completions/mean_length"),
            **{f"reward_{name}": last.get(f"rewards/{name}/mean") for name in section.rewards},
        }
        record = start.record(work)
        words = (
            f", from {start_from.name}, mean reward {figures['reward_start']:.3g} -> {figures['reward_end']:.3g}"
            if logged
            else ""
        )
        if section.prompts == "unsolved":
            words += (
                f", on the {prompt_counts['prompts_trained']:,} of {prompt_counts['prompts_available']:,} prompts it"
                " answered wrong"
            )
        return record, figures, words

    plots = {
        artifacts.LOSS_PLOT: ["loss", "eval_loss"],
        artifacts.REWARDS_PLOT: ["reward", *(f"rewards/{name}/mean" for name in section.rewards)],
        artifacts.LENGTH_PLOT: ["completions/mean_length", "completions/mean_terminated_length"],
    }
    if section.trainer.get("beta"):  # TRL computes (and logs) the KL to the start model only when it weighs it
        plots[artifacts.KL_PLOT] = ["kl"]
    return training.Job(
        config_class=GRPOConfig,
        trainer_class=GRPOTrainer,
        splits=splits,
        columns=["prompt", "reference", "expected_calls", "tools"],  # the prompt and what the rewards check it against
        tokenizer=tokenizer,
        start=start,
        plots=plots,
        owned={
            "use_vllm": section.generation != "hf",
            "vllm_mode": section.generation.removeprefix("vllm-") if section.generation != "hf" else "colocate",
            "max_completion_length": max_completion_length,
            # GRPO counts the prompt and completion tokens it trains on itself; the Trainer's own count looks for an
            # `input_ids` batch GRPO never builds, and warns at every step.
            "include_num_input_tokens_seen": "no",
        },
        trainer_kwargs={"reward_funcs": reward_functions},
        finish=finish,
    )


def run(recipe: Recipe, options: stages.Options = stages.Options()) -> stages.Outcome:
    if not STAGE.applies(recipe):
        raise ConfigError(
            f"{recipe.source_path} gives grpo.rewards no reward, so it has no GRPO stage. List at least one: a built-in"
            f" ({', '.join(rewards.BUILTINS)}) or a function as module:function."
        )
    start_from = stages.newest_trained_before(STAGE, recipe)
    return training.run_stage(STAGE, recipe, lambda run: _job(recipe, run, start_from), options)


main = cli.stage_main(STAGE, run)

if __name__ == "__main__":
    sys.exit(main())
