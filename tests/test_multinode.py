"""Two nodes of one training job on this host, each in its own folder with its own `checkpoints/` (no shared
filesystem), started with `python -m pipeline.node` as a cluster would start them: one CPU process per node over
gloo on 127.0.0.1, for DDP and DeepSpeed ZeRO-3.

The one-machine run of the same recipe (two processes) is the reference: the two-node loss curve follows it, a
kill -9 of both nodes followed by the same two commands resumes each node from its own checkpoint and ends on the
same curve, SIGTERM to one node stops both at the same step, and a node alone gives up after its join timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import dpo
from pipeline.core import artifacts, training

from conftest import REPO
from test_distributed import CONFIGS, accelerate_launch, kill_tree, two_stage_recipe
from test_sft import losses, prepare, wait_paused

NODE_HOOKS = REPO / "tests" / "node_hooks"
JOIN_TIMEOUT = 120  # seconds: both nodes start within a second of each other here
# The two-node curve against the one-machine one, relative. Both runs reduce the same two gradients over gloo in the
# same order; the curves measured equal to the last bit, and 1e-5 is the bound the one-machine DDP test uses.
LOSS_TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_environment(hooks: bool = False, **extra: str) -> dict[str, str]:
    # gloo on the loopback interface only: the two nodes talk over 127.0.0.1, nothing leaves the host.
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", **extra}
    if hooks:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NODE_HOOKS), os.environ.get("PYTHONPATH")]))
    return environment


def start_node(
    folder: Path,
    rank: int,
    port: int,
    config: str,
    *stage_args: str,
    join_timeout: int = JOIN_TIMEOUT,
    pause_after_save: int | None = None,
) -> subprocess.Popen:
    """One node: the same command a SLURM job or a Kubernetes pod runs (launchers/), with its place given."""
    command = [
        sys.executable, "-m", "pipeline.node", "sft",
        "--launch-config", str(CONFIGS / config),
        "--nodes", "2", "--node-rank", str(rank),
        "--main-address", "127.0.0.1", "--main-port", str(port),
        "--processes-per-node", "1", "--join-timeout", str(join_timeout),
        "--config", str(folder / "recipe.yaml"), *stage_args,
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node_environment(pause_after_save is not None, PAUSE_AFTER_SAVE=str(pause_after_save or "")),
    )


def run_nodes(nodes: list[Path], config: str, *stage_args: str, timeout: float = 600) -> list[tuple[int, str, str]]:
    port = free_port()
    started = [start_node(folder, rank, port, config, *stage_args) for rank, folder in enumerate(nodes)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in started]
        return [(p.returncode, *output) for p, output in zip(started, outputs)]
    finally:
        for process in started:
            kill_tree(process, signal.SIGKILL)


def node_folders(tmp_path: Path, **sft_settings) -> list:
    """Two nodes' folders, each with the recipe, its data files and the data and base stages run there."""
    recipes = []
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        recipes.append(prepare(two_stage_recipe(folder, **sft_settings)))
    return recipes


