"""A real vLLM server on loopback serving the default recipe's export, driven with the official `openai` client
(and raw HTTP where a client would hide what the server sent), and the gradio chat UI headless."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.core import artifacts, chat, engines, scoring, server_process
from serving import middleware

from conftest import REPO

sys.path.insert(0, str(REPO / "data"))
import make_data  # noqa: E402 - the generator of the shipped data, whose tool schemas the model learned

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


pytestmark = pytest.mark.slow  # the default recipe's pipeline (conftest.default_pipeline)

API_KEY = "test-key-123"
KEY_ENV = {"PIPELINE_API_KEY": API_KEY}  # the default recipe's serve.api_key_env
ERROR_FIELDS = {"message", "type", "param", "code"}
PROMPT_ROOM = 32  # tokens of the model length left to a short question
# Float32 logits of one model in vLLM and in HF differ by about 1e-5 (export merge parity); far below a real choice.
GREEDY_TOLERANCE = 1e-3
# Routes vLLM left open with a key set; /openapi.json lists the others (and some of these).
UNLISTED_ROUTES = [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")]
ROUTES_VLLM_LEFT_OPEN = [
    ("POST", "/invocations"),
    ("POST", "/generative_scoring"),
    ("POST", "/scale_elastic_ep"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/metrics"),
    ("GET", "/version"),
    ("GET", "/load"),
    ("GET", "/kv_event_sources"),
    ("GET", "/ping"),
    *UNLISTED_ROUTES,
]


def start_server(artifact: Path, log: Path, *options: str) -> tuple[subprocess.Popen, int]:
    port = server_process.free_port()
    process = server_process.start_vllm_server(artifact, port, log, options, env=KEY_ENV)
    server_process.wait_healthy(port, process, log, timeout=300)
    return process, port


@pytest.fixture(scope="module")
def server(default_pipeline: dict, tmp_path_factory: pytest.TempPathFactory):
    """The default recipe's export (DPO, merged), served with an API key and the default limits."""
    recipe = default_pipeline["recipe"]
    artifact = recipe.run_dir / "export"
    serving = artifacts.read_serving_file(artifact)
    log = tmp_path_factory.mktemp("serving") / "server.log"
    process, port = start_server(artifact, log)
    try:
        yield {
            "process": process,
            "port": port,
            "artifact": artifact,
            "recipe": recipe,
            "log": log,
            "url": f"http://127.0.0.1:{port}",
            "name": serving["served_model_name"],
            "max_model_len": serving["max_model_len"],
            "client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0),
        }
    finally:
        server_process.stop(process)


def openai_messages(messages: list[dict]) -> list[dict]:
    """A conversation as the chat API takes it: each tool call with an id, each tool result naming its call."""
    out, ids = [], []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            ids = [f"call_{len(out)}_{i}" for i in range(len(message["tool_calls"]))]
            message["tool_calls"] = [{**call, "id": id_} for call, id_ in zip(message["tool_calls"], ids)]
        elif message["role"] == "tool":
            message["tool_call_id"] = ids.pop(0)
        out.append(message)
    return out


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["code"] == status and error["message"], error
    return error


def hit(client: httpx.Client, method: str, path: str, headers: dict) -> httpx.Response:
    """One request to a route; a POST carries an empty JSON object, enough to get past body parsing to the route."""
    if method == "POST":
        return client.post(path, content=b"{}", headers={"content-type": "application/json", **headers})
    return client.request(method, path, headers=headers)


def test_health_is_open_and_every_other_route_needs_the_key(server) -> None:
    url = server["url"]
    listed = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()["paths"]
    routes = {(method.upper(), path) for path, methods in listed.items() for method in methods} | set(
        ROUTES_VLLM_LEFT_OPEN
    )
    assert ("GET", "/health") in routes and len(routes) > 20
    denied = {
        "no key": {},
        "wrong key": {"Authorization": "Bearer wrong"},
        "key without Bearer": {"Authorization": API_KEY},
    }
    with httpx.Client(base_url=url, timeout=60) as client:
        for method, path in sorted(routes):
            path = path.replace("{response_id}", "resp_0")
            for name, headers in denied.items():
                response = hit(client, method, path, headers)
                if path == "/health":
                    assert response.status_code == 200, (name, response.text)
                else:
                    assert_openai_error(response, 401)
            response = hit(client, method, path, {"Authorization": f"Bearer {API_KEY}"})
            assert response.status_code != 401, (method, path, response.text)
    print(
        f"{len(routes)} routes ({len(listed)} paths in /openapi.json): 401 without a key, with a wrong one and with one"
        " without 'Bearer', except GET /health; none 401 with the key"
    )
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert set(refused.value.body) == ERROR_FIELDS
    listed = server["client"].models.list().data
    assert [m.id for m in listed] == [server["name"]]
    # What the export says of the model travels with it: the default recipe's DPO export passed its gates.
    assert listed[0].model_extra["pipeline"] == {"gates": "passed", "exported_from": "dpo"}


