"""Runs in the optimum-onnx environment (pipeline.core.isolated_env), started by benchmarks/onnx_vs_torch.py: optimum's
ONNX export of a transformers-4.57 copy of a model, then ORTModelForCausalLM's prefill and batch-1 decode timings.

    python optimum_onnx_timing.py MODEL_COPY OUT_DIR REQUEST.json

REQUEST.json: {"prompts": {length: [ids]}, "decode_tokens": N, "repeats": R}. Prints one JSON line: the median of
each timing over the repeats."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def timings(model, prompts: dict[str, list[int]], decode_tokens: int) -> dict[str, float]:  # noqa: ANN001
    import torch

    out = {}
    with torch.no_grad():
        for length, ids in prompts.items():
            tensor = torch.tensor([ids])
            model(input_ids=tensor, attention_mask=torch.ones_like(tensor))  # warm-up
            start = time.perf_counter()
            model(input_ids=tensor, attention_mask=torch.ones_like(tensor))
            out[f"prefill_{length}_ms"] = (time.perf_counter() - start) * 1000
        first = min(prompts, key=int)
        tensor = torch.tensor([prompts[first]])
        start = time.perf_counter()
        model.generate(
            input_ids=tensor,
            attention_mask=torch.ones_like(tensor),
            max_new_tokens=decode_tokens,
            min_new_tokens=decode_tokens,
            do_sample=False,
        )
        total = time.perf_counter() - start
    out["decode_tokens_per_s"] = decode_tokens / max(total - out[f"prefill_{first}_ms"] / 1000, 1e-9)
    return out


def main(model_copy: str, out_dir: str, request_file: str) -> None:
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM

    request = json.loads(Path(request_file).read_text())
    main_export(model_copy, out_dir, task="text-generation-with-past", device="cpu")
    model = ORTModelForCausalLM.from_pretrained(out_dir, provider="CPUExecutionProvider")
    runs = [timings(model, request["prompts"], request["decode_tokens"]) for _ in range(request["repeats"])]
    print(json.dumps({key: statistics.median(run[key] for run in runs) for key in runs[0]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
