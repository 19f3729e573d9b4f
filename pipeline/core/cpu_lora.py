"""vLLM's LoRA kernels on CPU hosts: a vLLM plugin (the `vllm.general_plugins` entry point in pyproject.toml),
loaded by every vLLM process, the server's and the evaluation engine's alike.

vLLM's CPU path (vllm.lora.ops.torch_ops, used by PunicaWrapperCPU) gathers every token's adapter matrices
(`weights[indices]`, a copy of rank x width per token) and multiplies token by token: prefilling 2,048 tokens through
one 576 -> 1,536 projection at rank 16 took 85 ms there against 3.7 ms for one matrix product (measured on 2 cores,
bfloat16), and the 135M model served 0.17x the tokens/s of its merged weights over 4 adapters. It also reads a token
without an adapter (index -1: a request to the base model) as one of the last slot's adapter, so a base request
batched with adapter requests was answered by an adapter; and it indexes the logits by request, which fails (the
engine dies) where a batch of several requests asks for prompt log-probabilities (a row per prompt token).

Here a batch with one adapter gets one product per projection; a batch with several multiplies by every slot's
matrices at once and keeps each token's own block (no gathers or scatters, which were a fifth of a prefill step;
the extra arithmetic, slots x rank x width a token, is small beside the layer's own); tokens without an adapter are
left as the base model computed them, as vLLM's GPU kernels leave them; the products run in the activations' dtype;
and the output layer, which no adapter this project exports adapts, is skipped where no adapter adapts it.
"""

from __future__ import annotations

from typing import Any


def _one_slot(indices: Any) -> int | None:
    """The adapter slot every token of the batch has (-1: none has one), or None where they differ."""
    first = int(indices[0]) if indices.shape[0] else -1
    return first if not indices.shape[0] or bool((indices == first).all()) else None


def _matrices(weights: Any) -> Any:
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _slot_mask(indices: Any, slots: int, dtype: Any) -> Any:
    """[tokens, slots, 1]: 1 at each token's adapter slot, 0 elsewhere (everywhere for tokens without one)."""
    import torch

    return (indices.unsqueeze(1) == torch.arange(slots, device=indices.device)).to(dtype).unsqueeze(2)


def _compute_dtype(inputs: Any, weights: Any) -> Any:
    """The dtype the products run in: the activations' where the weights share it (bfloat16 serving multiplies in
    bfloat16, accumulating in float32 inside the kernel), else the weights'. Converting every call's activations
    to the float32 buffer's dtype was a copy of the whole batch per projection."""
    return inputs.dtype if inputs.dtype == weights.dtype else weights.dtype


def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling: float = 1.0):
    """output[t, :rank] = scaling * A[slot(t)] x[t] (zero for tokens without an adapter)."""
    weights = _matrices(lora_a_weights)
    slots, rank = weights.shape[0], weights.shape[1]
    dtype = _compute_dtype(inputs, weights)
    inputs = inputs.to(dtype)
    slot = _one_slot(lora_indices_tensor)
    if slot is None:
        every = inputs @ weights.reshape(slots * rank, -1).to(dtype).T
        mask = _slot_mask(lora_indices_tensor, slots, dtype)
        output_tensor[:, :rank] = scaling * (every.view(-1, slots, rank) * mask).sum(dim=1)
    elif slot < 0:
        output_tensor[:, :rank] = 0
    else:
        output_tensor[:, :rank] = scaling * (inputs @ weights[slot].to(dtype).T)


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
    slots, width, rank = weights.shape[0], min(slice_size, weights.shape[1]), weights.shape[2]
    dtype = output_tensor.dtype
    inputs = inputs.to(dtype)  # the rank-wide buffer: small
    slot = _one_slot(lora_indices_tensor)
    if slot is not None and slot < 0:
        return
    if slot is None:
        inputs = (inputs[:, None, :rank] * _slot_mask(lora_indices_tensor, slots, dtype)).reshape(-1, slots * rank)
        matrix = weights[:, :width].transpose(1, 2).reshape(slots * rank, width).to(dtype)
    else:
        matrix = weights[slot, :width].to(dtype).T
    target = output_tensor[:, slice_offset : slice_offset + width]
    if add_inputs:
        target.addmm_(inputs, matrix)  # accumulated in place: one pass over the output
    else:
        target.copy_(inputs @ matrix)


def bgmv_expand(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, add_inputs: bool = True
):
    """output[t, :width] (+)= B[slot(t)] x[t], the width the adapter and the output share (they pad differently)."""
    width = min(_matrices(lora_b_weights).shape[1], output_tensor.shape[1])
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, width, add_inputs)


_EXPLODED: dict[str, Any] = {"key": None, "value": None}


def _token_indices(lora_indices_tensor: Any, seq_len_tensor: Any) -> Any:
    """Each prefill token's adapter slot, from the batch's runs of tokens with one adapter. vLLM recomputed it with
    `repeat_interleave` in every call (0.35 ms each, a seventh of a LoRA step's time); the runs are the same for
    every layer of a step, so it is computed once per step (the runs' values are the key: a few numbers)."""
    import torch

    key = (tuple(lora_indices_tensor.tolist()), tuple(seq_len_tensor.tolist()))
    if _EXPLODED["key"] != key:
        _EXPLODED["key"], _EXPLODED["value"] = key, torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    return _EXPLODED["value"]


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):  # fmt: skip  # noqa: ANN001, ANN201 - vLLM's signature
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):  # fmt: skip  # noqa: ANN001, ANN201
    indices = _token_indices(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):  # fmt: skip  # noqa: ANN001, ANN201
    indices = _token_indices(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


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

    # PunicaWrapperCPU imported the ops by name (sgmv_* for prefill, bgmv_* for decode).
    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = bgmv_shrink, bgmv_expand, bgmv_expand_slice
        module.sgmv_shrink, module.sgmv_expand, module.sgmv_expand_slice = sgmv_shrink, sgmv_expand, sgmv_expand_slice
    punica_cpu.PunicaWrapperCPU.add_lora_logits = add_lora_logits
