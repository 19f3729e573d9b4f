"""The project's ASGI middleware for vLLM's OpenAI-compatible server: the API keys on every route, per-request
limits, admission in turn per key, clear errors for bodies vLLM cannot read, and a bounded drain on SIGTERM.

`serving.vllm_server` hands it to vLLM as `--middleware serving.middleware.ServingGuard`. vLLM builds middleware
without arguments, so the settings travel in the environment (`Settings.environment`, PIPELINE_SERVE_* variables).

The API keys. vLLM checks its key only on paths under /v1 (and a few other prefixes); this middleware checks the
keys on every HTTP request and WebSocket (`Authorization: Bearer <key>`, compared in constant time) before vLLM sees
it. Two kinds of request stay open, and only these:

- `GET /health`: load balancers, orchestrators' probes and `pipeline.core.server_process.wait_healthy` ask it without
  credentials. It answers 200 or 503 (engine dead, or the server draining) and nothing else: no model, no
  request, no metric.
- CORS preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`): browsers never attach credentials
  to a preflight, so a 401 there would lock out every browser client. vLLM's CORS middleware answers them itself
  with the allowed origins and methods; they never reach a route.

Limits. One request may ask for at most `max_n` sequences: `n` times the prompts it carries (a list of prompts
to /v1/completions, of conversations to /v1/chat/completions/batch, of items to /generative_scoring), and at
most `max_tokens` new tokens (`max_tokens`, `max_completion_tokens`, `max_output_tokens`). Without these one
request could hold the engine for minutes (n=4000 x 100 tokens: 72 s, during which a 4-token request waited 68 s).
Bodies are read as vLLM reads them (a byte-order mark skipped, "150" and 150.0 read as 150) and passed on as
checked. Tool parameter schemas must be valid JSON Schema, nested at most as deep as vLLM reads a schema. A
client's request id (X-Request-Id or the body's `request_id`) must be short and printable: it goes into log lines.
Redirects point at a path on this server, never at the Host header's.

Admission. At most `max_running` sequences are generated at once (vLLM batches as many); a request that would
pass that waits its turn, the turns going round the API keys, and a key with `max_waiting` requests waiting gets
429 with Retry-After. With several keys, one key holds at most half the room while alone and an equal share once
others wait (`Admission`), so that one client's flood waits behind itself.

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

Adapters loaded while serving (`serve.runtime_adapters`). vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter
need the API key like every route. A load names an adapter export (`lora_path`: the export folder, or its adapter
folder); its recorded base weights hash must be the served base's, and its rank within the server's slots, else a
400 naming both bases (or the rank), and the server goes on serving what it served. /v1/models shows a loaded
adapter's export record, and stops listing an unloaded one.

Every error this middleware answers has OpenAI's shape, as vLLM writes its own:
`{"error": {"message": ..., "type": ..., "param": ..., "code": <HTTP status>}}`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import graphlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import statistics
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import TypeAdapter, ValidationError

from pipeline.core.errors import PipelineError
from pipeline.core.schema import ServeConfig
from serving import adapter_exports

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
# The recipe's defaults (serve.shutdown_grace, serve.max_n): a server started without the variables holds to them too.
DEFAULT_SHUTDOWN_GRACE = ServeConfig.model_fields["shutdown_grace"].default
DEFAULT_MAX_N = ServeConfig.model_fields["max_n"].default
DEFAULT_MAX_RUNNING = ServeConfig.model_fields["max_running_sequences"].default
DEFAULT_MAX_WAITING = ServeConfig.model_fields["max_waiting_requests"].default
CONNECTION_LIMITS = {  # the limits a connection is held to (serve.* keys of the same names), and their variables
    "header_timeout": "PIPELINE_SERVE_HEADER_TIMEOUT",
    "body_timeout": "PIPELINE_SERVE_BODY_TIMEOUT",
    "max_header_bytes": "PIPELINE_SERVE_MAX_HEADER_BYTES",
    "max_body_bytes": "PIPELINE_SERVE_MAX_BODY_BYTES",
    "max_connections": "PIPELINE_SERVE_MAX_CONNECTIONS",
}
API_KEYS_VARIABLE = "PIPELINE_SERVE_API_KEYS"
MAX_RUNNING_VARIABLE = "PIPELINE_SERVE_MAX_RUNNING_SEQUENCES"
MAX_WAITING_VARIABLE = "PIPELINE_SERVE_MAX_WAITING_REQUESTS"
GRACE_VARIABLE = "PIPELINE_SERVE_SHUTDOWN_GRACE"
MAX_N_VARIABLE = "PIPELINE_SERVE_MAX_N"
MAX_TOKENS_VARIABLE = "PIPELINE_SERVE_MAX_TOKENS"
MODEL_METADATA_VARIABLE = "PIPELINE_SERVE_MODEL_METADATA"
MODELS_PATH = "/v1/models"
RUNTIME_ADAPTERS_VARIABLE = "PIPELINE_SERVE_RUNTIME_ADAPTERS"
LOAD_ADAPTER_PATH = "/v1/load_lora_adapter"  # vLLM's routes, attached where runtime LoRA updating is allowed
UNLOAD_ADAPTER_PATH = "/v1/unload_lora_adapter"
MODEL_METADATA_FIELD = "pipeline"
TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# vLLM's own limit on a structured-output schema's nesting (MAX_STRUCTURED_OUTPUT_JSON_NESTING), held to tool schemas.
MAX_SCHEMA_NESTING = 64
# A client's request id (X-Request-Id, or the body's request_id) becomes the response's id and goes into log lines:
# printable, without spaces, bounded, so that it cannot write a line of its own into the log.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
REQUEST_ID_RULE = (
    "{where} may hold only letters, digits and . _ : @ + = - (1 to 128 of them); send another, or none and the server "
    "makes one."
)
REDIRECTS = frozenset({301, 302, 303, 307, 308})
COUNT = TypeAdapter(int)  # pydantic's lax reading of an int field, as vLLM's request models read counts
# Body fields that hold a batch: each entry is generated (or scored) as a request of its own.
BATCH_FIELDS = ("prompt", "messages", "items")

logger = logging.getLogger("uvicorn.error")  # the logger uvicorn prints to the server log


@dataclass(frozen=True)
class RuntimeAdapters:
    """What an adapter loaded while serving is checked against: the served base (its weights hash, as adapter
    exports record it) and the rank of the server's LoRA slots."""

    base_model: str
    base_hash: str
    served_as: str  # the base's model name on this server
    rank_slot: int


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...] = ()  # none: every route open
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    max_n: int = DEFAULT_MAX_N
    max_tokens: int | None = None  # None: the model length, which vLLM enforces itself
    model_metadata: dict[str, Any] = field(default_factory=dict)  # model id -> its `pipeline` field in /v1/models
    max_running: int = DEFAULT_MAX_RUNNING
    max_waiting: int = DEFAULT_MAX_WAITING
    header_timeout: float = ServeConfig.model_fields["header_timeout"].default
    body_timeout: float = ServeConfig.model_fields["body_timeout"].default
    max_header_bytes: int = ServeConfig.model_fields["max_header_bytes"].default
    max_body_bytes: int = ServeConfig.model_fields["max_body_bytes"].default
    max_connections: int = ServeConfig.model_fields["max_connections"].default
    runtime_adapters: RuntimeAdapters | None = None  # None: adapters are not loaded while serving

    def environment(self) -> dict[str, str]:
        """The variables `from_environment` reads back in the server process."""
        variables = {
            GRACE_VARIABLE: str(self.shutdown_grace),
            MAX_N_VARIABLE: str(self.max_n),
            MAX_RUNNING_VARIABLE: str(self.max_running),
            MAX_WAITING_VARIABLE: str(self.max_waiting),
            **{variable: str(getattr(self, name)) for name, variable in CONNECTION_LIMITS.items()},
        }
        if self.api_keys:
            variables[API_KEYS_VARIABLE] = json.dumps(list(self.api_keys))
        if self.max_tokens is not None:
            variables[MAX_TOKENS_VARIABLE] = str(self.max_tokens)
        if self.model_metadata:
            variables[MODEL_METADATA_VARIABLE] = json.dumps(self.model_metadata)
        if self.runtime_adapters is not None:
            variables[RUNTIME_ADAPTERS_VARIABLE] = json.dumps(dataclasses.asdict(self.runtime_adapters))
        return variables

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Settings:
        # os.environ looked up at call time: a default argument would keep the mapping of import time, which code
        # that replaces os.environ (as some libraries' environment patching does) leaves behind.
        environ = os.environ if environ is None else environ
        max_tokens = environ.get(MAX_TOKENS_VARIABLE)
        runtime = environ.get(RUNTIME_ADAPTERS_VARIABLE)
        return cls(
            runtime_adapters=RuntimeAdapters(**json.loads(runtime)) if runtime else None,
            api_keys=tuple(json.loads(environ.get(API_KEYS_VARIABLE) or "[]")),
            shutdown_grace=float(environ.get(GRACE_VARIABLE, DEFAULT_SHUTDOWN_GRACE)),
            max_n=int(environ.get(MAX_N_VARIABLE, DEFAULT_MAX_N)),
            max_tokens=int(max_tokens) if max_tokens else None,
            model_metadata=json.loads(environ.get(MODEL_METADATA_VARIABLE) or "{}"),
            max_running=int(environ.get(MAX_RUNNING_VARIABLE, DEFAULT_MAX_RUNNING)),
            max_waiting=int(environ.get(MAX_WAITING_VARIABLE, DEFAULT_MAX_WAITING)),
            **{
                name: type(getattr(cls, name))(environ[variable])
                for name, variable in CONNECTION_LIMITS.items()
                if variable in environ
            },
        )