def served_view(message) -> tuple[str, list[dict]]:  # noqa: ANN001 - an openai ChatCompletionMessage
    """(content, calls) as a client reads them: the form `chat.served_reply` gives for generated text."""
    return (message.content or "").strip(), [
        {"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in message.tool_calls or []
    ]


def assert_served_as_hf(reply, prompt_ids: list[int], model, tokenizer) -> float:  # noqa: ANN001 - openai reply, HF model
    """What holds whatever tokens the model picks, on every machine: the server saw the prompt ids training renders,
    its reply is what the pipeline's decoding and tool-call reading make of the tokens it generated, and each token
    is HF's greedy choice up to float32 noise (a near-tie may go either way). The largest logit gap, for the log."""
    import torch

    assert reply.model_extra["prompt_token_ids"] == prompt_ids
    tokens = reply.choices[0].model_extra["token_ids"]
    text = engines.decode_answer(tokenizer, tokens, engines.model_stop_ids(model))
    assert served_view(reply.choices[0].message) == chat.served_reply(text)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1]
    gap = (logits.max(-1).values - logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]).max().item()
    assert gap <= GREEDY_TOLERANCE, (gap, tokenizer.decode(tokens))
    return gap


def test_served_answers_are_the_hf_greedy_answers_of_the_export(server, held_out: scoring.HeldOut) -> None:
    tokenizer = chat.load_tokenizer(server["artifact"] / "model")
    rows = held_out.sets["answers"][:12]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(server["artifact"] / "model"))
    gaps = []
    for row, ids in zip(
        rows, engines.prompt_ids(tokenizer, [row["prompt"] for row in rows], [row["tools"] for row in rows])
    ):
        reply = server["client"].chat.completions.create(
            model=server["name"],
            messages=openai_messages(row["prompt"]),
            max_tokens=16,
            temperature=0,
            extra_body={"return_token_ids": True},
            **({"tools": row["tools"]} if row["tools"] else {}),
        )
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
        gaps.append(assert_served_as_hf(reply, ids, model, tokenizer))
    print(f"largest logit gap between a served token and HF's greedy choice: {max(gaps):.2e}")


def test_text_completion_and_streaming(server) -> None:
    client, name = server["client"], server["name"]
    completion = client.completions.create(
        model=name,
        prompt="<|im_start|>user\nIs 8 even or odd?<|im_end|>\n<|im_start|>assistant\n",
        max_tokens=8,
        temperature=0,
    )
    assert completion.choices[0].text.strip()
    messages = [{"role": "user", "content": "What kind of thing is falcon?"}]
    whole = (
        client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
    )
    chunks = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0, stream=True)
        if c.choices
    ]
    assert len([c for c in chunks if c]) >= 1 and "".join(chunks) == whole


