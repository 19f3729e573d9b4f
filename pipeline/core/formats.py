"""Reading data sources and normalising real-world formats to chat messages.

SFT rows become `{"messages": [...], "tools": json-or-None}`; preference rows become conversational
`{"prompt": [...], "chosen": [...], "rejected": [...]}`. Every message has `role`, `content` and `tool_calls`
(OpenAI shape, arguments as a JSON string, or None). A row that cannot be read raises `Malformed`; a row that
reads but must not be trained on is dropped with a named reason, never silently.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.schema import PREFERENCE_FORMATS, SourceConfig

# OpenAI / HF role aliases, and ShareGPT's `from` tags (LLaMA-Factory's names included).
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}
SHAREGPT_TOOL_CALL_TAGS = ("function_call", "tool_call")


class Malformed(Exception):
    """The row does not have the shape its format requires."""


class Drop(Exception):
    """The row is well-formed but is not kept; `args[0]` names the reason (empty_turn, unknown_role, ...)."""


# ---------------------------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"{path}:{lineno}", Malformed(f"malformed JSON ({error.msg} at column {error.colno})")


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        # One bad byte makes the whole array unreadable: this is never skippable row by row.
        raise DataError(
            f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno}); the file is one JSON "
            "document, so nothing in it can be read until this is fixed."
        ) from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON array of rows (or JSON Lines), found a {type(payload).__name__}.")
    for index, row in enumerate(payload):
        yield f"{path}[{index}]", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as error:  # datasets wraps arrow errors in many types
        raise DataError(f"{path}: could not be read as Parquet ({type(error).__name__}: {error}).") from None
    for index, row in enumerate(table):
        yield f"{path}[row {index}]", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    try:
        # Every cell is text: "42" must stay the answer "42", and an empty `input` must stay "" (not NaN).
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as error:
        raise DataError(f"{path}: could not be read as CSV ({error}).") from None
    for index, row in enumerate(frame.to_dict("records")):
        yield f"{path}:{index + 2}", row  # line 1 is the header


def load_hub_table(source: SourceConfig) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source.hub, source.hub_config, split=source.split)
    except Exception as error:  # offline, the Hub client raises connection, file and value errors alike
        raise DataError(
            f"hub dataset '{source.hub}' (config {source.hub_config!r}, split {source.split!r}) could not be loaded: "
            f"{type(error).__name__}: {error}. Without network access (or with HF_HUB_OFFLINE=1) only datasets "
            "already in the local cache load; download it where the Hub is reachable, or export it to a local "
            "JSONL/Parquet file and use `path:`."
        ) from None


def _read_hub(source: SourceConfig) -> Iterator[tuple[str, Any]]:
    for index, row in enumerate(load_hub_table(source)):
        yield f"hub:{source.hub}[{index}]", row


READERS = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def read_source(source: SourceConfig) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) pairs; a row that could not be parsed is yielded as a Malformed instance."""
    if source.hub is not None:
        yield from _read_hub(source)
        return
    path = Path(source.path)
    if not path.is_file():
        raise DataError(f"data source {path} does not exist (data.sources: path: {source.path}).")
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise DataError(
            f"{path}: unsupported file type '{suffix}'. Supported: {', '.join(READERS)}, or a Hub "
            "dataset through `hub:`."
        )
    yield from READERS[suffix](path)


# ------------------------------------------------------------------------------------------- detection


def detect_format(columns: set[str]) -> str:
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt_preference" if {"chosen", "rejected"} <= columns else "sharegpt"
    if {"chosen", "rejected"} <= columns:
        return "preference"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    raise Malformed(
        f"cannot tell the format from the columns {sorted(columns)}; expected messages, conversations (ShareGPT), "
        "instruction/output (alpaca), prompt/completion, or prompt/chosen/rejected. Declare `format:` on the source."
    )


def is_preference(fmt: str) -> bool:
    return fmt in PREFERENCE_FORMATS


# ---------------------------------------------------------------------------------------- normalising


def _message(role: str, content: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"role": role, "content": content, "tool_calls": tool_calls}


def _text(content: Any, what: str) -> str:
    """A message's text: a string, or OpenAI content parts of type text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise Malformed(f"{what}: content parts must be objects, got {part!r}")
            if part.get("type", "text") != "text":
                raise Drop("non_text_content")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise Malformed(f"{what}: content must be a string, got {type(content).__name__}")


def _tool_call(call: Any, what: str) -> dict[str, Any]:
    """OpenAI tool call shape with arguments as a JSON string (what HF chat templates expect)."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError:
            raise Malformed(f"{what}: a tool call is not valid JSON: {call[:80]!r}") from None
    if not isinstance(call, dict):
        raise Malformed(f"{what}: a tool call must be an object, got {call!r}")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise Malformed(f"{what}: a tool call needs a function name")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _role(raw: Any) -> str:
    role = ROLE_ALIASES.get(str(raw).lower()) if raw is not None else None
    if role is None:
        raise Drop("unknown_role")
    return role