def parse_api_keys(value: str | None) -> tuple[str, ...]:
    """The keys a serve.api_key_env variable holds: one, or several separated by commas (one per client)."""
    return tuple(key.strip() for key in (value or "").split(",") if key.strip())


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


def sequences(payload: dict[str, Any]) -> int:
    """How many sequences a body asks vLLM to generate: n times its prompts (1 where n is not a count)."""
    n = payload.get("n")
    return (n if _is_count(n) and n > 0 else 1) * _batch_size(payload)


def normalise_counts(payload: dict[str, Any]) -> bool:
    """Write each count field (n and the token limits) as the integer vLLM will read it; True if any changed.

    vLLM's request models read these fields in pydantic's lax mode, where "150", 150.0 and " 1_50 " are all 150: a
    check that saw only ints let `max_tokens: "150"` past a limit of 17. A value pydantic refuses is left for vLLM
    to refuse."""
    changed = False
    for name in ("n", *TOKEN_LIMIT_FIELDS):
        value = payload.get(name)
        if value is None or _is_count(value):
            continue
        try:
            payload[name] = COUNT.validate_python(value)
        except ValidationError:
            continue
        changed = True
    return changed


def limit_problem(payload: dict[str, Any], settings: Settings) -> tuple[str, str] | None:
    """(message, parameter) if the body asks for more than one request may; values of the wrong type are left to
    vLLM's own validation."""
    total = sequences(payload)
    if total > settings.max_n:
        batch = _batch_size(payload)
        n = total // batch
        asked = f"n={n}" if batch == 1 else f"{total} sequences (n={n} for each of {batch} prompts)"
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


