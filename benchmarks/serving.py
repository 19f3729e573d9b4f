"""Serving throughput: the vLLM server (serving/vllm_server.py) against batched HF `generate`, side by side.

    python benchmarks/serving.py [--config configs/tiny.yaml] [--concurrency 1 8 32] [--output-tokens 64]
                                 [--prompt-tokens 64] [--requests-per-level N] [--dtype D] [--eager]
                                 [--json PATH] [--server-log PATH]

The model is a Llama-architecture model of about 135M parameters with random weights (hidden 576, 30 layers,
9 heads, 3 KV heads, vocab 49,152; benchmarks/llama_135m.py), which the tiny default
(0.9M parameters) is too small to stand in for. It carries the default recipe's trained tokenizer (run
`python -m pipeline.data` first); prompts are random token ids inside that tokenizer's vocabulary, all of
--prompt-tokens length, so both engines see identical prompt token ids and HF needs no padding. Every
request produces exactly --output-tokens tokens (vLLM: `ignore_eos` + `min_tokens`; HF: min_new_tokens =
max_new_tokens), greedy, in the same dtype in both: bfloat16 where the CPU computes it natively (avx512_bf16 or
amx_bf16), float32 elsewhere, or --dtype. The server is started as a deployment tuned for throughput would
start it: the export's serving.json names the dtype, and `-- --no-enforce-eager` lets vLLM compile the model;
--eager measures the server's default eager mode instead (faster start, slower steps).

What each number measures, per concurrency level C with R requests (default R = max(2C, 4)):
  vLLM  the server started as `python -m serving.vllm_server --artifact <folder>` with a serving.json written
        here, driven over loopback by an aiohttp client (streaming /v1/completions with token-id prompts, as
        `vllm bench serve` does), C requests in flight at all times until R are done. tok/s = output tokens of
        all R requests / wall time from the first request sent to the last one finished. TTFT = request sent -> first
        streamed token received; TPOT = (last token - first token) / (tokens - 1), per request. The client
        runs on the same cores as the server, so its cost is in the server's numbers.
  HF    `model.generate` on batches of C prompts (R / C batches). tok/s = output tokens / summed wall time of
        the full generate calls. TTFT = wall time of `generate(max_new_tokens=1)` on the same batch (prefill
        plus one token), the same for every request of the batch; TPOT = (full generate - TTFT) / (tokens - 1).
        No queueing: every request of a batch starts at once.
p50/p99 are over the R requests of a level (with few requests p99 is close to the maximum). The engines
take turns level by level (HF, then vLLM, while the server idles), so drifting background load on a shared
machine hits both alike; each gets a short warm-up per level on prompts of its own (never the measured ones,
so vLLM's prefix cache cannot skip measured prefill). HF uses torch's default threads (all cores); the server
uses what vLLM's CPU backend picks, with the server's small-host settings (serving/vllm_server.py: on up to 4
CPUs no CPU kept back for the engine process and the model run inside it); the output prints the CPUs the
model's threads may run on. The load average before and after is printed: on a shared machine, read the
ratios with it.

Also measures this machine's memory bandwidth in the same run (torch sum over a large float32 tensor, best
of several) and reports batch-1 decode speed of each engine against the bandwidth limit for the model's
bytes (every parameter read once per decode step; the KV cache and activations are ignored).
Goal (issue #8): the server at least 2x HF in output tokens/s at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core import models, server_process  # noqa: E402

SERVED_NAME = "llama-135m-random"
API_KEY = "serving-benchmark"  # set explicitly, so a PIPELINE_API_KEY in the environment changes nothing
GOAL_RATIO = 2.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(tokens: int, seconds: float, ttft: list[float], tpot: list[float]) -> dict[str, float]:
    return {
        "output_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "tpot_p50_ms": percentile(tpot, 50) * 1000,
        "tpot_p99_ms": percentile(tpot, 99) * 1000,
    }


def memory_bandwidth(gib: float, repeats: int = 7) -> dict[str, float]:
    """Best-of-N read (sum) and copy bandwidth of a float32 tensor far larger than the caches, in GB/s."""
    import torch

    n = int(gib * 2**30) // 4
    source = torch.ones(n, dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)  # touch every page before timing
    reads, copies = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        source.sum()
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        target.copy_(source)
        copies.append(time.perf_counter() - start)
    nbytes = n * 4
    del source, target
    return {"tensor_gib": gib, "read_gb_s": nbytes / min(reads) / 1e9, "copy_gb_s": 2 * nbytes / min(copies) / 1e9}


def hf_level(
    model, prompts: list[list[int]], warmup: list[list[int]], batch: int, output_tokens: int, pad_id: int
) -> dict[str, float]:
    import torch

    def generate(ids: list[list[int]], new_tokens: int) -> float:
        tensor = torch.tensor(ids)
        start = time.perf_counter()
        out = model.generate(
            tensor,
            attention_mask=torch.ones_like(tensor),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        seconds = time.perf_counter() - start
        assert out.shape[1] - tensor.shape[1] == new_tokens, "HF produced a different number of tokens"
        return seconds

    with torch.no_grad():
        generate(warmup, 2)
        total_seconds, ttft, tpot = 0.0, [], []
        for first in range(0, len(prompts), batch):
            chunk = prompts[first : first + batch]
            prefill = generate(chunk, 1)
            full = generate(chunk, output_tokens)
            total_seconds += full
            ttft += [prefill] * len(chunk)
            tpot += [(full - prefill) / max(output_tokens - 1, 1)] * len(chunk)
    return summarize(len(prompts) * output_tokens, total_seconds, ttft, tpot)


async def vllm_level(
    port: int,
    prompts: list[list[int]],
    warmup: list[list[int]],
    concurrency: int,
    output_tokens: int,
    served: tuple[str, ...] = (SERVED_NAME,),
) -> dict[str, float]:
    """Closed loop: `concurrency` clients, each sending its next request when its last one finished; request i asks
    model `served[i % len(served)]`, so requests spread evenly over the served models. Tokens are
    counted from the streamed token ids (`return_token_ids`), not the text: most ids of the random model's
    49,152-entry vocabulary are outside the small tokenizer and decode to nothing.

    The client is aiohttp reading the server-sent events with `json`, as vLLM's own `vllm bench serve` does: it
    shares the cores with the server here, where a real client would not. The `openai` SDK's per-chunk objects
    cost five times its CPU time (1.0 vs 0.2 s for 64 requests at concurrency 32), which took 8% off the
    server's tokens/s on 2 cores (the serving tests use the SDK)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def one(
        session: aiohttp.ClientSession, prompt: list[int], tokens: int, model: str
    ) -> tuple[float, float, float, int]:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "min_tokens": tokens,
            "return_token_ids": True,
        }
        first = last = None
        received = 0
        usage = None
        sent = time.perf_counter()
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"the server answered {response.status}: {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                ids = (choices[0].get("token_ids") or []) if choices else []
                if ids:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    received += len(ids)
        if usage is not None and usage["completion_tokens"] != received:
            raise RuntimeError(f"streamed {received} token ids but usage says {usage['completion_tokens']}")
        if received != tokens:
            raise RuntimeError(f"the server produced {received} tokens, asked for exactly {tokens}")
        return sent, first, last, received

    async def run(
        session: aiohttp.ClientSession, items: list[list[int]], tokens: int
    ) -> list[tuple[float, float, float, int]]:
        queue = list(enumerate(items))
        results: list = [None] * len(items)

        async def worker() -> None:
            while queue:
                index, prompt = queue.pop(0)
                results[index] = await one(session, prompt, tokens, served[index % len(served)])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        await run(session, warmup, 2)
        start = time.perf_counter()
        results = await run(session, prompts, output_tokens)
        seconds = time.perf_counter() - start
    ttft = [first - sent for sent, first, _, _ in results]
    tpot = [(last - first) / max(n - 1, 1) for _, first, last, n in results]
    return summarize(sum(n for *_, n in results), seconds, ttft, tpot)


