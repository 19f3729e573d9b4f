"""The stage table and the skeleton every stage runs in.

Each stage is one entry of `STAGES`: its name (the artifact folder), module, the artifacts it needs, the recipe
keys its artifact depends on, and the metrics `pipeline.run` shows for it. The runner, the command-line help,
the input checks, evaluation, export and the demo all read this table; nothing else lists stages.

`execute` is the skeleton around a stage's own work: require the inputs, skip when up to date, run the work,
write the manifest, print the one-line summary, and say what happened (`Outcome`).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.core import artifacts
from pipeline.core.errors import MissingArtifactError

if TYPE_CHECKING:
    from pipeline.core.schema import Recipe

# A stage stopped by SIGTERM exits with this status (128 + SIGTERM, what a shell reports for a process the signal
# ended): not 0, so a scheduler or a script does not take a stopped run for a finished one.
STOPPED_EXIT_CODE = 143
USER_ERROR_EXIT_CODE = 2  # a mistake the user can fix, explained in one paragraph


class Outcome(str, enum.Enum):
    RAN = "ran"
    SKIPPED = "skipped"  # a complete artifact already matched these inputs and settings
    STOPPED = "stopped"  # SIGTERM: a training stage saved a checkpoint; rerunning the command resumes it


@dataclass(frozen=True)
class Options:
    """How to run a stage, beside the recipe: the command-line flags, the same for every stage's `run`."""

    force: bool = False  # run even if the artifact is up to date
    allow_drift: bool = False  # training: resume although the recipe or data changed
    fresh: bool = False  # training: discard an interrupted run's checkpoints
    allow_failed_gates: bool = False  # export: export a model that failed its evaluation gates
    preview: int = 0  # data: print this many training rows as the model sees them
    targets: tuple[str, ...] | None = None  # export: the targets to build instead of export.targets


ModelInputs = Literal["", "newest", "every"]


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    description: str
    inputs: tuple[str, ...] = ()  # artifacts it needs (those that apply to the recipe)
    config_keys: tuple[str, ...] = ()  # recipe keys (dotted) its artifact depends on
    headline: tuple[str, ...] = ()  # manifest metrics shown in the run table
    trains: bool = False  # runs under `accelerate launch`, resumes after a kill, stops on SIGTERM
    model: bool = False  # its artifact holds a model that evaluation can score (and export take, once trained)
    only_if: Callable[[Recipe], bool] | None = None  # the recipes that have this stage; None: every recipe
    # The model artifacts it takes beside `inputs`: the newest complete trained one before it, or every one.
    model_inputs: ModelInputs = ""

    @property
    def command(self) -> str:
        """How a user runs it (the one a missing-input message names)."""
        if self.trains:
            return f"accelerate launch pipeline/{self.module.rsplit('.', 1)[-1]}.py"
        return f"python -m {self.module}"

    def applies(self, recipe: Recipe) -> bool:
        """Whether the recipe has this stage."""
        return self.only_if is None or self.only_if(recipe)

    def folder(self, recipe: Recipe) -> Path:
        """Where the stage's artifact lives in the recipe's run."""
        return recipe.run_dir / self.name

    def section(self, recipe: Recipe) -> Any:
        """The recipe section named after the stage, if there is one (sft, dpo)."""
        return getattr(recipe, self.name, None)


_TRAINING_KEYS = ("run.seed", "model", "data.max_length")

