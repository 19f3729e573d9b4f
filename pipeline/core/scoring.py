"""Scores: the shipped `evaluate` metric modules, and log-probability scoring with the shared chat template
(preference accuracy, perplexity)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import artifacts, chat
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


METRICS_DIR = Path(__file__).parent / "metrics"


def shipped_metrics() -> list[str]:
    return sorted(p.stem for p in METRICS_DIR.glob("*.py"))


def compute_metric(name: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """A generation metric through `evaluate`, loaded by path from the modules shipped with the package."""
    path = METRICS_DIR / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"metric '{name}' is not shipped; the shipped metrics are: {', '.join(shipped_metrics())}.")
    import evaluate

    return evaluate.load(str(path)).compute(predictions=predictions, references=references)


def _completion_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sequences: list[tuple[list[int], int]], batch_size: int
) -> list[float]:
    """Sum of log-probabilities of each sequence's tokens from `start` on, given everything before them."""
    import torch

    totals: list[float] = []
    model.eval()
    for first in range(0, len(sequences), batch_size):
        batch = sequences[first : first + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None].to(logits.device))[..., 0]
        for row, (ids, start) in enumerate(batch):
            totals.append(logprobs[row, start - 1 : len(ids) - 1].sum().item())
    return totals


def preference_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Any, batch_size: int = 64
) -> dict[str, float]:
    """Share of pairs where the chosen answer is more probable than the rejected one, and the mean margin."""
    sequences = []
    for row in pairs:
        prompt = chat.clean_messages(row["prompt"])
        tools = chat.parse_tools(row.get("tools"))
        start = len(chat.render_ids(tokenizer, prompt, tools, add_generation_prompt=True)["input_ids"])
        for key in ("chosen", "rejected"):
            ids = chat.render_ids(tokenizer, prompt + chat.clean_messages(row[key]), tools)["input_ids"]
            sequences.append((ids, start))
    scores = _completion_logprobs(model, tokenizer, sequences, batch_size)
    margins = [scores[i] - scores[i + 1] for i in range(0, len(scores), 2)]
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / max(1, len(margins)),
        "mean_margin": sum(margins) / max(1, len(margins)),
        "pairs": len(margins),
    }


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Any, batch_size: int = 64) -> float:
    """Token-weighted perplexity of the assistant tokens (the ones training puts in the loss)."""
    import torch

    total_nll, total_tokens = 0.0, 0
    model.eval()
    rows = list(rows)
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor(
            [[t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])] + [-100] * (width - len(r["input_ids"])) for r in batch]
        )
        counted = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            # The model's own loss: mean next-token NLL over the labelled tokens; weight it back to a sum.
            loss = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device), labels=labels.to(model.device)).loss
        total_nll += loss.item() * counted
        total_tokens += counted
    return math.exp(total_nll / max(1, total_tokens))


def held_out_pairs(data_dir: Path, limit: int | None = None) -> Any:
    import datasets

    split = datasets.load_from_disk(str(Path(data_dir) / artifacts.PREFERENCE_DATA_DIR))["eval"]
    return split.select(range(min(limit, len(split)))) if limit is not None else split