@pytest.mark.parametrize(
    ("request_kwargs", "error", "says"),
    [
        ({"max_tokens": -1}, "BadRequestError", "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "BadRequestError", "context length"),
        ({"messages": []}, "BadRequestError", ""),
        ({"model": "no-such-model"}, "NotFoundError", "no-such-model"),
        (
            {"messages": [{"role": "wizard", "content": "Is 3 even or odd?"}]},
            "BadRequestError",
            "unknown role 'wizard'",
        ),
        (
            {"n": middleware.DEFAULT_MAX_N + 1, "temperature": 1.0},
            "BadRequestError",
            f"at most {middleware.DEFAULT_MAX_N} sequences",
        ),
        ({"max_tokens": 10_000}, "BadRequestError", "more than this server allows ("),
        ({"max_completion_tokens": 10_000}, "BadRequestError", "more than this server allows ("),
    ],
    ids=[
        "negative-max-tokens",
        "prompt-longer-than-model",
        "empty-messages",
        "unknown-model",
        "unknown-role",
        "n-over-limit",
        "max-tokens-over-limit",
        "max-completion-tokens-over-limit",
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    server, request_kwargs: dict, error: str, says: str
) -> None:
    kwargs = {"model": server["name"], "messages": [{"role": "user", "content": "Is 3 even or odd?"}], "max_tokens": 4}
    kwargs.update(request_kwargs)
    with pytest.raises(getattr(openai, error)) as caught:
        server["client"].chat.completions.create(**kwargs)
    assert 400 <= caught.value.status_code < 500 and set(caught.value.body) == ERROR_FIELDS
    assert says in caught.value.body["message"]
    assert server["client"].models.list().data  # still serving


def test_a_batch_of_prompts_counts_against_the_limit_on_n(server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server["client"].completions.create(
            model=server["name"], prompt=["Say a.", "Say b.", "Say c."], n=3, max_tokens=2
        )
    assert (
        caught.value.body["param"] == "n" and "9 sequences (n=3 for each of 3 prompts)" in caught.value.body["message"]
    )
    # One prompt as token ids is one prompt, not a batch.
    ids = server["client"].completions.create(
        model=server["name"], prompt=[5, 6, 7, 8, 9, 10, 11, 12, 13], max_tokens=2
    )
    assert len(ids.choices) == 1


def test_bodies_vllm_cannot_read_get_a_400_in_openais_shape(server) -> None:
    """Invalid UTF-8 got FastAPI's {"detail": ...}; JSON nested too deeply for Python's parser got a 500."""
    model = server["name"].encode()
    bodies = {
        b'{"model": "' + model + b'", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}': "not valid UTF-8",
        b'{"model": "' + model + b'", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": "nests JSON too deeply",
    }
    for body, says in bodies.items():
        for route in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
            response = httpx.post(
                server["url"] + route,
                content=body,
                headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
            )
            assert says in assert_openai_error(response, 400)["message"]


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("/v1/chat/completions", {"stop_token_ids": [1425919, 95471186]}, "stop_token_ids"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 10**6}, "logprobs"),
        ("/v1/completions", {"prompt": ""}, None),
        ("/v1/completions", {"prompt": [5, 10**7]}, None),
        ("/v1/completions", {"allowed_token_ids": [10**7]}, "allowed_token_ids"),
    ],
    ids=["stop-token-out-of-vocab", "too-many-logprobs", "empty-prompt", "prompt-token-out-of-vocab", "allowed-token"],
)
def test_a_request_the_engine_refuses_gets_the_same_400_streamed_or_not(
    server, route: str, fields: dict, param: str | None
) -> None:
    """vLLM checks these only when its engine takes the request: streamed, that was a 200 whose only event was the
    error, and a traceback in the log (stop_token_ids: found by the fuzz test on another machine)."""
    body = {"model": server["name"], "max_tokens": 4}
    body.update(
        {"messages": [{"role": "user", "content": "Is 3 even or odd?"}]}
        if route.endswith("chat/completions")
        else {"prompt": "Is 3 even?"}
    )
    body.update(fields)
    log_start = server["log"].stat().st_size
    errors = []
    for stream in (False, True):
        response = httpx.post(
            server["url"] + route,
            json={**body, "stream": stream},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
        errors.append(assert_openai_error(response, 400))
    assert errors[0]["type"] == errors[1]["type"] and errors[0]["message"] == errors[1]["message"]
    if param:
        assert param in errors[1]["message"] + str(errors[1]["param"])
    assert "Traceback" not in server["log"].read_text(errors="replace")[log_start:]


def nested_tool(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return {"type": "function", "function": {"name": "f", "parameters": schema}}


HOSTILE_BODIES = {  # found by probing a served model (issue 28); each got a 5xx, a traceback or past a check
    "tool-schema-100-levels": ({"tools": [nested_tool(100)]}, "nested more than"),
    "max-tokens-as-a-string": ({"max_tokens": "100000"}, "max_tokens=100000 is more than this server allows"),
    "max-tokens-as-a-float": ({"max_tokens": 100000.0}, "max_tokens=100000 is more than this server allows"),
    "response-format-ref-to-itself": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "loop", "schema": {"$ref": "#"}}}},
        "refers to itself",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_hostile_bodies_get_a_400_and_no_traceback(server, case: str) -> None:
    fields, says = HOSTILE_BODIES[case]
    body = {"model": server["name"], "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 4}
    log_start = server["log"].stat().st_size
    for stream in (False, True):
        response = httpx.post(
            server["url"] + "/v1/chat/completions",
            json={**body, **fields, "stream": stream},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=120,
        )
        assert says in assert_openai_error(response, 400)["message"]
    assert "Traceback" not in server["log"].read_text(errors="replace")[log_start:]


def test_a_byte_order_mark_does_not_skip_the_checks(server) -> None:
    """A body behind a UTF-8 BOM once skipped the middleware's checks (vLLM's parser skips the mark)."""
    body = {
        "model": server["name"],
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
    }
    response = httpx.post(
        server["url"] + "/v1/chat/completions",
        content="\ufeff".encode() + json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
    )
    assert "not a valid JSON Schema" in assert_openai_error(response, 400)["message"]
    del body["tools"]
    response = httpx.post(
        server["url"] + "/v1/chat/completions",
        content="\ufeff".encode() + json.dumps({**body, "max_tokens": "2"}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2


def test_a_trailing_slash_redirect_stays_on_this_server(server) -> None:
    response = httpx.get(
        server["url"] + "/v1/models/",
        headers={"Authorization": f"Bearer {API_KEY}", "Host": "attacker.example"},
        follow_redirects=False,
    )
    # Starlette redirects a path that matches a route but for its trailing slash, building the URL from Host
    assert response.status_code == 307 and response.headers["location"] == "/v1/models"


def test_requests_sharing_a_client_request_id_stay_apart(server) -> None:
    """X-Request-Id is the client's correlation id: it names the response and the log lines, and two requests may
    share it. vLLM keeps its own id per request, so abandoning one (which aborts it in the engine) leaves the other
    to finish, and each gets its own tokens."""
    shared = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "retry-7"}
    body = {"model": server["name"], "messages": [{"role": "user", "content": "Say falcon."}], "ignore_eos": True}
    finished: dict = {}

    def whole() -> None:
        response = httpx.post(
            server["url"] + "/v1/chat/completions", json={**body, "max_tokens": 24}, headers=shared, timeout=120
        )
        finished.update(response.json(), status=response.status_code)

    abandoned = httpx.stream(
        "POST",
        server["url"] + "/v1/chat/completions",
        json={**body, "max_tokens": server["max_model_len"] - PROMPT_ROOM, "stream": True},
        headers=shared,
        timeout=120,
    )
    with abandoned as response:
        assert response.status_code == 200, response.read()[:500]
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        thread = threading.Thread(target=whole)
        thread.start()
        time.sleep(0.5)  # the second request is in the engine when the first is abandoned
    thread.join()
    assert json.loads(first[len("data: ") :])["id"] == "chatcmpl-retry-7"
    assert finished["status"] == 200 and finished["id"] == "chatcmpl-retry-7"
    assert finished["choices"][0]["finish_reason"] == "length" and finished["usage"]["completion_tokens"] == 24


def test_prompt_logprobs_are_served_where_the_compiler_has_no_vector_isa(
    default_pipeline: dict, tmp_path: Path
) -> None:
    """Found with ATEN_CPU_CAPABILITY=default forced for the whole suite: a body with `prompt_logprobs` made vLLM
    compile the helper that ranks the prompt's tokens, torch's compiler wrote vector code it could not build there,
    and the engine died (a 500, then every request refused). The server now runs vLLM's helpers uncompiled on such a
    CPU (engines.vllm_environment); forced here for this server alone, on any machine."""
    artifact = default_pipeline["recipe"].run_dir / "export"
    name = artifacts.read_serving_file(artifact)["served_model_name"]
    port = server_process.free_port()
    log = tmp_path / "server.log"
    forced = {**KEY_ENV, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    process = server_process.start_vllm_server(artifact, port, log, (), env=forced)
    try:
        server_process.wait_healthy(port, process, log, timeout=300)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
        for asked in (0, 2):
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": "Is 3 even or odd?"}],
                max_tokens=4,
                extra_body={"prompt_logprobs": asked},
            )
            assert reply.model_extra["prompt_logprobs"][1:], asked  # one entry per prompt token after the first
        assert client.models.list().data  # the engine lives on
    finally:
        server_process.stop(process)
    assert "Traceback" not in log.read_text(errors="replace")


def test_an_oversized_head_is_refused_before_its_key_is_read(server) -> None:
    """The server speaks HTTP through the project's protocol (serving/http_protocol.py): a 16 MB head without a key
    was read to its end before its 401."""
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        try:
            connection.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * 1024 * 1024))
        except OSError:  # closed under the sender: the answer was sent first
            pass
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 431")