def nesting_depth(value: Any, limit: int) -> int:
    """How many levels of objects and arrays `value` has (a scalar: 0), counted level by level without recursion;
    counting stops past `limit`."""
    level, depth = [value], 0
    while depth <= limit:
        level = [node for node in level if isinstance(node, (dict, list))]
        if not level:
            return depth
        depth += 1
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)]
    return depth


def _pointer_target(root: Any, ref: str) -> tuple[bool, Any]:
    """(found, node) for a local JSON pointer reference ("#", "#/$defs/item")."""
    node = root
    for token in ref[2:].split("/") if ref != "#" else []:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False, None
    return True, node


# Keywords whose subschemas apply to the same value as the schema that holds them: following one moves no further
# into the value, so a loop of them (through $ref) describes a value only by itself.
IN_PLACE = ("allOf", "anyOf", "oneOf", "if", "then", "else")


def reference_problem(schema: dict[str, Any]) -> str | None:
    """Why a schema cannot be turned into a grammar: a local $ref to nothing, or a loop of references that reaches
    itself without going into a property or an item ({"$ref": "#"}: vLLM's structured output answered it with a
    500). Recursion through properties or items (a tree) is fine. References by anchor or to other documents are
    left to vLLM."""
    nodes: dict[int, dict] = {}
    pending: list[Any] = [schema]
    while pending:  # every object in the schema, without recursion (its depth is already bounded)
        node = pending.pop()
        if isinstance(node, dict):
            nodes[id(node)] = node
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    edges: dict[int, set[int]] = {}
    via: dict[tuple[int, int], str] = {}  # what leads from one node to the next, for the message
    for key, node in nodes.items():
        edges[key] = set()
        ref = node.get("$ref")
        targets = []
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            found, target = _pointer_target(schema, ref)
            if not found:
                return f"refers to {ref}, which the schema does not have"
            targets.append((ref, target))
        for keyword in IN_PLACE:
            children = node.get(keyword)
            targets += [(keyword, child) for child in (children if isinstance(children, list) else [children])]
        for label, target in targets:
            if isinstance(target, dict):
                edges[key].add(id(target))
                via.setdefault((key, id(target)), label)
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as error:
        cycle = error.args[1]
        loop = [via[(a, b)] for b, a in zip(cycle, cycle[1:])][::-1]  # the sorter lists a cycle against its edges
        refs = [label for label in loop if label.startswith("#")]
        return f"refers to itself ({' -> '.join(refs or loop)}) without describing any part of the value"
    return None


