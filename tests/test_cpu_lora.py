"""The grouped LoRA kernels vLLM runs on CPU hosts (pipeline/core/cpu_lora.py) against the definition, token by
token: each token gets its own adapter's update, a token without an adapter (-1) none, in one- and many-adapter
batches of one token, a decode step and a prefill."""

from __future__ import annotations

import pytest
import torch

from pipeline.core import cpu_lora

RANK, WIDTH_IN, WIDTH_OUT, SLOTS = 8, 48, 80, 4


def reference(x, a, b, indices, scaling: float, y) -> torch.Tensor:  # noqa: ANN001 - tensors
    out = y.double().clone()
    for token, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[token] += b[slot, 0].double() @ (scaling * (a[slot, 0].double() @ x[token].double()))
    return out


# What vLLM hands the kernels: activations and adapter weights in the model's dtype, a float32 rank-wide buffer.
# Measured here, largest |error| / (|reference| + 1) over these cases: float32 8.2e-7 natively, 1.1e-6 with
# ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41 and MKL_CBWR=COMPATIBLE forced together (each alone:
# 8.2e-7 to 9.0e-7); bfloat16 1.08e-2 in every family (its 8-bit mantissa, not the kernels). Allowed: float32 about
# 10x that, bfloat16 2x (bfloat16's rounding is the dtype's, the same on every CPU).
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 12, 300], ids=["one token", "decode", "prefill"])
@pytest.mark.parametrize("batch", ["one adapter", "mixed", "mixed with base", "base only"])
def test_each_token_gets_its_own_adapter_and_base_tokens_none(tokens: int, batch: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, WIDTH_IN, generator=generator).to(dtype)
    a = (torch.randn(SLOTS, 1, RANK, WIDTH_IN, generator=generator) / 8).to(dtype)
    b = torch.randn(SLOTS, 1, WIDTH_OUT, RANK, generator=generator).to(dtype)
    y = torch.randn(tokens, WIDTH_OUT, generator=generator).to(dtype)
    rtol, atol = TOLERANCE[dtype]
    indices = {
        "one adapter": torch.full((tokens,), 2),
        "mixed": torch.arange(tokens) % SLOTS,
        "mixed with base": torch.arange(tokens) % (SLOTS + 1) - 1,
        "base only": torch.full((tokens,), -1),
    }[batch]
    buffer = torch.full((tokens, RANK), 7.0)  # stale values from an earlier step must not leak in
    served = y.clone()
    cpu_lora.bgmv_shrink(x, a, buffer, indices, 0.5)
    cpu_lora.bgmv_expand(buffer, b, served, indices, add_inputs=True)
    expected = reference(x, a, b, indices, 0.5, y)
    assert torch.allclose(served.double(), expected, rtol=rtol, atol=atol)
    base_rows = indices < 0
    assert torch.equal(served[base_rows], y[base_rows])

    sliced = y.clone()  # the slice form: an adapter's output written into columns of a fused projection
    cpu_lora.bgmv_expand_slice(buffer, b[:, :, :16], sliced, indices, 32, 16, add_inputs=True)
    part = reference(x, a, b[:, :, :16], indices, 0.5, y[:, 32:48])
    assert torch.allclose(sliced[:, 32:48].double(), part, rtol=rtol, atol=atol)
    assert torch.equal(sliced[:, :32], y[:, :32]) and torch.equal(sliced[:, 48:], y[:, 48:])


def test_prefill_runs_of_tokens_give_what_each_token_asked_alone() -> None:
    """The prefill form: runs of tokens with one adapter each (vLLM's segments), the last run without one."""
    generator = torch.Generator().manual_seed(0)
    runs, lengths = torch.tensor([1, 3, 1, -1]), torch.tensor([5, 2, 7, 4])
    tokens = int(lengths.sum())
    x = torch.randn(tokens, WIDTH_IN, generator=generator)
    a = torch.randn(SLOTS, 1, RANK, WIDTH_IN, generator=generator)
    b = torch.randn(SLOTS, 1, WIDTH_OUT, RANK, generator=generator)
    y = torch.randn(tokens, WIDTH_OUT, generator=generator)
    starts = torch.cumsum(lengths, 0) - lengths
    metadata = (starts, lengths, runs, len(runs), int(lengths.max()), tokens)
    buffer = torch.zeros(tokens, RANK)
    served = y.clone()
    cpu_lora.sgmv_shrink(x, a, buffer, *metadata, 2.0)
    cpu_lora.sgmv_expand(buffer, b, served, *metadata, add_inputs=True)
    expected = reference(x, a, b, torch.repeat_interleave(runs, lengths), 2.0, y)
    assert torch.allclose(served.double(), expected, rtol=1e-5, atol=1e-4)
