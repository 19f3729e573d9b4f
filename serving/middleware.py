"""The project's ASGI middleware for vLLM's OpenAI-compatible server: the API key on every route, per-request
limits, clear errors for bodies vLLM cannot read, and a bounded drain on SIGTERM.

`serving.vllm_server` hands it to vLLM as `--middleware serving.middleware.ServingGuard`. vLLM builds middleware
without arguments, so the settings travel in the environment (`Settings.environment`): the key in VLLM_API_KEY,
the variable vLLM's own check reads, the rest in PIPELINE_SERVE_* variables.

The API key. vLLM checks it only on paths under /v1 (and a few other prefixes); this middleware checks it on every
HTTP request and WebSocket (`Authorization: Bearer <key>`, compared in constant time) before vLLM sees it. Two
kinds of request stay open, and only these:

- `GET /health`: load balancers, orchestrators' probes and `serving.server_process.wait_healthy` ask it without
  credentials. It answers 200 or 503 (engine dead, or the server draining) and nothing else: no model, no
  request, no metric.
- CORS preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`): browsers never attach credentials
  to a preflight, so a 401 there would lock out every browser client. vLLM's CORS middleware answers them itself
  with the allowed origins and methods; they never reach a route.

Limits. One request may ask for at most `max_n` sequences: `n` times the prompts it carries (a list of prompts
to /v1/completions, of conversations to /v1/chat/completions/batch, of items to /generative_scoring), and at
most `max_tokens` new tokens (`max_tokens`, `max_completion_tokens`, `max_output_tokens`). Without these one
request could hold the engine for minutes (n=4000 x 100 tokens: 72 s, during which a 4-token request waited 68 s).
Tool parameter schemas must be valid JSON Schema.

Refusals agree, streamed or not. vLLM checks part of a request (token ids against the vocabulary, logprob counts,
empty prompts) only when its engine takes the request: unstreamed that is a 400, streamed it was a 200 whose only
event was the error, with a traceback in the server log. The start of a stream is held until its first event, so
that a refusal gets the status and body it gets unstreamed, and is logged as one line.

Shutdown. On SIGTERM (or SIGINT) the server stops accepting connections at once, lets the requests in flight run
for up to `shutdown_grace` seconds, then ends those left: a stream gets an error event (`data: {"error": ...}`,
then `data: [DONE]`), a request not yet answered a 503. vLLM then stops its engine and the process exits 0. A
second signal ends the grace period early. Without this, vLLM stopped the engine first and waited for the
clients: an open stream froze without `[DONE]` and the process never exited.

What the export says of the model. `GET /v1/models` lists each model with a `pipeline` field beside OpenAI's:
`{"gates": "passed" | "failed", "exported_from": <stage>}`, from the export's serving.json, so a client can see
that the model it talks to was exported past failing evaluation gates (`--allow-failed-gates`). vLLM's model card
has no field for it; OpenAI clients keep unknown fields (the openai SDK as `model.model_extra["pipeline"]`).

Every error this middleware answers has OpenAI's shape, as vLLM writes its own:
`{"error": {"message": ..., "type": ..., "param": ..., "code": <HTTP status>}}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.schema import ServeConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
# The recipe's defaults (serve.shutdown_grace, serve.max_n): a server started without the variables holds to them too.
DEFAULT_SHUTDOWN_GRACE = ServeConfig.model_fields["shutdown_grace"].default
DEFAULT_MAX_N = ServeConfig.model_fields["max_n"].default
API_KEY_VARIABLE = "VLLM_API_KEY"
GRACE_VARIABLE = "PIPELINE_SERVE_SHUTDOWN_GRACE"
MAX_N_VARIABLE = "PIPELINE_SERVE_MAX_N"
MAX_TOKENS_VARIABLE = "PIPELINE_SERVE_MAX_TOKENS"
MODEL_METADATA_VARIABLE = "PIPELINE_SERVE_MODEL_METADATA"
MODELS_PATH = "/v1/models"
MODEL_METADATA_FIELD = "pipeline"
TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Body fields that hold a batch: each entry is generated (or scored) as a request of its own.
BATCH_FIELDS = ("prompt", "messages", "items")

logger = logging.getLogger("uvicorn.error")  # the logger uvicorn prints to the server log


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    max_n: int = DEFAULT_MAX_N
    max_tokens: int | None = None  # None: the model length, which vLLM enforces itself
    model_metadata: dict[str, Any] = field(default_factory=dict)  # shown in /v1/models as each model's `pipeline`

    def environment(self) -> dict[str, str]:
        """The variables `from_environment` reads back in the server process."""
        variables = {GRACE_VARIABLE: str(self.shutdown_grace), MAX_N_VARIABLE: str(self.max_n)}
        if self.api_key:
            variables[API_KEY_VARIABLE] = self.api_key
        if self.max_tokens is not None:
            variables[MAX_TOKENS_VARIABLE] = str(self.max_tokens)
        if self.model_metadata:
            variables[MODEL_METADATA_VARIABLE] = json.dumps(self.model_metadata)
        return variables

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Settings:
        # os.environ looked up at call time: a default argument would keep the mapping of import time, which code
        # that replaces os.environ (as some libraries' environment patching does) leaves behind.
        environ = os.environ if environ is None else environ
        max_tokens = environ.get(MAX_TOKENS_VARIABLE)
        return cls(
            api_key=environ.get(API_KEY_VARIABLE) or None,
            shutdown_grace=float(environ.get(GRACE_VARIABLE, DEFAULT_SHUTDOWN_GRACE)),
            max_n=int(environ.get(MAX_N_VARIABLE, DEFAULT_MAX_N)),
            max_tokens=int(max_tokens) if max_tokens else None,
            model_metadata=json.loads(environ.get(MODEL_METADATA_VARIABLE) or "{}"),
        )


def error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


async def send_error(
    send: Send,
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    body = error_body(status, message, kind, param)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _digest(key: str) -> bytes:
    # Digests have one length whatever the key's, so compare_digest's time says nothing about the key either.
    return hashlib.sha256(key.encode()).digest()


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _route(scope: Scope) -> str:
    """The request's path as the app routes it (below any root path the server is mounted at)."""
    return scope["path"].removeprefix(scope.get("root_path", ""))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _batch_size(payload: dict[str, Any]) -> int:
    """How many prompts or conversations a body carries: a list whose entries are lists or strings is a batch; a
    list of token ids (ints) or of chat messages (dicts) is one."""
    for name in BATCH_FIELDS:
        value = payload.get(name)
        if isinstance(value, list) and value and all(isinstance(entry, (list, str)) for entry in value):
            return len(value)
    return 1