def _schemas(payload: dict[str, Any]) -> list[tuple[dict, str]]:
    """(schema, its parameter) for every JSON schema the request asks vLLM to generate by."""
    found: list[tuple[Any, str]] = []
    tools = payload.get("tools")
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict):
            found.append((function.get("parameters"), f"tools.{index}.function.parameters"))
    response_format = payload.get("response_format")
    json_schema = response_format.get("json_schema") if isinstance(response_format, dict) else None
    if isinstance(json_schema, dict):
        found.append((json_schema.get("schema"), "response_format.json_schema.schema"))
    structured = payload.get("structured_outputs")
    if isinstance(structured, dict):
        found.append((structured.get("json"), "structured_outputs.json"))
    found.append((payload.get("guided_json"), "guided_json"))
    return [(schema, param) for schema, param in found if isinstance(schema, dict)]


def schemas_problem(payload: dict[str, Any]) -> tuple[str, str] | None:
    """(message, parameter) if a schema the request gives (tool parameters, response_format, vLLM's structured
    outputs) nests deeper than this server reads, is not valid JSON Schema, or refers to itself or to nothing."""
    import jsonschema  # a dependency of vLLM, in whose server this runs

    for schema, param in _schemas(payload):
        # Measured before the schema is walked: jsonschema's check recurses, and 100 levels overflowed the stack
        # (a 500 and a 147 KB traceback, from a 4 KB request).
        if nesting_depth(schema, MAX_SCHEMA_NESTING) > MAX_SCHEMA_NESTING:
            return (
                f"{param} is nested more than {MAX_SCHEMA_NESTING} levels deep, the most this server reads in a "
                "schema; flatten the schema.",
                param,
            )
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as error:
            return f"{param} is not a valid JSON Schema: {error.message}", param
        reason = reference_problem(schema)
        if reason:
            return f"{param} {reason}: no output can be generated by it; fix the $ref.", param
    return None


def request_id_problem(payload: dict[str, Any]) -> tuple[str, str] | None:
    """(message, parameter) if the body names a request id that could not be written to a log line as it is."""
    value = payload.get("request_id")
    if value is None or (isinstance(value, str) and REQUEST_ID.fullmatch(value)):
        return None
    return REQUEST_ID_RULE.format(where="The body's request_id"), "request_id"