def one_machine_reference(tmp_path: Path, config: str, **sft_settings) -> list[float]:
    folder = tmp_path / "one-machine"
    folder.mkdir()
    recipe = prepare(two_stage_recipe(folder, **sft_settings))
    result = accelerate_launch(config, "sft", recipe.source_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return losses(recipe.run_dir / "sft")


def assert_same_curve(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want), (got, want)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    print(f"two nodes against one machine: largest relative loss difference {worst:.1e} over {len(got)} steps")
    assert worst <= LOSS_TOLERANCE, f"relative loss difference {worst:.2e}: {got} vs {want}"


SETTINGS = {"max_steps": 12, "save_steps": 6, "learning_rate": 2e-3}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero3.yaml"])
def test_two_nodes_with_their_own_disks_train_resume_and_hand_on(tmp_path: Path, config: str) -> None:
    reference = one_machine_reference(tmp_path, config, **SETTINGS)
    node0, node1 = node_folders(tmp_path, **SETTINGS)
    folders = [Path(node0.source_path).parent, Path(node1.source_path).parent]

    # Killed: rank 0 pauses once checkpoint-6 is saved; node 1 saves its own and waits for rank 0 at the next step.
    port = free_port()
    started = [start_node(f, rank, port, config, pause_after_save=6) for rank, f in enumerate(folders)]
    try:
        wait_paused(started[0])
        deadline = time.time() + 120
        while [c.name for c in training.complete_checkpoints(node1.run_dir / "sft.partial")] != ["checkpoint-6"]:
            assert time.time() < deadline, "node 1 never completed its own checkpoint-6"
            time.sleep(0.2)
    finally:
        for process in started:
            kill_tree(process, signal.SIGKILL)  # both nodes at once, as a power cut would
            process.communicate()
    for recipe in (node0, node1):  # each node holds the checkpoint on its own disk
        assert [c.name for c in training.complete_checkpoints(recipe.run_dir / "sft.partial")] == ["checkpoint-6"]
        assert not (recipe.run_dir / "sft").exists()

    # The same two commands again: each node resumes from its own checkpoint.
    results = run_nodes(folders, config)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert results[0][1].count("sft: ") == 1 and "sft: " not in results[1][1]  # node 0 reports, once
    out = node0.run_dir / "sft"
    metrics = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    assert metrics["processes"] == 2 and metrics["resumed_from"] == "checkpoint-6"
    assert metrics["storage"] == "each node its own" and metrics["optimizer_steps"] == 12
    assert artifacts.manifest_is_complete(out)
    # Resumed, the curve is the one-machine run's, step for step.
    assert_same_curve(losses(out), reference)
    # Node 1 keeps nothing of the stage: its checkpoints are spent and the artifact is node 0's.
    assert not (node1.run_dir / "sft").exists() and not (node1.run_dir / "sft.partial").exists()
    # A rerun is up to date on every node, not only on the node that holds the artifact.
    again = run_nodes(folders, config)
    assert [code for code, _, _ in again] == [0, 0] and "up to date" in again[0][1], again[0][2][-2000:]

    # The next stage runs from node 0's artifact.
    dpo.run(node0)
    assert artifacts.manifest_is_complete(node0.run_dir / "dpo")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero3.yaml"])
def test_sigterm_to_one_node_stops_both_at_the_same_step(tmp_path: Path, config: str) -> None:
    node0, node1 = node_folders(tmp_path, max_steps=400, save_steps=10_000, logging_steps=1)
    port = free_port()
    # -v: the trainer's log lines, so the test sees training under way.
    folders = [Path(r.source_path).parent for r in (node0, node1)]
    started = [start_node(folder, rank, port, config, "-v") for rank, folder in enumerate(folders)]
    try:
        for line in started[0].stdout:
            if "'loss'" in line:  # rank 0 logged a step: both nodes are inside training
                break
        started[1].send_signal(signal.SIGTERM)  # the node that is not the main one
        for process in started:
            process.communicate(timeout=180)
        codes = [p.returncode for p in started]
    finally:
        for process in started:
            kill_tree(process, signal.SIGKILL)
            process.communicate()
    assert codes == [143, 143]
    saved = [training.complete_checkpoints(r.run_dir / "sft.partial") for r in (node0, node1)]
    assert saved[0] and [c.name for c in saved[0]] == [c.name for c in saved[1]]
    assert int(saved[0][-1].name.rsplit("-", 1)[-1]) < 400


def test_a_node_alone_gives_up_after_its_join_timeout_naming_the_address(tmp_path: Path) -> None:
    port, timeout = free_port(), 10
    alone = [
        start_node(tmp_path, rank, port + rank, "ddp.yaml", join_timeout=timeout)  # each waits for a partner
        for rank in (0, 1)
    ]
    started = time.time()
    try:
        errors = [p.communicate(timeout=120)[1] for p in alone]
        results = [(p.returncode, stderr) for p, stderr in zip(alone, errors)]
    finally:
        for process in alone:
            kill_tree(process, signal.SIGKILL)
    elapsed = time.time() - started
    for rank, (code, stderr) in enumerate(results):
        assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
        assert f"127.0.0.1:{port + rank}" in stderr and f"for {timeout} s" in stderr, stderr
    # the join timeout plus the start of Python and torch; a launcher that hangs would meet the 120 s above
    assert elapsed < timeout + 60


def test_a_node_without_its_place_in_the_job_is_told_what_to_give(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NODE_RANK", "MAIN_ADDRESS"))}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.node", "sft", "--nodes", "2", "--config", "x.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=environment,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--node-rank, --main-address" in result.stderr
