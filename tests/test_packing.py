"""Packed rows stay apart: a padding-free micro-batch scores each row as that row alone, and recipes that would pay
for keeping rows apart quadratically (or would let them leak) are refused before any work starts."""

from __future__ import annotations

import pytest

from pipeline.core import models
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError
from pipeline.core.models import check_padding_free_attention

from conftest import TINY_MODEL

ROW_LENGTHS = (17, 40, 2, 5, 33)
VOCAB = 300
# float32 throughout. Masked keys get exactly zero weight, so a packed row can differ from the row alone only in the
# order of additions inside matmuls (float32 rounding, 1e-6 relative; 3e-6 on the logits of a larger model). Measured
# here: identical log-probs for sdpa, eager and flex attention, while a row that sees the rows before it moves them
# by 0.11 (the control below). The tolerance sits 1000x below that leak.
LOG_PROB_TOLERANCE = 1e-4


def _rows() -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in ROW_LENGTHS]


def _model(attn_implementation: str):
    """A tiny seeded Llama with TRL's fused log-prob head, the head SFTTrainer computes the loss with."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    fields = {k: v for k, v in TINY_MODEL.items() if k != "model_type"}
    config = AutoConfig.for_model(TINY_MODEL["model_type"], **fields, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    add_fused_lm_head(model)
    return model.train()  # as the trainer runs it (no dropout in this config)


def _collate(rows: list[list[int]], pad_to_multiple_of: int | None = None) -> dict:
    """TRL's own padding-free collation: one flattened row, position ids restarting at 0 per row, row boundaries."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=pad_to_multiple_of)
    return collator([{"input_ids": row} for row in rows])


def _log_probs(model, batch: dict):
    """Per-token log-probabilities of each next token, as SFTTrainer.compute_loss gets them (zero where unscored)."""
    return model(**batch, fused_lm_head=True).log_probs[0]


def _compare(packed, separate: list, rows: list[list[int]]) -> float:
    """Largest difference between each row's log-probs inside the packed micro-batch and alone; the position that
    would predict the next row's first token must be unscored."""
    worst, start = 0.0, 0
    for row, alone in zip(rows, separate):
        inside = packed[start : start + len(row) - 1]
        worst = max(worst, (inside - alone).abs().max().item())
        if start + len(row) - 1 < packed.numel():
            assert packed[start + len(row) - 1].item() == 0, "the last token of a row is scored against the next row"
        start += len(row)
    return worst


def packed_against_separate(
    attn_implementation: str,
    device: str = "cpu",
    pad_to_multiple_of: int | None = None,
    backward: bool = True,
    separate_with: str | None = None,
) -> tuple[float, float | None]:
    """The rows packed into one micro-batch against each row alone: the largest log-prob difference, and (with
    `backward`) the largest gradient difference of their sums, relative to each weight's largest gradient. The rows
    alone are scored with `separate_with` where given (the same seeded weights), else with the same attention."""
    import torch

    rows = _rows()
    model = _model(attn_implementation).to(device)
    alone_model = _model(separate_with).to(device) if separate_with else model

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    with torch.set_grad_enabled(backward):
        packed = _log_probs(model, on_device(_collate(rows, pad_to_multiple_of)))
        if backward:
            packed.sum().backward()
            packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            model.zero_grad()
        separate = [_log_probs(alone_model, on_device(_collate([row]))) for row in rows]
        if backward:
            torch.stack([s.sum() for s in separate]).sum().backward()
    difference = _compare(packed.detach().cpu(), [s.detach().cpu() for s in separate], rows)
    if not backward:
        return difference, None
    return difference, max(
        ((packed_grads[n] - p.grad).abs().max() / p.grad.abs().max()).item() for n, p in model.named_parameters()
    )


# A row that sees the rows before it moves the gradients by 22% to 137% of each weight's largest gradient (measured
# with the control's position ids); packed and separate rows on the CPU differ by at most 6e-7 of it (the per-token
# terms are added in another order).
GRADIENT_TOLERANCE = 1e-4


@pytest.mark.parametrize("pad_to_multiple_of", [None, 64])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_score_and_train_as_separate_rows(attn_implementation: str, pad_to_multiple_of: int | None) -> None:
    log_probs, gradients = packed_against_separate(attn_implementation, pad_to_multiple_of=pad_to_multiple_of)
    assert log_probs <= LOG_PROB_TOLERANCE and gradients <= GRADIENT_TOLERANCE


