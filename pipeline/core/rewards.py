"""Verifiable rewards for GRPO, and the prompts they are checked against.

A reward has TRL's signature, `f(prompts, completions, **kwargs) -> list[float]`: one value per completion, or None
where it does not apply (TRL then leaves it out of that completion's sum). Besides `completion_ids` and TRL's own
arguments, the keyword arguments are the prompt rows' columns, one value per completion:

- `reference`: the text the reference assistant turn answers with ("" where that turn only calls tools);
- `expected_calls`: the calls that turn makes, a JSON list of {"name", "arguments"} ("[]" where it makes none);
- `tools`: the tool schemas offered in the prompt, JSON (None where none are).

The built-ins (`BUILTINS`) score what the shipped chat template renders; a recipe names any of them, or a user
function as `module:function`. Every reward is called through `_checked`, so one that raises or answers in the
wrong shape stops the stage with an error that names it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.core import chat, formats, scoring
from pipeline.core.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Reward = Callable[..., list[float | None]]
USER_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class RewardError(PipelineError):
    """A reward function raised, or returned something other than one number (or None) per completion."""


# ------------------------------------------------------------------------------------------- the built-ins


def exact_match(completions: list[str], reference: list[str], **kwargs: Any) -> list[float | None]:
    """1 where the completion is the reference text (surrounding whitespace aside), as evaluation's exact match
    counts it; None where the reference turn only calls tools."""
    return [float(scoring.same_answer(c, r)) if r.strip() else None for c, r in zip(completions, reference)]


def answer_format(
    completions: list[str], reference: list[str], expected_calls: list[str], **kwargs: Any
) -> list[float]:
    """1 where the completion has the reference's shape: well-formed tool calls and nothing else where calls are
    expected; otherwise plain text, no tool-call markup, as many words as the reference. Right shape, any content:
    it teaches the form of an answer where exact match has nothing to reward yet."""
    scores = []
    for completion, ref, expected in zip(completions, reference, expected_calls):
        calls = chat.parse_tool_calls(completion)
        if json.loads(expected):
            outside = chat.TOOL_CALL_PATTERN.sub("", completion).strip()
            scores.append(float(bool(calls) and all("error" not in c for c in calls) and not outside))
        else:
            words = completion.split()
            scores.append(float(not calls and "<tool_call>" not in completion and len(words) == len(ref.split())))
    return scores


def tool_call(
    completions: list[str], expected_calls: list[str], tools: list[str | None], **kwargs: Any
) -> list[float | None]:
    """Where calls are expected: 1 for exactly those calls (names and JSON-equal arguments), 0.5 for the right tools
    with other arguments, else 0. Where tools are offered and none is due: 1 for answering without a call. None where
    the prompt offers no tools."""
    scores: list[float | None] = []
    for completion, expected, offered in zip(completions, expected_calls, tools):
        if not offered:
            scores.append(None)
            continue
        want = json.loads(expected)
        calls = chat.parse_tool_calls(completion)
        made = [c for c in calls if "error" not in c]
        if not want:
            scores.append(float(not calls))
        elif made == want:
            scores.append(1.0)
        else:
            scores.append(0.5 if [c["name"] for c in made] == [c["name"] for c in want] else 0.0)
    return scores


def _stop(end_of_turn: int) -> Reward:
    def stop(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        """1 where the completion ended its turn with the template's end-of-turn token (not cut at the length limit)."""
        return [float(bool(ids) and ids[-1] == end_of_turn) for ids in completion_ids]

    return stop


# name -> (tokenizer -> reward): `stop` needs the template's end-of-turn token; the others read text only.
BUILTINS: dict[str, Callable[[Any], Reward]] = {
    "exact_match": lambda tokenizer: exact_match,
    "format": lambda tokenizer: answer_format,
    "stop": lambda tokenizer: _stop(chat.end_of_turn_token_id(tokenizer)),
    "tool_call": lambda tokenizer: tool_call,
}


# ---------------------------------------------------------------------------------------------- loading


def check_name(name: str, where: str) -> None:
    """A recipe's reward entry: a built-in's name or `module:function` (imported when the stage starts)."""
    if name not in BUILTINS and not USER_FUNCTION.match(name):
        raise ConfigError(
            f"{where}: '{name}' is neither a built-in reward ({', '.join(BUILTINS)}) nor a user function written as "
            "module:function (e.g. my_rewards:length_penalty, importable from the directory the pipeline runs in)."
        )