def structured_outputs_problem(payload: dict[str, Any]) -> tuple[str, str] | None:
    """(message, parameter) if vLLM's `structured_outputs` is neither an object nor null: vLLM's own check reads it
    as a mapping before validating it, and answered `false` with a 500 ("'bool' object has no attribute 'get'")."""
    value = payload.get("structured_outputs")
    if value is None or isinstance(value, dict):
        return None
    return (
        f"structured_outputs must be an object (json, regex, choice, grammar, ...) or null, not {_json_type(value)}.",
        "structured_outputs",
    )


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: an error names it instead of echoing a value of any size back."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array"}.get(type(value), type(value).__name__)


def adapter_load(payload: dict[str, Any], runtime: RuntimeAdapters) -> tuple[dict[str, Any] | None, str | None]:
    """A load of an adapter while serving, as vLLM is to read it, and what /v1/models is to show of it; or None and
    why it is refused. `lora_path` names an adapter export (the export folder or its adapter folder): vLLM gets the
    adapter folder, and `lora_name` defaults to the export's run. An export of another base, or of a rank above the
    server's slots, is refused: vLLM would apply the adapter to weights it was not trained on, or fail with a 500."""
    path = payload.get("lora_path")
    if not isinstance(path, str) or not path:
        return payload, None  # vLLM's own 400 names the missing field
    try:
        adapter = adapter_exports.read(adapter_exports.export_folder(Path(path)))
    except (PipelineError, OSError, ValueError, KeyError, TypeError) as error:
        return None, f"lora_path {path!r} is not an adapter export the server can check: {error}"
    refusal = adapter_exports.other_base(adapter, runtime.base_model, runtime.base_hash, runtime.served_as)
    if refusal:
        return None, refusal[0].upper() + refusal[1:]
    if adapter.rank > runtime.rank_slot:
        return None, (
            f"The adapter {adapter.name} has rank {adapter.rank}, above this server's LoRA slots ({runtime.rank_slot}):"
            f" restart the server with serve.max_adapter_rank={adapter.rank} or more."
        )
    loaded = {**payload, "lora_path": str(adapter.path)}
    loaded.setdefault("lora_name", adapter.name)
    return {**loaded, MODEL_METADATA_FIELD: adapter.record}, None


@dataclass(frozen=True)
class CheckedBody:
    body: bytes  # what vLLM is to read
    problem: tuple[str, str | None] | None = None  # (message, parameter) of a reason to answer 400 instead
    sequences: int = 1  # what the request asks vLLM to generate at once