DATA = Stage(
    "data",
    "pipeline.data",
    "Data prep: read, validate, de-duplicate, split and tokenize the training data.",
    config_keys=(
        "run.seed",
        "data",
        "model.name_or_path",
        "model.gguf",
        "model.tokenizer",
        "model.train_tokenizer_vocab_size",
        "model.chat_template",
        "model.revision",
    ),
    headline=("sft_train_rows", "preference_train_rows"),
)
BASE = Stage(
    "base",
    "pipeline.base",
    "Base model: a fresh model from model.init, or the model of a GGUF file (model.gguf) as safetensors.",
    inputs=("data",),
    config_keys=("run.seed", "model.init", "model.gguf", "model.dtype"),
    headline=("parameters",),
    model=True,
    only_if=lambda recipe: recipe.model.init is not None or recipe.model.gguf is not None,
)
SFT = Stage(
    "sft",
    "pipeline.sft",
    "SFT: supervised fine-tuning with TRL's SFTTrainer (full, LoRA, QLoRA, DoRA).",
    inputs=("data", "base"),
    config_keys=(*_TRAINING_KEYS, "sft"),
    headline=("final_loss", "tokens_per_second"),
    trains=True,
    model=True,
)
DPO = Stage(
    "dpo",
    "pipeline.dpo",
    "DPO: preference tuning with TRL's DPOTrainer on top of the SFT model.",
    inputs=("data", "sft"),
    config_keys=(*_TRAINING_KEYS, "sft.method", "dpo"),
    headline=("final_loss", "rewards_accuracies"),
    trains=True,
    model=True,
)
GRPO = Stage(
    "grpo",
    "pipeline.grpo",
    "GRPO: online RL with TRL's GRPOTrainer and verifiable rewards on the newest of the DPO and SFT models.",
    inputs=("data",),
    config_keys=(*_TRAINING_KEYS, "grpo", "evaluate.max_new_tokens"),
    headline=("reward_start", "reward_end"),
    trains=True,
    model=True,
    only_if=lambda recipe: bool(recipe.grpo.rewards),
    model_inputs="newest",
)
EVAL = Stage(
    "eval",
    "pipeline.evaluate",
    "Evaluation: every trained model side by side on the held-out split, a report and gates.",
    inputs=("data",),
    config_keys=("evaluate", "model.dtype", "model.attn_implementation"),
    headline=("dpo_exact_match", "dpo_chosen_match", "sft_chosen_match", "gates_passed"),
    model_inputs="every",
)
EXPORT = Stage(
    "export",
    "pipeline.export",
    "Export: merged weights for vLLM and transformers, and ONNX, each checked.",
    inputs=("data",),
    config_keys=("export", "serve", "run.name", "model.dtype", "data.max_length", "evaluate.max_new_tokens"),
    headline=("merge_max_abs_logit_diff",),
    model_inputs="newest",
)
STAGES: tuple[Stage, ...] = (DATA, BASE, SFT, DPO, GRPO, EVAL, EXPORT)
NAMES = tuple(stage.name for stage in STAGES)
_BY_NAME = {stage.name: stage for stage in STAGES}


def get(name: str) -> Stage:
    return _BY_NAME[name]


def model_stages(recipe: Recipe) -> list[Stage]:
    """Stages whose artifact is a model, in pipeline order (the base first, where the recipe builds one)."""
    return [stage for stage in STAGES if stage.model and stage.applies(recipe)]


def model_names() -> tuple[str, ...]:
    """Every stage that can yield a model (evaluation's subjects, the gates' MODEL names), whatever the recipe."""
    return tuple(stage.name for stage in STAGES if stage.model)


def trained_stages() -> list[Stage]:
    return [stage for stage in STAGES if stage.model and stage.trains]


def complete_models(recipe: Recipe) -> list[Stage]:
    """Every model stage of the recipe whose artifact is complete, in pipeline order."""
    return [stage for stage in model_stages(recipe) if artifacts.manifest_is_complete(stage.folder(recipe))]


def newest_trained_before(stage: Stage, recipe: Recipe) -> Stage:
    """The last trained stage before `stage` with a complete artifact: the model GRPO continues and export takes."""
    candidates = [s for s in trained_stages() if STAGES.index(s) < STAGES.index(stage) and s.applies(recipe)]
    for candidate in reversed(candidates):
        # A stage the recipe does not have (GRPO without rewards) is never its final model, even if an earlier
        # recipe of the same run left its artifact behind.
        if artifacts.manifest_is_complete(candidate.folder(recipe)):
            return candidate
    raise MissingArtifactError(
        f"the {stage.name} stage needs a trained model, but {recipe.run_dir} has no complete"
        f" {' or '.join(s.name for s in reversed(candidates))} artifact. Run `{candidates[0].command} --config"
        f" {recipe.source_path}` first."
    )


def model_inputs(stage: Stage, recipe: Recipe) -> list[Stage]:
    """The model stages `stage` takes as inputs, as its table entry says."""
    if stage.model_inputs == "newest":
        return [newest_trained_before(stage, recipe)]
    if stage.model_inputs == "every":
        found = complete_models(recipe)
        if not found:
            raise MissingArtifactError(
                f"no model artifacts in {recipe.run_dir} to {stage.name}. Run `{SFT.command} --config "
                f"{recipe.source_path}` first (and `{BASE.command}` for a recipe that builds its model)."
            )
        return found
    return []


