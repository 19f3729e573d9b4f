"""What a launch asks for (one process, DDP, DeepSpeed ZeRO stage N) and which training methods work under it.

Read from an accelerate config file before anything starts (`python -m pipeline.run` with a recipe's
`launch_config`, and recipe validation), or from the environment `accelerate launch` gives each process (a
stage started directly). Either way a method x launch pair that cannot work is refused before training, with
the alternatives that do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Launch:
    kind: str  # "single", "ddp" or "deepspeed"
    processes: int = 1
    zero_stage: int | None = None
    offload: bool = False

    def describe(self) -> str:
        if self.kind == "deepspeed":
            name = f"DeepSpeed ZeRO-{self.zero_stage}" + (" with CPU offload" if self.offload else "")
        else:
            name = {"single": "a single process", "ddp": "DDP"}[self.kind]
        return f"{name} ({self.processes} process{'es' if self.processes != 1 else ''})"


def resolve_config_path(path: str | Path) -> Path:
    """A launch config as written in a recipe: relative to the working directory, else to the repository."""
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists() and (REPO / candidate).exists():
        return REPO / candidate
    return candidate


def from_config_file(path: str | Path, key: str) -> Launch:
    """The launch an accelerate config file describes; `key` names the recipe key that points at it."""
    file = resolve_config_path(path)
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(
            f"{key}: cannot read the accelerate config {path} ({error.strerror}). The shipped ones are in "
            f"accelerate_configs/: {', '.join(sorted(p.name for p in (REPO / 'accelerate_configs').glob('*.yaml')))}."
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: {path} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path} is not an accelerate config (expected a mapping of its keys).")
    processes = int(config.get("num_processes", 1) or 1)
    distributed = str(config.get("distributed_type", "NO")).upper()
    if distributed == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config") or {}
        stage, offload = _deepspeed_file_settings(deepspeed.get("deepspeed_config_file"), file.parent)
        if stage is None:
            stage = int(deepspeed.get("zero_stage", 2))
            offload = any(
                str(deepspeed.get(k, "none")).lower() not in ("none", "")
                for k in ("offload_optimizer_device", "offload_param_device")
            )
        return Launch("deepspeed", processes, stage, offload)
    if distributed in ("NO",) or processes == 1:
        return Launch("single", 1)
    if distributed in ("MULTI_GPU", "MULTI_CPU"):
        return Launch("ddp", processes)
    raise ConfigError(
        f"{key}: {path} asks for distributed_type {distributed}, which the pipeline does not support; use one of the "
        "configs in accelerate_configs/ (single process, DDP, DeepSpeed ZeRO-2/3)."
    )


def _deepspeed_file_settings(path: str | None, folder: Path) -> tuple[int | None, bool]:
    """ZeRO stage and offload from a DeepSpeed JSON config that an accelerate config may point at instead."""
    if not path:
        return None, False
    file = folder / path  # an absolute path stays absolute
    try:
        zero = json.loads(file.read_text(encoding="utf-8")).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the DeepSpeed config {file}: {error}. Check deepspeed_config_file.") from None
    offload = any(
        str((zero.get(k) or {}).get("device", "none")).lower() != "none" for k in ("offload_optimizer", "offload_param")
    )
    return int(zero.get("stage", 0)), offload


def from_environment() -> Launch:
    """The launch this process belongs to: the process count torchrun gives every process (WORLD_SIZE), and the
    DeepSpeed settings as accelerate itself reads them from what `accelerate launch` passed on."""
    from accelerate.utils import DeepSpeedPlugin, parse_flag_from_env

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        plugin = DeepSpeedPlugin()
        offload = any(
            str(device).lower() not in ("none", "")
            for device in (plugin.offload_optimizer_device, plugin.offload_param_device)
        )
        return Launch("deepspeed", processes, int(plugin.zero_stage), offload)
    return Launch("ddp", processes) if processes > 1 else Launch("single", 1)


def check_method(method: str, section: str, launch: Launch, global_batch_size: int) -> None:
    """Refuse a training method the launch cannot run, and a global batch the processes cannot share."""
    if launch.kind == "deepspeed" and launch.zero_stage == 3 and method == "qlora":
        raise ConfigError(
            f"{section}.method is qlora, which the pipeline does not run under {launch.describe()}: ZeRO-3 partitions"
            " every weight across processes, and bitsandbytes' packed 4-bit weights partition only when stored in the"
            " compute dtype (bnb_4bit_quant_storage), a combination this pipeline does not test. Use"
            f" {section}.method=lora under ZeRO-3 (its 16-bit weights are partitioned instead), or keep qlora with"
            " accelerate_configs/ddp.yaml or accelerate_configs/deepspeed_zero2.yaml."
        )
    if global_batch_size % launch.processes:
        raise ConfigError(
            f"{section}.global_batch_size={global_batch_size} cannot be split over the {launch.processes} processes of "
            f"{launch.describe()}; use a multiple of {launch.processes}."
        )


# ------------------------------------------------------------------------------------------- multi-node

DEFAULT_JOIN_TIMEOUT = 300  # seconds a node waits for the others (torch's static rendezvous waits 600)
DEFAULT_MAIN_PORT = 29500


@dataclass(frozen=True)
class Node:
    """One node's place in a multi-node job, and the `accelerate launch` that runs its processes."""

    nodes: int
    rank: int
    main_address: str
    main_port: int
    processes_per_node: int
    join_timeout: int

    @classmethod
    def resolve(
        cls,
        *,
        nodes: int | None,
        rank: int | None,
        main_address: str | None,
        main_port: int | None,
        processes_per_node: int | None,
        join_timeout: int,
    ) -> Node:
        """The flags given, else what the scheduler that started this node says (SLURM, a Kubernetes Indexed Job),
        else the generic environment variables (NUM_NODES, NODE_RANK, MAIN_ADDRESS, MAIN_PORT)."""
        env = os.environ
        nodes = nodes or _int_env("SLURM_JOB_NUM_NODES", "SLURM_NNODES", "NUM_NODES")
        rank = rank if rank is not None else _int_env("SLURM_NODEID", "JOB_COMPLETION_INDEX", "NODE_RANK")
        main_address = main_address or env.get("MAIN_ADDRESS") or _slurm_first_host()
        main_port = main_port or _int_env("MAIN_PORT") or DEFAULT_MAIN_PORT
        missing = [
            flag
            for flag, value in (("--nodes", nodes), ("--node-rank", rank), ("--main-address", main_address))
            if value is None
        ]
        if missing:
            raise ConfigError(
                f"this node's place in the job is not known: give {', '.join(missing)} (or run it under SLURM, or "
                "in a Kubernetes Indexed Job with NUM_NODES and MAIN_ADDRESS set; see launchers/)."
            )
        if not 0 <= rank < nodes:
            raise ConfigError(f"--node-rank {rank} is outside the job's {nodes} nodes (0 to {nodes - 1}).")
        if join_timeout < 1:
            raise ConfigError(f"--join-timeout must be at least 1 second, not {join_timeout}.")
        return cls(nodes, rank, main_address, main_port, processes_per_node or _processes_here(), join_timeout)

    def accelerate_arguments(
        self, config_file: Path, described: Launch, module: str, stage_args: list[str]
    ) -> list[str]:
        arguments = [
            "--config_file", str(config_file),
            "--num_machines", str(self.nodes),
            "--machine_rank", str(self.rank),
            "--num_processes", str(self.nodes * self.processes_per_node),
            "--main_process_ip", self.main_address,
            "--main_process_port", str(self.main_port),
            "--rdzv_backend", "static",
            "--rdzv_conf", f"timeout={self.join_timeout}",
            "--max_restarts", "0",
        ]  # fmt: skip
        if described.kind == "deepspeed":
            # torchrun on each node, as for DDP; DeepSpeed's own launchers (pdsh, ...) need ssh between the nodes.
            arguments += ["--deepspeed_multinode_launcher", "standard"]
        return [*arguments, "--module", module, *stage_args]

    def run(self, config_file: Path, described: Launch, module: str, stage_args: list[str]) -> int:
        """Launch this node's processes and wait for them; the exit code a stage would give."""
        import torch.distributed as dist
        from accelerate.commands.launch import launch_command, launch_command_parser
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        from pipeline.core.stages import STOPPED_EXIT_CODE, USER_ERROR_EXIT_CODE

        arguments = launch_command_parser().parse_args(
            self.accelerate_arguments(config_file, described, module, stage_args)
        )
        try:
            launch_command(arguments)
        except (dist.DistStoreError, dist.DistNetworkError) as error:
            raise self._no_show(error) from None
        except SignalException as signalled:
            # The scheduler stopped this node: its processes got the signal, checkpointed and stopped.
            return 128 + int(signalled.sigval)
        except ChildFailedError as failed:
            codes = {failure.exitcode for failure in failed.failures.values()}
            # 143: another node was stopped and this one stopped with it, at the same step; 2: the processes
            # explained a user error themselves.
            for code in (STOPPED_EXIT_CODE, USER_ERROR_EXIT_CODE):
                if codes == {code}:
                    return code
            return 1
        return 0

    def _no_show(self, error: Exception) -> ConfigError:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.rank == 0:
            waited = f"node 0 listened on {self.main_address}:{self.main_port} for the other {self.nodes - 1} node(s)"
        else:
            waited = f"node {self.rank} tried to reach node 0 at {self.main_address}:{self.main_port}"
        return ConfigError(
            f"the job's nodes did not all join: {waited} for {self.join_timeout} s ({first_line}). Start the same "
            "command on every node with its own --node-rank, check that node 0's address is reachable from the "
            "others and the port is open and free there, or raise --join-timeout if nodes start far apart."
        )


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"the environment variable {name}={value!r} is not a whole number.") from None
    return None


def _slurm_first_host() -> str | None:
    """The first host of the SLURM allocation: node 0, where the job's main process listens."""
    import shutil
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist or shutil.which("scontrol") is None:
        return None
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=False
    ).stdout.split()
    return hosts[0] if hosts else None


def _processes_here() -> int:
    gpus = _int_env("SLURM_GPUS_ON_NODE")
    if gpus:
        return gpus
    import torch

    return torch.cuda.device_count() or 1
