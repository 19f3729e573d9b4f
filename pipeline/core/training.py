"""Training plumbing shared by the SFT and DPO stages: batch plan, model + adapters, trainer arguments,
checkpoints and resume, SIGTERM, the final artifact and its plots. Stage files only choose the trainer and data.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import artifacts, launch, models
from pipeline.config import Recipe, TrainingSection
from pipeline.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Trainer

CHECKPOINTS_DIR = "checkpoints"
RESUME_KEY = "resume_key.json"
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


def processes() -> Any:
    """This launch's processes (accelerate's PartialState; the trainer arguments set it up, including the backend)."""
    from accelerate import PartialState

    return PartialState()


@contextlib.contextmanager
def zero3_partitioning_off() -> Iterator[None]:
    """Models loaded inside are whole even under ZeRO-3, whose trainer arguments make every load partition across
    ranks (a collective the other ranks would never join). transformers decides that from one global config."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    config = hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


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

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})


def _check_target_modules(section: TrainingSection, name: str, model: PreTrainedModel) -> None:
    targets = section.lora.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            return
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
            f"method lora."
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


def base_model_path(recipe: Recipe, stage: artifacts.StageRun) -> str | Path:
    """The model a training stage starts from: the base artifact of a recipe that builds one, else the pretrained id."""
    if recipe.model.init is not None:
        base_dir = artifacts.require_stage(recipe.run_dir, "base", stage.stage, recipe)
        stage.add_input("base", base_dir)
        return base_dir
    name = recipe.model.name_or_path
    stage.inputs["model"] = {"kind": "model", "path": name, "sha256": f"{name}@{recipe.model.revision or 'default'}"}
    return name


def model_record(base: str | Path, *, inside_artifact: bool, adapter: bool) -> dict[str, Any]:
    """How a training manifest says where its trained weights are: a base plus, for adapter methods, the adapter.

    A base outside the artifact is a Hub id or a local folder (kept absolute, so any working directory finds it).
    """
    if not inside_artifact and Path(base).exists():
        base = Path(base).resolve()
    return {"base": str(base), "base_inside_artifact": inside_artifact, "adapter": adapter}


def trained_model_location(stage_dir: Path) -> tuple[str | Path, Path | None]:
    """(base model path or id, adapter folder or None) of a complete SFT/DPO artifact."""
    record = (artifacts.read_manifest(stage_dir) or {})["model"]
    base = stage_dir / record["base"] if record["base_inside_artifact"] else record["base"]
    return base, (stage_dir / artifacts.MODEL_DIR if record["adapter"] else None)


def load_trainable_model(recipe: Recipe, section: TrainingSection, name: str, model_path: str | Path) -> PreTrainedModel:
    """The model to train, in the recipe's dtype; 4-bit and prepared for k-bit training for QLoRA."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": models.torch_dtype(recipe.model.dtype), "trust_remote_code": recipe.model.trust_remote_code}
    if section.method == "qlora":
        kwargs["quantization_config"] = _quantization_config(section, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    except OSError as error:
        raise PipelineError(
            f"could not load the model '{model_path}': {error}. Offline, a Hub id works only if it is in the local cache."
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

    lora = section.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        use_dora=section.method == "dora",
        task_type="CAUSAL_LM",
    )


# ----------------------------------------------------------------------------------- trainer arguments


def trainer_arguments(config_class: type, recipe: Recipe, section: TrainingSection, name: str, output_dir: Path, **owned: Any) -> Any:
    """The TRL config: the recipe's TRL fields verbatim, plus what the pipeline owns (paths, seed, batch plan)."""
    import torch

    current = launch.from_environment()
    launch.check_method(section.method, name, current, section.global_batch_size)
    plan = plan_batch(section, name, current.processes)
    fields: dict[str, Any] = {
        "report_to": "none",
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
        fields.update(bf16=False, fp16=False)
        # Without CUDA, accelerate starts DeepSpeed with no process-group backend, and a DDP launch outside the
        # Trainer's CPU mode trains each process alone: DeepSpeed needs gloo named, DDP (and a single process)
        # needs the CPU mode, and breaks with the backend named.
        if current.kind == "deepspeed":
            fields["ddp_backend"] = "gloo"
        else:
            fields["use_cpu"] = True
    try:
        return config_class(**fields)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"the {name} section is not a valid {config_class.__name__}: {error}") from None


# ----------------------------------------------------------------------------------- checkpoints/resume


def complete_checkpoints(work_dir: Path) -> list[Path]:
    folder = work_dir / CHECKPOINTS_DIR
    found = [p for p in folder.glob("checkpoint-*") if (p / TRAINER_STATE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def begin_or_resume(stage: artifacts.StageRun, *, allow_drift: bool, fresh: bool) -> Path | None:
    """Start the stage's work folder, or pick up the newest complete checkpoint of an interrupted run.

    Resuming is refused when the recipe or an input changed since that run (unless allow_drift), since the
    continued run would silently mix two different trainings. Every process decides the same from the same
    files; only the main one writes.
    """
    key = {"config_hash": stage.config_hash, "inputs": {n: r["sha256"] for n, r in stage.inputs.items()}}
    checkpoints = [] if fresh else complete_checkpoints(stage.work_dir)
    if checkpoints:
        try:
            previous = json.loads((stage.work_dir / RESUME_KEY).read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != key and not allow_drift:
            changed = _drift(previous, key)
            raise PipelineError(
                f"an interrupted {stage.stage} run left {checkpoints[-1]}, but {changed} changed since it started. "
                f"Resuming would mix two different trainings: rerun with --allow-drift to resume anyway, or --fresh "
                f"to discard the checkpoints and start over."
            )
    state = processes()
    state.wait_for_everyone()  # nobody reads the work folder while the main process clears it
    if state.is_main_process:
        stage.begin(keep_partial=bool(checkpoints))
        (stage.work_dir / RESUME_KEY).write_text(json.dumps(key, indent=2) + "\n")
    state.wait_for_everyone()
    return checkpoints[-1] if checkpoints else None


def _drift(previous: dict[str, Any] | None, current: dict[str, Any]) -> str:
    if previous is None:
        return "the record of its settings is missing, so whether anything"
    changed = [f"input '{n}'" for n in current["inputs"] if previous.get("inputs", {}).get(n) != current["inputs"][n]]
    if previous.get("config_hash") != current["config_hash"]:
        changed.insert(0, "the recipe")
    return " and ".join(changed) or "something"


class StopOnSignal:
    """On SIGTERM: save a checkpoint at the end of the current step and stop training (the stage exits 0).

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
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
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

    state = processes()
    stopper = StopOnSignal()
    trainer.add_callback(stopper.callback)
    started, cpu_started = time.time(), time.process_time()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stopper.restore()
    if stopper.stopping:
        newest = complete_checkpoints(stage.work_dir)
        if state.is_main_process:
            print(f"{stage.stage}: stopped by SIGTERM; saved {newest[-1] if newest else 'no checkpoint'}. Rerun the same command to resume.")
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


def complete_stage(stage: artifacts.StageRun, metrics: dict[str, Any], record: dict[str, Any], summary: str) -> Path:
    """The main process writes the manifest and prints the stage's one-line summary; the others wait for it."""
    state = processes()
    if state.is_main_process:
        stage.complete(metrics, extra={"model": record})
        print(f"{summary} -> {stage.final_dir}")
    state.wait_for_everyone()
    return stage.final_dir
