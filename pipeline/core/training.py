"""The one runner of every TRL training stage (SFT, DPO, GRPO): batch plan, model + adapters, trainer arguments,
checkpoints and resume, SIGTERM, the final artifact and its plots. A stage file says only what is its own: the
TRL config and trainer class, its data, where its model starts, and what it adds to the manifest (`Job`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import artifacts, chat, launch, models, stages, tracking
from pipeline.core.artifacts import CHECKPOINTS_DIR, RESUME_KEY
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.schema import Recipe, TrainingSection

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Trainer

TRAINER_STATE = "trainer_state.json"  # written last in a checkpoint: its presence marks a complete one


# ------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    per_device: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_device * self.accumulation


def _cpu_launch_fields(kind: str) -> dict[str, Any]:
    """What the trainer arguments need to run a launch on the CPU. Without CUDA, accelerate starts DeepSpeed with no
    process-group backend, and a DDP launch outside the Trainer's CPU mode trains each process alone: DeepSpeed
    needs gloo named, DDP (and a single process) needs the CPU mode, and breaks with the backend named."""
    return {"ddp_backend": "gloo"} if kind == "deepspeed" else {"use_cpu": True}


def processes() -> Any:
    """This launch's processes (accelerate's PartialState), set up as the trainer arguments set them up (the same
    backend), so that the processes can agree on something before the trainer exists."""
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        return PartialState()
    fields = _cpu_launch_fields(launch.from_environment().kind)
    return PartialState(cpu=fields.get("use_cpu", False), backend=fields.get("ddp_backend"))


def from_everyone(value: Any) -> list[Any]:
    """Every process's `value`, on every process, in rank order."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return [value]
    from accelerate.utils import gather_object

    processes()  # the process group, as the trainer will set it up
    return gather_object([value])


def agreed(value: Any) -> Any:
    """The main process's `value`, on every process: where nodes keep their own files, what rank 0 finds decides
    (whether a stage is already done, say), and no node goes its own way."""
    return from_everyone(value)[0]


def storage_is_shared(folder: Path) -> bool:
    """Whether every node of the launch sees the same `folder`. Nodes without a shared filesystem each keep their
    own checkpoints (and resume from them); only node 0 holds the finished artifact. Decided by looking: the main
    process writes a random token there, and every node reads it back."""
    import secrets

    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local == int(os.environ.get("WORLD_SIZE", "1")):
        return True  # one node
    state = processes()
    token = agreed(secrets.token_hex(16))
    probe = folder / ".shared-storage-probe"
    if state.is_main_process:
        probe.write_text(token)
    state.wait_for_everyone()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    everyone = from_everyone(seen)
    state.wait_for_everyone()
    if state.is_main_process:
        probe.unlink(missing_ok=True)
    return all(everyone)


def writes_files(shared_storage: bool) -> bool:
    """Whether this process writes the work folder's files: the main process, and on nodes with their own
    storage the first process of each node (its checkpoints, its resume state)."""
    state = processes()
    return state.is_main_process or (not shared_storage and state.is_local_main_process)


@contextlib.contextmanager
def zero3_partitioning_off(args: Any) -> Iterator[None]:
    """Models loaded inside are whole even under ZeRO-3, whose trainer arguments make every load partition across
    ranks (a collective the other ranks would never join). transformers decides that from one global DeepSpeed
    config, which the launch's DeepSpeed plugin holds (`dschf`): unset it for the load, then put it back."""
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    held = getattr(getattr(args, "deepspeed_plugin", None), "dschf", None)
    if held is None or not held.is_zero3():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(held)


def plan_batch(section: TrainingSection, name: str, processes: int) -> BatchPlan:
    """Per-device batch and accumulation that give the recipe's global batch on any number of processes
    (a number that divides it: `launch.check_method` refuses others before training)."""
    total = section.global_batch_size
    per_process = total // processes
    per_device = section.trainer.get("per_device_train_batch_size") or per_process
    if per_process % per_device:
        raise ConfigError(
            f"{name}.per_device_train_batch_size={per_device} does not divide the {per_process} rows each of "
            f"{processes} processes gets from {name}.global_batch_size={total}."
        )
    return BatchPlan(processes, per_device, per_process // per_device)


# ------------------------------------------------------------------------------------------------ model


def linear_layer_names(model: PreTrainedModel) -> list[str]:
    import torch

    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    )


