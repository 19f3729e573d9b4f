"""Scores: the held-out material every model is asked (`HeldOut`), the shipped `evaluate` metric modules, tool-call
accuracy, and log-probability scoring with the shared chat template (preference accuracy, perplexity)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import artifacts, chat, formats
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.core.schema import EvaluateConfig


METRICS_DIR = Path(__file__).parent / "metrics"


def shipped_metrics() -> list[str]:
    return sorted(p.stem for p in METRICS_DIR.glob("*.py"))


def check_evaluate_section(evaluate: EvaluateConfig, model_names: tuple[str, ...]) -> None:
    """Refuse metrics that are not shipped and gates that are not MODEL.METRIC or MODEL-MODEL.METRIC over
    `model_names` (the stages that yield a model)."""
    shipped = shipped_metrics()
    for name in evaluate.metrics:
        if name not in shipped:
            raise ConfigError(
                f"evaluate.metrics: '{name}' is not shipped; the shipped metrics are: {', '.join(shipped)}."
            )
    for key in evaluate.gates:
        subject, dot, metric = key.partition(".")
        names = subject.split("-")
        if not dot or not metric or len(names) > 2 or any(n not in model_names for n in names):
            raise ConfigError(
                f"evaluate.gates: '{key}' is not MODEL.METRIC (minimum) or MODEL-MODEL.METRIC (minimum difference) "
                f"with models among {', '.join(model_names)}, e.g. dpo.exact_match, dpo-sft.exact_match, or "
                "dpo-sft.exact_match@data/tools.jsonl for the held-out rows of one data source."
            )


def same_answer(output: str, reference: str) -> bool:
    """Exact match, the one definition every score, reward, report and the `exact_match` metric module use: the
    texts are equal but for surrounding whitespace."""
    return output.strip() == reference.strip()


def contains_answer(output: str, reference: str) -> bool:
    """The reference appears in the output as whole words, ignoring case: what a model that answers in a sentence
    ("The capital of France is Paris.") knows, where exact match wants the bare answer. The retention set is scored
    this way, since training changes how a model phrases an answer without changing what it knows."""
    wanted = reference.strip().casefold()
    return bool(wanted) and re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", output.casefold()) is not None


def compute_metric(name: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """A generation metric through `evaluate`, loaded by path from the modules shipped with the package."""
    path = METRICS_DIR / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"metric '{name}' is not shipped; the shipped metrics are: {', '.join(shipped_metrics())}.")
    import evaluate

    return evaluate.load(str(path)).compute(predictions=predictions, references=references)


# Logits held at once by log-probability scoring (elements; float32: 512 MiB), a few copies of which are alive at
# the peak (the model's output, its log-softmax, the loss's upcast). 64 rows of 256 tokens over SmolLM2's 49,152-token
# vocabulary are 3.2 GB a copy: its evaluation peaked at 12.8 GB, more than a 16 GB laptop spares.
LOGITS_BUDGET = 2**27


def _budgeted_batches(lengths: list[int], batch_size: int, vocab_size: int) -> list[slice]:
    """Consecutive batches of at most `batch_size` rows whose padded logits fit LOGITS_BUDGET (one row at least)."""
    batches, first, width = [], 0, 0
    for index, length in enumerate(lengths):
        width, rows = max(width, length), index - first + 1
        if index > first and (rows > batch_size or rows * width * vocab_size > LOGITS_BUDGET):
            batches.append(slice(first, index))
            first, width = index, length
    if lengths:
        batches.append(slice(first, len(lengths)))
    return batches


def _completion_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sequences: list[tuple[list[int], int]], batch_size: int
) -> list[float]:
    """Sum of log-probabilities of each sequence's tokens from `start` on, given everything before them."""
    import torch

    totals: list[float] = []
    model.eval()
    lengths = [len(ids) for ids, _ in sequences]
    for rows in _budgeted_batches(lengths, batch_size, model.config.vocab_size):
        batch = sequences[rows]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        with torch.no_grad():
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)
            ).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None].to(logits.device))[
            ..., 0
        ]
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
    for selected in _budgeted_batches([len(r["input_ids"]) for r in rows], batch_size, model.config.vocab_size):
        batch = rows[selected]
        width = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor(
            [
                [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]
                + [-100] * (width - len(r["input_ids"]))
                for r in batch
            ]
        )
        counted = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            # The model's own loss: mean next-token NLL over the labelled tokens; weight it back to a sum.
            loss = model(
                input_ids=input_ids.to(model.device),
                attention_mask=attention.to(model.device),
                labels=labels.to(model.device),
            ).loss
        total_nll += loss.item() * counted
        total_tokens += counted
    return math.exp(total_nll / max(1, total_tokens))