def check_body(body: bytes, settings: Settings) -> CheckedBody:
    """The body vLLM is to read, and the first reason to answer it with a 400 instead.

    The body is read as vLLM reads it: a UTF-8 byte-order mark is skipped (FastAPI's parser skips it; this check
    once did not, and let any body through unchecked behind one) and counts are read as vLLM reads them. Where
    either changed something, vLLM gets the body as checked, re-encoded, so that the two cannot disagree."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        message = f"The request body is not valid UTF-8 (byte {error.start}): send JSON encoded in UTF-8."
        return CheckedBody(body, (message, None))
    unmarked = text.removeprefix("\ufeff")
    too_deep = CheckedBody(body, ("The request body nests JSON too deeply to be read.", None))
    try:
        payload = json.loads(unmarked)
    except ValueError:
        return CheckedBody(body)  # vLLM answers malformed JSON with an OpenAI-style 400 itself
    except RecursionError:  # vLLM's parser would hit it too, and answer 500
        return too_deep
    if not isinstance(payload, dict):
        return CheckedBody(body)
    if normalise_counts(payload) or len(unmarked) != len(text):
        try:
            body = json.dumps(payload).encode()
        except RecursionError:  # read within the limit, but the encoder's stack runs deeper
            return too_deep
    problem = (
        limit_problem(payload, settings)
        or structured_outputs_problem(payload)
        or schemas_problem(payload)
        or request_id_problem(payload)
    )
    return CheckedBody(body, problem, sequences(payload))


def _with_length(scope: Scope, length: int) -> Scope:
    """The scope with its content-length header made the length of the body the app gets."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def _relative_redirects(send: Send) -> Send:
    """A send that makes each redirect's Location a path on this server. Starlette builds the Location of its
    trailing-slash redirect from the request's Host header, which the client chooses: a redirect to anywhere."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] in REDIRECTS:
            headers = []
            for key, value in message.get("headers", []):
                if key.lower() == b"location":
                    target = urlsplit(value.decode("latin-1"))
                    value = urlunsplit(("", "", target.path or "/", target.query, "")).encode("latin-1")
                headers.append((key, value))
            message = {**message, "headers": headers}
        await send(message)

    return sending


def _reads_json(scope: Scope) -> bool:
    """A POST whose body FastAPI parses as JSON: declared JSON, or no content type at all."""
    if scope["method"] != "POST":
        return False
    content_type = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
    return content_type in (b"", b"application/json") or content_type.endswith(b"+json")


class BodyTooLarge(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body; None if the client disconnected first. Raises BodyTooLarge past `limit` bytes,
    having read no more than that and one message."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's own messages (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def annotate_models(body: bytes, metadata: dict[str, Any]) -> bytes:
    """A /v1/models answer with each model's entry of `metadata` (by model id) as its `pipeline` field; any other
    body unchanged."""
    try:
        listing = json.loads(body)
    except ValueError:
        return body
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        return body
    for model in listing["data"]:
        if isinstance(model, dict) and isinstance(metadata.get(model.get("id")), dict):
            model[MODEL_METADATA_FIELD] = metadata[model["id"]]
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

    async def end_cut_off(self, given: float) -> None:
        message = (
            f"The server shut down before this request finished (it ran {given:.1f} s past the shutdown signal); "
            "retry it."
        )
        if not self.started:
            await send_error(self._send, 503, message, "ServiceUnavailableError")
        elif self.event_stream and not self.complete:
            event = b"data: " + error_body(503, message, "ServiceUnavailableError") + b"\n\ndata: [DONE]\n\n"
            await self._send({"type": "http.response.body", "body": event, "more_body": False})


class Admission:
    """Which requests run now and which wait: at most `capacity` sequences at once, waiting requests taken in turn
    from each API key (first come, first served within a key), and at most `max_waiting` waiting per key.

    Without it, vLLM took every request into one queue: 63 requests of n=8 and 188 tokens from one client made
    another client's 4-token request wait 35.9 s. With several keys, a key holds at most an equal share of the
    capacity among the keys with requests (and at most half while it is alone), so another key's request finds room
    at once; a request always fits when its key holds nothing."""

    def __init__(self, capacity: int, max_waiting: int, keys: int) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.shared = keys > 1
        self.running: dict[str, int] = {}  # sequences each key has running
        self.waiting: dict[str, collections.deque[tuple[int, asyncio.Future]]] = {}
        self._turns: collections.deque[str] = collections.deque()  # keys with requests waiting, in turn order
        self._seconds = collections.deque(maxlen=32)  # how long recent requests ran, for Retry-After

    @property
    def free(self) -> int:
        return self.capacity - sum(self.running.values())

    def _share(self) -> float:
        active = len(set(self.running) | set(self.waiting))
        return self.capacity / max(active, 2 if self.shared else 1)

    def _fits(self, key: str, cost: int) -> bool:
        held = self.running.get(key, 0)
        return cost <= self.free and (held == 0 or held + cost <= self._share())

    async def enter(self, key: str, cost: int) -> bool:
        """Wait for the request's turn; False if its key already has `max_waiting` requests waiting."""
        if not self.waiting.get(key) and self._fits(key, cost):
            self._hold(key, cost)
            return True
        queue = self.waiting.setdefault(key, collections.deque())
        if len(queue) >= self.max_waiting:
            if not queue:
                del self.waiting[key]
            return False
        turn = asyncio.get_running_loop().create_future()
        queue.append((cost, turn))
        if key not in self._turns:
            self._turns.append(key)
        try:
            return await turn
        except asyncio.CancelledError:  # the client left, or the server is ending it, while it waited
            if turn.done() and not turn.cancelled() and turn.result():
                self.leave(key, cost, 0.0)  # its turn had come: give it back
            else:
                self._forget(key, turn)
            raise

    def leave(self, key: str, cost: int, seconds: float) -> None:
        self.running[key] -= cost
        if not self.running[key]:
            del self.running[key]
        if seconds:
            self._seconds.append(seconds)
        self._admit()

    def refuse_waiting(self) -> None:
        """End every wait with a refusal (the server is shutting down)."""
        for queue in self.waiting.values():
            for _, turn in queue:
                if not turn.done():
                    turn.set_result(False)
        self.waiting.clear()
        self._turns.clear()

    def retry_after(self) -> int:
        """Seconds a refused client should wait: how long a recent request ran (1 s before any has finished)."""
        return max(1, math.ceil(statistics.median(self._seconds))) if self._seconds else 1

    def _hold(self, key: str, cost: int) -> None:
        self.running[key] = self.running.get(key, 0) + cost

    def _forget(self, key: str, turn: asyncio.Future) -> None:
        queue = self.waiting.get(key)
        if queue is None:
            return
        for entry in list(queue):
            if entry[1] is turn:
                queue.remove(entry)
        if not queue:
            del self.waiting[key]
            if key in self._turns:
                self._turns.remove(key)
        self._admit()  # a large request that waited may have held back smaller ones behind it

    def _admit(self) -> None:
        """Give waiting requests their turn, one key after another, while they fit."""
        progress = True
        while progress and self._turns:
            progress = False
            for _ in range(len(self._turns)):
                key = self._turns[0]
                self._turns.rotate(-1)
                queue = self.waiting[key]
                cost, turn = queue[0]
                if turn.done():  # its request was cancelled while it waited; `enter` forgets it
                    queue.popleft()
                elif not self._fits(key, cost):
                    continue
                else:
                    queue.popleft()
                    self._hold(key, cost)
                    turn.set_result(True)
                progress = True
                if not queue:
                    del self.waiting[key]
                    self._turns.remove(key)
                    break  # the rotation changed under the loop: start the round again


