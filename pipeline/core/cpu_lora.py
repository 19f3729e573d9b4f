"""vLLM's LoRA kernels on CPU hosts, grouped by adapter: a vLLM plugin (the `vllm.general_plugins` entry point in
pyproject.toml), loaded by every vLLM process, the server's and the evaluation engine's alike.

vLLM's CPU path (vllm.lora.ops.torch_ops, used by PunicaWrapperCPU) gathers every token's adapter matrices
(`weights[indices]`, a copy of rank x width per token) and multiplies token by token: prefilling 2,048 tokens through
one 576 -> 1,536 projection at rank 16 took 85 ms there against 3.7 ms for one matrix product per adapter (measured
on 2 cores, bfloat16), and the 135M model served 0.17x the tokens/s of its merged weights. It also reads a token
without an adapter (index -1: a request to the base model) as one of the last slot's adapter, so a base request
batched with adapter requests was answered by an adapter. Here each adapter present in the batch gets one matrix
product over its tokens, and tokens without an adapter are left as the base model computed them, as vLLM's GPU
kernels leave them. And the logits: vLLM indexes them by request, which fails (the engine dies) where a batch
of several requests asks for prompt log-probabilities (a row per prompt token); adapters that leave the output
layer alone (every adapter this project exports) add nothing there, and are skipped.
"""

from __future__ import annotations

from typing import Any


def _segments(indices: Any) -> list[tuple[int, Any]]:
    """(adapter slot, the rows of its tokens: a slice where they are all the rows) for each slot in `indices`;
    tokens without an adapter (-1) left out."""
    first = int(indices[0]) if indices.shape[0] else -1
    if not indices.shape[0] or bool((indices == first).all()):  # one adapter (or none) for the whole batch
        return [] if first < 0 else [(first, slice(None))]
    return [(slot, (indices == slot).nonzero().squeeze(1)) for slot in indices.unique().tolist() if slot >= 0]


def _matrices(weights: Any) -> Any:
    return weights.squeeze(1) if weights.dim() == 4 else weights


# Batches up to this many tokens with several adapters (decode steps) multiply by every slot's matrices at once and
# keep each token's own block: a few large products instead of several small ones per adapter, whose per-call cost
# dominated decoding (the extra arithmetic, slots x rank x width a token, is small beside the layer's own). Longer
# batches (prefill) take one product per adapter over its tokens.
ALL_SLOTS_TOKENS = 256


def _slot_mask(indices: Any, slots: int, dtype: Any) -> Any:
    """[tokens, slots, 1]: 1 at each token's adapter slot, 0 elsewhere (everywhere for tokens without one)."""
    import torch

    return (indices.unsqueeze(1) == torch.arange(slots, device=indices.device)).to(dtype).unsqueeze(2)


def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling: float = 1.0):
    """output[t, :rank] = scaling * A[slot(t)] x[t] (zero for tokens without an adapter)."""
    weights = _matrices(lora_a_weights)
    slots, rank = weights.shape[0], weights.shape[1]
    segments = _segments(lora_indices_tensor)
    if len(segments) > 1 and inputs.shape[0] <= ALL_SLOTS_TOKENS:
        every = inputs.to(output_tensor.dtype) @ weights.reshape(slots * rank, -1).to(output_tensor.dtype).T
        mask = _slot_mask(lora_indices_tensor, slots, output_tensor.dtype)
        output_tensor[:, :rank] = scaling * (every.view(-1, slots, rank) * mask).sum(dim=1)
        return
    if not (len(segments) == 1 and isinstance(segments[0][1], slice)):
        output_tensor[:, :rank] = 0
    for slot, rows in segments:
        product = inputs[rows].to(output_tensor.dtype) @ weights[slot].to(output_tensor.dtype).T
        output_tensor[rows, :rank] = scaling * product


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
):
    """output[t, offset:offset+size] (+)= B[slot(t)] x[t] for tokens with an adapter."""
    weights = _matrices(lora_b_weights)
    width = min(slice_size, weights.shape[1])
    columns = slice(slice_offset, slice_offset + width)
    segments = _segments(lora_indices_tensor)
    if len(segments) > 1 and inputs.shape[0] <= ALL_SLOTS_TOKENS:
        slots, rank = weights.shape[0], weights.shape[2]
        mask = _slot_mask(lora_indices_tensor, slots, output_tensor.dtype)
        blocks = (inputs.to(output_tensor.dtype)[:, None, :rank] * mask).reshape(-1, slots * rank)
        stacked = weights[:, :width].transpose(1, 2).reshape(slots * rank, width).to(output_tensor.dtype)
        if add_inputs:
            output_tensor[:, columns] += blocks @ stacked
        else:
            output_tensor[:, columns] = blocks @ stacked
        return
    for slot, rows in segments:
        product = inputs[rows].to(output_tensor.dtype) @ weights[slot, :width].to(output_tensor.dtype).T
        if add_inputs:
            output_tensor[rows, columns] += product
        else:
            output_tensor[rows, columns] = product


def bgmv_expand(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, add_inputs: bool = True
):
    """output[t, :width] (+)= B[slot(t)] x[t], the width the adapter and the output share (they pad differently)."""
    width = min(_matrices(lora_b_weights).shape[1], output_tensor.shape[1])
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, width, add_inputs)


def add_lora_logits(self: Any, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: float, **_: Any):
    """y += scale * B (A x) for the output layer, rows by request; nothing where no adapter adapts it."""
    import torch

    if not bool(lora_a_stacked.any()):  # no adapter served adapts the output layer (A is the smaller of the two)
        return
    y_rows, x_rows = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    indices = self.sampler_indices
    if indices.shape[0] != x_rows.shape[0]:
        raise RuntimeError(
            f"an adapter adapts the output layer, and the batch asks for {x_rows.shape[0]} rows of logits from "
            f"{indices.shape[0]} requests (prompt log-probabilities): vLLM's CPU LoRA path cannot tell which request "
            "each row belongs to. Leave lm_head out of lora.target_modules, or ask for prompt_logprobs one at a time."
        )
    buffer = torch.zeros((x_rows.shape[0], lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
    bgmv_shrink(x_rows, lora_a_stacked, buffer, indices, scale)
    bgmv_expand(buffer, lora_b_stacked, y_rows, indices, add_inputs=True)


def register() -> None:
    """Put the grouped kernels in place of vLLM's torch ops on CPU hosts (vLLM calls this in each of its processes)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    # lora_ops' sgmv_* (prefill) call its bgmv_* by name; PunicaWrapperCPU imported the bgmv_* (decode) itself.
    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = bgmv_shrink, bgmv_expand, bgmv_expand_slice
    punica_cpu.PunicaWrapperCPU.add_lora_logits = add_lora_logits