def test_flex_attention_scores_packed_rows_as_separate_rows_on_the_cpu() -> None:
    """Forward only: torch 2.13's flex attention has no backward pass on the CPU (it trains on CUDA only). The rows
    alone are scored with sdpa: on an AVX2-only CPU, flex attention scored a single unpacked row up to 0.11 apart from
    sdpa and eager, while its packed rows equal sdpa's rows alone exactly (0.0); on AVX-512 CPUs all agree."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if not pick_vec_isa():
        # Found with ATEN_CPU_CAPABILITY=default forced on an AVX2 CPU: inductor then picks no vector ISA, and the
        # flex attention kernel it writes uses at::vec regardless: "'at::vec' has not been declared".
        pytest.skip("torch 2.13 compiles flex attention on the CPU only with a vector ISA (AVX2, AVX-512, NEON)")
    log_probs, _ = packed_against_separate("flex_attention", backward=False, separate_with="sdpa")
    assert log_probs <= LOG_PROB_TOLERANCE


def test_the_comparison_sees_rows_that_leak() -> None:
    """Control: position ids that run on across rows (one long sequence, as wrapped packing trains) let each row
    attend to the rows before it, and the comparison must see that."""
    import torch

    rows = _rows()
    model = _model("sdpa")
    batch = _collate(rows)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        packed = _log_probs(model, batch)
        separate = [_log_probs(model, _collate([row])) for row in rows]
    assert _compare(packed, separate, rows) > 100 * LOG_PROB_TOLERANCE


# ------------------------------------------------------------------------------------------- the recipe rule


def _checked(path: str, *overrides: str):
    recipe = load_recipe(path, list(overrides))
    check_padding_free_attention(recipe)
    return recipe


def test_the_shipped_recipes_pass_the_rule() -> None:
    tiny = _checked("configs/tiny.yaml")
    assert tiny.sft.trainer["padding_free"] and tiny.model.attn_implementation is None  # sdpa on 8 x 192 tokens
    qwen = _checked("configs/qwen2.5-0.5b-qlora.yaml")
    assert qwen.sft.trainer["packing"] and models.attends_within_rows(qwen.model.attn_implementation)


@pytest.mark.parametrize("attention", ["null", "sdpa", "eager"])
def test_long_padding_free_micro_batches_need_attention_within_rows(attention: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _checked("configs/qwen2.5-0.5b-qlora.yaml", f"model.attn_implementation={attention}")
    message = str(caught.value)
    assert "64 rows x 1024 tokens" in message and "2,048" in message
    for option in (
        "flash_attention_2",
        "kernels-community/flash-attn2",
        "flex_attention",
        "sft.packing: false",
        "sft.per_device_train_batch_size: 2",
    ):
        assert option in message


@pytest.mark.parametrize(
    "attention",
    ["flash_attention_3", "flex_attention", "kernels-community/flash-attn2", "kernels-community/vllm-flash-attn3"],
)
def test_attention_within_rows_packs_any_micro_batch(attention: str) -> None:
    _checked("configs/qwen2.5-0.5b-qlora.yaml", f"model.attn_implementation={attention}")


def test_dense_attention_packs_small_micro_batches_and_padded_batches_of_any_size() -> None:
    _checked("configs/qwen2.5-0.5b-qlora.yaml", "model.attn_implementation=sdpa", "sft.per_device_train_batch_size=2")
    _checked("configs/qwen2.5-0.5b-qlora.yaml", "model.attn_implementation=sdpa", "sft.packing=false")
    with pytest.raises(ConfigError, match="16 rows x 192 tokens"):
        _checked("configs/tiny.yaml", "sft.per_device_train_batch_size=16")


def test_wrapped_packing_is_refused() -> None:
    with pytest.raises(ConfigError, match="rows leak into each other"):
        _checked("configs/qwen2.5-0.5b-qlora.yaml", "sft.packing_strategy=wrapped")


def test_an_unknown_attention_implementation_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        load_recipe("configs/tiny.yaml", ["model.attn_implementation=flash_attn"])
    message = str(caught.value)
    assert "'flash_attn'" in message
    for name in ("eager", "sdpa", "flash_attention_2", "flex_attention", "kernels-community/flash-attn2"):
        assert name in message