class ServingGuard:
    """The middleware; see the module's docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.settings = Settings.from_environment()
        self._keys = [_digest(key) for key in self.settings.api_keys]
        self._model_metadata = dict(self.settings.model_metadata)  # adapters loaded while serving add theirs
        self._admission = Admission(self.settings.max_running, self.settings.max_waiting, len(self._keys))
        self._running: set[asyncio.Future] = set()  # the app's handling of each request in flight
        self._cut_off: set[asyncio.Future] = set()  # those cancelled because the grace period ran out
        self._draining = False
        self._drain_began = 0.0  # the event loop's clock when the first signal came
        self._given = 0.0  # seconds the requests cut off had after it (the grace, or less after a second signal)
        for handler in logging.getLogger("vllm").handlers:  # vLLM's loggers do not propagate past "vllm"
            if not any(isinstance(installed, RefusedRequestLog) for installed in handler.filters):
                handler.addFilter(RefusedRequestLog())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self._take_over_shutdown(scope)
            return await self.app(scope, receive, send)
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        client = self._client(scope)
        if client is None:
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
            return await self._refuse_draining(send)
        request_id = _header(scope, b"x-request-id")
        if request_id is not None and not REQUEST_ID.fullmatch(request_id.decode("latin-1")):
            return await send_error(
                send, 400, REQUEST_ID_RULE.format(where="The X-Request-Id header"), "BadRequestError", "X-Request-Id"
            )
        if not _reads_json(scope):
            return await self._run(scope, receive, send)
        declared = _header(scope, b"content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
                raise BodyTooLarge
            body = await _read_body(receive, self.settings.max_body_bytes)
        except BodyTooLarge:
            return await send_error(
                send,
                413,
                f"The request body is larger than this server reads ({self.settings.max_body_bytes} bytes).",
                "BadRequestError",
            )
        if body is None:
            return None
        checked = check_body(body, self.settings)
        if checked.problem:
            return await send_error(send, 400, checked.problem[0], "BadRequestError", checked.problem[1])
        if self.settings.runtime_adapters is not None and _route(scope) in (LOAD_ADAPTER_PATH, UNLOAD_ADAPTER_PATH):
            return await self._change_adapters(scope, receive, send, checked.body)
        if not await self._admission.enter(client, checked.sequences):
            if self._draining:
                return await self._refuse_draining(send)
            retry = self._admission.retry_after()
            return await send_error(
                send,
                429,
                f"This API key already has {self.settings.max_waiting} requests waiting for their turn; retry in "
                f"{retry} s.",
                "RateLimitError",
                headers=((b"retry-after", str(retry).encode()),),
            )
        began = asyncio.get_running_loop().time()
        try:
            await self._run(_with_length(scope, len(checked.body)), _replay(checked.body, receive), send)
        finally:
            self._admission.leave(client, checked.sequences, asyncio.get_running_loop().time() - began)

    async def _change_adapters(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Load or unload an adapter (vLLM's routes), loads checked against the served base, and /v1/models' records
        kept in step. Outside the admission: nothing is generated. Requests in flight on an adapter being unloaded
        finish on it (vLLM drops only the name); later ones get vLLM's 404."""
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return await self._run(scope, receive, send)  # vLLM answers what it cannot read
        record = None
        if _route(scope) == LOAD_ADAPTER_PATH:
            loaded, refusal = adapter_load(payload, self.settings.runtime_adapters)
            if refusal:
                return await send_error(send, 400, refusal, "BadRequestError", "lora_path")
            record = loaded.pop(MODEL_METADATA_FIELD, None)
            body = json.dumps(loaded).encode()
            payload = loaded
        status: list[int] = []

        async def noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self._run(_with_length(scope, len(body)), _replay(body, receive), noting_status)
        name = payload.get("lora_name")
        if status == [200] and isinstance(name, str):
            if record is None:
                self._model_metadata.pop(name, None)
            else:
                self._model_metadata[name] = record

    @staticmethod
    async def _refuse_draining(send: Send) -> None:
        await send_error(
            send, 503, "The server is shutting down; retry on another instance.", "ServiceUnavailableError"
        )

    def _client(self, scope: Scope) -> str | None:
        """Which client sent the request, as the admission tells clients apart (the index of its API key; "" when the
        server has none, or for the open routes), or None if it may not."""
        if not self._keys:
            return ""
        preflight = (
            scope.get("method") == "OPTIONS"
            and _header(scope, b"origin") is not None
            and _header(scope, b"access-control-request-method") is not None
        )
        if _route(scope) in OPEN_PATHS or preflight:
            return ""
        scheme, _, token = (_header(scope, b"authorization") or b"").decode("latin-1").partition(" ")
        digest = _digest(token if scheme.lower() == "bearer" else "")
        # Every key compared, in constant time each, so that the time taken says nothing of which one matched.
        matches = [hmac.compare_digest(digest, key) for key in self._keys]
        return str(matches.index(True)) if any(matches) else None

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _Response(_relative_redirects(send))
        app_send = _refusing_failed_streams(response.send)
        if self._model_metadata and scope["method"] == "GET" and _route(scope) == MODELS_PATH:
            app_send = _annotating_models(response.send, self._model_metadata)
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
            await response.end_cut_off(self._given)

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
        self._drain_began = asyncio.get_running_loop().time()
        self._admission.refuse_waiting()
        logger.info(
            "[shutdown] stopped accepting; %d requests in flight get up to %g s",
            len(self._running),
            self.settings.shutdown_grace,
        )
        server.should_exit = True  # uvicorn closes its listening sockets, then waits for the open connections
        asyncio.get_running_loop().call_later(self.settings.shutdown_grace, self._end_running)

    def _end_running(self) -> None:
        self._given = asyncio.get_running_loop().time() - self._drain_began
        if self._running:
            logger.info("[shutdown] grace period over: ending %d requests", len(self._running))
        for handling in list(self._running):
            self._cut_off.add(handling)
            handling.cancel()
