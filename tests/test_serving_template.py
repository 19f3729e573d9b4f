"""The shipped ChatML template as a server renders it: tool-call arguments as vLLM passes them (dicts) render as
training renders them (JSON strings), and roles the model never learned are refused."""

from __future__ import annotations

import copy
import json
import sys

import pytest
from jinja2.exceptions import TemplateError

from pipeline.core import chat

from conftest import REPO

sys.path.insert(0, str(REPO / "data"))
import make_data  # noqa: E402 - the generator of the shipped data

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}
CONVERSATION = [
    {"role": "system", "content": "Reply with just the answer."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "foggy"},
    {"role": "assistant", "content": "foggy"},
]


@pytest.fixture(scope="module")
def tokenizer():
    rows = [json.loads(line) for line in (REPO / "data" / "tools.jsonl").read_text().splitlines()]
    template = chat.resolve_chat_template("chatml")
    return chat.train_tokenizer([(row["messages"], row.get("tools")) for row in rows[:50]], 300, template)


def with_dict_arguments(messages: list[dict]) -> list[dict]:
    """The conversation as vLLM hands it to the template: each call's arguments parsed into a dict."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return messages


def test_the_rendering_of_a_tool_conversation_is_unchanged(tokenizer) -> None:
    text = tokenizer.apply_chat_template(CONVERSATION, tools=make_data.TOOL_SCHEMAS[:1], tokenize=False)
    schema = json.dumps(make_data.TOOL_SCHEMAS[0], sort_keys=True)
    assert (
        text == f"<|im_start|>system\nReply with just the answer.\n\nTools:\n{schema}\n<|im_end|>\n"
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city":'
        ' "Oslo"}}</tool_call><|im_end|>\n'
        "<|im_start|>tool\nfoggy<|im_end|>\n"
        "<|im_start|>assistant\nfoggy<|im_end|>\n"
    )


def test_tool_schemas_in_any_key_order_render_as_the_data_stage_stores_them(tokenizer) -> None:
    """The data stage stores schemas with sorted keys, so training saw them sorted; a client sends them in its own
    order (make_data declares type, function; name, description, parameters). Rendered unsorted, the tiny model's
    served tool accuracy fell from 1.0 to 0.46."""
    stored = json.loads(json.dumps(make_data.TOOL_SCHEMAS, sort_keys=True))
    assert list(stored[0]) != list(make_data.TOOL_SCHEMAS[0])
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    assert chat.render_ids(tokenizer, question, make_data.TOOL_SCHEMAS, add_generation_prompt=True) == chat.render_ids(
        tokenizer, question, stored, add_generation_prompt=True
    )


def test_every_shipped_tool_call_renders_the_same_ids_with_dict_arguments(tokenizer) -> None:
    rows = [json.loads(line) for line in (REPO / "data" / "tools.jsonl").read_text().splitlines()]
    with_calls = [row for row in rows if any(m.get("tool_calls") for m in row["messages"])]
    assert len(with_calls) > 500
    for row in with_calls:
        for messages in (row["messages"], row["messages"][:-1]):
            as_trained = chat.render_ids(
                tokenizer,
                messages,
                row["tools"],
                add_generation_prompt=messages[-1]["role"] != "assistant",
                with_assistant_mask=True,
            )
            as_served = chat.render_ids(
                tokenizer,
                with_dict_arguments(messages),
                row["tools"],
                add_generation_prompt=messages[-1]["role"] != "assistant",
                with_assistant_mask=True,
            )
            assert as_served == as_trained, row


@pytest.mark.parametrize(
    "arguments",
    [{"city": "Zürich"}, {"unit": "C", "city": "São Paulo", "days": [1, 2], "detail": {"wind": True, "rain": None}}],
    ids=["non-ascii", "key-order-and-nesting"],
)
def test_dict_arguments_render_as_the_data_stage_writes_them(tokenizer, arguments: dict) -> None:
    """Key order and separators as json.dumps; non-ASCII characters as themselves, as the data stage writes dict
    arguments (a JSON string escaped with json.dumps' default ensure_ascii would render its escapes instead)."""
    as_string = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(arguments, ensure_ascii=False)},
                }
            ],
        },
    ]
    rendered = tokenizer.apply_chat_template(with_dict_arguments(as_string), tokenize=False)
    assert f'"arguments": {json.dumps(arguments, ensure_ascii=False)}}}</tool_call>' in rendered
    assert rendered == tokenizer.apply_chat_template(as_string, tokenize=False)


@pytest.mark.parametrize("role", ["wizard", "developer", "function", "System"])
def test_unknown_roles_raise(tokenizer, role: str) -> None:
    for messages in (
        [{"role": role, "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": role, "content": "hi"}],
    ):
        with pytest.raises(TemplateError, match=f"unknown role '{role}'"):
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# Generated text of every shape the tool-call reading must agree on: none, good, broken, mixed, unclosed, fragments.
GENERATED_TEXTS = [
    "foggy",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
    'Let me see. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
    (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n<tool_call>{"name":'
        ' "get_daytime", "arguments": {"city": "Lima"}}</tool_call>'
    ),
    'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><tool_call>{"name": </tool_call>',
    '<tool_call>{"name": "get_daytime", "arguments": {"city": "Lima"}}',
    'Sure.<tool_call>{"name": "get_daytime", "arguments": {"city": "Lima"}}</tool_call> and more',
    'foggytool_weather", "arguments": "arguments": {"city": {"city": "Parismorning"}}</tool_call>',
    "sunny</tool_call></",
    '<tool_call>{"arguments": {"city": "Oslo"}}</tool_call>',
    '<tool_call>{"name": "get_weather"}</tool_call>',
    '<tool_call>["get_weather", {"city": "Oslo"}]</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": "Oslo"}</tool_call>',
]


@pytest.mark.parametrize("text", GENERATED_TEXTS)
def test_the_pipeline_reads_generated_text_as_the_served_hermes_parser_does(tokenizer, text: str) -> None:
    """Evaluation scores what a client of the server would receive: chat.served_reply against vLLM's own parser."""
    pytest.importorskip("vllm")
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    served = Hermes2ProToolParser(tokenizer).extract_tool_calls(text, request=None)
    calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in served.tool_calls]
    assert ((served.content or "").strip(), calls) == chat.served_reply(text)
