"""Chat templates and tokenizers: the one place a conversation becomes token ids.

Training, evaluation, export and serving all render conversations through `render_ids` with the tokenizer
saved in the data artifact, so the ids the model is trained on are the ids it is served with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = {"chatml": TEMPLATES_DIR / "chatml.jinja"}
EOS_TOKEN = "<|endoftext|>"
CHATML_SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")

# A conversation used to find the end-of-turn token: the last token a template marks as assistant output.
_PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]


def resolve_chat_template(spec: str | None) -> str | None:
    """A builtin name or a .jinja path to template text; None keeps the tokenizer's own template."""
    if spec is None:
        return None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec].read_text(encoding="utf-8")
    path = Path(spec)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise ConfigError(
        f"model.chat_template '{spec}' is neither a shipped template ({', '.join(BUILTIN_TEMPLATES)}) nor an "
        "existing .jinja file."
    )


def clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the null fields Arrow adds to every message (a template testing `'tool_calls' in m` must not see them)."""
    return [{k: v for k, v in message.items() if v is not None} for message in messages]


def parse_tools(tools: str | None) -> list[dict[str, Any]] | None:
    return json.loads(tools) if tools else None


def _byte_level_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # Single digits keep numbers compositional, which a tiny model needs to learn arithmetic-like rules.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, bos_token=None, unk_token=None
    )


def train_tokenizer(
    conversations: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]], vocab_size: int, chat_template: str
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on the conversations as the chat template renders them, digits split one
    per token, with ChatML special tokens.

    Training on the rendered text, not only the message contents, gives the template's own words, tool schemas
    and tool-call JSON merges of their own: the sequences the model trains on are that much shorter.
    """
    # Rendering text needs a template, not a vocabulary: the byte alphabet alone renders it.
    renderer = _byte_level_bpe([], 0)
    renderer.chat_template = chat_template
    texts = []
    for messages, tools in conversations:
        text = renderer.apply_chat_template(clean_messages(messages), tools=tools, tokenize=False)
        for special in CHATML_SPECIAL_TOKENS:  # special tokens stay whole; BPE must not spend merges on them
            text = text.replace(special, "\n")
        texts.append(text)
    tokenizer = _byte_level_bpe(texts, vocab_size)
    tokenizer.chat_template = chat_template
    return tokenizer


def load_tokenizer(source: str | Path, chat_template: str | None = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load a tokenizer (folder or Hub id); a given template replaces its own. A missing pad token becomes EOS."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    except OSError as error:
        raise PipelineError(
            f"could not load the tokenizer '{source}': {error}. Offline, a Hub id works only if it is in the local "
            "cache; otherwise point model.tokenizer / model.name_or_path at a local folder."
        ) from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ConfigError(f"the tokenizer '{source}' has no chat template; set model.chat_template (e.g. chatml).")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensure_training_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a template whose generation markers cover each assistant turn and its end-of-turn token.

    A template without markers is swapped for TRL's training variant of the same template (which renders the
    same text, so serving with it changes nothing); templates TRL does not know are refused.
    """
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_stop_token_trained,
    )

    if not has_generation_markers(tokenizer.chat_template):
        try:
            patched = get_training_chat_template(tokenizer)
        except ValueError:
            patched = None
        if patched is None:
            raise ConfigError(
                "the chat template has no {% generation %} markers and TRL has no training variant of it, so "
                "assistant-only loss cannot find the assistant tokens. Set model.chat_template: chatml (or a .jinja "
                "template with generation markers)."
            )
        tokenizer.chat_template = patched
    if not is_chat_template_stop_token_trained(tokenizer):
        raise ConfigError(
            "the chat template's generation markers leave out the assistant's end-of-turn token, so the model would "
            "never learn to stop. Move the end-of-turn token inside {% generation %}...{% endgeneration %}."
        )


def render_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
    with_assistant_mask: bool = False,
) -> dict[str, list[int]]:
    """Token ids of a conversation (and the assistant-token mask if asked), exactly as training sees them."""
    encoded = tokenizer.apply_chat_template(
        clean_messages(messages),
        tools=tools,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=with_assistant_mask,
    )
    out = {"input_ids": list(encoded["input_ids"])}
    if with_assistant_mask:
        out["assistant_masks"] = list(encoded["assistant_masks"])
    return out


def render_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
) -> str:
    """A conversation as the template writes it, for runtimes that tokenize text themselves."""
    return tokenizer.apply_chat_template(
        clean_messages(messages), tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn: the last one the training template marks as assistant output."""
    encoded = render_ids(tokenizer, _PROBE, with_assistant_mask=True)
    masked = [tok for tok, keep in zip(encoded["input_ids"], encoded["assistant_masks"]) if keep]
    if not masked:
        raise ConfigError("the chat template's generation markers enclose no tokens of the assistant turn.")
    return masked[-1]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends an answer: EOS and the template's end-of-turn token."""
    return sorted({tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)})


# ------------------------------------------------------------------------------------------- tool calls

TOOL_CALL_START = "<tool_call>"
# vLLM's hermes parser reads a call between the markers, or from a start marker to the end of an answer that ran out
# of tokens before its end marker.
TOOL_CALL_PATTERN = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def tool_call_parser(chat_template: str | None) -> str | None:
    """The vLLM tool parser that reads the calls this template renders, or None if no known parser fits.

    Templates that write each call as JSON inside <tool_call>...</tool_call> (the shipped ChatML, Qwen 2.5, Hermes)
    are read by vLLM's `hermes` parser.
    """
    if chat_template and TOOL_CALL_START in chat_template and "</tool_call>" in chat_template:
        return "hermes"
    return None


def _read_call(body: str) -> dict[str, Any]:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return {"error": f"not JSON: {body[:80]!r}"}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return {"error": f"not a call of name and arguments: {body[:80]!r}"}
    return {"name": call["name"], "arguments": call["arguments"]}


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls in generated text, each a dict with `name` and `arguments`, or with `error` when the call is
    not a JSON object of that shape."""
    return [_read_call(closed or unclosed) for closed, unclosed in TOOL_CALL_PATTERN.findall(text)]


def served_reply(text: str) -> tuple[str, list[dict[str, Any]]]:
    """What a client of the server gets for generated text: (content, calls), read as vLLM's hermes parser reads it.
    Calls come back only if every one is well formed, and then the content is the text before the first; one broken
    call and the client gets the whole text as content, no calls. Evaluation scores tool calls this way."""
    calls = parse_tool_calls(text)
    if not calls or any("error" in call for call in calls):
        return text.strip(), []
    return text[: text.index(TOOL_CALL_START)].strip(), calls