def _import_user_function(spec: str, where: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    # Recipes name files relative to where the pipeline runs; reward modules resolve the same way, also under
    # `accelerate launch pipeline/grpo.py`, whose script hand-over leaves that directory off the path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may fail in any way while it loads
        raise ConfigError(
            f"{where}: could not import '{module_name}' for the reward {spec} ({type(error).__name__}: {error}). Put "
            "the module in the directory the pipeline runs in or on PYTHONPATH."
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"{where}: module '{module_name}' has no function '{attribute}' for the reward {spec}.")
    if inspect.iscoroutinefunction(function):
        raise ConfigError(f"{where}: the reward {spec} is async; write it as a plain function.")
    return function


def load(names: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[Reward]:
    """The recipe's rewards, in order, each checked on every call and named as the recipe names it (TRL logs
    `rewards/<name>/mean`)."""
    rewards = []
    for index, name in enumerate(names):
        where = f"grpo.rewards.{index}"
        check_name(name, where)
        function = BUILTINS[name](tokenizer) if name in BUILTINS else _import_user_function(name, where)
        rewards.append(_checked(name, function))
    return rewards


def _checked(name: str, function: Callable[..., Any]) -> Reward:
    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        try:
            values = function(prompts=prompts, completions=completions, **kwargs)
        except Exception as error:  # any failure of the user's code becomes a message naming the reward
            raise RewardError(
                f"the GRPO reward '{name}' raised {type(error).__name__}: {error}. It is called as f(prompts,"
                " completions, completion_ids, reference, expected_calls, tools, ...) with one list item per"
                " completion and must return a list of floats (None where it does not apply); fix it or remove it from"
                " grpo.rewards."
            ) from None
        values = values.tolist() if hasattr(values, "tolist") else values  # numpy and torch answers are fine too
        problem = _shape_problem(values, len(completions))
        if problem:
            raise RewardError(
                f"the GRPO reward '{name}' returned {problem}, for {len(completions)} completions. A reward returns a"
                " list with one float per completion (None where it does not apply); fix it or remove it from"
                " grpo.rewards."
            )
        return list(values)

    reward.__name__ = name
    return reward


def _shape_problem(values: Any, count: int) -> str | None:
    if not isinstance(values, (list, tuple)):
        return f"a {type(values).__name__}"
    if len(values) != count:
        return f"{len(values)} values"
    for value in values:
        if value is None:
            continue
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            return f"{value!r} (a {type(value).__name__}) among its values"
    return None


# ----------------------------------------------------------------------------------------------- prompts


def prompt_rows(
    split: Any, tokenizer: PreTrainedTokenizerBase, sources: set[int] | None = None
) -> list[dict[str, Any]]:
    """GRPO's prompts from SFT conversations: one for the last assistant turn, and one for every earlier turn that
    calls tools (what evaluation asks of held-out conversations). Each prompt is rendered with its tools by the
    chat template, as text: TRL renders conversational prompts with the trainer's tools, not each row's own."""
    rows = []
    for row in split:
        if sources is not None and row["source"] not in sources:
            continue
        messages, tools = chat.clean_messages(row["messages"]), chat.parse_tools(row["tools"])
        last = len(formats.sft_prompt(messages))
        turns = [i for i, m in enumerate(messages[:last]) if m["role"] == "assistant" and m.get("tool_calls")] + [last]
        for index in turns:
            turn = messages[index]
            text = chat.render_text(tokenizer, messages[:index], tools, add_generation_prompt=True)
            calls = scoring._expected_calls(turn) if turn.get("tool_calls") else []  # noqa: SLF001 - evaluation's reading
            rows.append(
                {
                    "prompt": text,
                    "reference": turn.get("content") or "",
                    "expected_calls": json.dumps(calls),
                    "tools": row["tools"],
                    "source": row["source"],
                }
            )
    return rows


def solved(row: dict[str, Any], completion: str) -> bool:
    """Whether a completion is what a prompt row's reference turn is, as evaluation counts it: exactly its tool calls
    where it calls tools, else exactly its text."""
    if json.loads(row["expected_calls"]):
        return tool_call([completion], [row["expected_calls"]], [row["tools"]]) == [1.0]
    return exact_match([completion], [row["reference"]]) == [1.0]
