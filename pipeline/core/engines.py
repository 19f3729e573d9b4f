"""Generation engines and their settings: vLLM (the engine that serves) or batched HF `generate`.

`engine_settings` is the one place that decides how a model runs when it generates: the same answer for the
evaluation engine and for `serving.vllm_server`, so the model evaluated is the model served, in the served dtype.
Both engines take prompts as token ids rendered by the shared chat template, decode greedily, and stop on the
model's stop tokens and at the served context length (`new_token_budget`), so they answer the same prompts with
the same tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core import chat
from pipeline.core.errors import ConfigError

# vLLM's CPU backend reserves this much memory for its KV cache (GiB) unless VLLM_CPU_KVCACHE_SPACE is set: plenty
# for a short-context model, and small enough for a 2-core, 24 GiB machine running evaluation beside training.
CPU_KV_CACHE_GIB = "1"
SMALL_HOST_CPUS = 4


@dataclass(frozen=True)
class EngineSettings:
    dtype: str  # the dtype the weights run in
    enforce_eager: bool  # vLLM without CUDA graphs / torch.compile

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# The ranks vLLM's LoRA slots come in (vllm.config.lora.MaxLoRARanks): --max-lora-rank takes one of these.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(rank: int) -> int:
    """The smallest LoRA rank slot vLLM offers that holds an adapter of `rank`."""
    for slot in VLLM_LORA_RANKS:
        if slot >= rank:
            return slot
    raise ConfigError(
        f"an adapter of rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}): serve the merged export."
    )


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_settings(model_dtype: str, gpu: bool) -> EngineSettings:
    """How a model of `model_dtype` runs for generation, in evaluation and in serving alike.

    On a GPU, float32 weights run in bfloat16 (what a GPU serves them in) and vLLM captures CUDA graphs. On a CPU
    the weights run in their own dtype, eagerly: a float32 export answers exactly as its HF reference, and eager
    mode starts in a quarter of the time compiling takes (16 vs 65 s for a 135M model).
    """
    if gpu:
        return EngineSettings(dtype="bfloat16" if model_dtype == "float32" else model_dtype, enforce_eager=False)
    return EngineSettings(dtype=model_dtype, enforce_eager=True)


def vllm_environment(gpu: bool) -> dict[str, str]:
    """Environment for vLLM on this host, the same for evaluation and serving (each applied unless already set).

    On a CPU host: the KV-cache size above. On a small CPU host every core has to run the model: vLLM's CPU
    backend keeps one back for its engine process (2 cores, 135M model, 32 concurrent requests: 150 -> 233
    tokens/s without), and runs the model in a worker process the engine process busy-waits on (the model in the
    engine process: 413 -> 476 tokens/s, bfloat16 compiled); in-process, an evaluation also skips starting a
    process per model.
    """
    if gpu:
        return {}
    environment = {"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB}
    if (os.cpu_count() or 1) <= SMALL_HOST_CPUS:
        environment.update(VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if not compiler_vectorizes():
        environment["TORCH_COMPILE_DISABLE"] = "1"
    return environment


def compiler_vectorizes() -> bool:
    """Whether torch's compiler has a vector instruction set on this CPU (none where the CPU lacks AVX2 / AVX-512 /
    NEON, or where ATEN_CPU_CAPABILITY=default is forced). Without one, torch 2.13 writes kernels it cannot compile
    ("'at::vec' has not been declared"): vLLM compiles a few helpers even when the model runs eagerly, and the first
    request that reached one (prompt_logprobs: the ranks of the prompt's tokens) killed the engine and the server. There
    vLLM runs its helpers uncompiled."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return bool(pick_vec_isa())


def apply_vllm_environment(gpu: bool) -> None:
    for key, value in vllm_environment(gpu).items():
        os.environ.setdefault(key, value)
    if os.environ.get("TORCH_COMPILE_DISABLE") == "1":
        import torch._dynamo

        torch._dynamo.config.disable = True  # read from the environment when torch was imported, already done here


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested: str) -> str:
    if requested == "auto":
        return "vllm" if vllm_available() else "hf"
    if requested == "vllm" and not vllm_available():
        raise ConfigError(
            "evaluate.backend is vllm but vLLM is not installed: install the serve-cpu extra (CPU hosts) or the "
            "serve-gpu extra (CUDA hosts), or set evaluate.backend: hf."
        )
    return requested


def prompt_ids(tokenizer: Any, prompts: list[list[dict]], tools: list[Any] | None = None) -> list[list[int]]:
    tools = tools or [None] * len(prompts)
    return [chat.render_ids(tokenizer, p, t, add_generation_prompt=True)["input_ids"] for p, t in zip(prompts, tools)]


def served_context_length(recipe: Any) -> int:
    """The context an export is served with (vLLM's --max-model-len): the length the model was trained on. Evaluation
    generates within it, so an answer the server would cut is cut there too."""
    return recipe.data.max_length


def model_stop_ids(model: Any) -> list[int]:
    """The stop tokens of a model's generation config, always as a list (transformers allows one id)."""
    stop_ids = model.generation_config.eos_token_id
    return stop_ids if isinstance(stop_ids, list) else [stop_ids]


