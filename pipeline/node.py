"""One node of a multi-node training job: `accelerate launch` with this node's place in the job.

    python -m pipeline.node sft --nodes 2 --node-rank 0 --main-address 10.0.0.1 \\
        [--launch-config accelerate_configs/ddp.yaml] [--processes-per-node 8] [--main-port 29500] \\
        [--join-timeout 300] --config configs/my.yaml [KEY=VALUE ...]

Run the same command on every node, each with its own rank. Where a scheduler started the node, its place comes
from the scheduler and the flags can be left out: under SLURM (`launchers/slurm/train.sbatch`) the node count,
this node's rank and the main address come from the allocation (SLURM_JOB_NUM_NODES, SLURM_NODEID, the first host
of SLURM_JOB_NODELIST); in a Kubernetes Indexed Job (`launchers/kubernetes/train-job.yaml`) the rank is
JOB_COMPLETION_INDEX and NUM_NODES / MAIN_ADDRESS come from the pod's environment. Flags win over either.

The nodes need not share a filesystem: each keeps its checkpoints in its own `run.output_dir` and resumes from
them; the finished artifact is written on node 0 (README, "Scaling out"). Every node waits at most --join-timeout
seconds for the others to join, then stops with the address it waited on. Exit codes are a stage's: 0; 2 for a
user error (a node that never joined included); 143 when SIGTERM stopped the job after a checkpoint (a signal to
one node stops every node at the same step); 1 for anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.core import cli, launch, stages
from pipeline.core.errors import ConfigError, PipelineError

TRAINING_STAGES = ("sft", "dpo", "grpo")
DEFAULT_LAUNCH_CONFIG = "accelerate_configs/ddp.yaml"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.node",
        description=__doc__.splitlines()[0],
        epilog="Anything after the flags (--config, KEY=VALUE overrides, --fresh, ...) goes to the stage.",
    )
    parser.add_argument("stage", choices=TRAINING_STAGES)
    parser.add_argument(
        "--launch-config",
        default=DEFAULT_LAUNCH_CONFIG,
        help=f"the accelerate config of each node's processes: DDP or DeepSpeed (default: {DEFAULT_LAUNCH_CONFIG})",
    )
    parser.add_argument("--nodes", type=int, help="nodes in the job (SLURM_JOB_NUM_NODES, NUM_NODES)")
    parser.add_argument("--node-rank", type=int, help="this node's rank, 0 on the main node (SLURM_NODEID, ...)")
    parser.add_argument("--main-address", help="the main node's address, reachable from every node (MAIN_ADDRESS)")
    parser.add_argument("--main-port", type=int, help="a free port on the main node (MAIN_PORT; default 29500)")
    parser.add_argument(
        "--processes-per-node",
        type=int,
        help="training processes on each node (default: SLURM_GPUS_ON_NODE, else the GPUs here, else 1)",
    )
    parser.add_argument(
        "--join-timeout",
        type=int,
        default=launch.DEFAULT_JOIN_TIMEOUT,
        help=f"seconds to wait for every node to join (default {launch.DEFAULT_JOIN_TIMEOUT})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, stage_args = parser().parse_known_args(argv)
    cli.configure_output("-v" in stage_args or "--verbose" in stage_args)
    if not cli.verbose():
        _quiet_rendezvous_logging()
    try:
        node = launch.Node.resolve(
            nodes=args.nodes,
            rank=args.node_rank,
            main_address=args.main_address,
            main_port=args.main_port,
            processes_per_node=args.processes_per_node,
            join_timeout=args.join_timeout,
        )
        described = launch.from_config_file(args.launch_config, "--launch-config")
        if described.kind == "single":
            raise ConfigError(
                f"--launch-config {args.launch_config} runs a single process; a multi-node job needs DDP or "
                "DeepSpeed (accelerate_configs/ddp.yaml, deepspeed_zero2.yaml, deepspeed_zero3.yaml)."
            )
        return node.run(launch.resolve_config_path(args.launch_config), described, f"pipeline.{args.stage}", stage_args)
    except PipelineError as error:
        cli.report_user_error(error)
        return stages.USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        return 130


def _quiet_rendezvous_logging() -> None:
    """torch's C++ layer logs every failed connection to the main node with a stack of frames, read from the
    environment when torch loads; this launcher says what failed in one paragraph. Only this process is quieted:
    the training processes it starts get the environment back as it was."""
    import os

    previous = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch.distributed  # noqa: F401

    if previous is None:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    else:
        os.environ["TORCH_CPP_LOG_LEVEL"] = previous


if __name__ == "__main__":
    sys.exit(main())