def _check_target_modules(section: TrainingSection, name: str, model: PreTrainedModel) -> None:
    targets = section.lora.get("target_modules")
    if targets is None or targets == "all-linear":  # None: PEFT's default modules for the architecture
        return
    if isinstance(targets, str):
        targets = [targets]
    available = linear_layer_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(
            f"{name}.lora.target_modules names {', '.join(missing)}, which the model does not have. Its linear "
            f"layers are: {', '.join(available)} (or use all-linear)."
        )


def _quantization_config(section: TrainingSection, name: str) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # a broken native library raises more than ImportError
        raise ConfigError(
            f"{name}.method is qlora, which needs bitsandbytes, but it cannot be imported ({type(error).__name__}: "
            f"{error}). Install it (`pip install bitsandbytes`, part of this package's dependencies) or use "
            "method lora."
        ) from None
    from transformers import BitsAndBytesConfig

    q = section.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=models.torch_dtype(q.bnb_4bit_compute_dtype),
        bnb_4bit_quant_storage=models.torch_dtype(q.bnb_4bit_quant_storage),
    )


def pretrained_input(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The input record of a recipe that trains a pretrained model (the base artifact is recorded otherwise)."""
    if stages.BASE.applies(recipe):
        return {}
    return {"model": artifacts.model_input_record(recipe.model.name_or_path, recipe.model.revision)}


def base_model_path(recipe: Recipe) -> str | Path:
    """The model SFT starts from: the base artifact of a recipe that has one, else the pretrained id or folder."""
    return stages.BASE.folder(recipe) if stages.BASE.applies(recipe) else recipe.model.name_or_path


def load_trainable_model(
    recipe: Recipe, section: TrainingSection, name: str, model_path: str | Path
) -> PreTrainedModel:
    """The model to train, in the recipe's dtype; 4-bit and prepared for k-bit training for QLoRA."""
    from transformers import AutoModelForCausalLM

    kwargs = models.load_kwargs(recipe.model)
    import torch

    if recipe.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(
            "model.attn_implementation flex_attention has no backward pass on the CPU (torch 2.13): train with sdpa or "
            "eager there, or on a CUDA GPU."
        )
    if section.method == "qlora":
        kwargs["quantization_config"] = _quantization_config(section, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    except OSError as error:
        raise PipelineError(
            f"could not load the model '{model_path}': {error}. Offline, a Hub id works only if it is in the local"
            " cache."
        ) from None
    if section.method != "full":
        _check_target_modules(section, name, model)
    if section.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(section.trainer.get("gradient_checkpointing", False))
        )
    return model


def peft_config(section: TrainingSection) -> Any:
    if section.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(**section.lora, use_dora=section.method == "dora", task_type="CAUSAL_LM")


# ----------------------------------------------------------------------------------- trainer arguments


def trainer_arguments(
    config_class: type, recipe: Recipe, section: TrainingSection, name: str, output_dir: Path, **owned: Any
) -> Any:
    """The TRL config: the recipe's TRL fields verbatim, plus what the pipeline owns (paths, seed, batch plan)."""
    import torch

    current = launch.from_environment()
    launch.check_method(section.method, name, current, section.global_batch_size)
    plan = plan_batch(section, name, current.processes)
    fields: dict[str, Any] = {
        **tracking.trainer_fields(recipe, name),
        # TRL turns it on by default; it trades compute for memory, which only a recipe that needs the memory should
        # pay (a tiny model recomputed every forward for nothing).
        "gradient_checkpointing": False,
        # A progress bar even when quiet logging raises transformers' level (which would turn bars into log lines).
        "disable_tqdm": False,
        "save_strategy": "steps",
        "logging_first_step": True,
        "include_num_input_tokens_seen": "non_padding",
        **section.trainer,
        **owned,
        "output_dir": str(output_dir),
        "seed": recipe.run.seed,
        "per_device_train_batch_size": plan.per_device,
        "gradient_accumulation_steps": plan.accumulation,
    }
    if not torch.cuda.is_available():
        # Mixed precision flags fail without a GPU ("Your setup doesn't support bf16/gpu"); CPU runs in the model dtype.
        fields.update(bf16=False, fp16=False, **_cpu_launch_fields(current.kind))
    try:
        return config_class(**fields)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"the {name} section is not a valid {config_class.__name__}: {error}") from None


# ----------------------------------------------------------------------------------- checkpoints/resume