def test_the_access_log_shows_the_socket_address_not_a_forwarded_one(server) -> None:
    log_start = server["log"].stat().st_size
    response = httpx.get(
        server["url"] + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}", "X-Forwarded-For": "203.0.113.9"}
    )
    assert response.status_code == 200
    time.sleep(0.5)  # the access log line is written after the response
    logged = server["log"].read_text(errors="replace")[log_start:]
    assert "GET /v1/models" in logged and "203.0.113.9" not in logged


def test_a_small_request_is_answered_beside_the_biggest_allowed_one(server) -> None:
    """Before the limits, one request of n=4000 x 100 tokens held the server for 72 s and a 4-token request beside
    it waited 68 s. The biggest request now allowed is a batch the engine runs next to others."""
    client, name = server["client"], server["name"]

    def small(_: int = 0) -> tuple[float, float]:
        started = time.perf_counter()
        client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Is 7 even or odd?"}], max_tokens=4, temperature=0
        )
        return time.perf_counter() - started, time.perf_counter()

    alone = sorted(small()[0] for _ in range(3))[1]
    big: dict = {}
    generating = threading.Event()

    def biggest() -> None:
        started = time.perf_counter()
        # n at its limit, as many tokens as the model length leaves after the prompt, no early stop; streamed, so
        # that the small requests go out once it is generating, whatever the machine's speed.
        chunks = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "Say falcon."}],
            n=middleware.DEFAULT_MAX_N,
            max_tokens=server["max_model_len"] - PROMPT_ROOM,
            temperature=1.0,
            seed=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for chunk in chunks:
            generating.set()
            if chunk.usage:
                big["tokens"] = chunk.usage.completion_tokens
        big.update(seconds=time.perf_counter() - started, finished=time.perf_counter())

    thread = threading.Thread(target=biggest)
    thread.start()
    assert generating.wait(timeout=120), "the biggest request never started generating"
    with ThreadPoolExecutor(max_workers=3) as pool:
        beside = list(pool.map(small, range(3)))
    thread.join()
    latency = sorted(seconds for seconds, _ in beside)[1]
    overlapped = sum(done < big["finished"] for _, done in beside)
    print(
        f"4-token request alone {alone:.2f} s, beside the biggest allowed request ({big['tokens']} tokens,"
        f" {big['seconds']:.1f} s) {latency:.2f} s ({overlapped} of 3 answered while it ran)"
    )
    # Continuous batching lets the small requests join the running batch instead of waiting for the big one to end
    # (before the limits: 68 s of its 72 s): sent while it generates, each ends before it does.
    assert overlapped == 3, f"{3 - overlapped} of the small requests waited for the biggest one to end"


def test_32_concurrent_requests_all_succeed(server) -> None:
    client, name = server["client"], server["name"]

    def ask(i: int) -> str:
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"Is {i} even or odd?"}], max_tokens=8, temperature=0
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32 and all(isinstance(a, str) for a in answers)


def test_chat_ui_streams_the_servers_answer_headless(server) -> None:
    pytest.importorskip("gradio")
    from gradio_client import Client

    port = server_process.free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.chat_ui",
            "--base-url",
            f"{server['url']}/v1",
            "--model",
            server["name"],
            "--ui-port",
            str(port),
        ],
        cwd=REPO,
        env={**os.environ, **KEY_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        server_process.wait_healthy(port, ui, timeout=120, route="/")
        question = "What kind of thing is falcon?"
        answer = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            question, server["name"], api_name="/respond"
        )
        expected = (
            server["client"]
            .chat.completions.create(
                model=server["name"], messages=[{"role": "user", "content": question}], temperature=0
            )
            .choices[0]
            .message.content
        )
        assert answer == expected
    finally:
        server_process.stop(ui, grace=30)


# ------------------------------------------------------------------------------------------ tool calling


@pytest.fixture(scope="module")
def held_out(server) -> scoring.HeldOut:
    recipe = server["recipe"]
    held = scoring.HeldOut.load(
        recipe.run_dir / "data", chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR), recipe
    )
    assert all(row["tools"] == make_data.TOOL_SCHEMAS for row in held.sets["tool_calls"])
    return held


