"""The model the speed benchmarks measure: a Llama-architecture model of about 135M parameters, random weights.

Hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49,152 (the shape of SmolLM-135M). The tiny default recipe's
0.9M-parameter model is too small to say anything about speed: every runtime would measure its own overhead.
"""

from __future__ import annotations

from pathlib import Path

SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}
# The same family at a size that runs in seconds: a benchmark's --smoke mode checks its logic, not speed.
SMOKE_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head size 64: vLLM's CPU attention has no kernel for 16
    "num_key_value_heads": 1,
}
VOCAB = 49152


def build_135m(folder: Path, tokenizer_dir: Path, smoke: bool = False) -> Path:
    """Write the model (seeded, so every run measures the same weights) with the given tokenizer into `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # The smoke model generates only ids its tokenizer can decode; the measured one keeps SmolLM's vocabulary, whose
    # output layer is a large share of a 135M model's work.
    shape = {**SMOKE_SHAPE, "vocab_size": len(tokenizer)} if smoke else {**SHAPE, "vocab_size": VOCAB}
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
