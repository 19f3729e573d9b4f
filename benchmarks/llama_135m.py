"""The model the speed benchmarks measure: a Llama-architecture model of about 135M parameters, random weights.

Hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49,152 (the shape of SmolLM-135M). The tiny default recipe's
0.9M-parameter model is too small to say anything about speed: every runtime would measure its own overhead.
"""

from __future__ import annotations

from pathlib import Path


def build_135m(folder: Path, tokenizer_dir: Path) -> Path:
    """Write the model (seeded, so every run measures the same weights) with the given tokenizer into `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return folder