def start_server(
    artifact: Path, config: str, port: int, log_path: Path, compile_graphs: bool, options: tuple[str, ...] = ()
) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.vllm_server",
                "--config",
                config,
                "--artifact",
                str(artifact),
                "serve.host=127.0.0.1",
                f"serve.port={port}",
                "--api-key",
                API_KEY,
                *options,
                *(["--", "--no-enforce-eager"] if compile_graphs else []),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def server_cpus(server: subprocess.Popen) -> dict[str, list[int]]:
    """The CPUs the threads of each vLLM process running the model may run on (the union over its threads).

    vLLM's CPU backend runs the model in worker processes whose OpenMP threads it pins one to a CPU, and by
    default keeps CPUs back for its engine-core process (VLLM_CPU_NUM_OF_RESERVED_CPU), so on a small machine
    the model may get fewer cores than HF, which uses all of them. On small hosts the server runs the model
    inside the engine-core process instead."""
    import psutil

    children = psutil.Process(server.pid).children(recursive=True)
    workers = (
        [p for p in children if "Worker" in p.name()] or [p for p in children if "EngineCore" in p.name()] or children
    )
    out = {}
    for process in workers:
        cpus: set[int] = set()
        for thread in process.threads():
            try:
                cpus |= os.sched_getaffinity(thread.id)
            except OSError:
                pass
        out[process.name()] = sorted(cpus)
    return out


