"""vLLM's hermes tool parser, streamed so that a streaming client gets what a non-streaming one gets.

vLLM's own hermes parser reads a finished answer all at once (`extract_tool_calls`): calls come back only if every
`<tool_call>` holds a JSON object with a name and arguments, and then the content is the text before the first;
one broken call and the whole text is content. Streaming, it sends each call's arguments as they are generated,
before it can know whether the call will parse: a broken call reached a streaming client as a tool call with
arguments that are not JSON (`{"city": "Oslo"`), where the same request without streaming got the text as content.

This parser streams the text before the first `<tool_call>` as it comes, holds the rest until the answer ends,
then hands it to the non-streaming reading: the calls, each in one delta, or the held text as content. A streaming
client thus receives exactly the non-streaming reply, which is also how the evaluation reads generated text
(`pipeline.core.chat.served_reply`); the price is that a call's arguments arrive whole at the end of the stream.

`serving.vllm_server` loads it with `--tool-parser-plugin serving.tool_parser` for exports whose template writes
hermes calls; vLLM calls `finish_streaming` at the end of each stream because the parser declares
`engine_based_streaming` (and then hands it each delta alone, which it gathers itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
)
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

from serving.vllm_server import WHOLE_CALL_HERMES


@ToolParserManager.register_module(WHOLE_CALL_HERMES)
class WholeCallHermesToolParser(Hermes2ProToolParser):
    engine_based_streaming = True

    def __init__(self, tokenizer: Any, tools: Any = None) -> None:
        super().__init__(tokenizer, tools)
        self._streamed_text = ""
        self._tool_choice_none = False

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        if getattr(request, "tool_choice", None) == "none":  # no calls asked for: the text as generated
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        return super().extract_tool_calls(model_output, request)

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> DeltaMessage | None:
        self._streamed_text += delta_text
        self._tool_choice_none = getattr(request, "tool_choice", None) == "none"
        if self._tool_choice_none:
            return DeltaMessage(content=delta_text) if delta_text else None
        # Up to the first call (a possible partial start marker held back): the content the reply will have.
        content = self._extract_content(self._streamed_text)
        return DeltaMessage(content=content) if content else None

    def finish_streaming(self) -> DeltaMessage | None:
        if self._tool_choice_none:
            return None
        result = super().extract_tool_calls(self._streamed_text, request=None)
        if result.tools_called:
            calls = [
                DeltaToolCall(
                    index=index,
                    id=make_tool_call_id(),
                    type="function",
                    function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
                )
                for index, call in enumerate(result.tool_calls)
            ]
            return DeltaMessage(tool_calls=calls)
        held = self._streamed_text[self._sent_content_idx :]
        self._sent_content_idx = len(self._streamed_text)
        return DeltaMessage(content=held) if held else None
