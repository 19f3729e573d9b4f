"""The Kubernetes manifests `python -m pipeline.kubernetes` writes: valid against the Kubernetes API's schema (strict:
no field the API does not know), and their commands run here as the pods would run them, with what Kubernetes
would give each pod (the volume's path, the Secret's key, the Job's completion index) filled in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from pipeline import kubernetes
from pipeline.core import artifacts, server_process

from conftest import REPO
from test_distributed import two_stage_recipe
from test_multinode import free_port, node_environment
from test_sft import prepare

KUBERNETES_VERSION = "1.37"  # the newest API the validator ships (kubernetes-validate 1.37)


def manifests(*args: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.kubernetes", *args, "--image", "registry.example/pipeline:1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    for document in documents:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{document['kind']} {document['metadata']['name']} is not valid: {error.message}")
    return documents


def by_kind(documents: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in documents}


def test_a_manifest_the_api_would_refuse_is_caught() -> None:
    """The validator is strict: a misspelt field fails it (so that the tests above can fail)."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


@pytest.mark.slow
def test_the_server_manifest_runs_the_served_export_and_drains_within_its_grace(
    default_pipeline: dict, tmp_path: Path
) -> None:
    recipe = default_pipeline["recipe"]
    docs = by_kind(manifests("serve", "--config", "configs/tiny.yaml", *default_pipeline["overrides"]))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > recipe.serve.shutdown_grace
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    [key] = container["env"]
    assert key["name"] == recipe.serve.api_key_env and "secretKeyRef" in key["valueFrom"]
    assert container["volumeMounts"][0]["readOnly"] and pod["volumes"][0]["persistentVolumeClaim"]["readOnly"]
    weights = sum(p.stat().st_size for p in (recipe.run_dir / "export" / artifacts.MODEL_DIR).glob("*.safetensors"))
    memory = int(container["resources"]["requests"]["memory"].removesuffix("Gi"))
    assert memory * 2**30 >= kubernetes.CPU_SERVER_BASE_GIB * 2**30 + weights
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]

    # The pod's command, with the export where the volume would be and the port free here.
    port = free_port()
    command = [
        sys.executable if part == "python" else str(recipe.run_dir / "export") if part == kubernetes.EXPORT_MOUNT
        else f"serve.port={port}" if part.startswith("serve.port=") else part
        for part in container["command"]
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, key["name"]: "k8s-key"}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        server_process.wait_healthy(port, server, log, timeout=300)
        headers = {"Authorization": "Bearer k8s-key"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=30)
        assert models.status_code == 200 and models.json()["data"], models.text
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 401
        # Kubernetes sends SIGTERM, then SIGKILL after the grace period: the server is gone before that.
        stopped = time.time()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=grace)
        assert time.time() - stopped < grace
    finally:
        server_process.stop(server)


@pytest.mark.slow
def test_the_training_job_runs_its_command_on_two_pods(tmp_path: Path) -> None:
    recipe = prepare(two_stage_recipe(tmp_path))
    docs = by_kind(manifests("train", "--config", str(recipe.source_path), "--stage", "sft", "--nodes", "2"))
    job = docs["Job"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 2
    assert pod["subdomain"] == docs["Service"]["metadata"]["name"] and docs["Service"]["spec"]["clusterIP"] == "None"
    assert any(143 in rule.get("onExitCodes", {}).get("values", []) and rule["action"] == "Ignore"
               for rule in job["podFailurePolicy"]["rules"])  # fmt: skip
    environment = {item["name"]: item["value"] for item in container["env"]}
    assert environment["MAIN_ADDRESS"].startswith(f"{docs['Job']['metadata']['name']}-0.")

    # Both pods of the Job, on one shared volume (the run's checkpoints folder here), with the index Kubernetes
    # gives each and pod 0 reachable on 127.0.0.1.
    command = [
        sys.executable if part == "python" else f"run.output_dir={tmp_path / 'checkpoints'}"
        if part.startswith("run.output_dir=") else part
        for part in container["command"]
    ]  # fmt: skip
    port = str(free_port())
    pods = [
        subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=node_environment(
                **{**environment, "MAIN_ADDRESS": "127.0.0.1", "MAIN_PORT": port}, JOB_COMPLETION_INDEX=str(i)
            ),
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [pod.communicate(timeout=600) for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    metrics = json.loads((recipe.run_dir / "sft" / artifacts.MANIFEST).read_text())["metrics"]
    assert metrics["processes"] == 2 and metrics["storage"] == "shared"
