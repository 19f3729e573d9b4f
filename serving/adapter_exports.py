"""Adapter exports as a server holds them: each one's model name, folder, rank, base and what /v1/models says of it,
read from the export's serving.json. Shared by the server's start (serving.vllm_server) and its runtime loads
(serving.middleware), so an adapter is checked against the served base the same way at both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import artifacts
from pipeline.core.errors import ConfigError, MissingArtifactError


@dataclass(frozen=True)
class ServedAdapter:
    """One exported adapter a server holds: its model name, folder, rank, base, and what /v1/models says of it."""

    name: str
    path: Path
    rank: int
    base_model: str
    base_hash: str
    export: Path
    record: dict[str, Any]


def export_folder(path: Path) -> Path:
    """The export folder `path` names: the folder itself, or the export holding it (its adapter/ folder)."""
    path = Path(path)
    if not (path / artifacts.SERVING_FILE).is_file() and (path.parent / artifacts.SERVING_FILE).is_file():
        return path.parent
    return path


def read(folder: Path, serving: dict | None = None) -> ServedAdapter:
    """The adapter export in `folder` (or `serving`, its serving.json already read); ConfigError or
    MissingArtifactError, naming the folder and what to do, where it is not one."""
    if serving is None:
        serving = artifacts.read_serving_file(folder)
    if serving is None:
        raise MissingArtifactError(
            f"{folder / artifacts.SERVING_FILE} does not exist: an adapter to serve is an export folder written with "
            "adapter in export.targets."
        )
    lora = serving.get("lora")
    if not lora or "base_hash" not in lora:
        raise ConfigError(
            f"{folder} holds no adapter export: add adapter to export.targets and re-export it (its stages must "
            "train adapters), or serve its merged model on a server of its own."
        )
    return ServedAdapter(
        name=lora["name"], path=(Path(folder) / lora["path"]).resolve(), rank=int(lora["rank"]),
        base_model=lora["base_model"], base_hash=lora["base_hash"], export=Path(folder), record=metadata(serving),
    )  # fmt: skip


def other_base(adapter: ServedAdapter, base_model: str, base_hash: str, served_as: str) -> str | None:
    """Why `adapter` cannot be served on the base with `base_hash`, naming both bases; None if it can."""
    if adapter.base_hash == base_hash:
        return None
    return (
        f"the adapter {adapter.name} ({adapter.export}) was trained on another base than {served_as}: its base is "
        f"{adapter.base_model} (weights hash {adapter.base_hash[:12]}), {served_as}'s is {base_model} "
        f"({base_hash[:12]}). One server serves adapters of one base: serve it on a server of its own."
    )


def metadata(serving: dict) -> dict[str, Any]:
    """What /v1/models shows of an adapter: its export record (gates, stage, the stages it holds, rank, base)."""
    lora = serving["lora"]
    return {
        **export_metadata(serving),
        "stages": lora["stages"],
        "rank": lora["rank"],
        "base_hash": lora["base_hash"],
    }


def export_metadata(serving: dict) -> dict[str, Any]:
    """Whether the export passed its gates, and the stage it was exported from; exports written before these fields
    leave them out."""
    return {key: serving[key] for key in ("gates", "exported_from") if serving.get(key)}