def calls_due(held_out: scoring.HeldOut) -> list[dict]:
    return [row for row in held_out.sets["tool_calls"] if row["reference"]]


def served_calls(message) -> list[dict]:  # noqa: ANN001 - an openai ChatCompletionMessage
    return [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in message.tool_calls or []]


def ask_with_tools(server, messages: list[dict], **kwargs):  # noqa: ANN201 - an openai ChatCompletion
    return server["client"].chat.completions.create(
        model=server["name"],
        messages=openai_messages(messages),
        tools=make_data.TOOL_SCHEMAS,
        temperature=0,
        max_tokens=server["recipe"].evaluate.max_new_tokens,
        **kwargs,
    )


def test_held_out_tool_prompts_get_structured_calls_as_accurate_as_offline(server, held_out: scoring.HeldOut) -> None:
    rows = calls_due(held_out)
    offline = json.loads((server["recipe"].run_dir / "eval" / artifacts.METRICS_FILE).read_text())["models"]["dpo"][
        "tool_arguments_accuracy"
    ]
    hits = 0
    for row in rows:
        reply = ask_with_tools(server, row["prompt"])
        hits += served_calls(reply.choices[0].message) == row["reference"]
        assert reply.choices[0].finish_reason in ("tool_calls", "stop", "length")
    served = hits / len(rows)
    print(f"tool arguments accuracy: served {served:.3f} on {len(rows)} held-out calls, offline {offline:.3f}")
    # The same engine, dtype and rendered prompt as the offline evaluation, greedy: the same calls, up to float noise
    # from different batch shapes (the evaluation batched every prompt, the server gets them one by one), which can
    # flip a near-tie token. 0.1 lets two or three of the two dozen or so held-out calls flip.
    assert served >= offline - 0.1


def first_served_call(server, held_out: scoring.HeldOut) -> tuple[dict, object]:
    """The first held-out question the served model answers with a call (the default's gate holds the model to calls
    on at least 80% of them), and that reply's message."""
    for row in calls_due(held_out):
        message = ask_with_tools(server, row["prompt"]).choices[0].message
        if message.tool_calls:
            return row, message
    raise AssertionError("the served model made no tool call on any held-out question that needs one")


def test_a_call_streams_in_delta_tool_calls(server, held_out: scoring.HeldOut) -> None:
    row, message = first_served_call(server, held_out)
    whole = served_calls(message)
    streamed: dict[int, dict] = {}
    for chunk in ask_with_tools(server, row["prompt"], stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert whole and [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in streamed.values()] == whole


def test_the_tool_result_sent_back_gets_the_answer_hf_gives(server, held_out: scoring.HeldOut) -> None:
    """Conversations with an earlier call: vLLM hands the template its arguments as a dict, training as a JSON string;
    both must render the same ids, so the served answer is HF's on the training tokenizer's rendering."""
    from transformers import AutoModelForCausalLM

    recipe = server["recipe"]
    # Held-out conversations after their tool result, and one round trip with the call the server just made.
    after_tool = [row for row in held_out.sets["answers"] if row["after_tool"]]
    conversations = [row["prompt"] for row in after_tool]
    question, call = first_served_call(server, held_out)
    result = "sunny" if call.tool_calls[0].function.name == "get_weather" else "night"
    calls = [
        {"type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in call.tool_calls
    ]
    conversations.append(
        [
            *question["prompt"],
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": result},
        ]
    )
    assert len(conversations) > 1

    # HF renders as training did: the training tokenizer, the arguments as JSON strings, the schemas as stored.
    tokenizer = chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR)
    model = AutoModelForCausalLM.from_pretrained(str(server["artifact"] / "model"))
    ids = engines.prompt_ids(tokenizer, conversations, [row["tools"] for row in [*after_tool, question]])
    for conversation, prompt_ids in zip(conversations, ids):
        reply = ask_with_tools(server, conversation, extra_body={"return_token_ids": True})
        assert_served_as_hf(reply, prompt_ids, model, tokenizer)


# Generated text the model is made to write (tests/forced_tokens.py), each a case the server's decoding and tool-call
# reading must turn into what the pipeline's own reading of HF's text says; the first is what the default model wrote
# on an Intel AMX machine after a tool result.
FORCED_TEXTS = {
    "call-fragments": 'foggytool_weather", "arguments": "arguments": {"city": {"city": "Parismorning"}}</tool_call>',
    "broken-call": 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"</tool_call>',
    "good-then-broken": (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><tool_call>{"name": </tool_call>'
    ),
    "no-end-marker": '<tool_call>{"name": "get_daytime", "arguments": {"city": "Lima"}}',
    "text-after-call": 'Sure.<tool_call>{"name": "get_daytime", "arguments": {"city": "Lima"}}</tool_call> and more',
    "end-marker-alone": "sunny</tool_call></",
    # What a served model wrote for a two-city question; streamed, it came back as a call to a tool named "arguments".
    "name-without-value": '<tool_call>{"name": "arguments": "<tool_4',
}


@pytest.fixture(scope="module")
def forced(default_pipeline: dict, tmp_path_factory: pytest.TempPathFactory):
    """The default export served with the forcing logits processor, and the training tokenizer."""
    recipe = default_pipeline["recipe"]
    artifact = recipe.run_dir / "export"
    serving = artifacts.read_serving_file(artifact)
    log = tmp_path_factory.mktemp("forced") / "server.log"
    tests_dir = str(Path(__file__).resolve().parent)
    port = server_process.free_port()
    process = server_process.start_vllm_server(
        artifact,
        port,
        log,
        ["--", "--logits-processors", "forced_tokens:ForcedTokens"],
        env={**KEY_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))},
    )
    try:
        server_process.wait_healthy(port, process, log, timeout=300)
        tokenizer = chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR)
        yield {
            "client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0),
            "name": serving["served_model_name"],
            "max_model_len": serving["max_model_len"],
            "tokenizer": tokenizer,
            "stop_ids": chat.stop_token_ids(tokenizer),
        }
    finally:
        server_process.stop(process)