def limit_problem(payload: dict[str, Any], settings: Settings) -> tuple[str, str] | None:
    """(message, parameter) if the body asks for more than one request may; values of the wrong type are left to
    vLLM's own validation."""
    n = payload.get("n")
    n = 1 if n is None else n
    if _is_count(n):
        batch = _batch_size(payload)
        if n * batch > settings.max_n:
            asked = f"n={n}" if batch == 1 else f"{n * batch} sequences (n={n} for each of {batch} prompts)"
            return (
                (
                    f"This request asks for {asked}; the server allows at most {settings.max_n} sequences per request. "
                    "Lower n, or send the prompts as separate requests."
                ),
                "n",
            )
    if settings.max_tokens is not None:
        for field in TOKEN_LIMIT_FIELDS:
            value = payload.get(field)
            if _is_count(value) and value > settings.max_tokens:
                return (
                    f"{field}={value} is more than this server allows ({settings.max_tokens}); request fewer tokens.",
                    field,
                )
    return None


def tools_problem(payload: dict[str, Any]) -> tuple[str, str] | None:
    """(message, parameter) if a tool's parameter schema is not valid JSON Schema (its shape is vLLM's to check)."""
    tools = payload.get("tools")
    if not isinstance(tools, list):
        return None
    import jsonschema  # a dependency of vLLM, in whose server this runs

    for index, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        schema = function.get("parameters") if isinstance(function, dict) else None
        if not isinstance(schema, dict):
            continue
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as error:
            return (
                f"tools[{index}] has parameters that are not a valid JSON Schema: {error.message}",
                f"tools.{index}.function.parameters",
            )
    return None