def _openai_messages(raw: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise Malformed(f"{what} must be a list of messages, got {type(raw).__name__}")
    out = []
    for index, message in enumerate(raw):
        where = f"{what}[{index}]"
        if not isinstance(message, dict) or "role" not in message:
            raise Malformed(f"{where} must be an object with 'role' and 'content'")
        role = _role(message["role"])
        calls = message.get("tool_calls") or None
        if calls is not None:
            if not isinstance(calls, list):
                raise Malformed(f"{where}.tool_calls must be a list")
            calls = [_tool_call(call, where) for call in calls]
        out.append(_message(role, _text(message.get("content"), where), calls))
    return out


def _sharegpt_messages(raw: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise Malformed(f"{what} must be a list of turns, got {type(raw).__name__}")
    out = []
    for index, turn in enumerate(raw):
        where = f"{what}[{index}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise Malformed(f"{where} must be an object with 'from' and 'value'")
        tag = str(turn["from"]).lower()
        if tag in SHAREGPT_TOOL_CALL_TAGS:
            out.append(_message("assistant", "", [_tool_call(turn["value"], where)]))
        else:
            out.append(_message(_role(tag), _text(turn["value"], where)))
    return out


def _tools(raw: Any, what: str) -> str | None:
    """Tool schemas as a canonical JSON string (Arrow cannot hold free-form schemas as structs)."""
    if raw in (None, "", []):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise Malformed(f"{what}: 'tools' is not valid JSON") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise Malformed(f"{what}: 'tools' must be a list of tool schemas")
    return json.dumps(raw, ensure_ascii=False, sort_keys=True)


def _with_system(messages: list[dict[str, Any]], system: Any) -> list[dict[str, Any]]:
    if system and not (messages and messages[0]["role"] == "system"):
        return [_message("system", _text(system, "system")), *messages]
    return messages


def _require(row: dict[str, Any], *keys: str) -> None:
    missing = [key for key in keys if key not in row]
    if missing:
        raise Malformed(f"missing field(s) {', '.join(missing)}")


def _as_turns(value: Any, what: str, default_role: str) -> list[dict[str, Any]]:
    """A string becomes one message of `default_role`; a list is OpenAI messages; a dict is one message."""
    if isinstance(value, str):
        return [_message(default_role, value)]
    if isinstance(value, dict):
        if "from" in value:
            return _sharegpt_messages([value], what)
        return _openai_messages([value], what)
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return _sharegpt_messages(value, what)
    return _openai_messages(value, what)


def normalise_sft(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    tools = None
    if fmt == "messages":
        _require(row, "messages")
        messages = _openai_messages(row["messages"], "messages")
        tools = _tools(row.get("tools"), "row")
    elif fmt == "sharegpt":
        _require(row, "conversations")
        messages = _with_system(_sharegpt_messages(row["conversations"], "conversations"), row.get("system"))
        tools = _tools(row.get("tools"), "row")
    elif fmt == "alpaca":
        _require(row, "instruction", "output")
        history = row.get("history") or []
        if not isinstance(history, list) or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in history):
            raise Malformed("'history' must be a list of [instruction, response] pairs")
        messages = []
        for query, response in history:
            messages += [_message("user", _text(query, "history")), _message("assistant", _text(response, "history"))]
        instruction = _text(row["instruction"], "instruction")
        extra = _text(row.get("input"), "input")
        messages += [
            _message("user", f"{instruction}\n{extra}" if extra.strip() else instruction),
            _message("assistant", _text(row["output"], "output")),
        ]
        messages = _with_system(messages, row.get("system"))
    elif fmt == "prompt_completion":
        _require(row, "prompt", "completion")
        messages = _as_turns(row["prompt"], "prompt", "user") + _as_turns(row["completion"], "completion", "assistant")
    else:
        raise Malformed(f"format '{fmt}' is not an SFT format")
    check_conversation(messages)
    return {"messages": messages, "tools": tools}


def normalise_preference(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "sharegpt_preference":
        _require(row, "conversations", "chosen", "rejected")
        prompt = _with_system(_sharegpt_messages(row["conversations"], "conversations"), row.get("system"))
        chosen = _as_turns(row["chosen"], "chosen", "assistant")
        rejected = _as_turns(row["rejected"], "rejected", "assistant")
    elif fmt == "preference":
        _require(row, "chosen", "rejected")
        chosen = _as_turns(row["chosen"], "chosen", "assistant")
        rejected = _as_turns(row["rejected"], "rejected", "assistant")
        if row.get("prompt") is not None:
            prompt = _with_system(_as_turns(row["prompt"], "prompt", "user"), row.get("system"))
        else:  # implicit prompt: the turns chosen and rejected share before they differ
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        raise Malformed(f"format '{fmt}' is not a preference format")
    if not prompt:
        raise Malformed("the prompt is empty (chosen and rejected share no turns before they differ)")
    for turns in (chosen, rejected):
        if not turns or turns[-1]["role"] != "assistant":
            raise Drop("ends_without_assistant_turn")
    check_conversation(prompt, need_assistant=False)
    check_conversation(chosen)
    check_conversation(rejected)
    if conversation_key(chosen) == conversation_key(rejected):
        raise Drop("chosen_equals_rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": _tools(row.get("tools"), "row")}


def check_conversation(messages: list[dict[str, Any]], need_assistant: bool = True) -> None:
    for message in messages:
        if not message["content"].strip() and not message["tool_calls"]:
            raise Drop("empty_turn")
    if need_assistant:
        if not any(m["role"] == "assistant" for m in messages):
            raise Drop("no_assistant_turn")
        if messages[-1]["role"] != "assistant":
            raise Drop("ends_without_assistant_turn")


# ------------------------------------------------------------------------------------ normalised text


def normalise_text(text: str) -> str:
    """The text used for de-duplication and contamination checks: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def conversation_key(messages: list[dict[str, Any]]) -> str:
    parts = []
    for message in messages:
        calls = json.dumps(message.get("tool_calls"), sort_keys=True) if message.get("tool_calls") else ""
        parts.append(f"{message['role']}\x1f{normalise_text(message['content'])}\x1f{calls}")
    return "\x1e".join(parts)


def sft_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Everything before the final assistant turn: what a model is asked."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]