def ask_forced(
    forced: dict, messages: list[dict], token_ids: list[int], stream: bool = False, **kwargs
) -> tuple[str, list[dict], str]:
    """(content, calls, finish reason) of a request whose answer is `token_ids`, streamed or not."""
    request = {
        "model": forced["name"],
        "messages": messages,
        "tools": make_data.TOOL_SCHEMAS,
        "temperature": 0,
        "max_tokens": len(token_ids),
        "extra_body": {"vllm_xargs": {"forced_token_ids": token_ids}},
        **kwargs,
    }
    if not stream:
        choice = forced["client"].chat.completions.create(**request).choices[0]
        return (*served_view(choice.message), choice.finish_reason)
    content, calls, finish = "", {}, None
    for chunk in forced["client"].chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    return (
        content.strip(),
        [{"name": c["name"], "arguments": json.loads(c["arguments"])} for _, c in sorted(calls.items())],
        finish,
    )


QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(FORCED_TEXTS))
def test_served_reply_is_the_pipeline_reading_of_the_generated_text(forced: dict, case: str, stream: bool) -> None:
    tokenizer = forced["tokenizer"]
    token_ids = tokenizer(FORCED_TEXTS[case], add_special_tokens=False)["input_ids"] + [forced["stop_ids"][-1]]
    expected = chat.served_reply(engines.decode_answer(tokenizer, token_ids, forced["stop_ids"]))
    content, calls, finish = ask_forced(forced, QUESTION, token_ids, stream)
    assert (content, calls) == expected
    assert finish == ("tool_calls" if expected[1] else "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_inside_a_call_ends_the_text_there(forced: dict, stream: bool) -> None:
    tokenizer, text = forced["tokenizer"], FORCED_TEXTS["text-after-call"]
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [forced["stop_ids"][-1]]
    content, calls, finish = ask_forced(forced, QUESTION, token_ids, stream, stop=['"city"'])
    assert (content, calls, finish) == (*chat.served_reply(text[: text.index('"city"')]), "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_answer_that_reaches_the_context_length_is_cut_where_evaluation_cuts_it(forced: dict, stream: bool) -> None:
    """The case behind a red test on one machine: an answer running into the served context length. The server cuts
    it at `max_model_len`; evaluation and HF generation cut it at the same token (engines.new_token_budget)."""
    tokenizer, limit = forced["tokenizer"], forced["max_model_len"]
    token_ids = tokenizer(FORCED_TEXTS["call-fragments"], add_special_tokens=False)["input_ids"]
    words = 1
    while (
        len(
            chat.render_ids(
                tokenizer,
                [{"role": "user", "content": "word " * (words + 1)}],
                make_data.TOOL_SCHEMAS,
                add_generation_prompt=True,
            )["input_ids"]
        )
        < limit - 6
    ):
        words += 1
    messages = [{"role": "user", "content": "word " * words}]
    prompt_length = len(
        chat.render_ids(tokenizer, messages, make_data.TOOL_SCHEMAS, add_generation_prompt=True)["input_ids"]
    )
    budget = engines.new_token_budget(prompt_length, len(token_ids), limit)
    assert 0 < budget < len(token_ids)
    expected = chat.served_reply(engines.decode_answer(tokenizer, token_ids[:budget], forced["stop_ids"]))
    assert ask_forced(forced, messages, token_ids, stream) == (*expected, "length")


@pytest.mark.parametrize(
    ("tools", "says"),
    [
        ([{"type": "function", "function": {"description": "no name", "parameters": {"type": "object"}}}], "name"),
        ([{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}], "parameters"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            "not a valid JSON Schema",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "city"}}}],
            "not a valid JSON Schema",
        ),
    ],
    ids=["no-name", "parameters-not-an-object", "unknown-type", "required-not-a-list"],
)
def test_a_malformed_tools_schema_gets_a_400(server, tools: list, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server["client"].chat.completions.create(
            model=server["name"], messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=tools, max_tokens=4
        )
    assert set(caught.value.body) == ERROR_FIELDS and says in caught.value.body["message"]


def test_langchain_bound_tools_come_back_as_tool_calls(server, held_out: scoring.HeldOut) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        base_url=f"{server['url']}/v1",
        api_key=API_KEY,
        model=server["name"],
        temperature=0,
        max_tokens=server["recipe"].evaluate.max_new_tokens,
        max_retries=0,
    )
    row, message = first_served_call(server, held_out)
    reply = llm.bind_tools(make_data.TOOL_SCHEMAS).invoke(row["prompt"])
    got = [{"name": call["name"], "arguments": call["args"]} for call in reply.tool_calls]
    assert got and got == served_calls(message)