def body_problem(body: bytes, settings: Settings) -> tuple[str, str | None] | None:
    """(message, parameter) of the first reason to answer a JSON body with a 400 before vLLM reads it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"The request body is not valid UTF-8 (byte {error.start}): send JSON encoded in UTF-8.", None
    try:
        payload = json.loads(text)
    except ValueError:
        return None  # vLLM answers malformed JSON with an OpenAI-style 400 itself
    except RecursionError:  # vLLM's parser would hit it too, and answer 500
        return "The request body nests JSON too deeply to be read.", None
    if not isinstance(payload, dict):
        return None
    return limit_problem(payload, settings) or tools_problem(payload)


def _reads_json(scope: Scope) -> bool:
    """A POST whose body FastAPI parses as JSON: declared JSON, or no content type at all."""
    if scope["method"] != "POST":
        return False
    content_type = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
    return content_type in (b"", b"application/json") or content_type.endswith(b"+json")


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's own messages (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def annotate_models(body: bytes, metadata: dict[str, Any]) -> bytes:
    """A /v1/models answer with `metadata` as each model's `pipeline` field; any other body unchanged."""
    try:
        listing = json.loads(body)
    except ValueError:
        return body
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        return body
    for model in listing["data"]:
        if isinstance(model, dict):
            model[MODEL_METADATA_FIELD] = metadata
    return json.dumps(listing).encode()


def _annotating_models(send: Send, metadata: dict[str, Any]) -> Send:
    """A send that holds the response until its body is complete, then sends it annotated, with its new length."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def annotated(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        body = b"".join(chunks)
        if start["status"] == 200:
            body = annotate_models(body, metadata)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return None

    return annotated


def _error_event(chunk: bytes) -> dict[str, Any] | None:
    """The error of a server-sent event `data: {"error": {...}}`, or None for any other chunk."""
    if not chunk.startswith(b"data: {"):
        return None
    try:
        event = json.loads(chunk.removeprefix(b"data: ").split(b"\n\n", 1)[0])
    except ValueError:
        return None
    error = event.get("error") if isinstance(event, dict) else None
    return error if isinstance(error, dict) and isinstance(error.get("code"), int) else None


def _refusing_failed_streams(send: Send) -> Send:
    """A send that answers a stream the engine refused before its first token as the same request unstreamed is
    answered: with the error's own status and OpenAI's error body, not a 200 whose only event is an error.

    vLLM checks much of a request (token ids against the vocabulary, logprob counts, empty prompts) only when the
    engine takes it; streamed, the 200 and its headers have gone out by then. So the start of an event stream is
    held until its first event, which is either output (sent on unchanged) or that refusal."""
    held: Message | None = None
    refused = False

    async def sending(message: Message) -> None:
        nonlocal held, refused
        if refused:
            return None
        if message["type"] == "http.response.start":
            if message["status"] == 200 and _content_type(message).startswith(b"text/event-stream"):
                held = message
                return None
            return await send(message)
        if held is not None and message["type"] == "http.response.body":
            start, held = held, None
            error = _error_event(message.get("body", b""))
            if error is not None and 400 <= error["code"] < 500:
                refused = True
                return await send_error(
                    send, error["code"], str(error.get("message")), str(error.get("type")), error.get("param")
                )
            await send(start)
        return await send(message)

    return sending


class RefusedRequestLog(logging.Filter):
    """Logs a request that vLLM refused inside a stream as one line, as vLLM logs the same refusal unstreamed.

    vLLM's stream generators log every exception with its traceback ("Error in chat completion stream generator"),
    a client's out-of-vocabulary stop token as much as an engine failure. Which is which is vLLM's own mapping of
    exceptions to HTTP statuses: below 500, the client's mistake, logged without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, Exception) and "stream generator" in str(record.msg):
            from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

            status = create_error_response(error).error.code
            if status < 500:
                record.msg = f"Refused a streamed request ({status}): {type(error).__name__}: {error}"
                record.args, record.exc_info, record.exc_text = (), None, None
                record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def _content_type(start: Message) -> bytes:
    return dict((k.lower(), v) for k, v in start.get("headers", [])).get(b"content-type", b"")