def write_artifact(folder: Path, tokenizer_dir: Path, max_model_len: int, dtype: str, smoke: bool = False) -> Path:
    """An export-shaped folder (serving.json from artifacts.write_serving_file) holding the random 135M model."""
    import shutil

    from benchmarks.llama_135m import build_135m
    from pipeline.core import artifacts, chat

    model_dir = build_135m(folder / artifacts.MODEL_DIR, tokenizer_dir, smoke=smoke)
    template = model_dir / "chat_template.jinja"
    if not template.exists():  # vllm_arguments passes --chat-template; completions never use it
        shutil.copy(chat.BUILTIN_TEMPLATES["chatml"], template)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    stop_ids = generation.get("eos_token_id")
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids] if stop_ids is not None else []
    artifacts.write_serving_file(
        folder,
        served_model_name=SERVED_NAME,
        max_model_len=max_model_len,
        dtype=dtype,
        stop_ids=stop_ids,
        stop_tokens=[],
        tool_call_parser=None,
        lora=None,
    )
    return folder


def print_table(levels: list[int], hf: dict, vllm: dict, requests: dict[int, int]) -> None:
    print(
        f"\n{'conc':>4} {'reqs':>4} | {'vLLM tok/s':>10} {'HF tok/s':>9} {'x HF':>6} | "
        f"{'vLLM TTFT p50/p99 ms':>22} {'HF TTFT p50/p99':>18} | {'vLLM TPOT p50/p99':>18} {'HF TPOT p50/p99':>18}"
    )
    for c in levels:
        v, h = vllm[c], hf[c]
        print(
            f"{c:4d} {requests[c]:4d} | {v['tokens_per_s']:10.1f} {h['tokens_per_s']:9.1f} "
            f"{v['tokens_per_s'] / h['tokens_per_s']:6.2f} | "
            f"{v['ttft_p50_ms']:10.1f}/{v['ttft_p99_ms']:<11.1f} {h['ttft_p50_ms']:8.1f}/{h['ttft_p99_ms']:<9.1f} | "
            f"{v['tpot_p50_ms']:8.1f}/{v['tpot_p99_ms']:<9.1f} {h['tpot_p50_ms']:8.1f}/{h['tpot_p99_ms']:<9.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="recipe whose data stage holds the tokenizer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument(
        "--requests-per-level", type=int, help="requests at each level (default: max(2 x concurrency, 4))"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=models.native_dtype(models.cpu_flags()),
        help=(
            "weights and compute of both engines (default: bfloat16 where the CPU computes it "
            "natively, here %(default)s)"
        ),
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="run the server in its default eager mode instead of letting vLLM compile the model",
    )
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth test tensor")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--server-log", type=Path, help="keep a copy of the vLLM server's log here")
    parser.add_argument(
        "--smoke", action="store_true", help="a 2-layer model, concurrency 1 and 2, 4 tokens each: the logic, eagerly"
    )
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.output_tokens, args.prompt_tokens, args.bandwidth_gib, args.eager = (
            [1, 2],
            4,
            8,
            0.05,
            True,
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.core import artifacts, stages
    from pipeline.core.config import load_recipe

    recipe = load_recipe(args.config)
    tokenizer_dir = stages.require(stages.DATA, recipe, "benchmark") / artifacts.TOKENIZER_DIR
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    levels = sorted(set(args.concurrency))
    requests = {c: args.requests_per_level or max(2 * c, 4) for c in levels}
    prompts, warmups = {}, {}
    for c in levels:
        rng = random.Random(c)
        prompts[c] = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(requests[c])]
        warmups[c] = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(c)]
    max_model_len = args.prompt_tokens + args.output_tokens + 16

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; prompts"
        f" {args.prompt_tokens} tokens (random ids < {vocab}), outputs exactly {args.output_tokens} tokens,"
        f" {args.dtype}, greedy"
    )
    load_before = os.getloadavg()
    bandwidth = memory_bandwidth(args.bandwidth_gib)
    print(
        f"memory bandwidth ({bandwidth['tensor_gib']:g} GiB float32, best of 7): read {bandwidth['read_gb_s']:.1f}"
        f" GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s"
    )

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch:
        scratch = Path(scratch)
        started = time.time()
        artifact = write_artifact(scratch / "served", tokenizer_dir, max_model_len, args.dtype, args.smoke)
        print(f"built the random {'smoke-sized' if args.smoke else '135M'} model in {time.time() - started:.0f} s")

        port = server_process.free_port()
        log_path = scratch / "server.log"
        server = start_server(artifact, args.config, port, log_path, compile_graphs=not args.eager)
        hf, vllm, healthy_after = {}, {}, None
        try:
            healthy_after = server_process.wait_healthy(port, server, log_path)  # its error carries the end of the log
            workers = server_cpus(server)
            print(
                f"vLLM server ({'eager' if args.eager else 'compiled'}) healthy after {healthy_after:.0f} s; CPUs the"
                f" threads running its model may use: {workers} (HF: {torch.get_num_threads()} threads, unpinned)"
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(artifact / artifacts.MODEL_DIR), dtype=getattr(torch, args.dtype)
            ).eval()
            parameters = sum(p.numel() for p in model.parameters())
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            pad_id = model.generation_config.pad_token_id or 0
            # Level by level, HF then vLLM (the idle server uses next to no CPU), so drift in background
            # load on a shared machine hits both engines alike.
            for c in levels:
                hf[c] = hf_level(model, prompts[c], warmups[c], c, args.output_tokens, pad_id)
                vllm[c] = asyncio.run(vllm_level(port, prompts[c], warmups[c], c, args.output_tokens))
                print(
                    f"  concurrency {c:3d}, {requests[c]} requests: HF {hf[c]['tokens_per_s']:6.1f} tok/s"
                    f" ({hf[c]['seconds']:.1f} s), vLLM {vllm[c]['tokens_per_s']:6.1f} tok/s"
                    f" ({vllm[c]['seconds']:.1f} s)",
                    flush=True,
                )
            del model
        except BaseException:
            if healthy_after is not None and server.poll() is not None:
                print(
                    f"the server exited with code {server.returncode}; the end of its"
                    f" log:\n{server_process.log_tail(log_path)}",
                    file=sys.stderr,
                )
            raise
        finally:
            left = server_process.stop(server)
            if args.server_log and log_path.exists():
                args.server_log.write_text(log_path.read_text(errors="replace"))
            if left:
                print(f"WARNING: server processes still running after SIGKILL: {left}", file=sys.stderr)

    load_after = os.getloadavg()
    print_table(levels, hf, vllm, requests)
    ceiling = bandwidth["read_gb_s"] * 1e9 / model_bytes
    print(
        f"\nmodel: {parameters / 1e6:.1f}M parameters, {model_bytes / 1e6:.0f} MB {args.dtype}; batch-1 decode ceiling"
        f" at {bandwidth['read_gb_s']:.1f} GB/s read bandwidth = {ceiling:.1f} tok/s"
    )
    batch1 = {}
    if 1 in levels:
        for name, results in (("vLLM", vllm), ("HF", hf)):
            decode = 1000 / results[1]["tpot_p50_ms"]
            batch1[name] = {"decode_tokens_per_s": decode, "fraction_of_ceiling": decode / ceiling}
            print(
                f"  {name:4} batch-1 decode {decode:6.1f} tok/s (1 / TPOT p50) = {decode / ceiling:.2f} of the"
                " bandwidth limit"
            )

    busy = " (other work was running before: read the ratios with care)" if load_before[0] > 0.5 else ""
    print(
        f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} CPUs{busy}"
    )

    goal_level = 32
    if goal_level in levels:
        ratio = vllm[goal_level]["tokens_per_s"] / hf[goal_level]["tokens_per_s"]
        verdict = "MET" if ratio >= GOAL_RATIO else "NOT MET"
        summary = (
            f"goal {verdict}: vLLM server {vllm[goal_level]['tokens_per_s']:.1f} tok/s vs HF"
            f" {hf[goal_level]['tokens_per_s']:.1f} tok/s at concurrency {goal_level} = {ratio:.2f}x (goal >="
            f" {GOAL_RATIO:g}x)"
        )
    else:
        top = levels[-1]
        ratio = vllm[top]["tokens_per_s"] / hf[top]["tokens_per_s"]
        summary = f"goal not checked (needs concurrency {goal_level}): vLLM server {ratio:.2f}x HF at concurrency {top}"
    print(f"\n{summary}")

    if args.json:
        record = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch_threads": torch.get_num_threads(),
            "vllm_worker_cpus": workers,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "requests_per_level": requests,
            "parameters": parameters,
            "model_bytes": model_bytes,
            "bandwidth": bandwidth,
            "batch1_ceiling_tokens_per_s": ceiling,
            "batch1": batch1,
            "hf": hf,
            "vllm": vllm,
            "summary": summary,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
