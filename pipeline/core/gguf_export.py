"""The export stage's `gguf` target: GGUF files for llama.cpp (Ollama, LM Studio) written by llama.cpp's own converter
from the merged export, and checked in llama.cpp's runtime (llama-cpp-python): its tokenization of the held-out
conversations, its greedy answers and first-step logits against PyTorch, and its chat completion through the
template the file carries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.core import chat, runtime_parity
from pipeline.core.errors import ConfigError, PipelineError

# `make install` unpacks the converter from the llama-cpp-python source it builds, so file and runtime agree.
CONVERTER_DIR = Path(sys.prefix) / "share" / "llama.cpp"
CONVERTER_FILE_TYPES = ("f32", "f16", "bf16", "q8_0")


class GGUFExportError(PipelineError):
    """llama.cpp cannot take this model or its tokenizer."""


def check_installed() -> None:
    import importlib.util

    converter = CONVERTER_DIR / "convert_hf_to_gguf.py"
    missing = [
        what
        for what, present in (
            ("llama-cpp-python", importlib.util.find_spec("llama_cpp") is not None),
            (f"llama.cpp's converter ({converter})", converter.is_file()),
        )
        if not present
    ]
    if missing:
        raise ConfigError(
            f"the gguf target needs {' and '.join(missing)}, which `make install` sets up (it builds llama-cpp-python "
            "from source, about 5 min on 2 cores the first time, and unpacks the converter from the same source); "
            "or export with --target hf."
        )


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenization, from tokenizer.json's structure; None for one outside
    the two byte-level forms the project's tokenizers take (the converter may still know it by its hash)."""
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if spec.get("normalizer") or model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    steps = spec.get("pre_tokenizer") or {}
    steps = steps.get("pretokenizers", [steps]) if steps.get("type") == "Sequence" else [steps]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    kinds = [{k: s.get(k) for k in byte_level} if s.get("type") == "ByteLevel" else s for s in steps]
    if kinds == [byte_level]:
        return "gpt-2"
    if kinds == [{"type": "Digits", "individual_digits": True}, byte_level]:
        return "smollm"  # llama.cpp's SMOLLM rules: each digit alone, then GPT-2's split
    return None


def convert(model_dir: Path, out_file: Path, file_type: str, end_of_turn_id: int) -> None:
    pre = pre_tokenizer_name(model_dir)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.core.gguf_convert",
            str(CONVERTER_DIR),
            pre or "-",
            str(end_of_turn_id),
            str(model_dir),
            "--outfile",
            str(out_file),
            "--outtype",
            file_type,
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        return
    if "pre-tokenizer was not recognized" in result.stderr:
        raise GGUFExportError(
            "gguf export: llama.cpp cannot take this tokenizer. It knows a BPE tokenizer's pre-tokenization (how text "
            "is split before merging) by a list of known vocabularies, and this one's rules are neither a known "
            "vocabulary's nor the two byte-level forms the export can name itself (GPT-2's split, or SmolLM's digits "
            f"then GPT-2's): see {model_dir / 'tokenizer.json'}. A GGUF file written anyway would tokenize differently "
            "from training, so none was written; export the hf or onnx targets, or train with the project's default "
            "tokenizer."
        )
    raise PipelineError(
        f"llama.cpp's converter failed for {file_type} (exit {result.returncode}):\n{result.stderr[-2500:]}"
    )


def _load(path: Path, context: int, file_type: str) -> Any:
    import llama_cpp

    # llama.cpp keeps its KV cache in f16 unless told: an f32 file checks the conversion itself with an f32 cache,
    # the others run as llama.cpp runs them by default.
    cache = llama_cpp.GGML_TYPE_F32 if file_type == "f32" else None
    return llama_cpp.Llama(
        str(path),
        type_k=cache,
        type_v=cache,
        n_ctx=context,
        n_batch=context,
        logits_all=True,  # llama-cpp-python keeps the logits after eval only then
        chat_format="chat_template.default",  # the file's own template, never a built-in one guessed from it
        seed=0,
        verbose=False,
    )