def config_hash(stage: Stage, recipe: Recipe) -> str:
    return recipe.section_hash(*stage.config_keys)


def require(stage: Stage, recipe: Recipe, needed_by: str) -> Path:
    """The folder of a complete artifact made with the recipe's current settings, or an error naming the command."""
    name = stage.name
    folder = stage.folder(recipe)
    command = f"`{stage.command} --config {recipe.source_path}`"
    if not artifacts.manifest_is_complete(folder):
        state = (
            "is incomplete (its manifest is missing or does not list every file)"
            if folder.exists()
            else "does not exist"
        )
        raise MissingArtifactError(
            f"the {needed_by} stage needs the '{name}' artifact, but {folder} {state}. Run {command} first."
        )
    if (artifacts.read_manifest(folder) or {}).get("config_hash") != config_hash(stage, recipe):
        raise MissingArtifactError(
            f"the '{name}' artifact in {folder} was made with other settings than the recipe now has (one of "
            f"{', '.join(stage.config_keys)} changed). Run {command} first."
        )
    return folder


# ---------------------------------------------------------------------------------------------- skeleton


@dataclass
class Result:
    """What a stage's work produced: headline metrics, the summary line, and manifest fields beyond metrics."""

    metrics: dict[str, Any]
    summary: str
    extra: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None  # raised once the artifact is complete (a failed gate: the report still exists)


def prepare(stage: Stage, recipe: Recipe, inputs: dict[str, dict[str, Any]] | None = None) -> artifacts.StageRun:
    """The stage's run record with every input it needs checked and identified; raises if one is missing."""
    run = artifacts.StageRun(stage.name, recipe.run_dir, recipe.to_dict(), config_hash(stage, recipe))
    for name in stage.inputs:
        if get(name).applies(recipe):
            run.add_input(name, require(get(name), recipe, stage.name))
    for model in model_inputs(stage, recipe):
        run.add_input(model.name, require(model, recipe, stage.name))
    run.inputs.update(inputs or {})
    return run


def is_main_process() -> bool:
    """False in the non-main processes of a multi-process launch, whose output and files would repeat rank 0's."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _process_group() -> Any:
    """torch.distributed where a launch set up a process group in this process, else None."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _wait_for_other_processes() -> None:
    if (dist := _process_group()) is not None:
        dist.barrier()


def leave_process_group() -> None:
    """Tear down a launch's process group before the interpreter exits: left to the exit, gloo's threads could be
    destroyed while running (ZeRO-3 ranks leaving a stage that was up to date aborted with "terminate called
    without an active exception")."""
    if (dist := _process_group()) is not None:
        dist.destroy_process_group()


def execute(
    stage: Stage,
    recipe: Recipe,
    work: Callable[[artifacts.StageRun], Result | None],
    *,
    force: bool = False,
    inputs: dict[str, dict[str, Any]] | None = None,
    decide: Callable[[bool], bool] = lambda found: found,
) -> Outcome:
    """Run `work` unless a complete artifact matches the inputs and settings; `work` returns None when stopped.

    `work` writes into `run.work_dir` (after `run.begin()`); the manifest is written last and the folder swapped
    into place by the main process while the others wait, so every process returns with the artifact complete.
    `decide` makes every process act on one finding (a multi-node launch whose nodes keep their own files: rank 0's).
    """
    run = prepare(stage, recipe, inputs)
    if not force and decide(run.up_to_date()):
        if is_main_process():
            print(f"{stage.name}: up to date ({run.final_dir}); use --force to rerun.")
        return Outcome.SKIPPED
    try:
        result = work(run)
        if result is None:
            return Outcome.STOPPED
        if is_main_process():
            run.complete(result.metrics, extra=result.extra)
            print(f"{result.summary} -> {run.final_dir}")
    finally:
        if run.memory is not None:
            run.memory.stop()
    _wait_for_other_processes()
    if result.error is not None:
        raise result.error
    return Outcome.RAN


def headline(stage: Stage, recipe: Recipe) -> str:
    metrics = (artifacts.read_manifest(stage.folder(recipe)) or {}).get("metrics", {})
    shown = [
        f"{key} {metrics[key]:.4g}" if isinstance(metrics[key], float) else f"{key} {metrics[key]}"
        for key in stage.headline
        if key in metrics
    ]
    return ", ".join(shown)
