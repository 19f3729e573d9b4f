"""GPU SFT speed: full, LoRA and QLoRA SFT of a Qwen2-0.5B-shaped model on long packed rows, the pipeline's SFT
stage against a bare TRL SFTTrainer script, with tokens/s, MFU and peak memory.

    python benchmarks/gpu_sft.py            # one CUDA GPU (sized for an H200: about 5 minutes with start-up)
    python benchmarks/gpu_sft.py --tiny     # tiny sizes and a few steps on the CPU: the benchmark's logic only

Models have random weights built from a config (the Qwen2.5-0.5B shape with its 151,936-token vocabulary, and the
1.5B shape for memory), so nothing is downloaded; the tokenizer is trained on the synthetic chat rows, whose
assistant answers run to 2,000 tokens. Rows are packed (TRL's bfd strategy, padding-free) into micro-batches of
8 x 2,048 tokens, padded to that fixed length so that compiled attention kernels see one shape.

Attention: flex_attention on CUDA (its block-sparse document mask attends within each packed row; it needs no
package beyond torch and triton), sdpa on the CPU (flex attention has no backward there). flash_attention_2 needs
the flash-attn package, or the `kernels` package plus a Hub download, which a machine without the Hub cannot make.

Tokens/s is measured over the steps after the warm-up (compilation included in the warm-up), in both programs by the
same callback (added to the pipeline's trainer by wrapping `training.train_and_save`). MFU is model FLOPs (6 x matmul
parameters per token for full fine-tuning, 4 x for adapters over a frozen base, plus causal attention within each
row) over the bf16 matmul peak timed at the start of the same run. Peak memory is torch's peak allocation.

Goals reported against: full bf16 SFT at MFU >= 35%; pipeline / bare TRL >= 0.97 for every method; a second model
size where QLoRA's peak memory is clearly below LoRA's, and the size where the two cross (from the two sizes).
Every step runs in its own process with its own timeout; with $OUT set, the results so far are written to
$OUT/gpu_sft.json after each step. Exits 1 if a goal is missed or a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QWEN2 = {
    "model_type": "qwen2",
    "hidden_act": "silu",
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "attention_dropout": 0.0,
}
SETTINGS = {
    "gpu": {
        "sizes": {
            "0.5b": {
                **QWEN2,
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "vocab_size": 151936,
            },
            "1.5b": {
                **QWEN2,
                "hidden_size": 1536,
                "intermediate_size": 8960,
                "num_hidden_layers": 28,
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "vocab_size": 151936,
            },
        },
        "tokenizer_vocab": 8192,
        "rows": 600,
        "answer_tokens": (64, 1950),
        "max_length": 2048,
        "per_device": 8,
        "warmup_steps": 5,
        "measured_steps": 15,
        "memory_per_device": 2,
        "memory_steps": 3,
        "matmul": 8192,
        "dtype": "bfloat16",
        "budget_s": 330,
        "timeouts": {"peak": 60, "prepare": 120, "run": 120, "memory": 150},
    },
    "tiny": {
        "sizes": {
            "0.5b": {
                **QWEN2,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 1024,
            },
            "1.5b": {
                **QWEN2,
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 1024,
            },
        },
        "tokenizer_vocab": 512,
        "rows": 160,
        "answer_tokens": (8, 220),
        "max_length": 256,
        "per_device": 2,
        "warmup_steps": 2,
        "measured_steps": 3,
        "memory_per_device": 2,
        "memory_steps": 2,
        "matmul": 512,
        "dtype": "float32",
        "budget_s": 1500,
        "timeouts": {"peak": 120, "prepare": 400, "run": 300, "memory": 600},
    },
}
METHODS = ("full", "lora", "qlora")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
GOAL_MFU, GOAL_RATIO = 0.35, 0.97


# ------------------------------------------------------------------------------------------ the steps


def matmul_peak(n: int, dtype: str = "bfloat16") -> float:
    """Matmul FLOP/s of this machine's torch in `dtype`: the best of several timed batches of an n x n matmul."""
    import torch

    cuda = torch.cuda.is_available()
    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype), device="cuda" if cuda else "cpu") for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    a @ b
    once = time.perf_counter() - start
    # On a CPU without bf16 instructions a bf16 matmul is ~80x slower than fp32 (emulated): fewer repeats there.
    repeats = 50 if cuda else max(1, min(10, int(0.5 / once)))
    best = float("inf")
    for _ in range(4):  # the first batch warms up clocks and kernels
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best


