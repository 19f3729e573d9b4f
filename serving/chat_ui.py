"""A chat UI (gradio) for the served model, talking to the vLLM server through the official `openai` client.

    python -m serving.chat_ui [--config configs/tiny.yaml] [--base-url http://127.0.0.1:8000/v1] [--ui-port 7860]

Answers stream token by token. A menu picks the model among those the server lists (a server with adapters
serves the base and each fine-tune), each labelled with the stages it holds and its gates. The model first picked
and the server address default to the recipe's `serve` section; the API key to the environment variable it names.
Needs the `ui` extra (gradio, openai).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence

from pipeline.core.cli import DEFAULT_CONFIG, run_cli
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError
from serving import middleware


def stream_reply(client, model: str, history: list[dict], message: str, max_tokens: int | None) -> Iterator[str]:  # noqa: ANN001
    """The reply so far, after each streamed chunk (gradio redraws the message with every yield)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in history] + [{"role": "user", "content": message}]
    reply = ""
    # Without max_tokens the server allows whatever the model length leaves after the prompt.
    limit = {"max_tokens": max_tokens} if max_tokens else {}
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0.0, stream=True, **limit):
        if chunk.choices and chunk.choices[0].delta.content:
            reply += chunk.choices[0].delta.content
            yield reply


def served_models(client) -> list[tuple[str, str]]:  # noqa: ANN001 - an openai client
    """(label, model id) of every model the server lists, each labelled with what its export recorded (the stages
    an adapter holds, whether the gates passed); empty where the server cannot be asked."""
    import openai

    try:
        listing = client.models.list().data
    except openai.OpenAIError as error:
        print(f"warning: could not list the served models ({error}); only the model given is offered", file=sys.stderr)
        return []
    choices = []
    for model in listing:
        record = (model.model_extra or {}).get("pipeline") or {}
        facts = [" + ".join(record["stages"])] if record.get("stages") else []
        facts += [f"gates {record['gates']}"] if record.get("gates") else []
        choices.append((f"{model.id} ({'; '.join(facts)})" if facts else model.id, model.id))
    return choices


def build_app(base_url: str, model: str, api_key: str | None, max_tokens: int | None):  # noqa: ANN201 - gradio Blocks
    import gradio as gr
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none")
    choices = served_models(client) or [(model, model)]
    if model not in [value for _, value in choices]:  # the recipe's name, not served here: the server's first
        model = choices[0][1]

    def respond(message: str, history: list[dict], chosen: str) -> Iterator[str]:
        yield from stream_reply(client, chosen, history, message, max_tokens)

    picker = gr.Dropdown(choices=choices, value=model, label="model", allow_custom_value=True)
    return gr.ChatInterface(
        respond, additional_inputs=[picker], title="Chat with the served models", description=f"vLLM at {base_url}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m serving.chat_ui",
        description=(
            f"{__doc__.splitlines()[0]} Start `python -m serving.vllm_server` first; then open http://UI_HOST:UI_PORT."
        ),
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"recipe YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument(
        "--base-url",
        help=(
            "the server's /v1 address (default: http://<serve.host>:<serve.port>/v1, "
            "http://127.0.0.1:8000/v1 for the shipped recipes)"
        ),
    )
    parser.add_argument(
        "--model", help="model picked first (default: serve.served_model_name or run.name, if the server lists it)"
    )
    parser.add_argument("--ui-host", default="127.0.0.1", help="address the chat page binds to (default: %(default)s)")
    parser.add_argument("--ui-port", type=int, default=7860, help="port of the chat page (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, help="cap on answer tokens (default: what the model length allows)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config)
    missing = [name for name in ("gradio", "openai") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the chat UI needs {', '.join(missing)}: install the `ui` extra (`pip install -e '.[ui]'`).")
    base_url = args.base_url or f"http://{recipe.serve.host}:{recipe.serve.port}/v1"
    model = args.model or recipe.serve.served_model_name or recipe.run.name
    keys = middleware.parse_api_keys(os.environ.get(recipe.serve.api_key_env))
    app = build_app(base_url, model, keys[0] if keys else None, args.max_tokens)
    app.launch(server_name=args.ui_host, server_port=args.ui_port)


if __name__ == "__main__":
    sys.exit(run_cli(main))