class _Response:
    """What an app has sent of its response, so a request cut off at shutdown can still be ended properly."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.event_stream = False
        self.complete = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.event_stream = _content_type(message).startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    async def end_cut_off(self, grace: float) -> None:
        message = f"The server shut down before this request finished (shutdown grace {grace:g} s); retry it."
        if not self.started:
            await send_error(self._send, 503, message, "ServiceUnavailableError")
        elif self.event_stream and not self.complete:
            event = b"data: " + error_body(503, message, "ServiceUnavailableError") + b"\n\ndata: [DONE]\n\n"
            await self._send({"type": "http.response.body", "body": event, "more_body": False})


class ServingGuard:
    """The middleware; see the module's docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.settings = Settings.from_environment()
        self._key = _digest(self.settings.api_key) if self.settings.api_key else None
        self._running: set[asyncio.Future] = set()  # the app's handling of each request in flight
        self._cut_off: set[asyncio.Future] = set()  # those cancelled because the grace period ran out
        self._draining = False
        for handler in logging.getLogger("vllm").handlers:  # vLLM's loggers do not propagate past "vllm"
            if not any(isinstance(installed, RefusedRequestLog) for installed in handler.filters):
                handler.addFilter(RefusedRequestLog())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self._take_over_shutdown(scope)
            return await self.app(scope, receive, send)
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await send_error(
                send,
                401,
                "Missing or wrong API key: send it as 'Authorization: Bearer <key>'.",
                "AuthenticationError",
                headers=((b"www-authenticate", b"Bearer"),),
            )
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        if self._draining:
            return await send_error(
                send, 503, "The server is shutting down; retry on another instance.", "ServiceUnavailableError"
            )
        if _reads_json(scope):
            body = await _read_body(receive)
            if body is None:
                return None
            problem = body_problem(body, self.settings)
            if problem:
                return await send_error(send, 400, problem[0], "BadRequestError", problem[1])
            receive = _replay(body, receive)
        await self._run(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        if self._key is None:
            return True
        preflight = (
            scope.get("method") == "OPTIONS"
            and _header(scope, b"origin") is not None
            and _header(scope, b"access-control-request-method") is not None
        )
        if _route(scope) in OPEN_PATHS or preflight:
            return True
        scheme, _, token = (_header(scope, b"authorization") or b"").decode("latin-1").partition(" ")
        return hmac.compare_digest(_digest(token if scheme.lower() == "bearer" else ""), self._key)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _Response(send)
        app_send = _refusing_failed_streams(response.send)
        if self.settings.model_metadata and scope["method"] == "GET" and _route(scope) == MODELS_PATH:
            app_send = _annotating_models(response.send, self.settings.model_metadata)
        # The app runs as a task of its own, so that the end of the grace period can cancel it and this request
        # still answers; a cancellation of the request itself reaches the app through the await.
        handling = asyncio.ensure_future(self.app(scope, receive, app_send))
        self._running.add(handling)
        try:
            await handling
        except asyncio.CancelledError:
            if handling not in self._cut_off:
                raise
        finally:
            self._running.discard(handling)
            cut_off = handling in self._cut_off
            self._cut_off.discard(handling)
        if cut_off:  # also when the app swallowed the cancellation
            await response.end_cut_off(self.settings.shutdown_grace)

    def _take_over_shutdown(self, scope: Scope) -> None:
        """Replace vLLM's SIGTERM/SIGINT handlers (installed before the app starts) with the drain.

        vLLM's own handler stops the engine first, then waits for every open connection without a deadline. Here
        the HTTP server stops accepting, the requests in flight get the grace period, and the engine stops after
        the HTTP server, on vLLM's normal exit path.
        """
        server = getattr(getattr(scope.get("app"), "state", None), "server", None)
        if server is None:
            logger.warning(
                "ServingGuard: vLLM did not expose its HTTP server (app.state.server); SIGTERM keeps vLLM's own"
                " handling, without a drain."
            )
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.drain, server)

    def drain(self, server: Any) -> None:
        """Stop accepting (`server` is uvicorn's) and give the requests in flight the grace period; called again,
        end them now."""
        if self._draining:
            logger.info("[shutdown] second signal: ending the %d requests still running now", len(self._running))
            self._end_running()
            return
        self._draining = True
        logger.info(
            "[shutdown] stopped accepting; %d requests in flight get up to %g s",
            len(self._running),
            self.settings.shutdown_grace,
        )
        server.should_exit = True  # uvicorn closes its listening sockets, then waits for the open connections
        asyncio.get_running_loop().call_later(self.settings.shutdown_grace, self._end_running)

    def _end_running(self) -> None:
        if self._running:
            logger.info("[shutdown] grace period over: ending %d requests", len(self._running))
        for handling in list(self._running):
            self._cut_off.add(handling)
            handling.cancel()
