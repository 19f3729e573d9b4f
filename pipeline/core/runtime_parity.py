"""What every exported runtime (ONNX Runtime GenAI, optimum's ONNX, llama.cpp) is compared with: PyTorch's greedy
answers and the logits after each prompt, on the merged export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Greedy:
    tokens: list[list[int]]  # generated tokens per prompt
    first_logits: list[Any]  # float32 arrays: the logits after each prompt


def _float32(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _generate(model: Any, ids: list[list[int]], max_new_tokens: int) -> Greedy:
    import torch

    tokens, first_logits = [], []
    with torch.no_grad():
        for prompt in ids:
            first_logits.append(model(torch.tensor([prompt])).logits[0, -1].numpy())
            output = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=model.generation_config.eos_token_id,
                pad_token_id=model.generation_config.pad_token_id,
            )
            tokens.append(output[0, len(prompt) :].tolist())
    return Greedy(tokens, first_logits)


def torch_greedy(model_dir: Path, ids: list[list[int]], max_new_tokens: int) -> Greedy:
    return _generate(_float32(model_dir), ids, max_new_tokens)


def until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """The answer up to and including its first stop token: runtimes differ in whether they keep generating (or
    padding) after it."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return list(tokens[: cut + 1])


def compare(reference: Greedy, candidate: Greedy, stop_ids: list[int]) -> dict[str, Any]:
    import numpy as np

    same = [until_stop(a, stop_ids) == until_stop(b, stop_ids) for a, b in zip(reference.tokens, candidate.tokens)]
    difference = float(
        max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(reference.first_logits, candidate.first_logits))
    )
    scale = float(max(np.abs(np.asarray(a)).max() for a in reference.first_logits))
    return {
        "prompts": len(same),
        "identical_greedy_outputs": sum(same),
        "agreement_rate": sum(same) / len(same),
        "first_step_max_abs_logit_diff": difference,
        "first_step_relative_logit_diff": difference / max(scale, 1e-12),
        "reference_max_abs_logit": scale,
    }


@dataclass
class Reference:
    """PyTorch's greedy answers on the merged export's parity prompts, with what a runtime is measured against them
    with: its stop tokens, and the model itself for the margins at a divergence."""

    ids: list[list[int]]
    max_new_tokens: int
    stop_ids: list[int]
    model: Any
    answers: Greedy

    @classmethod
    def measure(cls, model_dir: Path, ids: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> Reference:
        model = _float32(model_dir)
        return cls(ids, max_new_tokens, stop_ids, model, _generate(model, ids, max_new_tokens))

    def compare(self, candidate: Greedy) -> dict[str, Any]:
        return compare(self.answers, candidate, self.stop_ids)

    def divergences(self, candidate: Greedy) -> list[dict[str, Any]]:
        """Where a runtime's greedy answer leaves PyTorch's: the prompt, the position, and PyTorch's own margin there
        between its token and the runtime's (logit difference). A margin within the runtime's numerical error is a
        near tie that any rounding may flip; a large one is a broken runtime."""
        import torch

        found = []
        for index, (prompt, want, got) in enumerate(zip(self.ids, self.answers.tokens, candidate.tokens)):
            want, got = until_stop(want, self.stop_ids), until_stop(got, self.stop_ids)
            if want == got:
                continue
            position = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            if position >= min(len(want), len(got)):  # one stopped where the other went on
                found.append({"prompt": index, "position": position, "pytorch_margin": None})
                continue
            with torch.no_grad():
                logits = self.model(torch.tensor([prompt + want[:position]])).logits[0, -1]
            margin = float(logits[want[position]] - logits[got[position]])
            found.append({"prompt": index, "position": position, "pytorch_margin": margin})
        return found
