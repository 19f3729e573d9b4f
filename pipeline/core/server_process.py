"""A server as a child process (vLLM's, the chat UI), for the evaluation's benchmarks, the demo, the serving
benchmarks and the tests: a free port, waiting until it answers, and stopping it with everything it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.core.errors import PipelineError

STARTUP_SECONDS = 300  # a cold start on a 2-core machine loads torch, vLLM and the model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_vllm_server(
    artifact: Path,
    port: int,
    log_path: Path,
    options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """`python -m serving.vllm_server` on an export, output to `log_path`, in a session of its own so that `stop`
    reaches everything it starts. An API key belongs in `env` (the recipe's serve.api_key_env), where `ps` does
    not show it. It runs in `cwd` (default: the repository), where the recipe's relative paths are read."""
    repo = Path(__file__).resolve().parents[2]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "serving.vllm_server", "--artifact", str(artifact), f"serve.port={port}", *options],
            cwd=cwd or repo,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def log_tail(log_path: Path, lines: int = 40) -> str:
    text = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return "\n".join(text[-lines:])


def wait_healthy(
    port: int,
    server: subprocess.Popen,
    log_path: Path | None = None,
    timeout: float = STARTUP_SECONDS,
    route: str = "/health",
) -> float:
    """Seconds until `route` on the port answered; an error carrying the end of the log if the server exited or hung."""
    started = time.time()
    where = f"; the end of {log_path}:\n{log_tail(log_path)}" if log_path else "."
    while time.time() - started < timeout:
        if server.poll() is not None:
            raise PipelineError(
                f"the server for port {port} exited with code {server.returncode} before it answered{where}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=2):
                return time.time() - started
        except OSError:
            time.sleep(1)
    raise PipelineError(f"the server for port {port} did not answer {route} within {timeout:.0f} s{where}")


def stop(server: subprocess.Popen, grace: float = 60) -> list[int]:
    """SIGTERM, then SIGKILL for whatever of the server's process tree outlives the grace period. The pids left."""
    import psutil

    try:
        family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    return [p.pid for p in alive]
