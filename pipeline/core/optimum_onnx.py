"""The export stage's `optimum-onnx` target: optimum's ONNX exporter (`text-generation-with-past`) on the merged
export, in the optimum-onnx environment (transformers 4.57), and its parity with PyTorch measured there."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core import isolated_env, runtime_parity

ENVIRONMENT = "optimum-onnx"
WORKER = Path(__file__).with_name("optimum_onnx_worker.py")
# Tokenizer keys transformers 5 writes that 4.57 would keep as constructor arguments.
NEWER_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")


def legacy_copy(model_dir: Path, copy: Path) -> None:
    """The merged export as transformers 4.57 reads it, in `copy` (the export itself is never changed): the weights
    linked, the config's `rope_parameters` back to `rope_theta` / `rope_scaling` (4.57 ignores the new key and would
    silently use rope_theta 10000), and the tokenizer class 4.57 knows."""
    copy.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.suffix == ".safetensors":
            (copy / item.name).symlink_to(item.resolve())
        elif item.is_file():
            shutil.copy2(item, copy / item.name)
    config = json.loads((copy / "config.json").read_text())
    rope = dict(config.pop("rope_parameters", None) or {})
    if rope:
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" and len(rope) <= 1 else rope
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_file = copy / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    for key in NEWER_TOKENIZER_KEYS:
        tokenizer.pop(key, None)
    # 4.57 has no TokenizersBackend; dropping the key instead would make it pick LlamaTokenizerFast, which adds BOS.
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tokenizer.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x's name for the list; in 4.57 the key means a dict of named tokens
        tokenizer["additional_special_tokens"] = tokenizer.pop("extra_special_tokens")
    tokenizer_file.write_text(json.dumps(tokenizer, indent=2))


def export(model_dir: Path, out_dir: Path, reference: runtime_parity.Reference) -> dict[str, Any]:
    """Writes `out_dir`; returns the isolated environment's versions and, measured there, the ONNX model's and the
    PyTorch model's (transformers 4.57 on the same copy) greedy answers and logits."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="optimum-onnx-") as scratch:
        copy = Path(scratch) / "transformers-4.57"
        legacy_copy(model_dir, copy)
        request = Path(scratch) / "request.json"
        request.write_text(
            json.dumps(
                {
                    "prompts": reference.ids,
                    "max_new_tokens": reference.max_new_tokens,
                    "stop_ids": reference.stop_ids,
                    "scratch": scratch,
                }
            )
        )
        result = isolated_env.run_json(
            ENVIRONMENT, WORKER, [str(copy), str(out_dir), str(request)], "optimum's ONNX export"
        )
        return {
            "versions": result["versions"],
            **{
                name: runtime_parity.Greedy(result[name]["tokens"], list(np.load(result[name]["first_logits"])))
                for name in ("onnx", "torch")
            },
        }
