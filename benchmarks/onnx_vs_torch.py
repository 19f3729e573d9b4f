"""Every export runtime against PyTorch fp32: decode speed at batch 1 and prefill latency.

    python benchmarks/onnx_vs_torch.py [--config configs/tiny.yaml] [--decode-tokens 64] [--repeats 3]

Runtimes: ONNX Runtime GenAI (fp32, int4), optimum's ONNX export with ORTModelForCausalLM (in the optimum-onnx
environment, created on first use), llama.cpp through llama-cpp-python (GGUF f16 and q8_0, as many threads as
PyTorch uses). Two models, each measured side by side in one run: the default recipe's export (run
`python -m pipeline.run` first) and a Llama-architecture model of about 135M parameters with random weights
(hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49,152), which the tiny default is too small to stand in for: at
0.9M parameters every runtime measures its own overhead. Prompts are random token ids; decoding ignores stop
tokens so each runtime produces the same number of tokens. Reports medians of the repeats and ratios to PyTorch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.llama_135m import build_135m  # noqa: E402

GGUF_TYPES = ("f16", "q8_0")
PROMPT_LENGTHS = (32, 256)  # the longer one shrinks to fit a model whose context is shorter than 256 + decode


def prompt_lengths(model_dir: Path, decode_tokens: int) -> tuple[int, int]:

    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    return PROMPT_LENGTHS[0], min(PROMPT_LENGTHS[1], context - decode_tokens - 1)


def torch_timings(model_dir: Path, prompts: dict[int, list[int]], decode_tokens: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for length, ids in prompts.items():
            tensor = torch.tensor([ids])
            model(tensor)  # warm-up
            start = time.perf_counter()
            model(tensor)
            out[f"prefill_{length}_ms"] = (time.perf_counter() - start) * 1000
        tensor = torch.tensor([prompts[min(prompts)]])
        start = time.perf_counter()
        model.generate(tensor, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
        total = time.perf_counter() - start
    out["decode_tokens_per_s"] = decode_tokens / max(total - out[f"prefill_{min(prompts)}_ms"] / 1000, 1e-9)
    return out


def onnx_timings(onnx_dir: Path, prompts: dict[int, list[int]], decode_tokens: int) -> dict[str, float]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))

    def generator(length: int, extra: int):  # noqa: ANN202
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=length + extra, min_length=length + extra)
        return og.Generator(model, params)

    out = {}
    for length, ids in prompts.items():
        generator(length, 1).append_tokens(np.asarray(ids, dtype=np.int32))  # warm-up
        gen = generator(length, 1)
        start = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out[f"prefill_{length}_ms"] = (time.perf_counter() - start) * 1000
    first = min(prompts)
    gen = generator(first, decode_tokens)
    gen.append_tokens(np.asarray(prompts[first], dtype=np.int32))
    start = time.perf_counter()
    produced = 0
    while not gen.is_done() and produced < decode_tokens:
        gen.generate_next_token()
        produced += 1
    out["decode_tokens_per_s"] = produced / (time.perf_counter() - start)
    return out


def llama_cpp_timings(gguf_file: Path, prompts: dict[int, list[int]], decode_tokens: int) -> dict[str, float]:
    import llama_cpp
    import torch

    context = max(prompts) + decode_tokens + 1
    model = llama_cpp.Llama(
        str(gguf_file), n_ctx=context, n_batch=context, n_threads=torch.get_num_threads(), verbose=False
    )
    out = {}
    for length, ids in prompts.items():
        model.reset()
        model.eval(ids)  # warm-up
        model.reset()
        start = time.perf_counter()
        model.eval(ids)
        out[f"prefill_{length}_ms"] = (time.perf_counter() - start) * 1000
    produced = 0
    start = time.perf_counter()
    for _ in model.generate(prompts[min(prompts)], top_k=1, temp=0.0, reset=True):
        produced += 1
        if produced == decode_tokens:
            break
    total = time.perf_counter() - start
    out["decode_tokens_per_s"] = produced / max(total - out[f"prefill_{min(prompts)}_ms"] / 1000, 1e-9)
    return out


def optimum_timings(
    model_dir: Path, prompts: dict[int, list[int]], decode_tokens: int, repeats: int, scratch: Path
) -> dict[str, float]:
    """optimum's export and its timings, both in the optimum-onnx environment (the medians come back)."""
    from pipeline.core import isolated_env, optimum_onnx

    copy = scratch / "optimum-copy"
    optimum_onnx.legacy_copy(model_dir, copy)
    request = scratch / "optimum-request.json"
    request.write_text(json.dumps({"prompts": prompts, "decode_tokens": decode_tokens, "repeats": repeats}))
    return isolated_env.run_json(
        optimum_onnx.ENVIRONMENT,
        REPO / "benchmarks" / "optimum_onnx_timing.py",
        [str(copy), str(scratch / "onnx-export"), str(request)],
        "optimum's ONNX timings",
    )


