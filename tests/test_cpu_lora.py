"""The grouped LoRA kernels vLLM runs on CPU hosts (pipeline/core/cpu_lora.py) against the definition, token by token:
each token gets its own adapter's update, a token without an adapter (-1) none, in one- and many-adapter batches
short (every slot at once) and long (one product per adapter)."""

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


@pytest.mark.parametrize("tokens", [12, cpu_lora.ALL_SLOTS_TOKENS + 4], ids=["short", "long"])
@pytest.mark.parametrize("batch", ["one adapter", "mixed", "mixed with base", "base only"])
def test_each_token_gets_its_own_adapter_and_base_tokens_none(tokens: int, batch: str) -> None:
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, WIDTH_IN, generator=generator)
    a = torch.randn(SLOTS, 1, RANK, WIDTH_IN, generator=generator)
    b = torch.randn(SLOTS, 1, WIDTH_OUT, RANK, generator=generator)
    y = torch.randn(tokens, WIDTH_OUT, generator=generator)
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
    assert torch.allclose(served.double(), expected, rtol=1e-5, atol=1e-4)
    base_rows = indices < 0
    assert torch.equal(served[base_rows], y[base_rows])

    sliced = y.clone()  # the slice form: an adapter's output written into columns of a fused projection
    cpu_lora.bgmv_expand_slice(buffer, b[:, :, :16], sliced, indices, 32, 16, add_inputs=True)
    part = reference(x, a, b[:, :, :16], indices, 0.5, y[:, 32:48])
    assert torch.allclose(sliced[:, 32:48].double(), part, rtol=1e-5, atol=1e-4)
    assert torch.equal(sliced[:, :32], y[:, :32]) and torch.equal(sliced[:, 48:], y[:, 48:])