LOWER_IS_BETTER = frozenset({"perplexity", "tool_false_call_rate"})


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def describe(scores: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))


def tool_call_scores(outputs: list[str], expected: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Tool use in generated text, as the server's client receives it (`chat.served_reply`: a broken call anywhere
    and no call comes back): where calls are due, the share that made one, named the right tools, and gave the right
    arguments (JSON-equal); where none is due, the share that called anyway."""
    due = [(chat.served_reply(text)[1], calls) for text, calls in zip(outputs, expected) if calls]
    not_due = [chat.served_reply(text)[1] for text, calls in zip(outputs, expected) if not calls]
    scores: dict[str, float] = {}
    if due:
        valid = [got for got, _ in due]
        scores["tool_call_rate"] = sum(bool(v) for v in valid) / len(due)
        scores["tool_name_accuracy"] = sum(
            [c["name"] for c in v] == [c["name"] for c in want] for v, (_, want) in zip(valid, due)
        ) / len(due)
        scores["tool_arguments_accuracy"] = sum(v == want for v, (_, want) in zip(valid, due)) / len(due)
    if not_due:
        scores["tool_false_call_rate"] = sum(bool(got) for got in not_due) / len(not_due)
    return scores


def _expected_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
        for c in message["tool_calls"]
    ]


@dataclass
class HeldOut:
    """The held-out material every model is asked, read once from the data artifact.

    Three generation sets, each (prompt messages, tools, source index) with its own references:
    `answers` (held-out conversations whose last assistant turn has text: that text), `tool_calls` (held-out
    conversations with tools: the calls each assistant turn makes, or none where it answers directly) and
    `chosen` (held-out preference prompts: the chosen answer). Plus the tokenized rows for perplexity and the
    pairs for preference accuracy.
    """

    tokenizer: Any
    sources: list[str]  # source labels by index
    sets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sft_rows: Any = None
    pairs: Any = None

    @classmethod
    def load(cls, data_dir: Path, tokenizer: Any, recipe: Any) -> HeldOut:
        import datasets

        limit = recipe.evaluate.max_examples
        held = cls(
            tokenizer, [source.label for source in recipe.data.sources], {"answers": [], "tool_calls": [], "chosen": []}
        )

        def first(split: Any) -> Any:
            return split.select(range(min(limit, len(split)))) if limit is not None else split

        if (data_dir / artifacts.SFT_DATA_DIR).is_dir():
            held.sft_rows = first(datasets.load_from_disk(str(data_dir / artifacts.SFT_DATA_DIR))["eval"])
            for row in held.sft_rows:
                held._add_conversation(
                    chat.clean_messages(row["messages"]), chat.parse_tools(row["tools"]), row["source"]
                )
        if (data_dir / artifacts.PREFERENCE_DATA_DIR).is_dir():
            held.pairs = first(datasets.load_from_disk(str(data_dir / artifacts.PREFERENCE_DATA_DIR))["eval"])
            for row in held.pairs:
                chosen = chat.clean_messages(row["chosen"])
                if chosen[-1].get("content", "").strip() and not chosen[-1].get("tool_calls"):
                    held.sets["chosen"].append(
                        {
                            "prompt": chat.clean_messages(row["prompt"]),
                            "tools": chat.parse_tools(row["tools"]),
                            "source": row["source"],
                            "reference": chosen[-1]["content"],
                        }
                    )
        return held

    def _add_conversation(self, messages: list[dict[str, Any]], tools: Any, source: int) -> None:
        last = messages[-1]
        if last["content"].strip():
            self.sets["answers"].append(
                {
                    "prompt": formats.sft_prompt(messages),
                    "tools": tools,
                    "source": source,
                    "reference": last["content"],
                    "after_tool": messages[-2]["role"] == "tool",
                }
            )
        if not tools:
            return
        calls = [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")]
        for index, message in calls:
            self.sets["tool_calls"].append(
                {"prompt": messages[:index], "tools": tools, "source": source, "reference": _expected_calls(message)}
            )
        if not calls:  # tools offered, none needed: answering directly is right
            self.sets["tool_calls"].append(
                {"prompt": formats.sft_prompt(messages), "tools": tools, "source": source, "reference": []}
            )

    def empty(self) -> bool:
        return not any(self.sets.values())

    def sizes(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.sets.items()}

    def describe(self) -> str:
        return ", ".join(f"{n} held-out {name.replace('_', ' ')}" for name, n in self.sizes().items() if n)

    def generation_sets(self) -> dict[str, list[list[int]]]:
        from pipeline.core import engines

        return {
            name: engines.prompt_ids(self.tokenizer, [r["prompt"] for r in rows], [r["tools"] for r in rows])
            for name, rows in self.sets.items()
            if rows
        }

    def score(self, outputs: dict[str, list[str]], metrics: list[str]) -> dict[str, Any]:
        """Generation metrics of one model's outputs on every set, overall and by source."""
        scores: dict[str, Any] = {}
        by_source: dict[str, dict[str, float]] = {}
        answers, chosen, calls = self.sets["answers"], self.sets["chosen"], self.sets["tool_calls"]
        if answers:
            for metric in metrics:
                scores.update(compute_metric(metric, outputs["answers"], [r["reference"] for r in answers]))
            after_tool = [(o, r["reference"]) for o, r in zip(outputs["answers"], answers) if r["after_tool"]]
            if after_tool:
                scores["tool_answer_match"] = sum(same_answer(o, ref) for o, ref in after_tool) / len(after_tool)
            scores["contains_answer"] = sum(
                contains_answer(o, r["reference"]) for o, r in zip(outputs["answers"], answers)
            ) / len(answers)
        if calls:
            scores.update(tool_call_scores(outputs["tool_calls"], [r["reference"] for r in calls]))
        if chosen:
            scores["chosen_match"] = compute_metric("exact_match", outputs["chosen"], [r["reference"] for r in chosen])[
                "exact_match"
            ]
        for name, metric, matches in (
            ("answers", "exact_match", same_answer),
            ("answers", "contains_answer", contains_answer),
            ("chosen", "chosen_match", same_answer),
        ):
            groups: dict[str, list[bool]] = {}
            for output, row in zip(outputs.get(name, []), self.sets[name]):
                groups.setdefault(self.sources[row["source"]], []).append(matches(output, row["reference"]))
            for label, hits in groups.items():
                by_source.setdefault(label, {})[metric] = sum(hits) / len(hits)
        if by_source:
            scores["by_source"] = by_source
        return scores

    def likelihood_scores(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int
    ) -> dict[str, float]:
        scores: dict[str, float] = {}
        if self.sft_rows is not None and len(self.sft_rows):
            scores["perplexity"] = perplexity(model, tokenizer, self.sft_rows, batch_size)
        if self.pairs is not None and len(self.pairs):
            preference = preference_scores(model, tokenizer, self.pairs, batch_size)
            scores.update(preference_accuracy=preference["preference_accuracy"], mean_margin=preference["mean_margin"])
        return scores

    def write_predictions(self, path: Path, outputs: dict[str, dict[str, list[str]]]) -> None:
        """One line per held-out item: its set, source, prompt, reference and every model's answer."""
        with open(path, "w", encoding="utf-8") as handle:
            for name, rows in self.sets.items():
                for index, row in enumerate(rows):
                    record = {
                        "set": name,
                        "source": self.sources[row["source"]],
                        "prompt": row["prompt"],
                        "reference": row["reference"],
                        "answers": {model: out[name][index] for model, out in outputs.items()},
                    }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