def step_peak(spec: dict) -> dict:
    import torch

    n = spec["matmul"]
    return {
        "matmul_n": n,
        "bf16_peak_tflops": matmul_peak(n) / 1e12,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }


def _synthetic_rows(spec: dict, tokens_per_word: float) -> list[dict]:
    """Chat rows whose answers of made-up words run over `answer_tokens` (at the given tokens per word): seeded, so
    every run trains on the same text."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    low, high = (round(n / tokens_per_word) for n in spec["answer_tokens"])
    return [
        {
            "messages": [
                {"role": "user", "content": f"Write passage {i} about {' '.join(rng.choices(words, k=6))}."},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(low, high)))},
            ]
        }
        for i in range(spec["rows"])
    ]


def _recipe(spec: dict, workdir: Path, size: str) -> Path:
    """The recipe the pipeline runs for one model size (methods and memory settings come as overrides)."""
    import yaml

    trainer = {
        "method": "full",
        "global_batch_size": spec["per_device"],
        "per_device_train_batch_size": spec["per_device"],
        "lora": LORA,
        "quantization": {"bnb_4bit_compute_dtype": "bfloat16"},
        "packing": True,
        "pad_to_multiple_of": spec["per_device"] * spec["max_length"],
        "gradient_checkpointing": False,
        "max_steps": spec["warmup_steps"] + spec["measured_steps"],
        "learning_rate": 1.0e-5,
        "logging_steps": 5,
        "save_steps": 100000,
        "eval_strategy": "no",
    }
    recipe = {
        "run": {"name": size, "seed": 0, "output_dir": str(workdir / "runs")},
        "data": {
            "sources": [{"path": str(workdir / "rows.jsonl")}],
            "eval_fraction": 0.02,
            "max_length": spec["max_length"],
            "min_keep_fraction": 0.5,
            "dedupe": False,
            "num_proc": min(8, os.cpu_count() or 1),
        },
        "model": {
            "name_or_path": str(workdir / "built" / size),
            "chat_template": "chatml",
            "dtype": spec["dtype"],
            "attn_implementation": spec["attention"],
        },
        "sft": trainer,
    }
    path = workdir / f"recipe-{size}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def step_prepare(spec: dict, workdir: Path) -> dict:
    """Rows, a tokenizer trained on them, each model size saved with random weights, and the data artifacts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline import data
    from pipeline.core import chat
    from pipeline.core.config import load_recipe

    template = chat.resolve_chat_template("chatml")
    # The tokenizer learns from the words, whatever the answer lengths; its tokens per word then size the answers.
    rows = _synthetic_rows(spec, 1.0)
    tokenizer = chat.train_tokenizer([(r["messages"], None) for r in rows], spec["tokenizer_vocab"], template)
    answers = [r["messages"][1]["content"] for r in rows[:50]]
    tokens_per_word = sum(len(tokenizer(a)["input_ids"]) for a in answers) / sum(len(a.split()) for a in answers)
    rows = _synthetic_rows(spec, tokens_per_word)
    (workdir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out: dict[str, Any] = {"tokenizer_vocab": len(tokenizer), "tokens_per_word": round(tokens_per_word, 2), "sizes": {}}
    for size, fields in spec["sizes"].items():
        fields = dict(fields)
        config = AutoConfig.for_model(
            fields.pop("model_type"),
            **fields,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
        folder = workdir / "built" / size
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        out["sizes"][size] = {"parameters": sum(p.numel() for p in model.parameters())}
        del model
        recipe = load_recipe(_recipe(spec, workdir, size))
        data.run(recipe)
        lengths = _row_lengths(recipe.run_dir)
        out["sizes"][size].update(train_rows=len(lengths), mean_row_tokens=round(sum(lengths) / len(lengths), 1))
    return out


def _row_lengths(run_dir: Path) -> list[int]:
    import datasets

    from pipeline.core import artifacts, stages

    return list(datasets.load_from_disk(str(run_dir / stages.DATA.name / artifacts.SFT_DATA_DIR))["train"]["length"])


def _step_clock(warmup: int) -> Any:
    """A callback timing the optimizer steps after `warmup`, with the non-padding tokens they trained."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - the Trainer's callback API
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step >= warmup:
                self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        def result(self) -> dict:
            (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
            return {
                "measured_steps": len(self.marks) - 1,
                "tokens": n1 - n0,
                "seconds": t1 - t0,
                "tokens_per_second": (n1 - n0) / (t1 - t0),
            }

    return StepClock()


def _peak_memory_gb() -> float:
    """As the pipeline measures it (`training.peak_memory_mb`), without importing the pipeline into bare TRL."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_pipeline(spec: dict, workdir: Path, size: str, overrides: list[str]) -> dict:
    """The pipeline's SFT stage, as `python -m pipeline.sft --force` runs it, with the step clock added."""
    from pipeline import sft
    from pipeline.core import artifacts, stages, training
    from pipeline.core.config import load_recipe

    clock = _step_clock(spec["warmup_steps"])
    train_and_save = getattr(training.train_and_save, "unwrapped", training.train_and_save)  # once per process

    def timed(trainer, *args, **kwargs):  # noqa: ANN001, ANN202 - the runner's own signature
        trainer.add_callback(clock)
        return train_and_save(trainer, *args, **kwargs)

    timed.unwrapped = train_and_save
    training.train_and_save = timed
    recipe = load_recipe(workdir / f"recipe-{size}.yaml", overrides)
    sft.run(recipe, stages.Options(force=True))
    metrics = artifacts.read_manifest(stages.SFT.folder(recipe))["metrics"]
    return {
        **clock.result(),
        "peak_memory_gb": max(metrics["peak_memory_mb_per_process"]) / 1024,
        "final_loss": metrics["final_loss"],
        "trainable_parameters": metrics["trainable_parameters"],
    }


def step_bare(spec: dict, workdir: Path, size: str, method: str) -> dict:
    """What a user writes with TRL alone: the same model, data, adapter and trainer settings, no pipeline."""
    import datasets
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    run_dir = workdir / "runs" / size
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, spec["dtype"])
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": spec["attention"]}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(str(workdir / "built" / size), **kwargs)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    from pipeline.core import artifacts, stages

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / stages.DATA.name / artifacts.TOKENIZER_DIR))
    train = datasets.load_from_disk(str(run_dir / stages.DATA.name / artifacts.SFT_DATA_DIR))["train"].select_columns(
        ["messages", "input_ids", "assistant_masks"]
    )
    args = SFTConfig(
        output_dir=str(workdir / "bare"),
        seed=0,
        per_device_train_batch_size=spec["per_device"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup_steps"] + spec["measured_steps"],
        learning_rate=1.0e-5,
        packing=True,
        pad_to_multiple_of=spec["per_device"] * spec["max_length"],
        max_length=spec["max_length"],
        assistant_only_loss=True,
        gradient_checkpointing=False,
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
    )
    peft_config = None if method == "full" else LoraConfig(**LORA, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    clock = _step_clock(spec["warmup_steps"])
    trainer.add_callback(clock)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        **clock.result(),
        "peak_memory_gb": _peak_memory_gb(),
        "final_loss": losses[-1] if losses else None,
        "trainable_parameters": trainable,
    }


def step_memory(spec: dict, workdir: Path) -> dict:
    """Peak memory of LoRA and QLoRA at each size, at the settings QLoRA is for: gradient checkpointing and small
    padded micro-batches, so that the weights, not the activations, decide. One process: the peak is reset between."""
    import gc

    import torch

    out = {}
    for size in spec["sizes"]:
        for method in ("lora", "qlora"):
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            overrides = [
                f"sft.method={method}",
                "sft.gradient_checkpointing=true",
                "sft.packing=false",
                "sft.pad_to_multiple_of=null",
                "model.attn_implementation=sdpa",
                f"sft.global_batch_size={spec['memory_per_device']}",
                f"sft.per_device_train_batch_size={spec['memory_per_device']}",
                f"sft.max_steps={spec['memory_steps']}",
            ]
            memory_spec = {**spec, "warmup_steps": 0}
            result = step_pipeline(memory_spec, workdir, size, overrides)
            out[f"{size}-{method}"] = {"peak_memory_gb": result["peak_memory_gb"], "final_loss": result["final_loss"]}
    return out


# --------------------------------------------------------------------------------------- accounting


def flops_per_token(fields: dict, method: str, row_lengths: list[int], trainable: int) -> float:
    """Training FLOPs per non-padding token: matmuls (6x their parameters for full fine-tuning; 4x with a frozen
    base, which computes no weight gradients, plus 6x the adapter's), and causal attention within each row (query
    times key and weights times value, forward and twice that backward). `forward`: a forward pass alone (2x the
    matmul parameters and a third of the attention), as a frozen reference model costs."""
    d, layers, ffn = fields["hidden_size"], fields["num_hidden_layers"], fields["intermediate_size"]
    head_dim = d // fields["num_attention_heads"]
    kv = fields["num_key_value_heads"] * head_dim
    matmul = layers * (d * (d + 2 * kv) + d * d + 3 * d * ffn) + d * fields["vocab_size"]
    # A token at position i of its row attends to i + 1 keys: the mean over every token of every row.
    context = sum(n * (n + 1) / 2 for n in row_lengths) / sum(row_lengths)
    attention = 3 * layers * 4 * d * context
    if method == "forward":
        return 2 * matmul + attention / 3
    if method == "full":
        return 6 * matmul + attention
    return 4 * matmul + 6 * trainable + attention


def crossover(memory: dict, sizes: dict) -> dict:
    """Where QLoRA's peak memory falls below LoRA's: the saving (LoRA - QLoRA) as a straight line in parameters."""
    small, big = list(sizes)
    n1, n2 = sizes[small]["parameters"], sizes[big]["parameters"]
    d1 = memory[f"{small}-lora"]["peak_memory_gb"] - memory[f"{small}-qlora"]["peak_memory_gb"]
    d2 = memory[f"{big}-lora"]["peak_memory_gb"] - memory[f"{big}-qlora"]["peak_memory_gb"]
    out = {"saving_gb": {small: d1, big: d2}}
    if d2 != d1:
        out["crossover_parameters"] = n1 - d1 * (n2 - n1) / (d2 - d1)
    return out


# ------------------------------------------------------------------------------------------ the driver


def plan(spec: dict) -> list[tuple[str, str, list[str]]]:
    """(name, timeout key, step arguments): pipeline and bare alternate which goes first from method to method."""
    steps = [("peak", "peak", ["peak"]), ("prepare", "prepare", ["prepare"])]
    for index, method in enumerate(METHODS):
        pair = [
            (f"{method}-pipeline", "run", ["pipeline", "0.5b", method]),
            (f"{method}-bare", "run", ["bare", "0.5b", method]),
        ]
        steps += pair if index % 2 == 0 else pair[::-1]
    steps.append(("memory", "memory", ["memory"]))
    # The padded baseline: sdpa's fused kernels on rows padded to the longest of each micro-batch, no packing.
    steps.append(("full-sdpa-padded-pipeline", "run", ["pipeline", "0.5b", "full", "padded"]))
    return steps


def run_step(spec: dict, workdir: Path, args: list[str], timeout: float) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--step",
        json.dumps({"spec": spec, "workdir": str(workdir), "args": args}),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stderr or b"")[-2000:]
        return {
            "status": "timeout",
            "seconds": round(time.time() - started, 1),
            "error": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
        }
    seconds = round(time.time() - started, 1)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        return {"status": "failed", "seconds": seconds, "error": (done.stderr or done.stdout)[-3000:]}
    return {"status": "ok", "seconds": seconds, "result": json.loads(line.removeprefix("RESULT "))}