def gguf_files(model_dir: Path, scratch: Path) -> dict[str, Path]:
    from pipeline.core import chat, gguf_export

    end_of_turn = chat.end_of_turn_token_id(chat.load_tokenizer(model_dir))
    files = {}
    for file_type in GGUF_TYPES:
        files[file_type] = scratch / f"model-{file_type}.gguf"
        gguf_export.convert(model_dir, files[file_type], file_type, end_of_turn)
    return files


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def measure(
    label: str, model_dir: Path, onnx_dirs: dict[str, Path], vocab: int, decode_tokens: int, repeats: int
) -> None:
    import random

    rng = random.Random(0)
    lengths = prompt_lengths(model_dir, decode_tokens)
    prompts = {n: [rng.randrange(3, vocab) for _ in range(n)] for n in lengths}
    results = {"torch fp32": median_of([torch_timings(model_dir, prompts, decode_tokens) for _ in range(repeats)])}
    for name, folder in onnx_dirs.items():
        results[f"ort-genai {name}"] = median_of([onnx_timings(folder, prompts, decode_tokens) for _ in range(repeats)])
    with tempfile.TemporaryDirectory(prefix="runtimes-bench-") as scratch:
        results["optimum fp32"] = optimum_timings(model_dir, prompts, decode_tokens, repeats, Path(scratch))
        for file_type, path in gguf_files(model_dir, Path(scratch)).items():
            results[f"llama.cpp {file_type}"] = median_of(
                [llama_cpp_timings(path, prompts, decode_tokens) for _ in range(repeats)]
            )
    reference = results["torch fp32"]
    print(f"\n{label}")
    print(
        f"  {'runtime':15} {'decode tok/s':>13} {'x torch':>8} "
        + " ".join(f"{'prefill ' + str(n) + ' ms':>15} {'x torch':>8}" for n in lengths)
    )
    for name, values in results.items():
        cells = [
            f"{values['decode_tokens_per_s']:13.1f}"
            f" {values['decode_tokens_per_s'] / reference['decode_tokens_per_s']:8.2f}"
        ]
        for n in lengths:
            key = f"prefill_{n}_ms"
            # a ratio above 1 means faster than PyTorch for both columns
            cells.append(f"{values[key]:15.2f} {reference[key] / values[key]:8.2f}")
        print(f"  {name:15} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--smoke", action="store_true", help="a 2-layer model, 4 tokens, one repeat: the logic in seconds"
    )
    args = parser.parse_args()
    if args.smoke:
        args.decode_tokens, args.repeats = 4, 1

    from pipeline import export
    from pipeline.core import artifacts, stages
    from pipeline.core.config import load_recipe

    recipe = load_recipe(args.config)
    export_dir = stages.require(stages.EXPORT, recipe, "benchmark")
    onnx_root = export_dir / artifacts.ONNX_DIR
    default_onnx = {p.name: p for p in sorted(onnx_root.iterdir())} if onnx_root.is_dir() else {}
    vocab = len(json.loads((export_dir / artifacts.MODEL_DIR / "tokenizer.json").read_text())["model"]["vocab"])
    measure(
        f"default recipe export ({recipe.run.name})",
        export_dir / artifacts.MODEL_DIR,
        default_onnx,
        vocab,
        args.decode_tokens,
        args.repeats,
    )

    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as scratch:
        folder = build_135m(Path(scratch) / "built", export_dir / artifacts.MODEL_DIR, smoke=args.smoke)
        onnx_dirs = {}
        for precision in ("fp32", "int4"):
            onnx_dirs[precision] = Path(scratch) / precision
            export.build_onnx(folder, onnx_dirs[precision], precision)
        label = "Llama 2 layers (smoke)" if args.smoke else "Llama 135M"
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        measure(f"{label}, random weights", folder, onnx_dirs, vocab, args.decode_tokens, args.repeats)


if __name__ == "__main__":
    main()
