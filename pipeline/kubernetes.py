"""Kubernetes manifests for a run: its server, and a multi-node training job, written from the recipe.

    python -m pipeline.kubernetes serve --config configs/tiny.yaml --image IMAGE > serve.yaml
    python -m pipeline.kubernetes train --config configs/tiny.yaml --image IMAGE --stage sft --nodes 2 > train.yaml
    kubectl apply -f serve.yaml

IMAGE holds the repository at --workdir (default /app) with `make install`'s environment on its PATH. The commands
the pods run are the ones the tests run: `python -m serving.vllm_server` and `python -m pipeline.node`.

`serve`: a Deployment + Service. The API key comes from a Secret (create it yourself: `kubectl create secret generic
<run>-api-key --from-literal=key=...`), the export from a volume claim mounted read-only, readiness from `/health`
(the one route the server answers without the key), `terminationGracePeriodSeconds` above `serve.shutdown_grace` so
that requests in flight finish before Kubernetes kills the pod, and the memory request from the export's size.

`train`: an Indexed Job with one pod per node and a headless Service that gives pod 0 the name the others reach it
by. Each pod runs `python -m pipeline.node`, which takes its rank from JOB_COMPLETION_INDEX. A pod stopped by
SIGTERM (a drained node, a preemption) saves a checkpoint and exits 143; the Job's pod failure policy does not count
that against its retries, and the replacement pod resumes from the checkpoint in the run's volume claim.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from pipeline.core import artifacts, cli, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.schema import Recipe

GIB = 2**30
# Peak memory of the server on a CPU host (server, engine and its 1 GiB KV cache together) measured at two sizes:
# 2.5 GiB with 5 MB of weights (1M parameters), 4.0 GiB with 1.44 GB (0.36B): 2.5 GiB + 1.1 x the weights.
CPU_SERVER_BASE_GIB = 2.5
CPU_SERVER_PER_WEIGHT_BYTE = 1.1
MEMORY_LIMIT_FACTOR = 1.5  # the limit over the request: room for long requests before the pod is killed
SHUTDOWN_MARGIN_S = 30  # what the server needs after its grace: closing streams, the engine stopping
CHECKPOINT_GRACE_S = 300  # a training pod's time from SIGTERM to a saved checkpoint
EXPORT_MOUNT = "/models/export"
CHECKPOINTS_MOUNT = "/checkpoints"


def serve_manifests(
    recipe: Recipe, config: list[str], image: str, *, export_claim: str, replicas: int, gpus: int, workdir: str
) -> list[dict[str, Any]]:
    export = stages.EXPORT.folder(recipe)
    manifest = artifacts.read_manifest(export)
    if not manifest:
        raise ConfigError(f"{export} holds no complete export: run `python -m pipeline.export` first.")
    weights = sum(record["bytes"] for name, record in manifest["outputs"].items() if name.endswith(".safetensors"))
    serve = recipe.serve
    name = _name(recipe.run.name)
    secret = f"{name}-api-key"
    memory = _gib(CPU_SERVER_BASE_GIB * GIB + CPU_SERVER_PER_WEIGHT_BYTE * weights)
    resources: dict[str, Any] = {
        "requests": {"cpu": "2", "memory": f"{memory}Gi"},
        "limits": {"memory": f"{math.ceil(memory * MEMORY_LIMIT_FACTOR)}Gi"},
    }
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = str(gpus)
    command = [
        "python", "-m", "serving.vllm_server", "--artifact", EXPORT_MOUNT, "--config", *config,
        "serve.host=0.0.0.0", f"serve.port={serve.port}",
    ]  # fmt: skip
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "server"}
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{name}-server", "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": math.ceil(serve.shutdown_grace) + SHUTDOWN_MARGIN_S,
                    "containers": [
                        {
                            "name": "server",
                            "image": image,
                            "workingDir": workdir,
                            "command": command,
                            "ports": [{"name": "http", "containerPort": serve.port}],
                            "env": [
                                {
                                    "name": serve.api_key_env,
                                    "valueFrom": {"secretKeyRef": {"name": secret, "key": "key"}},
                                }
                            ],
                            # vLLM loads the model before /health answers: up to 10 minutes to start.
                            "startupProbe": {**probe, "failureThreshold": 120},
                            "readinessProbe": {**probe, "failureThreshold": 2},
                            "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
                            "resources": resources,
                            "volumeMounts": [{"name": "export", "mountPath": EXPORT_MOUNT, "readOnly": True}],
                        }
                    ],
                    "volumes": [
                        {"name": "export", "persistentVolumeClaim": {"claimName": export_claim, "readOnly": True}}
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return [deployment, service]


def train_manifests(
    recipe: Recipe,
    config: list[str],
    image: str,
    *,
    stage: str,
    nodes: int,
    processes_per_node: int,
    launch_config: str,
    checkpoints_claim: str,
    gpus: int,
    workdir: str,
) -> list[dict[str, Any]]:
    if nodes < 1 or processes_per_node < 1:
        raise ConfigError("--nodes and --processes-per-node must be at least 1.")
    name = _name(f"{recipe.run.name}-{stage}")
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "training"}
    command = [
        "python", "-m", "pipeline.node", stage, "--launch-config", launch_config,
        "--processes-per-node", str(processes_per_node), "--config", *config,
        f"run.output_dir={CHECKPOINTS_MOUNT}",
    ]  # fmt: skip
    resources: dict[str, Any] = {"requests": {"cpu": str(max(2, processes_per_node))}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        # Pod 0's stable name, <job>-0.<service>, before it is ready: the other pods reach it while it waits.
        "spec": {"clusterIP": "None", "selector": labels, "publishNotReadyAddresses": True},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 3,
            # SIGTERM -> checkpoint -> exit 143: not a failure; the replacement pod resumes.
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onExitCodes": {"containerName": "node", "operator": "In", "values": [143]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [2]}},
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": name,
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": CHECKPOINT_GRACE_S,
                    "containers": [
                        {
                            "name": "node",
                            "image": image,
                            "workingDir": workdir,
                            "command": command,
                            "env": [
                                {"name": "NUM_NODES", "value": str(nodes)},
                                {"name": "MAIN_ADDRESS", "value": f"{name}-0.{name}"},
                                {"name": "MAIN_PORT", "value": "29500"},
                            ],
                            "ports": [{"name": "rendezvous", "containerPort": 29500}],
                            "resources": resources,
                            "volumeMounts": [{"name": "checkpoints", "mountPath": CHECKPOINTS_MOUNT}],
                        }
                    ],
                    "volumes": [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoints_claim}}],
                },
            },
        },
    }
    return [headless, job]


def _name(text: str) -> str:
    """A Kubernetes object name (DNS label) from a run name."""
    cleaned = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return cleaned[:50] or "pipeline"


def _gib(amount: float) -> int:
    return max(1, math.ceil(amount / GIB))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.kubernetes", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("serve", "train"))
    parser.add_argument("--config", default=cli.DEFAULT_CONFIG, help="the recipe, as a path inside the image")
    parser.add_argument("--image", required=True, help="container image with the repository and its environment")
    parser.add_argument("--workdir", default="/app", help="the repository's folder in the image (default /app)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per pod (nvidia.com/gpu)")
    parser.add_argument("--replicas", type=int, default=1, help="serve: server pods")
    parser.add_argument("--export-claim", help="serve: volume claim holding the export (default <run>-export)")
    parser.add_argument("--stage", choices=("sft", "dpo", "grpo"), default="sft", help="train: the stage")
    parser.add_argument("--nodes", type=int, default=2, help="train: pods, one per node")
    parser.add_argument("--processes-per-node", type=int, default=1, help="train: processes per pod")
    parser.add_argument("--launch-config", default="accelerate_configs/ddp.yaml", help="train: accelerate config")
    parser.add_argument("--checkpoints-claim", help="train: volume claim for run.output_dir (<run>-checkpoints)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    try:
        recipe = load_recipe(args.config, args.overrides)
        config = [args.config, *args.overrides]  # the pods read the recipe as this command did
        name = _name(recipe.run.name)
        if args.what == "serve":
            documents = serve_manifests(
                recipe, config, args.image, export_claim=args.export_claim or f"{name}-export",
                replicas=args.replicas, gpus=args.gpus, workdir=args.workdir,
            )  # fmt: skip
        else:
            documents = train_manifests(
                recipe, config, args.image, stage=args.stage, nodes=args.nodes,
                processes_per_node=args.processes_per_node, launch_config=args.launch_config,
                checkpoints_claim=args.checkpoints_claim or f"{name}-checkpoints", gpus=args.gpus,
                workdir=args.workdir,
            )  # fmt: skip
    except PipelineError as error:
        cli.report_user_error(error)
        return stages.USER_ERROR_EXIT_CODE
    yaml.dump_all(documents, sys.stdout, Dumper=_PlainDumper, sort_keys=False)
    return 0


class _PlainDumper(yaml.SafeDumper):
    """Every object written out where it appears: the label sets repeat rather than point at one another (YAML
    anchors), which readers of a manifest expect and some tools do not follow."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


if __name__ == "__main__":
    sys.exit(main())
