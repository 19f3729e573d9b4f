"""Generation engines for evaluation: vLLM's offline engine (the one that serves) or batched HF `generate`.

Both take prompts as token ids rendered by the shared chat template, decode greedily, and stop on the
model's stop tokens, so they answer the same prompts with the same tokens.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from pipeline import artifacts, chat, formats
from pipeline.errors import ConfigError


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested: str) -> str:
    if requested == "auto":
        return "vllm" if vllm_available() else "hf"
    if requested == "vllm" and not vllm_available():
        raise ConfigError(
            "evaluate.backend is vllm but vLLM is not installed: install the serve-cpu extra (CPU hosts) or the "
            "serve-gpu extra (CUDA hosts), or set evaluate.backend: hf."
        )
    return requested


def held_out_conversations(data_dir: Path, limit: int | None = None) -> tuple[list[list[dict]], list[str], list[Any]]:
    """Prompts (everything before the last assistant turn), reference answers and tools of the SFT eval split."""
    import datasets

    split = datasets.load_from_disk(str(Path(data_dir) / artifacts.SFT_DATA_DIR))["eval"]
    if limit is not None:
        split = split.select(range(min(limit, len(split))))
    prompts, references, tools = [], [], []
    for row in split:
        messages = chat.clean_messages(row["messages"])
        prompts.append(formats.sft_prompt(messages))
        references.append(messages[-1]["content"])
        tools.append(chat.parse_tools(row["tools"]))
    return prompts, references, tools


def prompt_ids(tokenizer: Any, prompts: list[list[dict]], tools: list[Any] | None = None) -> list[list[int]]:
    tools = tools or [None] * len(prompts)
    return [chat.render_ids(tokenizer, p, t, add_generation_prompt=True)["input_ids"] for p, t in zip(prompts, tools)]


def hf_generate(model: Any, tokenizer: Any, ids: list[list[int]], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations with batched HF `generate`, stopped at the model's stop tokens."""
    import torch

    model.eval()
    stop_ids = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        width = max(len(row) for row in batch)
        # Left padding keeps every prompt's last token at the same position, where generation continues.
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in batch])
        attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in batch])
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad,
            )  # fmt: skip
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in output[:, width:]]
    return answers


def vllm_generate(model_dir: Path, tokenizer: Any, ids: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[str]:
    """vLLM's offline engine. Its engine runs in a subprocess: callers need an `if __name__ == "__main__"` guard.

    The generated token ids are decoded with the same tokenizer call as the HF path, so the two backends
    differ only if the engines pick different tokens.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import torch

    on_gpu = torch.cuda.is_available()
    longest = max(len(row) for row in ids) + max_new_tokens
    llm = LLM(
        model=str(model_dir),
        dtype="auto" if on_gpu else "float32",
        enforce_eager=not on_gpu,
        max_model_len=longest,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop_ids, skip_special_tokens=True)
    try:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=row) for row in ids], params, use_tqdm=False)
        return [tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True).strip() for output in outputs]
    finally:
        del llm
