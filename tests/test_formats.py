"""Every input format normalises to chat messages (SFT) or conversational prompt/chosen/rejected (DPO)."""

from __future__ import annotations

import json

import pytest

from pipeline.core import formats
from pipeline.core.formats import Drop, Malformed, detect_format, normalise_preference, normalise_sft


def m(role: str, content: str, tool_calls=None) -> dict:
    return {"role": role, "content": content, "tool_calls": tool_calls}


def test_openai_messages_with_content_parts_tools_and_tool_calls() -> None:
    row = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
                ],
            },
            {"role": "tool", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "3 degrees."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
    }
    assert detect_format(set(row)) == "messages"
    out = normalise_sft(row, "messages")
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    assert out["messages"] == [
        m("system", "Be brief."),
        m("user", "Weather in Oslo?"),
        m("assistant", "", [call]),
        m("tool", '{"temp": 3}'),
        m("assistant", "3 degrees."),
    ]
    assert json.loads(out["tools"])[0]["function"]["name"] == "weather"


def test_alpaca_with_input_system_and_history() -> None:
    row = {
        "instruction": "Translate",
        "input": "chat",
        "output": "cat",
        "system": "You translate.",
        "history": [["Hi", "Hello!"]],
    }
    assert detect_format(set(row)) == "alpaca"
    assert normalise_sft(row, "alpaca")["messages"] == [
        m("system", "You translate."),
        m("user", "Hi"),
        m("assistant", "Hello!"),
        m("user", "Translate\nchat"),
        m("assistant", "cat"),
    ]


def test_alpaca_with_empty_input_uses_the_instruction_alone() -> None:
    row = {"instruction": "Say hi", "input": "", "output": "hi"}
    assert normalise_sft(row, "alpaca")["messages"] == [m("user", "Say hi"), m("assistant", "hi")]


def test_sharegpt_with_system_function_call_observation_and_tools_string() -> None:
    row = {
        "system": "sys",
        "tools": '[{"name": "add", "parameters": {}}]',
        "conversations": [
            {"from": "human", "value": "2+2?"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 2}}'},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "4"},
        ],
    }
    assert detect_format(set(row)) == "sharegpt"
    out = normalise_sft(row, "sharegpt")
    assert out["messages"][0] == m("system", "sys")
    assert out["messages"][2]["tool_calls"] == [
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    ]
    assert [x["role"] for x in out["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(out["tools"]) == [{"name": "add", "parameters": {}}]


def test_prompt_completion_strings_and_conversational() -> None:
    assert detect_format({"prompt", "completion"}) == "prompt_completion"
    assert normalise_sft({"prompt": "a", "completion": "b"}, "prompt_completion")["messages"] == [
        m("user", "a"),
        m("assistant", "b"),
    ]
    row = {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}
    assert normalise_sft(row, "prompt_completion")["messages"] == [m("user", "a"), m("assistant", "b")]


def test_preference_strings_lists_and_implicit_prompt() -> None:
    expected = {
        "prompt": [m("user", "q")],
        "chosen": [m("assistant", "good")],
        "rejected": [m("assistant", "bad")],
        "tools": None,
    }
    assert detect_format({"prompt", "chosen", "rejected"}) == "preference"
    assert normalise_preference({"prompt": "q", "chosen": "good", "rejected": "bad"}, "preference") == expected
    lists = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert normalise_preference(lists, "preference") == expected
    implicit = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    }
    assert detect_format(set(implicit)) == "preference"
    assert normalise_preference(implicit, "preference") == expected


def test_sharegpt_preference() -> None:
    row = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    assert detect_format(set(row)) == "sharegpt_preference"
    assert normalise_preference(row, "sharegpt_preference") == {
        "prompt": [m("user", "q")],
        "chosen": [m("assistant", "good")],
        "rejected": [m("assistant", "bad")],
        "tools": None,
    }


@pytest.mark.parametrize(
    ("row", "fmt", "reason"),
    [
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            "messages",
            "empty_turn",
        ),
        (
            {"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages",
            "unknown_role",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no_assistant_turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "more?"},
                ]
            },
            "messages",
            "ends_without_assistant_turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages",
            "non_text_content",
        ),
        (
            {"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "sharegpt",
            "unknown_role",
        ),
        ({"instruction": "q", "input": "", "output": ""}, "alpaca", "empty_turn"),
    ],
)
def test_sft_drop_reasons(row: dict, fmt: str, reason: str) -> None:
    with pytest.raises(Drop) as caught:
        normalise_sft(row, fmt)
    assert caught.value.args[0] == reason


def test_chosen_equal_to_rejected_is_dropped_after_normalisation() -> None:
    with pytest.raises(Drop, match="chosen_equals_rejected"):
        normalise_preference({"prompt": "q", "chosen": "Same  answer", "rejected": "same answer"}, "preference")


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"messages": "hello"}, "messages", "messages must be a list of messages, got str"),
        ({"instruction": "q"}, "alpaca", r"missing field\(s\) output"),
        (
            {"conversations": [{"value": "q"}]},
            "sharegpt",
            r"conversations\[0\] must be an object with 'from' and 'value'",
        ),
        ({"instruction": "q", "output": "a", "history": ["x"]}, "alpaca", "history"),
    ],
)
def test_malformed_rows(row: dict, fmt: str, message: str) -> None:
    with pytest.raises(Malformed, match=message):
        normalise_sft(row, fmt)


def test_undetectable_columns_name_the_expected_formats() -> None:
    with pytest.raises(Malformed, match=r"cannot tell the format from the columns \['question'\]"):
        detect_format({"question"})


def test_normalised_text_ignores_case_width_and_spacing() -> None:
    assert formats.normalise_text("  Ｈello\tWORLD \n") == formats.normalise_text("hello world")
