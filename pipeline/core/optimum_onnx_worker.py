"""Runs in the optimum-onnx environment (pipeline.core.isolated_env), never imported by the project: optimum's ONNX
exporter on a transformers-4.57 copy of the merged export, then ORTModelForCausalLM against that copy in PyTorch.

    python optimum_onnx_worker.py MODEL_COPY OUT_DIR REQUEST.json

REQUEST.json: {"prompts": [[ids]], "max_new_tokens": N, "stop_ids": [ids], "scratch": DIR}. Prints one JSON line:
versions, greedy tokens of both, and where the first generated position's logits of both were saved (.npy)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path


def main(model_copy: str, out_dir: str, request_file: str) -> None:
    import numpy as np
    import torch
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM

    request = json.loads(Path(request_file).read_text())
    main_export(model_copy, out_dir, task="text-generation-with-past", device="cpu")
    models = {
        "onnx": ORTModelForCausalLM.from_pretrained(out_dir, provider="CPUExecutionProvider"),
        "torch": AutoModelForCausalLM.from_pretrained(model_copy, torch_dtype=torch.float32).eval(),
    }
    result: dict = {
        "versions": {p: version(p) for p in ("optimum", "optimum-onnx", "transformers", "onnxruntime", "onnx", "torch")}
    }
    for name, model in models.items():
        tokens, logits = [], []
        with torch.no_grad():
            for prompt in request["prompts"]:
                ids = torch.tensor([prompt])
                mask = torch.ones_like(ids)
                logits.append(model(input_ids=ids, attention_mask=mask).logits[0, -1].float().numpy())
                output = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=request["max_new_tokens"],
                    do_sample=False,
                    eos_token_id=request["stop_ids"],
                    pad_token_id=request["stop_ids"][0],
                )
                tokens.append(output[0, len(prompt) :].tolist())
        saved = Path(request["scratch"]) / f"{name}_first_logits.npy"
        np.save(saved, np.stack(logits))
        result[name] = {"tokens": tokens, "first_logits": str(saved)}
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
