"""launchers/slurm/train.sbatch on a real SLURM: Debian's slurm-wlm started on this host as a one-node cluster
(munged, slurmctld and slurmd as root, with their own key, socket, ports and folders under the test's temporary
folder), the script submitted with sbatch, a job that finishes, and a job requeued mid-run that resumes.

Skipped, with the reason, where SLURM cannot run: slurm-wlm not installed (`apt-get install slurm-wlm munge`, which
.ci/run does where it is root), or not root (the daemons are started as root here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core import artifacts

from conftest import REPO
from test_distributed import CONFIGS, two_stage_recipe
from test_multinode import free_port
from test_sft import prepare

SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def _wait_for(what: str, check, timeout: float = 60) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A one-node SLURM cluster on this host; yields the environment its clients (sbatch, scontrol) need."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test starts SLURM's daemons (munged, slurmctld, slurmd) as root, and this is not root")
    root = tmp_path_factory.mktemp("slurm")
    key, munge_socket = root / "munge.key", root / "munge.socket"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname()
    cpus = os.cpu_count() or 1
    config = root / "slurm.conf"
    config.write_text(
        "\n".join(
            [
                "ClusterName=pipeline-test",
                f"SlurmctldHost={host}(127.0.0.1)",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={munge_socket}",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'slurmd.log'}",
                # No cgroups in a container: processes are tracked through /proc, tasks are not confined.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "MpiDefault=none",
                "SwitchType=switch/none",
                # Seconds from SIGTERM to SIGKILL when a job is requeued or cancelled: time to save a checkpoint.
                "KillWait=120",
                f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
                "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    env = {**os.environ, "SLURM_CONF": str(config)}
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(
            subprocess.Popen(
                ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                 f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                 f"--seed-file={root / 'munged.seed'}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        _wait_for("munged's socket", munge_socket.exists)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(config)], env=env, **_quiet()))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(config), "-N", host], env=env, **_quiet()))
        _wait_for("an idle SLURM node", lambda: "idle" in _run(["sinfo", "-h", "-o", "%t"], env))
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
        for daemon in reversed(daemons):
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def _quiet() -> dict:
    return {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


def _run(command: list[str], env: dict[str, str]) -> str:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30).stdout


def job_field(job: str, field: str, env: dict[str, str]) -> str:
    found = re.search(rf"\b{field}=(\S+)", _run(["scontrol", "show", "job", "-o", job], env))
    return found.group(1) if found else ""


def submit(folder: Path, env: dict[str, str], *stage_args: str) -> tuple[str, Path]:
    """sbatch the launcher from the run's folder, as a user would (one node, two processes): job id, output file."""
    output = folder / "slurm-job.out"
    result = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", f"--output={output}", str(SBATCH), "sft",
         "--launch-config", str(CONFIGS / "ddp.yaml"), "--processes-per-node", "2", "--join-timeout", "60",
         "--config", str(folder / "recipe.yaml"), *stage_args],
        cwd=folder, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0], output


def wait_until_done(job: str, env: dict[str, str], output: Path, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while (state := job_field(job, "JobState", env)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline, (
            f"job {job} still {state} after {timeout} s:\n{output.read_text(errors='replace')[-3000:]}"
        )
        time.sleep(1)
    return state


@pytest.mark.slow
def test_a_job_requeued_mid_run_resumes_and_completes(tmp_path: Path, slurm: dict[str, str]) -> None:
    """One job covers both: submitted with sbatch, requeued mid-run (as a preemption would), resumed from the
    checkpoint its SIGTERM saved, and finished with the artifact complete (a job that runs through is its second
    half)."""
    recipe = prepare(two_stage_recipe(tmp_path, max_steps=300, save_steps=10_000, logging_steps=1))
    job, output = submit(tmp_path, slurm, "-v")  # -v: the trainer's log lines show training under way
    _wait_for(
        "a logged training step",
        lambda: output.exists() and "'loss'" in output.read_text(errors="replace"),
        timeout=600,
    )
    requeued = subprocess.run(["scontrol", "requeue", job], env=slurm, capture_output=True, text=True, timeout=30)
    assert requeued.returncode == 0, requeued.stderr
    state = wait_until_done(job, slurm, output)
    log = output.read_text(errors="replace")
    assert state == "COMPLETED" and job_field(job, "Restarts", slurm) == "1", log[-4000:]
    assert "stopped by SIGTERM; saved" in log and "start 1:" in log and "pipeline.node sft" in log
    metrics = json.loads((recipe.run_dir / "sft" / artifacts.MANIFEST).read_text())["metrics"]
    assert metrics["resumed_from"] and metrics["optimizer_steps"] == 300 and metrics["processes"] == 2
    assert artifacts.manifest_is_complete(recipe.run_dir / "sft")