def test_fuzzing_the_openapi_of_chat_and_completions_finds_no_server_error(server) -> None:
    """Bodies schemathesis draws from the server's OpenAPI, and the same with a real model and question, so that the
    drawn sampling parameters reach the engine (the drawn conversations are mostly refused before it)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json", headers=auth)
    log_start = server["log"].stat().st_size
    statuses: dict[int, int] = {}
    for path, question in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Is 3 even or odd?"}]}),
        ("/v1/completions", {"prompt": "<|im_start|>user\nIs 3 even or odd?<|im_end|>\n<|im_start|>assistant\n"}),
    ):
        operation = schema[path]["POST"]
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            # Derandomized: the same 300 bodies on every run. Drawn afresh each run, they found a different vLLM
            # validation gap each time (a float where vLLM expects a mapping: 500), so a pass said little and a
            # failure could not be reproduced; a fixed draw is a regression test.
            @settings(
                max_examples=75,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode), real_question=st.booleans())
            def call(case, real_question: bool) -> None:  # noqa: ANN001 - a schemathesis Case
                if real_question and isinstance(case.body, dict):
                    case.body.update(model=server["name"], **question)
                response = case.call(base_url=server["url"], headers=auth, timeout=120)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, (
                    f"{response.status_code} {response.text[:300]}\n{case.as_curl_command()}"
                )

            call()
    print(f"responses by status: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 250 and statuses.get(200, 0) >= 10
    assert server["client"].models.list().data  # still serving
    log = server["log"].read_text(errors="replace")[log_start:]
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :][:6000]


def test_sigterm_drains_the_streams_then_exits_0_with_nothing_left_behind(
    default_pipeline: dict, tmp_path: Path
) -> None:
    """Streams of the biggest allowed size are open at SIGTERM: the port closes at once, each stream ends with its
    completion or an error event (never a hang), and the process exits soon after the grace period, its children
    with it. (tests/test_serving_middleware.py shows each ending on its own.)

    32 streams of n=8 and ~160 tokens each, ignoring EOS, are ~40k tokens. How many of them a grace period lets
    finish depends on the machine's speed (with 1 s: 16 of 32 on a loaded machine, all 32 on a quiet one), so the
    grace here is 0: every stream still open at the signal must end with the error event, the path that hung before.
    (tests/test_serving_middleware.py shows requests finishing within a grace period.)"""
    import psutil

    grace, margin, streams = 0.0, 10.0, 32
    artifact = default_pipeline["recipe"].run_dir / "export"
    name, max_model_len = (artifacts.read_serving_file(artifact)[key] for key in ("served_model_name", "max_model_len"))
    process, port = start_server(artifact, tmp_path / "server.log", f"serve.shutdown_grace={grace}")
    outcomes: dict[int, object] = {}
    started = threading.Semaphore(0)

    def stream(index: int) -> None:
        body = {
            "model": name,
            "messages": [{"role": "user", "content": "Say falcon."}],
            "max_tokens": max_model_len - PROMPT_ROOM,
            "n": middleware.DEFAULT_MAX_N,
            "temperature": 1.0,
            "seed": index,
            "ignore_eos": True,
            "stream": True,
        }
        events: list[str] = []
        try:
            with httpx.stream(
                "POST",
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=60,
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: ") :])
                        if len(events) == 1:
                            started.release()
            outcomes[index] = events
        except Exception as error:  # noqa: BLE001 - recorded; the assertions below say what the client saw
            outcomes[index] = error
            started.release()

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert started.acquire(timeout=120)
        signalled = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        refused_after = None
        while refused_after is None and time.perf_counter() - signalled < 5:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.05)
            except OSError:
                refused_after = time.perf_counter() - signalled
        process.wait(timeout=grace + margin + 30)
        exited_after = time.perf_counter() - signalled
        for thread in threads:
            thread.join(timeout=30)
    finally:
        server_process.stop(process)
    endings = []
    for index, events in sorted(outcomes.items()):
        assert isinstance(events, list) and events[-1] == "[DONE]", f"stream {index} hung or failed: {events!r}"[:500]
        last = json.loads(events[-2])
        if "error" in last:
            assert set(last["error"]) == ERROR_FIELDS and last["error"]["code"] == 503
            endings.append("error event")
        else:
            finished = [
                c["finish_reason"] for event in events[:-1] for c in json.loads(event)["choices"] if c["finish_reason"]
            ]
            assert finished == ["length"] * middleware.DEFAULT_MAX_N, finished
            endings.append("completed")
    print(
        f"port refused {refused_after:.2f} s after SIGTERM, exited after {exited_after:.2f} s (grace {grace:g} s); "
        f"streams: {endings.count('completed')} completed, {endings.count('error event')} ended by an error event"
    )
    assert len(endings) == streams and refused_after is not None and refused_after < 2
    assert endings.count("error event") >= 1, (
        "every stream finished within the grace period: the cut-off path went untested"
    )
    assert process.returncode == 0 and exited_after < grace + margin
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert "nanobind" not in (tmp_path / "server.log").read_text(errors="replace")  # shutdown noise, issue #21


# ------------------------------------------------------------------------------------------ LlamaIndex as a client
# The forced fixture's server, through LlamaIndex's OpenAI-compatible LLM class; its address and key come from
# forced["client"] (an openai.OpenAI).

LLAMA_INDEX_ANSWER = "It is sunny in Oslo today."
LLAMA_INDEX_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
LLAMA_INDEX_QUESTION = "What is the weather in Oslo?"


def forced_ids(forced: dict, text: str) -> list[int]:
    """The training tokenizer's ids of `text` and the stop id: what the model is made to write."""
    return forced["tokenizer"](text, add_special_tokens=False)["input_ids"] + [forced["stop_ids"][-1]]


