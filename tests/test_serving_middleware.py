"""The serving middleware on its own, around small ASGI apps: which requests need the key, which bodies are
refused, and how a drain ends each kind of request. Deterministic and quick; tests/test_serving.py runs it in vLLM."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from types import SimpleNamespace

import pytest

from serving import middleware

KEY = "k-123"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"}


async def call(
    app, path: str = "/v1/chat/completions", method: str = "POST", body: bytes = b"", headers: dict | None = None
) -> list[dict]:  # noqa: ANN001
    """The messages `app` sends for one request; the client never disconnects."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    await app(scope, receive, send)
    return sent


def status(sent: list[dict]) -> int:
    return sent[0]["status"]


def body(sent: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def error(sent: list[dict]) -> dict:
    payload = json.loads(body(sent))["error"]
    assert set(payload) == {"message", "type", "param", "code"} and payload["code"] == status(sent)
    return payload


async def echo(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
    """200 with the body the app received."""
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": message.get("body", b"")})


def stream(events: int, every: float, first_sent: asyncio.Event | None = None):  # noqa: ANN201 - an ASGI app
    """Server-sent events, `events` of them `every` seconds apart, then [DONE]; `first_sent` is set once the first
    has gone out."""

    async def app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        for index in range(events):
            await send({"type": "http.response.body", "body": f"data: {index}\n\n".encode(), "more_body": True})
            if first_sent is not None:
                first_sent.set()
            await asyncio.sleep(every)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


async def slow_answer(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
    await asyncio.sleep(30)
    await echo(scope, receive, send)


def guard(monkeypatch: pytest.MonkeyPatch, app, **settings) -> middleware.ServingGuard:  # noqa: ANN001
    chosen = middleware.Settings(**{"api_keys": (KEY,), **settings})
    for name in (middleware.API_KEYS_VARIABLE, middleware.MAX_TOKENS_VARIABLE, middleware.MODEL_METADATA_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    for name, value in chosen.environment().items():
        monkeypatch.setenv(name, value)
    built = middleware.ServingGuard(app)
    assert built.settings == chosen
    return built


def test_every_path_but_health_needs_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    app = guard(monkeypatch, echo)
    for path, method in [
        ("/v1/models", "GET"),
        ("/metrics", "GET"),
        ("/docs", "GET"),
        ("/ping", "GET"),
        ("/invocations", "POST"),
        ("/tokenize", "POST"),
        ("/v1/chat/completions", "POST"),
        ("/health/", "GET"),
    ]:
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": KEY},
            {"authorization": f"Basic {KEY}"},
        ):
            sent = asyncio.run(call(app, path, method, b"{}", {**JSON, **headers}))
            assert status(sent) == 401 and error(sent)["type"] == "AuthenticationError", (path, headers)
            assert (b"www-authenticate", b"Bearer") in sent[0]["headers"]
        assert status(asyncio.run(call(app, path, method, b"{}", {**JSON, **AUTH}))) == 200
        assert status(asyncio.run(call(app, path, method, b"{}", {**JSON, "authorization": f"bearer {KEY}"}))) == 200
    assert status(asyncio.run(call(app, "/health", "GET"))) == 200
    # A CORS preflight reaches vLLM's CORS middleware, which answers it; an OPTIONS request that is not one does not.
    preflight = {"origin": "https://ui.example", "access-control-request-method": "POST"}
    assert status(asyncio.run(call(app, "/v1/chat/completions", "OPTIONS", headers=preflight))) == 200
    assert (
        status(asyncio.run(call(app, "/v1/chat/completions", "OPTIONS", headers={"origin": "https://ui.example"})))
        == 401
    )


def test_without_a_key_every_route_is_open(monkeypatch: pytest.MonkeyPatch) -> None:
    app = guard(monkeypatch, echo, api_keys=())
    assert status(asyncio.run(call(app, "/v1/models", "GET"))) == 200


@pytest.mark.parametrize(
    ("payload", "param", "says"),
    [
        ({"n": 9}, "n", "n=9; the server allows at most 8"),
        ({"n": 3, "prompt": ["a", "b", "c"]}, "n", "9 sequences (n=3 for each of 3 prompts)"),
        ({"prompt": [[1, 2], [3, 4]] * 5}, "n", "10 sequences (n=1 for each of 10 prompts)"),
        ({"messages": [[{"role": "user", "content": "hi"}]] * 9}, "n", "9 sequences"),
        ({"items": ["x"] * 9}, "n", "9 sequences"),
        ({"max_tokens": 65}, "max_tokens", "max_tokens=65 is more than this server allows (64)"),
        ({"max_completion_tokens": 65}, "max_completion_tokens", "allows (64)"),
        ({"max_output_tokens": 1000}, "max_output_tokens", "allows (64)"),
        # vLLM reads counts in pydantic's lax mode: each of these is the integer it looks like.
        ({"max_tokens": "150"}, "max_tokens", "max_tokens=150 is more"),
        ({"max_tokens": 150.0}, "max_tokens", "max_tokens=150 is more"),
        ({"max_tokens": 1.5e9}, "max_tokens", "max_tokens=1500000000 is more"),
        ({"max_completion_tokens": " 1_50 "}, "max_completion_tokens", "max_completion_tokens=150 is more"),
        ({"n": "9"}, "n", "n=9; the server allows at most 8"),
        # vLLM reads it as a mapping before checking it: `false` was a 500 (found by the fuzzing test)
        ({"structured_outputs": False}, "structured_outputs", "or null, not a boolean."),
        ({"structured_outputs": ["x" * 10_000]}, "structured_outputs", "or null, not an array."),
    ],
    ids=[
        "n",
        "prompts-times-n",
        "token-id-prompts",
        "conversations",
        "scoring-items",
        "max-tokens",
        "max-completion-tokens",
        "max-output-tokens",
        "max-tokens-a-string",
        "max-tokens-a-float",
        "max-tokens-an-exponent",
        "max-completion-tokens-spaced",
        "n-a-string",
        "structured-outputs-a-boolean",
        "structured-outputs-an-array",
    ],
)
def test_requests_over_a_limit_get_a_400(monkeypatch: pytest.MonkeyPatch, payload: dict, param: str, says: str) -> None:
    app = guard(monkeypatch, echo, max_n=8, max_tokens=64)
    sent = asyncio.run(call(app, body=json.dumps(payload).encode(), headers={**JSON, **AUTH}))
    assert status(sent) == 400 and error(sent)["param"] == param and says in error(sent)["message"]


@pytest.mark.parametrize(
    "payload",
    [
        {"n": 8, "max_tokens": 64},
        {"prompt": list(range(500))},
        {"n": 2, "prompt": ["a", "b", "c", "d"]},
        {"messages": [{"role": "user", "content": "hi"}] * 20},
        {"n": "many"},
        {"max_tokens": 1.5},
        {"max_tokens": "1e3"},
        {"structured_outputs": None},
    ],
    ids=[
        "at-the-limits",
        "one-prompt-of-token-ids",
        "eight-sequences",
        "one-long-conversation",
        "n-not-a-number",
        "max-tokens-not-a-whole-number",
        "max-tokens-not-an-int-string",
        "structured-outputs-null",
    ],
)
def test_requests_within_the_limits_or_for_vllm_to_judge_pass_unchanged(
    monkeypatch: pytest.MonkeyPatch, payload: dict
) -> None:
    app = guard(monkeypatch, echo, max_n=8, max_tokens=64)
    raw = json.dumps(payload).encode()
    sent = asyncio.run(call(app, body=raw, headers={**JSON, **AUTH}))
    assert status(sent) == 200 and body(sent) == raw


def test_bodies_vllm_cannot_read_get_a_400_and_other_bodies_reach_it(monkeypatch: pytest.MonkeyPatch) -> None:
    app = guard(monkeypatch, echo)
    for headers in (JSON, {"content-type": "application/json; charset=utf-8"}, {}):
        sent = asyncio.run(call(app, body=b'{"prompt": "caf\xe9"}', headers={**headers, **AUTH}))
        assert status(sent) == 400 and "not valid UTF-8 (byte 15)" in error(sent)["message"]
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    sent = asyncio.run(call(app, body=deep, headers={**JSON, **AUTH}))
    assert status(sent) == 400 and "nests JSON too deeply" in error(sent)["message"]
    for raw, headers in (
        (b'{"prompt": ', JSON),
        (b"[1, 2]", JSON),
        (b"\xff\xd8 an upload", {"content-type": "multipart/form-data; boundary=x"}),
    ):
        sent = asyncio.run(call(app, body=raw, headers={**headers, **AUTH}))
        assert status(sent) == 200 and body(sent) == raw


def test_vllm_gets_the_counts_and_the_body_as_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts written as strings, floats or bools reach vLLM as the integers that were checked; a body behind a UTF-8
    byte-order mark is checked (it once skipped every check) and reaches vLLM without it."""
    app = guard(monkeypatch, echo, max_n=8, max_tokens=64)
    raw = json.dumps({"n": True, "max_tokens": "32", "max_completion_tokens": 16.0, "prompt": "hi"}).encode()
    sent = asyncio.run(call(app, body=raw, headers={**JSON, **AUTH}))
    assert status(sent) == 200
    assert json.loads(body(sent)) == {"n": 1, "max_tokens": 32, "max_completion_tokens": 16, "prompt": "hi"}
    bad_tool = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}
    marked = "\ufeff".encode() + json.dumps(bad_tool).encode()
    sent = asyncio.run(call(app, body=marked, headers={**JSON, **AUTH}))
    assert status(sent) == 400 and error(sent)["param"] == "tools.0.function.parameters"
    sent = asyncio.run(call(app, body="\ufeff".encode() + b'{"max_tokens": 65}', headers={**JSON, **AUTH}))
    assert status(sent) == 400 and error(sent)["param"] == "max_tokens"
    seen: list[dict] = []

    async def recording(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        seen.append(scope)
        await echo(scope, receive, send)

    app = guard(monkeypatch, recording, max_tokens=64)
    headers = {**JSON, **AUTH, "content-length": str(len(b'{"max_tokens": 8}') + 3)}
    sent = asyncio.run(call(app, body="\ufeff".encode() + b'{"max_tokens": 8}', headers=headers))
    assert status(sent) == 200 and body(sent) == b'{"max_tokens": 8}'
    assert dict(seen[0]["headers"])[b"content-length"] == str(len(body(sent))).encode()


def nested_schema(levels: int) -> dict:
    """A tool parameter schema `levels` objects deep: each level's properties hold the next."""
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_tool_schemas_deeper_than_vllm_reads_get_a_400_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """100 levels made jsonschema's check overflow the stack: a 500 and a 147 KB traceback from a 4 KB request."""
    pytest.importorskip("jsonschema")
    app = guard(monkeypatch, echo)
    limit = middleware.MAX_SCHEMA_NESTING
    for levels, expected in ((limit // 2 - 1, 200), (100, 400), (400, 400)):
        tool = {"type": "function", "function": {"name": "f", "parameters": nested_schema(levels)}}
        sent = asyncio.run(call(app, body=json.dumps({"tools": [tool]}).encode(), headers={**JSON, **AUTH}))
        assert status(sent) == expected, levels
        if expected == 400:
            assert error(sent)["param"] == "tools.0.function.parameters"
            assert f"nested more than {limit} levels" in error(sent)["message"]


def test_nesting_depth_counts_levels() -> None:
    assert [middleware.nesting_depth(v, 64) for v in (1, {}, [[]], {"a": [{"b": 1}]}, nested_schema(3))] == [
        0,
        1,
        2,
        3,
        7,
    ]
    assert middleware.nesting_depth(nested_schema(1000), 64) == 65


@pytest.mark.parametrize(
    ("where", "value", "accepted"),
    [
        ("header", "req-42.retry_1", True),
        ("header", "a b", False),
        ("header", "x" * 129, False),
        ("body", "req-42", True),
        ("body", "forged\nINFO: 200 OK", False),
        ("body", 42, False),
    ],
)
def test_client_request_ids_cannot_forge_log_lines(
    monkeypatch: pytest.MonkeyPatch, where: str, value: object, accepted: bool
) -> None:
    app = guard(monkeypatch, echo)
    headers = {**JSON, **AUTH, **({"x-request-id": value} if where == "header" else {})}
    raw = json.dumps({"prompt": "hi", **({"request_id": value} if where == "body" else {})}).encode()
    sent = asyncio.run(call(app, body=raw, headers=headers))
    if accepted:
        assert status(sent) == 200
    else:
        assert status(sent) == 400
        assert error(sent)["param"] == ("X-Request-Id" if where == "header" else "request_id")


def test_redirects_point_at_this_server_whatever_the_host_header(monkeypatch: pytest.MonkeyPatch) -> None:
    async def redirecting(scope, receive, send) -> None:  # noqa: ANN001 - ASGI, as Starlette's slash redirect
        location = b"http://attacker.example:8080/v1/models?x=1"
        await send({"type": "http.response.start", "status": 307, "headers": [(b"location", location)]})
        await send({"type": "http.response.body", "body": b""})

    sent = asyncio.run(call(guard(monkeypatch, redirecting), "/v1/models/", "GET", headers=AUTH))
    assert status(sent) == 307 and dict(sent[0]["headers"])[b"location"] == b"/v1/models?x=1"


@pytest.mark.parametrize(
    ("schema", "valid"),
    [
        ({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, True),
        ({}, True),
        ({"type": "nonsense"}, False),
        ({"type": "object", "required": "city"}, False),
        ({"properties": {"a": {"minLength": -1}}}, False),
    ],
)
def test_tool_parameters_must_be_json_schema(monkeypatch: pytest.MonkeyPatch, schema: dict, valid: bool) -> None:
    pytest.importorskip("jsonschema")
    app = guard(monkeypatch, echo)
    for tool in (
        {"type": "function", "function": {"name": "f", "parameters": schema}},
        {"type": "function", "name": "f", "parameters": schema},
    ):
        sent = asyncio.run(
            call(
                app,
                body=json.dumps({"tools": [{"type": "function", "function": {"name": "g"}}, tool]}).encode(),
                headers={**JSON, **AUTH},
            )
        )
        if valid:
            assert status(sent) == 200
        else:
            assert status(sent) == 400 and error(sent)["param"] == "tools.1.function.parameters"
            assert error(sent)["message"].startswith("tools.1.function.parameters is not a valid JSON Schema")


TREE = {  # recursion through a property: a tree of any depth, which a grammar generates
    "type": "object",
    "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
}


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"$ref": "#"}, "refers to itself (#)"),
        ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "refers to itself"),
        ({"$defs": {"a": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "itself"),
        ({"allOf": [{"$ref": "#"}]}, "refers to itself"),
        ({"$ref": "#/$defs/missing"}, "refers to #/$defs/missing, which the schema does not have"),
        (TREE, None),
        ({"$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}}, None),
        ({"$ref": "https://example.com/schema.json"}, None),
    ],
)
def test_schemas_that_refer_to_themselves_or_to_nothing_are_refused(
    monkeypatch: pytest.MonkeyPatch, schema: dict, says: str | None
) -> None:
    """{"$ref": "#"} in a response_format got a 500 from vLLM's structured output (issue 28)."""
    pytest.importorskip("jsonschema")
    assert (middleware.reference_problem(schema) is None) == (says is None)
    app = guard(monkeypatch, echo)
    bodies = {
        "response_format.json_schema.schema": {
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        },
        "tools.0.function.parameters": {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        },
        "structured_outputs.json": {"structured_outputs": {"json": schema}},
    }
    for param, fields in bodies.items():
        sent = asyncio.run(call(app, body=json.dumps({"prompt": "hi", **fields}).encode(), headers={**JSON, **AUTH}))
        if says is None:
            assert status(sent) == 200, param
        else:
            assert status(sent) == 400 and error(sent)["param"] == param
            assert says in error(sent)["message"] and error(sent)["message"].startswith(param)


def router(routes: dict):  # noqa: ANN201 - an ASGI app
    async def app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        await routes[scope["path"]](scope, receive, send)

    return app


async def started(app: middleware.ServingGuard, requests: int) -> None:
    """Until `requests` requests are running in the app: the drain comes after they began, whatever the machine."""
    while len(app._running) < requests:
        await asyncio.sleep(0)


def test_a_drain_lets_requests_finish_within_the_grace_period_and_ends_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grace = 0.5
    app = guard(
        monkeypatch,
        router({"/short": stream(3, 0.05), "/long": stream(1000, 0.05), "/slow": slow_answer, "/v1/models": echo}),
        shutdown_grace=grace,
    )
    server = SimpleNamespace(should_exit=False)

    async def scenario() -> tuple[list, float]:
        requests = [asyncio.ensure_future(call(app, path, headers=AUTH)) for path in ("/short", "/long", "/slow")]
        await started(app, 3)
        app.drain(server)
        drained = time.perf_counter()
        late = await call(app, "/v1/models", "GET", headers=AUTH)
        health = await call(app, "/health", "GET")
        return [*await asyncio.gather(*requests), late, health], time.perf_counter() - drained

    (short, long, slow, late, health), seconds = asyncio.run(scenario())
    events = body(long).decode().split("\n\n")
    # Ended by the grace period, not before it, and long before the stream's own end (1000 events, 50 s).
    assert server.should_exit and seconds >= grace and len(events) < 1000
    assert body(short) == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert events[-3:] == [events[-3], "data: [DONE]", ""] and events[-3].startswith("data: {")
    assert json.loads(events[-3][len("data: ") :])["error"]["code"] == 503 and long[-1]["more_body"] is False
    assert status(slow) == 503 and "shut down before this request finished" in error(slow)["message"]
    assert status(late) == 503 and status(health) == 503  # a load balancer stops routing here


def test_a_second_signal_ends_the_requests_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    server = SimpleNamespace(should_exit=False)

    async def scenario() -> tuple[list, float]:
        first_sent = asyncio.Event()
        app = guard(monkeypatch, router({"/long": stream(1000, 0.05, first_sent)}), shutdown_grace=60)
        request = asyncio.ensure_future(call(app, "/long", headers=AUTH))
        await first_sent.wait()
        app.drain(server)
        app.drain(server)
        signalled = time.perf_counter()
        return await request, time.perf_counter() - signalled

    sent, seconds = asyncio.run(scenario())
    # At once: long before the 60 s grace, and before the stream's own end (1000 events, 50 s).
    assert seconds < 60 and len(body(sent).split(b"\n\n")) < 1000
    assert b'"code": 503' in body(sent) and body(sent).endswith(b"data: [DONE]\n\n")
    # The error says how long the request really had, not the 60 s grace it was promised.
    given = float(body(sent).split(b"it ran ")[1].split(b" s past")[0])
    assert given <= seconds + 0.05


def refused_stream(code: int):  # noqa: ANN201 - an ASGI app
    """A stream whose first event is an error with `code`, as vLLM's generators write a refusal, then [DONE]."""
    refusal = {
        "error": {"message": "stop_token_ids out of vocab", "type": "BadRequestError", "param": "stop", "code": code}
    }

    async def app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send(
            {"type": "http.response.body", "body": f"data: {json.dumps(refusal)}\n\n".encode(), "more_body": True}
        )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def test_a_stream_refused_before_its_first_event_gets_the_refusals_status(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = asyncio.run(call(guard(monkeypatch, refused_stream(400)), headers={**JSON, **AUTH}, body=b"{}"))
    assert status(sent) == 400 and error(sent) == {
        "message": "stop_token_ids out of vocab",
        "type": "BadRequestError",
        "param": "stop",
        "code": 400,
    }
    assert len(sent) == 2  # nothing of the stream follows the answer


def test_streams_with_output_or_a_server_error_are_sent_as_they_come(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = asyncio.run(call(guard(monkeypatch, stream(2, 0)), headers={**JSON, **AUTH}, body=b"{}"))
    assert status(sent) == 200 and body(sent) == b"data: 0\n\ndata: 1\n\ndata: [DONE]\n\n"
    sent = asyncio.run(call(guard(monkeypatch, refused_stream(500)), headers={**JSON, **AUTH}, body=b"{}"))
    assert status(sent) == 200 and body(sent).startswith(b'data: {"error"') and body(sent).endswith(b"[DONE]\n\n")


def test_a_refusal_inside_a_stream_is_logged_without_a_traceback() -> None:
    from vllm.exceptions import VLLMValidationError

    def logged(error: Exception) -> logging.LogRecord:
        try:
            raise error
        except Exception:
            record = logging.LogRecord(
                "vllm.x", logging.ERROR, __file__, 1, "Error in chat completion stream generator.", (), sys.exc_info()
            )
        assert middleware.RefusedRequestLog().filter(record)
        return record

    refused = logged(VLLMValidationError("token_id(s) [5000] out of vocab", parameter="stop_token_ids"))
    assert (
        refused.exc_info is None and refused.levelno == logging.INFO and "[5000] out of vocab" in refused.getMessage()
    )
    failed = logged(RuntimeError("engine died"))
    assert failed.exc_info is not None and failed.levelno == logging.ERROR


def models_listing(status_code: int = 200):  # noqa: ANN201 - an ASGI app
    """vLLM's /v1/models answer (or an error with `status_code`), its body sent in two parts with its length."""
    listing = json.dumps(
        {
            "object": "list",
            "data": [
                {"id": "tiny", "object": "model", "owned_by": "vllm"},
                {"id": "tiny-lora", "object": "model", "owned_by": "vllm"},
            ],
        }
    ).encode()

    async def app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        await send(
            {
                "type": "http.response.start",
                "status": status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(listing)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": listing[:10], "more_body": True})
        await send({"type": "http.response.body", "body": listing[10:], "more_body": False})

    return app, listing


def test_the_model_listing_says_what_the_export_says_of_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    metadata = {"tiny": {"gates": "failed", "exported_from": "dpo"}, "tiny-lora": {"gates": "passed", "rank": 16}}
    app, listing = models_listing()
    sent = asyncio.run(call(guard(monkeypatch, app, model_metadata=metadata), "/v1/models", "GET", headers=AUTH))
    answer = json.loads(body(sent))
    assert [m["id"] for m in answer["data"]] == ["tiny", "tiny-lora"]
    assert [m["pipeline"] for m in answer["data"]] == [metadata["tiny"], metadata["tiny-lora"]]
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(body(sent))).encode()
    assert [k for k, _ in sent[0]["headers"]].count(b"content-length") == 1
    # Other routes, error answers and a server without metadata pass unchanged.
    assert (
        body(
            asyncio.run(call(guard(monkeypatch, app, model_metadata=metadata), "/v1/models/tiny", "GET", headers=AUTH))
        )
        == listing
    )
    failing, listing = models_listing(500)
    assert (
        body(asyncio.run(call(guard(monkeypatch, failing, model_metadata=metadata), "/v1/models", "GET", headers=AUTH)))
        == listing
    )
    assert body(asyncio.run(call(guard(monkeypatch, app), "/v1/models", "GET", headers=AUTH))) == listing


def held_until(release: asyncio.Event, log: list[str]):  # noqa: ANN201 - an ASGI app
    """Answers each request once `release` is set, logging its path when it starts and when it ends."""

    async def app(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        log.append(f"start {scope['path']}")
        await release.wait()
        await echo(scope, receive, send)
        log.append(f"end {scope['path']}")

    return app


def keyed(key: str) -> dict:
    return {**JSON, "authorization": f"Bearer {key}"}


def test_a_flood_from_one_key_leaves_room_for_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two keys, room for 16 sequences: key a's requests of n=8 hold at most half while a is alone; b's request runs
    at once beside them, and a's others wait their turn instead of taking the room."""
    release, log = asyncio.Event(), []
    app = guard(monkeypatch, held_until(release, log), api_keys=("a", "b"), max_running=16, max_n=8, max_waiting=8)

    async def scenario() -> list[list[dict]]:
        flood = [asyncio.ensure_future(call(app, f"/a{i}", body=b'{"n": 8}', headers=keyed("a"))) for i in range(4)]
        while len(log) < 1:
            await asyncio.sleep(0)
        small = asyncio.ensure_future(call(app, "/b", body=b'{"max_tokens": 4}', headers=keyed("b")))
        while len(log) < 2:
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert log == ["start /a0", "start /b"]  # a holds 8 of 16 while alone; b's 1 sequence fits beside it
        assert app._admission.running == {"0": 8, "1": 1} and len(app._admission.waiting["0"]) == 3
        release.set()
        return await asyncio.gather(*flood, small)

    answers = asyncio.run(scenario())
    assert [status(sent) for sent in answers] == [200] * 5
    assert app._admission.running == {} and app._admission.waiting == {}


def test_requests_past_a_keys_waiting_bound_get_a_429_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    release, log = asyncio.Event(), []
    held = held_until(release, log)
    app = guard(
        monkeypatch,
        router({"/r0": held, "/r1": held, "/r2": held, "/late": held, "/v1/models": echo}),
        max_running=8,
        max_n=8,
        max_waiting=2,
    )

    async def scenario() -> list[list[dict]]:
        running = [
            asyncio.ensure_future(call(app, f"/r{i}", body=b'{"n": 8}', headers={**JSON, **AUTH})) for i in range(3)
        ]
        while sum(len(queue) for queue in app._admission.waiting.values()) < 2:
            await asyncio.sleep(0)
        refused = await call(app, "/late", body=b'{"n": 1}', headers={**JSON, **AUTH})
        listing = await call(app, "/v1/models", "GET", headers=AUTH)  # not engine work: it never waits
        release.set()
        return [refused, listing, *await asyncio.gather(*running)]

    refused, listing, *answered = asyncio.run(scenario())
    assert status(refused) == 429 and error(refused)["type"] == "RateLimitError"
    assert dict(refused[0]["headers"])[b"retry-after"] == b"1"  # no request had finished yet
    assert status(listing) == 200 and [status(sent) for sent in answered] == [200] * 3
    # One request of 8 sequences at a time, in the order they came; the refused one never ran.
    assert log == ["start /r0", "end /r0", "start /r1", "end /r1", "start /r2", "end /r2"]


def test_a_drain_refuses_the_requests_still_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    release, log = asyncio.Event(), []
    app = guard(monkeypatch, held_until(release, log), max_running=8, max_n=8, shutdown_grace=5)
    server = SimpleNamespace(should_exit=False)

    async def scenario() -> list[list[dict]]:
        first = asyncio.ensure_future(call(app, "/first", body=b'{"n": 8}', headers={**JSON, **AUTH}))
        waiting = asyncio.ensure_future(call(app, "/waiting", body=b'{"n": 8}', headers={**JSON, **AUTH}))
        while not app._admission.waiting:
            await asyncio.sleep(0)
        app.drain(server)
        refused = await waiting
        release.set()
        return [refused, await first]

    refused, first = asyncio.run(scenario())
    assert status(refused) == 503 and status(first) == 200 and "start /waiting" not in log


def test_a_request_that_leaves_while_waiting_gives_up_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    release, log = asyncio.Event(), []
    app = guard(monkeypatch, held_until(release, log), max_running=8, max_n=8)

    async def scenario() -> list[dict]:
        first = asyncio.ensure_future(call(app, "/first", body=b'{"n": 8}', headers={**JSON, **AUTH}))
        leaving = asyncio.ensure_future(call(app, "/leaving", body=b'{"n": 8}', headers={**JSON, **AUTH}))
        after = asyncio.ensure_future(call(app, "/after", body=b'{"n": 2}', headers={**JSON, **AUTH}))
        while sum(len(q) for q in app._admission.waiting.values()) < 2:
            await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(first, after)

    first, after = asyncio.run(scenario())
    assert status(first) == 200 and status(after) == 200 and "start /leaving" not in log
    assert app._admission.running == {} and app._admission.waiting == {}


def adapter_export(folder, base_hash: str = "b" * 64, rank: int = 16) -> None:  # noqa: ANN001 - a Path
    (folder / "adapter").mkdir(parents=True)
    lora = {"name": "run-b", "path": "adapter", "base_model": "/models/base", "base_hash": base_hash, "rank": rank,
            "stages": ["sft"]}  # fmt: skip
    (folder / "serving.json").write_text(json.dumps({"lora": lora, "gates": "passed", "exported_from": "sft"}))


RUNTIME = middleware.RuntimeAdapters(
    base_model="/models/base", base_hash="b" * 64, served_as="run-a-base", rank_slot=16
)


def test_an_adapter_loaded_while_serving_is_read_from_its_export_and_checked_against_the_base(tmp_path) -> None:
    adapter_export(tmp_path / "b")
    for named in (tmp_path / "b", tmp_path / "b" / "adapter"):  # the export folder, or its adapter folder
        loaded, refusal = middleware.adapter_load({"lora_path": str(named)}, RUNTIME)
        assert refusal is None and loaded["lora_path"] == str((tmp_path / "b" / "adapter").resolve())
        assert loaded["lora_name"] == "run-b" and loaded["pipeline"]["stages"] == ["sft"]
    assert (
        middleware.adapter_load({"lora_path": str(tmp_path / "b"), "lora_name": "mine"}, RUNTIME)[0]["lora_name"]
        == "mine"
    )

    adapter_export(tmp_path / "other", base_hash="c" * 64)
    _, refusal = middleware.adapter_load({"lora_path": str(tmp_path / "other")}, RUNTIME)
    assert "another base" in refusal and "c" * 12 in refusal and "b" * 12 in refusal and "run-a-base" in refusal

    adapter_export(tmp_path / "wide", rank=64)
    _, refusal = middleware.adapter_load({"lora_path": str(tmp_path / "wide")}, RUNTIME)
    assert "rank 64" in refusal and "serve.max_adapter_rank=64" in refusal

    _, refusal = middleware.adapter_load({"lora_path": str(tmp_path)}, RUNTIME)
    assert "not an adapter export" in refusal and "serving.json does not exist" in refusal
    assert middleware.adapter_load({"lora_name": "x"}, RUNTIME) == (
        {"lora_name": "x"},
        None,
    )  # vLLM names what is missing


def test_runtime_adapter_settings_travel_in_the_environment() -> None:
    settings = middleware.Settings(runtime_adapters=RUNTIME)
    assert middleware.Settings.from_environment(settings.environment()).runtime_adapters == RUNTIME
    assert middleware.Settings.from_environment(middleware.Settings().environment()).runtime_adapters is None