def complete_checkpoints(work_dir: Path) -> list[Path]:
    folder = work_dir / CHECKPOINTS_DIR
    found = [p for p in folder.glob("checkpoint-*") if _is_complete(p)] if folder.is_dir() else []
    return sorted(found, key=_step)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def _is_complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last. DeepSpeed's loader also reads the `latest` tag, which DeepSpeed
    writes on node 0 only and `NodeCheckpointTag` on the other nodes after the save."""
    if not (checkpoint / TRAINER_STATE).is_file():
        return False
    return not any(checkpoint.glob("global_step*")) or (checkpoint / "latest").is_file()


def begin_or_resume(
    stage: artifacts.StageRun, *, allow_drift: bool, fresh: bool, shared_storage: bool = True
) -> Path | None:
    """Start the stage's work folder, or pick up the newest complete checkpoint of an interrupted run.

    Resuming is refused when the recipe or an input changed since that run (unless allow_drift), since the
    continued run would silently mix two different trainings. Every process resumes from the same step: the
    newest one every node holds complete (nodes with their own storage, killed while saving, can differ).
    """
    key = {
        "config_hash": stage.config_hash,
        "inputs": {n: artifacts.input_identity(r) for n, r in stage.inputs.items()},
    }
    found = [] if fresh else complete_checkpoints(stage.work_dir)
    everywhere = set.intersection(*(set(steps) for steps in from_everyone([_step(c) for c in found])))
    checkpoints = [c for c in found if _step(c) in everywhere]
    problem = ""
    if checkpoints:
        try:
            previous = json.loads((stage.work_dir / RESUME_KEY).read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != key and not allow_drift:
            problem = (
                f"an interrupted {stage.stage} run left {checkpoints[-1]}, but {_drift(previous, key)} changed since "
                "it started. Resuming would mix two different trainings: rerun with --allow-drift to resume anyway, "
                "or --fresh to discard the checkpoints and start over."
            )
    problems = [p for p in from_everyone(problem) if p]
    if problems:
        raise PipelineError(problems[0])  # on every process, so that none waits for the others
    state = processes()
    state.wait_for_everyone()  # nobody reads the work folder while the main process clears it
    if writes_files(shared_storage):
        stage.begin(keep_partial=bool(checkpoints))
        (stage.work_dir / RESUME_KEY).write_text(json.dumps(key, indent=2) + "\n")
    state.wait_for_everyone()
    return checkpoints[-1] if checkpoints else None


def keep_checkpoints_on_each_node(args: Any) -> None:
    """Trainer arguments for nodes without a shared filesystem: every node saves each checkpoint in full into its
    own folder (the Trainer's files on each node's first process; DeepSpeed's module states too, beside each
    rank's own shards), so that every node can resume from its own disk."""
    args.save_on_each_node = True
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config.setdefault("checkpoint", {})["use_node_local_storage"] = True


def save_where_the_trainer_says(model: Any) -> None:
    """transformers 5's `save_pretrained` writes on global rank 0 only, whatever the Trainer decided: with
    save_on_each_node, the other nodes' checkpoints held no weights to resume from. The Trainer's own decision
    (`args.should_save`, which gates the call) stands instead. PEFT models save themselves without that check."""
    if hasattr(model, "should_save_on_this_rank"):
        model.should_save_on_this_rank = lambda is_main_process: is_main_process


def _node_checkpoint_tag() -> Any:
    from transformers import TrainerCallback

    class NodeCheckpointTag(TrainerCallback):
        """DeepSpeed names the newest checkpoint in a `latest` file on node 0 only; its loader needs one on every
        node that keeps its own checkpoints."""

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - the Trainer's callback API
            if args.save_on_each_node and state.is_local_process_zero and not state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                tags = sorted(p.name for p in folder.glob("global_step*"))
                if tags:
                    (folder / "latest").write_text(tags[-1])
            return control

    return NodeCheckpointTag()


def _drift(previous: dict[str, Any] | None, current: dict[str, Any]) -> str:
    if previous is None:
        return "the record of its settings is missing, so whether anything"
    changed = [f"input '{n}'" for n in current["inputs"] if previous.get("inputs", {}).get(n) != current["inputs"][n]]
    if previous.get("config_hash") != current["config_hash"]:
        changed.insert(0, "the recipe")
    return " and ".join(changed) or "something"


def _bar_without_log_lines() -> type:
    from transformers.trainer_callback import ProgressCallback

    class BarWithoutLogLines(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201 - the Trainer's callback API
            return control

    return BarWithoutLogLines


class StopOnSignal:
    """On SIGTERM: save a checkpoint at the end of the current step and stop training; the stage's outcome is
    `stopped` (exit status 143), and rerunning the same command resumes from that checkpoint.

    Under several processes the decision is agreed at every step (a signal can reach the ranks in different
    steps), since saving a checkpoint is collective and a rank that stops alone leaves the others waiting.
    """

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self
        self.received = False
        self.stopping = False

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - the Trainer's callback API
                outer.stopping = outer._agreed(args.device) if args.world_size > 1 else outer.received
                if outer.stopping:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        self.callback = _Callback()
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _agreed(self, device: Any) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------- finishing


def plot_curves(log_history: list[dict[str, Any]], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key.startswith("eval_") else None)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_memory_mb() -> float:
    """This process's peak memory: the accelerator's allocations on a GPU, else the resident set size."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def train_and_save(
    trainer: Trainer, stage: artifacts.StageRun, resume_from: Path | None, plot_keys: dict[str, list[str]]
) -> dict[str, Any] | None:
    """Train (resuming if asked), then write the model, tokenizer, log history and plots into the work folder.

    Every process trains and takes part in saving (ZeRO-3 gathers the partitioned weights); only the main
    process writes files. Returns the headline metrics, or None when SIGTERM stopped the run after a checkpoint.
    """
    from accelerate.utils import gather_object
    from transformers.trainer_callback import ProgressCallback

    from pipeline.core import cli

    state = processes()
    stopper = StopOnSignal()
    trainer.add_callback(stopper.callback)
    trainer.add_callback(_node_checkpoint_tag())
    if not cli.verbose() and trainer.pop_callback(ProgressCallback) is not None:
        # The progress bar stays; the log dictionary it prints at every logging step is in log_history.json.
        trainer.add_callback(_bar_without_log_lines())
    started, cpu_started = time.time(), time.process_time()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stopper.restore()
    if stopper.stopping:
        newest = complete_checkpoints(stage.work_dir)
        if state.is_main_process:
            print(
                f"{stage.stage}: stopped by SIGTERM; saved {newest[-1] if newest else 'no checkpoint'}. Rerun the same"
                " command to resume."
            )
        return None
    wall, cpu = time.time() - started, time.process_time() - cpu_started
    work = stage.work_dir
    model_dir = work / artifacts.MODEL_DIR
    trainer.save_model(str(model_dir))  # gathers sharded (ZeRO-3) weights; PEFT models save only the adapter
    memory = [round(mb, 1) for mb in gather_object([peak_memory_mb()])]
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    if state.is_main_process:
        # The Trainer also pickles its arguments; the artifact keeps them as JSON and holds no pickle files.
        (model_dir / "training_args.bin").unlink(missing_ok=True)
        (work / artifacts.TRAINING_ARGS).write_text(trainer.args.to_json_string())
        trainer.processing_class.save_pretrained(str(model_dir))
        (work / artifacts.LOG_HISTORY).write_text(json.dumps(history, indent=1) + "\n")
        for filename, keys in plot_keys.items():
            plot_curves(history, keys, work / filename, f"{stage.stage}: {', '.join(keys)}")
        shutil.rmtree(work / CHECKPOINTS_DIR, ignore_errors=True)  # resume state; the artifact is the final model
        (work / RESUME_KEY).unlink(missing_ok=True)
    return {
        "final_loss": losses[-1] if losses else None,
        "train_loss": output.training_loss,
        "optimizer_steps": trainer.state.global_step,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / wall, 1) if wall > 0 else None,
        "train_seconds": round(wall, 2),
        "train_cpu_seconds": round(cpu, 2),  # this process, all threads: wall time / cpu time shows core use
        "trainable_parameters": trainable,
        "processes": state.num_processes,
        "peak_memory_mb_per_process": memory,
        "resumed_from": resume_from.name if resume_from else None,
    }


# ------------------------------------------------------------------------------------------ the runner


class ContinuedModel:
    """The start of a stage that continues a trained model (DPO after SFT, GRPO after DPO): that model in full
    precision in `<work>/base_model/`, merged where it trained an adapter (never into 4-bit weights), hard-linked
    where it trained full weights. One process writes it. An adapter method trains a fresh adapter on it, and the
    folder stays in the artifact as the adapter's base; full fine-tuning writes its own weights to model/, and
    `record` removes the copy."""

    def __init__(self, recipe: Recipe, source_stage: str, work_dir: Path, adapter: bool) -> None:
        self.recipe, self.source, self.adapter = recipe, recipe.run_dir / source_stage, adapter
        self.path = work_dir / artifacts.START_MODEL_DIR

    def __call__(self, args: Any) -> Path:
        state = processes()
        if writes_files(shared_storage=not args.save_on_each_node):
            # Under ZeRO-3 the merge must load whole weights, not partition them across ranks.
            with zero3_partitioning_off(args):
                self._materialise()
        state.wait_for_everyone()
        return self.path

    def _materialise(self) -> None:
        if (self.path / "config.json").is_file():
            return  # left by an interrupted run that is now resuming
        model, adapter = artifacts.model_location(self.source)
        if adapter is None:
            self.path.mkdir(parents=True)
            for file in Path(model).iterdir():
                if file.is_file():
                    try:
                        os.link(file, self.path / file.name)
                    except OSError:
                        shutil.copy2(file, self.path / file.name)
            return
        models.save_merged(
            model,
            adapter,
            self.recipe.model,
            self.path,
            chat.load_tokenizer(stages.DATA.folder(self.recipe) / artifacts.TOKENIZER_DIR),
        )

    def record(self, work: Path) -> dict[str, Any]:
        """The finished artifact's model record; drops the start copy a full fine-tune no longer needs."""
        if not self.adapter and processes().is_main_process:
            # the trained weights are in model/; the start is its own artifact
            shutil.rmtree(work / artifacts.START_MODEL_DIR)
        return artifacts.model_record(
            artifacts.START_MODEL_DIR if self.adapter else artifacts.MODEL_DIR,
            inside_artifact=True,
            adapter=self.adapter,
        )


@dataclass
class Job:
    """What one training stage adds to the shared runner."""

    config_class: type  # the TRL config (SFTConfig, DPOConfig)
    trainer_class: type  # the TRL trainer (SFTTrainer, DPOTrainer)
    splits: Any  # the data artifact's DatasetDict: "train", and "eval" when held out
    columns: list[str]  # the columns the trainer reads
    tokenizer: Any
    start: Callable[[Any], str | Path]  # (trainer arguments) -> the model to train, made ready by the main process
    plots: dict[str, list[str]]  # plot file -> logged keys drawn in it
    owned: dict[str, Any] = field(default_factory=dict)  # TRL fields the pipeline sets (max_length, ...)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # what else the trainer class takes
    # (trainer, work folder) -> (manifest model record, extra headline metrics, extra words for the summary)
    finish: Callable[[Trainer, Path], tuple[dict[str, Any], dict[str, Any], str]] | None = None

    def make_trainer(self, model: Any, args: Any, section: TrainingSection) -> Trainer:
        evaluating = args.eval_strategy != "no" and "eval" in self.splits
        return self.trainer_class(
            model=model,
            args=args,
            train_dataset=self.splits["train"].select_columns(self.columns),
            eval_dataset=self.splits["eval"].select_columns(self.columns) if evaluating else None,
            processing_class=self.tokenizer,
            peft_config=peft_config(section),
            **self.trainer_kwargs,
        )


def run_stage(
    stage: stages.Stage,
    recipe: Recipe,
    job: Callable[[artifacts.StageRun], Job],
    options: stages.Options,
    inputs: dict[str, dict[str, Any]] | None = None,
) -> stages.Outcome:
    """Train `stage` with the TRL trainer its job describes; resume an interrupted run; stop cleanly on SIGTERM."""
    section = stage.section(recipe)

    def work(run: artifacts.StageRun) -> stages.Result | None:
        plan = job(run)
        args = trainer_arguments(
            plan.config_class, recipe, section, stage.name, run.work_dir / CHECKPOINTS_DIR, **plan.owned
        )
        shared = storage_is_shared(recipe.run_dir)
        if not shared:
            keep_checkpoints_on_each_node(args)
        resume_from = begin_or_resume(run, allow_drift=options.allow_drift, fresh=options.fresh, shared_storage=shared)
        model = load_trainable_model(recipe, section, stage.name, plan.start(args))
        trainer = plan.make_trainer(model, args, section)
        if not shared:
            save_where_the_trainer_says(trainer.model)
        metrics = train_and_save(trainer, run, resume_from, plan.plots)
        if metrics is None:
            return None
        record, extra, words = plan.finish(trainer, run.work_dir) if plan.finish else ({}, {}, "")
        metrics["storage"] = "shared" if shared else "each node its own"
        if writes_files(shared) and not processes().is_main_process:
            # This node's checkpoints and its copy of the saves; the artifact is node 0's.
            shutil.rmtree(run.work_dir, ignore_errors=True)
        metrics.update(method=section.method, **extra)
        return stages.Result(
            metrics,
            f"{stage.name}: {section.method}, {metrics['optimizer_steps']} steps, final loss"
            f" {metrics['final_loss']:.4f}, {metrics['tokens_seen']:,} tokens at {metrics['tokens_per_second']:,.0f}"
            f" tokens/s in {metrics['train_seconds']:.0f} s{words}",
            extra={"model": record},
        )

    return stages.execute(stage, recipe, work, force=options.force, inputs=inputs, decide=agreed)