def forcing(token_ids: list[int], **extra_body) -> dict:
    """The keyword LlamaIndex's OpenAI LLMs pass through to `chat.completions.create` for a request's extra body."""
    return {"extra_body": {"vllm_xargs": {"forced_token_ids": token_ids}, **extra_body}}


def llama_index_llm(forced: dict, max_tokens: int):  # noqa: ANN201 - a llama_index OpenAILike
    """The served model as LlamaIndex's OpenAI-compatible LLM. The context window is given, so LlamaIndex never asks
    tiktoken (which would download its encodings) for one; max_tokens is set, so it never counts prompt tokens."""
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    client = forced["client"]
    return openai_like.OpenAILike(
        model=forced["name"],
        api_base=str(client.base_url),
        api_key=client.api_key,
        is_chat_model=True,
        is_function_calling_model=True,
        context_window=forced["max_model_len"],
        max_tokens=max_tokens,  # LlamaIndex sends this one whatever a call passes
        temperature=0,
        max_retries=0,
    )


def weather_tool(calls: list[str]):  # noqa: ANN201 - a llama_index FunctionTool
    """get_weather as the model learned it (make_data.TOOL_SCHEMAS), a function that records each city it gets."""
    from llama_index.core.tools import FunctionTool

    def get_weather(city: str) -> str:
        calls.append(city)
        return "foggy"

    schema = next(t["function"] for t in make_data.TOOL_SCHEMAS if t["function"]["name"] == "get_weather")
    return FunctionTool.from_defaults(fn=get_weather, name=schema["name"], description=schema["description"])


def test_llama_index_chat_and_stream_chat_get_the_served_reply(forced: dict) -> None:
    from llama_index.core.llms import ChatMessage

    token_ids = forced_ids(forced, LLAMA_INDEX_ANSWER)
    expected, calls = chat.served_reply(engines.decode_answer(forced["tokenizer"], token_ids, forced["stop_ids"]))
    assert expected and not calls
    llm = llama_index_llm(forced, len(token_ids))
    messages = [ChatMessage(role="user", content=LLAMA_INDEX_QUESTION)]
    reply = llm.chat(messages, **forcing(token_ids))
    assert reply.message.content.strip() == expected
    assert reply.raw.choices[0].finish_reason == "stop"
    chunks = list(llm.stream_chat(messages, **forcing(token_ids)))
    deltas = [chunk.delta for chunk in chunks if chunk.delta]
    assert len(deltas) > 1  # streamed in pieces, not one piece at the end
    assert "".join(deltas) == reply.message.content == chunks[-1].message.content


def test_llama_index_predict_and_call_calls_the_function_the_model_named(forced: dict) -> None:
    calls: list[str] = []
    token_ids = forced_ids(forced, LLAMA_INDEX_CALL)
    llm = llama_index_llm(forced, len(token_ids))
    out = llm.predict_and_call(
        [weather_tool(calls)], LLAMA_INDEX_QUESTION, error_on_tool_error=True, **forcing(token_ids)
    )
    assert calls == ["Oslo"]
    assert out.response == "foggy"
    assert [(s.tool_name, s.raw_output, s.is_error) for s in out.sources] == [("get_weather", "foggy", False)]


def test_llama_index_tool_result_goes_back_to_the_model(forced: dict) -> None:
    """The loop an agent runs: the call as LlamaIndex reads it, the function's result sent back in a tool message
    (LlamaIndex's own conversion of the conversation), and the answer after it."""
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools.calling import call_tool_with_selection

    calls: list[str] = []
    tool = weather_tool(calls)
    call_ids = forced_ids(forced, LLAMA_INDEX_CALL)
    llm = llama_index_llm(forced, len(call_ids))
    history = [ChatMessage(role="user", content=LLAMA_INDEX_QUESTION)]
    reply = llm.chat_with_tools([tool], chat_history=history, **forcing(call_ids))
    assert reply.raw.choices[0].finish_reason == "tool_calls"
    (selection,) = llm.get_tool_calls_from_response(reply)
    assert (selection.tool_name, selection.tool_kwargs) == ("get_weather", {"city": "Oslo"}) and selection.tool_id
    result = call_tool_with_selection(selection, [tool])
    assert calls == ["Oslo"] and result.content == "foggy" and not result.is_error
    history += [
        reply.message,
        ChatMessage(role="tool", content=result.content, additional_kwargs={"tool_call_id": selection.tool_id}),
    ]
    answer_ids = forced_ids(forced, "foggy")
    final = llama_index_llm(forced, len(answer_ids)).chat_with_tools(
        [tool], chat_history=history, **forcing(answer_ids, return_token_ids=True)
    )
    assert final.message.content.strip() == "foggy" and not llm.get_tool_calls_from_response(
        final, error_on_no_tool_call=False
    )
    # What the server rendered for the model: the call and, after it, the function's result.
    prompt = forced["tokenizer"].decode(final.raw.model_extra["prompt_token_ids"])
    assert prompt.index('"city": "Oslo"') < prompt.rindex("foggy"), prompt