def summarise(spec: dict, steps: dict) -> dict:
    """Tokens/s, MFU, memory and the goals, from whatever steps finished."""
    ok = {name: s["result"] for name, s in steps.items() if s["status"] == "ok"}
    summary: dict[str, Any] = {"runs": {}, "goals": {}}
    peak = ok.get("peak", {}).get("bf16_peak_tflops")
    prepared = ok.get("prepare")
    lengths = None
    if prepared:
        lengths = _row_lengths(Path(spec["workdir"]) / "runs" / "0.5b")
    for name, result in ok.items():
        if "tokens_per_second" not in result:
            continue
        method = name.split("-")[0]
        row = {
            "tokens_per_second": result["tokens_per_second"],
            "peak_memory_gb": result["peak_memory_gb"],
            "final_loss": result["final_loss"],
        }
        if peak and lengths:
            flops = flops_per_token(spec["sizes"]["0.5b"], method, lengths, result["trainable_parameters"])
            row["mfu"] = result["tokens_per_second"] * flops / (peak * 1e12)
        summary["runs"][name] = row
    runs = summary["runs"]
    if "full-pipeline" in runs and "mfu" in runs["full-pipeline"]:
        summary["goals"]["full_mfu"] = {
            "value": runs["full-pipeline"]["mfu"],
            "goal": GOAL_MFU,
            "met": runs["full-pipeline"]["mfu"] >= GOAL_MFU,
        }
    for method in METHODS:
        p, b = runs.get(f"{method}-pipeline"), runs.get(f"{method}-bare")
        if p and b:
            ratio = p["tokens_per_second"] / b["tokens_per_second"]
            summary["goals"][f"{method}_pipeline_over_bare"] = {
                "value": ratio,
                "goal": GOAL_RATIO,
                "met": ratio >= GOAL_RATIO,
            }
    if "memory" in ok and prepared:
        memory = ok["memory"]
        summary["memory"] = memory
        cross = crossover(memory, prepared["sizes"])
        summary["memory_crossover"] = cross
        big = list(spec["sizes"])[-1]
        # "Clearly below": QLoRA saves at least a tenth of LoRA's peak at the larger size.
        saved = cross["saving_gb"][big] >= 0.1 * memory[f"{big}-lora"]["peak_memory_gb"]
        summary["goals"]["qlora_below_lora_at_" + big] = {
            "value": cross["saving_gb"][big],
            "goal": "saving >= 10% of LoRA's peak",
            "met": saved,
        }
    return summary