def new_token_budget(prompt_length: int, max_new_tokens: int, context_length: int) -> int:
    """How many tokens may follow a prompt: `max_new_tokens`, and never past the context length, as vLLM's server
    caps a request (prompt plus answer within --max-model-len). Every engine applies it, so an answer cut by the
    context ends at the same token in evaluation, in HF and in serving."""
    return max(0, min(max_new_tokens, context_length - prompt_length))


def decode_answer(tokenizer: Any, token_ids: list[int], stop_ids: list[int]) -> str:
    """Generated ids as text: up to the first stop token, special tokens left out (a tool call's markers are ordinary
    text and stay)."""
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(token_ids) if token in stops), len(token_ids))
    return tokenizer.decode(token_ids[:end], skip_special_tokens=True).strip()


def hf_generate(
    model: Any,
    tokenizer: Any,
    ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 64,
    context_length: int | None = None,
) -> list[str]:
    """Greedy continuations with batched HF `generate`, stopped at the model's stop tokens and at `context_length`
    (default: the model's position limit) as `new_token_budget` says."""
    import torch

    model.eval()
    context_length = context_length or model.config.max_position_embeddings
    stop_ids = model_stop_ids(model)
    pad = tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        budgets = [new_token_budget(len(row), max_new_tokens, context_length) for row in batch]
        width = max(len(row) for row in batch)
        # Left padding keeps every prompt's last token at the same position, where generation continues.
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in batch])
        attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in batch])
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention.to(model.device),
                max_new_tokens=max(budgets),
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=pad,
            )
        # Greedy tokens do not depend on later ones: a row's answer is the batch's continuation cut at its budget.
        answers += [
            decode_answer(tokenizer, row[:budget].tolist(), stop_ids) for row, budget in zip(output[:, width:], budgets)
        ]
    return answers


class VLLMEngine:
    """vLLM's offline engine on one model folder, with the shared engine settings and environment. Where its engine
    runs in a subprocess (GPU and larger CPU hosts), callers need an `if __name__ == "__main__"` guard.

    Generated token ids are decoded with the same tokenizer call as the HF path, so the two backends differ only
    if the engines pick different tokens.
    """

    def __init__(
        self, model_dir: Path | str, settings: EngineSettings, context_length: int, lora_rank: int | None = None
    ) -> None:
        """`lora_rank`: generate through vLLM's LoRA path, as a server with adapters does, with slots of that rank."""
        apply_vllm_environment(on_gpu())
        from vllm import LLM

        self.context_length = context_length
        self.model = model_reference(model_dir)
        self.architecture = _architecture(model_dir) if Path(model_dir).is_dir() else {"hub": str(model_dir)}
        self.lora_rank = lora_rank
        self._adapter_ids: dict[str, int] = {}
        lora = {"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": 1, "max_cpu_loras": 1}
        self.llm = LLM(
            model=str(model_dir),
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            max_model_len=context_length,
            seed=0,
            **(lora if lora_rank else {}),
        )

    def generate(
        self,
        tokenizer: Any,
        ids: list[list[int]],
        max_new_tokens: int,
        stop_ids: list[int],
        adapter: Path | None = None,
    ) -> list[str]:
        """Greedy answers to `ids`; with `adapter` (an engine made with lora_rank), through that LoRA adapter."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        request = None
        if adapter is not None:
            number = self._adapter_ids.setdefault(str(adapter), len(self._adapter_ids) + 1)
            request = LoRARequest(f"adapter-{number}", number, str(adapter))

        budgets = [new_token_budget(len(row), max_new_tokens, self.context_length) for row in ids]
        answerable = [(row, budget) for row, budget in zip(ids, budgets) if budget > 0]
        params = [
            SamplingParams(temperature=0.0, max_tokens=budget, stop_token_ids=stop_ids, skip_special_tokens=True)
            for _, budget in answerable
        ]
        outputs = iter(
            self.llm.generate(
                [TokensPrompt(prompt_token_ids=row) for row, _ in answerable],
                params,
                use_tqdm=False,
                lora_request=request,
            )  # fmt: skip
        )
        # A prompt that fills the context gets no answer, here as in serving (vLLM takes no max_tokens of 0).
        return [
            decode_answer(tokenizer, list(next(outputs).outputs[0].token_ids), stop_ids) if budget > 0 else ""
            for budget in budgets
        ]

    def switch_to(self, model_dir: Path) -> bool:
        """Generate with another model of the same architecture from now on: its weights read in place and the
        prefix cache dropped (its keys and values were the previous model's). False, and nothing changed, where the
        architecture differs. An engine start costs the evaluation of each model ~5 s on 2 cores (compilation
        checks, memory profiling, several full garbage collections of a heap that holds torch and transformers)."""
        if _architecture(model_dir) != self.architecture:
            return False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        self.llm.reset_prefix_cache()
        return True

    def close(self) -> None:
        del self.llm


def model_reference(model: Path | str) -> str:
    """One spelling of a model: a folder's resolved path, or a Hub id as given."""
    return str(Path(model).resolve()) if Path(model).is_dir() else str(model)


def _architecture(model_dir: Path) -> dict[str, Any]:
    """What a model's weights must share with an engine's to be loaded into it: its config, less bookkeeping."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path")}