def greedy(llm: Any, ids: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> runtime_parity.Greedy:
    import numpy as np

    tokens, first_logits = [], []
    for prompt in ids:
        llm.reset()
        llm.eval(prompt)
        first_logits.append(np.array(llm.scores[len(prompt) - 1], dtype=np.float32))
        generated: list[int] = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            generated.append(int(token))
            if token in stop_ids or len(generated) == max_new_tokens:
                break
        tokens.append(generated)
    return runtime_parity.Greedy(tokens, first_logits)


def tokenization_mismatches(llm: Any, tokenizer: Any, texts: list[str]) -> int:
    return sum(
        llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        != tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in texts
    )


def chat_check(
    llm: Any, tokenizer: Any, prompts: list[tuple[list[dict], Any]], expected: dict[int, str], max_new_tokens: int
) -> tuple[int, dict[int, bool]]:
    """How many prompts (tool declarations included) the file's template renders otherwise than the training
    tokenizer, and for the prompts in `expected` whether llama.cpp's chat completion through that template replies
    what PyTorch generated."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=tokenizer.eos_token or "",
        bos_token=tokenizer.bos_token or "",
        add_generation_prompt=True,
    )
    prompt_mismatches = sum(
        formatter(messages=chat.clean_messages(messages), tools=tools).prompt
        != chat.render_text(tokenizer, messages, tools, add_generation_prompt=True)
        for messages, tools in prompts
    )
    same = {}
    for index, reply_text in expected.items():
        messages = chat.clean_messages(prompts[index][0])
        reply = llm.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        same[index] = (reply["choices"][0]["message"]["content"] or "").strip() == reply_text.strip()
    return prompt_mismatches, same


def export(
    model_dir: Path,
    out_dir: Path,
    file_types: list[str],
    tokenizer: Any,
    conversations: list[tuple[list[dict], Any]],
    prompts: list[tuple[list[dict], Any]],
    reference: runtime_parity.Reference,
) -> dict[str, Any]:
    """One file per type in `out_dir`, each checked; raises GGUFExportError where llama.cpp tokenizes otherwise.
    `conversations` are whole held-out conversations (tokenization), `prompts` the parity prompts behind
    `reference` (PyTorch's answers)."""
    from importlib.metadata import version

    ids, max_new_tokens, stop_ids = reference.ids, reference.max_new_tokens, reference.stop_ids
    end_of_turn = chat.end_of_turn_token_id(tokenizer)
    texts = [chat.render_text(tokenizer, messages, tools) for messages, tools in conversations]
    # Replies are compared for prompts without tools: llama-cpp-python returns a call as text, not as tool_calls.
    expected = {
        i: tokenizer.decode(
            [t for t in runtime_parity.until_stop(reference.answers.tokens[i], stop_ids) if t not in stop_ids]
        )
        for i, (_, tools) in enumerate(prompts)
        if not tools
    }
    context = max(len(p) for p in ids) + max_new_tokens + 1
    context = max(context, max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) + 1)
    results: dict[str, Any] = {"llama_cpp_python": version("llama-cpp-python")}
    out_dir.mkdir(parents=True)
    for file_type in file_types:
        path = out_dir / f"model-{file_type}.gguf"
        convert(model_dir, path, file_type, end_of_turn)
        llm = _load(path, context, file_type)
        # The converter's name when it knows the vocabulary, else the one taken from the tokenizer's rules.
        results["pre_tokenizer"] = llm.metadata.get("tokenizer.ggml.pre")
        mismatches = tokenization_mismatches(llm, tokenizer, texts)
        if mismatches:
            raise GGUFExportError(
                f"gguf export: llama.cpp tokenizes {mismatches} of {len(texts)} held-out conversations otherwise than "
                f"the training tokenizer (pre-tokenizer {results['pre_tokenizer']}), so the file would "
                "not see what the model was trained on; nothing was exported. Export the hf or onnx targets instead."
            )
        answers = greedy(llm, ids, max_new_tokens, stop_ids)
        record = reference.compare(answers)
        record["divergences"] = reference.divergences(answers)
        diverged = {d["prompt"] for d in record["divergences"]}
        prompt_mismatches, replies = chat_check(llm, tokenizer, prompts, expected, max_new_tokens)
        record["chat"] = {
            "prompts": len(prompts),
            "prompt_mismatches": prompt_mismatches,
            "conversations": len(replies),
            "identical_replies": sum(replies.values()),
            # A reply can only be expected to equal PyTorch's where the greedy tokens did.
            "replies_differing_where_answers_equal": sum(not same for i, same in replies.items() if i not in diverged),
        }
        record["tokenization"] = {"conversations": len(texts), "mismatches": 0}
        record["file"] = str(path.relative_to(out_dir.parent))
        record["size_bytes"] = path.stat().st_size
        results[file_type] = record
        del llm
    return results