def write(out: dict) -> None:
    folder = os.environ.get("OUT")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "gpu_sft.json").write_text(json.dumps(out, indent=1) + "\n")


def report(out: dict) -> None:
    spec, summary = out["spec"], out["summary"]
    peak = out["steps"].get("peak", {}).get("result", {})
    print(
        f"\nGPU SFT benchmark on {peak.get('device', '?')} (torch {peak.get('torch', '?')}),"
        f" {'TINY' if out['tiny'] else 'full'} sizes, attention {spec['attention']}, micro-batch {spec['per_device']} x"
        f" {spec['max_length']} tokens packed"
    )
    if peak:
        print(f"  bf16 matmul peak ({peak['matmul_n']}^3): {peak['bf16_peak_tflops']:.4g} TFLOP/s")
    for name, step in out["steps"].items():
        if step["status"] != "ok":
            print(
                f"  {name}: {step['status'].upper()} after {step['seconds']} s: {step.get('error', '')[-400:].strip()}"
            )
    print(f"  {'run':28} {'tokens/s':>11} {'MFU':>7} {'peak GB':>8} {'loss':>7}")
    for name, row in summary["runs"].items():
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        print(
            f"  {name:28} {row['tokens_per_second']:>11,.0f} {mfu:>7} {row['peak_memory_gb']:>8.2f}"
            f" {row['final_loss'] or 0:>7.3f}"
        )
    for name, row in summary.get("memory", {}).items():
        print(
            f"  memory {name:21} peak {row['peak_memory_gb']:.2f} GB (gradient checkpointing,"
            f" {spec['memory_per_device']} padded rows)"
        )
    cross = summary.get("memory_crossover", {})
    if "crossover_parameters" in cross:
        print(
            f"  QLoRA saves {', '.join(f'{v:.2f} GB at {k}' for k, v in cross['saving_gb'].items())}: it falls below"
            f" LoRA from about {cross['crossover_parameters'] / 1e6:,.1f}M parameters (straight line through the two"
            " sizes)"
        )
    for name, goal in summary["goals"].items():
        value = f"{goal['value']:.1%}" if name == "full_mfu" else f"{goal['value']:.3f}"
        print(f"  goal {name}: {value} (goal {goal['goal']}): {'MET' if goal['met'] else 'MISSED'}")
    print(f"  {out['total_seconds']:.0f} s for every step together")
    if out["tiny"]:
        print(
            "  (--tiny: CPU and tiny sizes check the benchmark's logic; its figures say nothing about a GPU, and on the"
            " CPU peak memory is the process's resident high-water mark)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", "--smoke", action="store_true", help="tiny sizes and a few steps, on the CPU: checks the logic"
    )
    parser.add_argument("--attention", help="attention for packed rows (default: flex_attention on CUDA, else sdpa)")
    parser.add_argument("--workdir", help="where models, data and runs go (default: a new temporary folder)")
    parser.add_argument("--budget", type=float, help="seconds for every step together; later steps are skipped past it")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        job = json.loads(args.step)
        spec, workdir, (kind, *rest) = job["spec"], Path(job["workdir"]), job["args"]
        if kind == "peak":
            result = step_peak(spec)
        elif kind == "prepare":
            result = step_prepare(spec, workdir)
        elif kind == "memory":
            result = step_memory(spec, workdir)
        elif kind == "bare":
            result = step_bare(spec, workdir, *rest)
        else:
            size, method, *padded = rest
            overrides = [f"sft.method={method}"]
            if padded:
                overrides += ["sft.packing=false", "sft.pad_to_multiple_of=null", "model.attn_implementation=sdpa"]
            result = step_pipeline(spec, workdir, size, overrides)
        print("RESULT " + json.dumps(result))
        return

    import torch

    spec = dict(SETTINGS["tiny" if args.tiny else "gpu"])
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to check the benchmark's logic on the CPU.")
    spec["attention"] = args.attention or ("flex_attention" if torch.cuda.is_available() else "sdpa")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-sft-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec["workdir"] = str(workdir)
    budget = args.budget or spec["budget_s"]
    out: dict[str, Any] = {"tiny": args.tiny, "spec": spec, "steps": {}, "summary": {}}
    started = time.time()
    for name, timeout_key, step_args in plan(spec):
        left = budget - (time.time() - started)
        needs_prepare = name not in ("peak", "prepare") and out["steps"].get("prepare", {}).get("status") != "ok"
        if left < 30 or needs_prepare:
            out["steps"][name] = {
                "status": "skipped",
                "seconds": 0,
                "error": "no prepared models" if needs_prepare else "over the time budget",
            }
        else:
            print(f"{name} (timeout {min(spec['timeouts'][timeout_key], left):.0f} s) ...", flush=True)
            out["steps"][name] = run_step(spec, workdir, step_args, min(spec["timeouts"][timeout_key], left))
        out["summary"] = summarise(spec, out["steps"])
        write(out)
    out["total_seconds"] = round(time.time() - started, 1)
    write(out)
    report(out)
    failed = [n for n, s in out["steps"].items() if s["status"] != "ok"]
    # Goals are about a GPU: --tiny checks that every step runs, not the figures.
    missed = [] if args.tiny else [n for n, g in out["summary"]["goals"].items() if not g["met"]]
    sys.exit(1 if failed or missed else 0)


if __name__ == "__main__":
    main()
