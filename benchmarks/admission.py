"""Admission under a flood: how long a small request waits beside one client's flood, against alone.

    python benchmarks/admission.py [--config configs/tiny.yaml] [KEY=VALUE ...] [--flood 63] [--n 8]
                                   [--flood-tokens 188] [--probes 20] [--probe-tokens 4] [--json PATH]

Serves the recipe's export (run `python -m pipeline.run` first) with two API keys, `a` and `b`, the recipe's
`serve.max_running_sequences` and `serve.max_waiting_requests`, and measures a probe: a request for --probe-tokens
tokens, sent one after another --probes times, each timed from sent to answered.

  alone     the probes with nothing else running;
  two keys  key a sends --flood requests at once (n=--n, --flood-tokens tokens each, ignore_eos, sampled as n > 1
            needs), then key b sends the probes while the flood runs: the fair share at work (issue 28 measured
            35.9 s for this before admission, 50-759 ms beside one such request);
  one key   the same with the probes sent with key a: one client's own small requests wait behind its flood.

Prints p50/p95/max of each scenario's probe latencies, their ratio to alone, and how many flood requests got a 429.
The scenarios run one after another on one server, so background load on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.core import server_process  # noqa: E402 - after the repository is on the path

KEYS = ("a", "b")
QUESTION = "Is 3 even or odd?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def scenario(
    port: int, name: str, flood: int, n: int, flood_tokens: int, probes: int, probe_tokens: int, probe_key: str
) -> dict:
    """Probe latencies in seconds, and the flood's statuses, for one scenario (no flood when `flood` is 0)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"

    async def ask(session: aiohttp.ClientSession, key: str, body: dict) -> tuple[int, float]:
        sent = time.perf_counter()
        async with session.post(
            url,
            json={"model": name, "prompt": QUESTION, "temperature": 0, **body},
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            await response.read()
            return response.status, time.perf_counter() - sent

    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        flooding = [
            # Sampled (vLLM generates n > 1 sequences only when sampling), every one to its full length.
            asyncio.ensure_future(
                ask(session, "a", {"n": n, "max_tokens": flood_tokens, "ignore_eos": True, "temperature": 1.0})
            )
            for _ in range(flood)
        ]
        if flood:
            await asyncio.sleep(1.0)  # the flood reaches the server and fills it before the first probe
        latencies = []
        for _ in range(probes):
            status, seconds = await ask(session, probe_key, {"max_tokens": probe_tokens})
            if status != 200:
                raise RuntimeError(f"a probe got {status}")
            latencies.append(seconds)
        flood_running = sum(not f.done() for f in flooding)
        statuses = [status for status, _ in await asyncio.gather(*flooding)]
    if set(statuses) - {200, 429}:
        raise RuntimeError(f"flood requests got statuses other than 200 and 429: {statuses}")
    return {
        "latencies": latencies,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "max": max(latencies),
        "flood_still_running_after_probes": flood_running,
        "flood_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="the recipe's keys, as the stages take them (run.output_dir=...)")
    parser.add_argument("--flood", type=int, default=63, help="requests key a sends at once")
    parser.add_argument("--n", type=int, default=8, help="sequences each flood request asks for")
    parser.add_argument("--flood-tokens", type=int, default=188)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--probe-tokens", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="a flood of 4 requests, n=2, 4 tokens; 2 probes")
    args = parser.parse_args()
    if args.smoke:
        args.flood, args.n, args.flood_tokens, args.probes = 4, 2, 4, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.core import artifacts, stages
    from pipeline.core.config import load_recipe

    recipe = load_recipe(args.config, args.overrides)
    artifact = stages.require(stages.EXPORT, recipe, "benchmark")
    name = artifacts.read_serving_file(artifact)["served_model_name"]
    serve = recipe.serve
    print(
        f"serving {artifact} with keys {', '.join(KEYS)}: max_running_sequences {serve.max_running_sequences}, "
        f"max_waiting_requests {serve.max_waiting_requests}; flood {args.flood} x n={args.n} x {args.flood_tokens} "
        f"tokens (ignore_eos); {args.probes} probes of {args.probe_tokens} tokens; {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="admission-bench-") as scratch:
        log = Path(scratch) / "server.log"
        port = server_process.free_port()
        server = server_process.start_vllm_server(
            # The overrides beside the server's own serve.port: argparse reads positional arguments as one run.
            artifact,
            port,
            log,
            [*args.overrides, "--config", args.config],
            env={serve.api_key_env: ",".join(KEYS)},
        )
        try:
            server_process.wait_healthy(port, server, log, timeout=300)
            # A warm-up, so that the first probe does not pay for the engine's first steps.
            asyncio.run(scenario(port, name, 0, 1, 1, 2, args.probe_tokens, "b"))
            for label, flood, key in (("alone", 0, "b"), ("two keys", args.flood, "b"), ("one key", args.flood, "a")):
                results[label] = asyncio.run(
                    scenario(port, name, flood, args.n, args.flood_tokens, args.probes, args.probe_tokens, key)
                )
                r = results[label]
                print(
                    f"  {label:9s} probe p50 {r['p50'] * 1000:8.0f} ms  p95 {r['p95'] * 1000:8.0f} ms  max"
                    f" {r['max'] * 1000:8.0f} ms  flood statuses {r['flood_statuses'] or '-'}",
                    flush=True,
                )
        finally:
            server_process.stop(server)
    alone = results["alone"]["p95"]
    print(
        f"admission: probe p95 beside the flood / alone: two keys {results['two keys']['p95'] / alone:.1f}x, "
        f"one key {results['one key']['p95'] / alone:.1f}x (alone p95 {alone * 1000:.0f} ms)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
