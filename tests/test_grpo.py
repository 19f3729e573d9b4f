"""GRPO stage: the rewards (built-ins, user functions, broken ones), a run that raises the mean reward, each method,
two DDP processes, resume after kill -9, and `pipeline.run` with the stage in the table."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import grpo
from pipeline import run as pipeline_run
from pipeline.core import artifacts, chat, rewards, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError, MissingArtifactError

from conftest import REPO, chat_rows, run_module, write_jsonl, write_recipe
from test_distributed import accelerate_launch
from test_dpo import dpo_recipe, prepare_with_sft
from test_sft import adapter_tensors, no_pickles, prepare, signal_paused, start_paused_at

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
WEATHER = json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])
TOOLS = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])


def grpo_section(**settings) -> dict:
    """A GRPO run short enough for a test: 4 prompts x 4 completions a step, completions of at most 8 tokens."""
    return {
        "method": "lora",
        "rewards": ["exact_match", "stop"],
        "global_batch_size": 16,
        "num_generations": 4,
        "learning_rate": 2e-2,
        "max_steps": 6,
        "max_completion_length": 8,
        "logging_steps": 1,
        "save_steps": 100,
        "lora": LORA,
        **settings,
    }


def grpo_recipe(tmp_path: Path, sft_steps: int = 30, rows: list[dict] | None = None, **settings) -> Path:
    return write_recipe(
        tmp_path,
        [{"path": str(write_jsonl(tmp_path / "chat.jsonl", rows or chat_rows(64)))}],
        sft={"method": "full", "global_batch_size": 8, "learning_rate": 5e-3, "max_steps": sft_steps},
        grpo=grpo_section(**settings),
    )


def logged(folder: Path, key: str) -> list[float]:
    return [e[key] for e in json.loads((folder / artifacts.LOG_HISTORY).read_text()) if key in e]


@pytest.fixture(scope="module")
def tokenizer():
    """A ChatML tokenizer of the kind the data stage trains (its end-of-turn token is what `stop` looks for)."""
    conversation = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "sunny"}]
    return chat.train_tokenizer([(conversation, None)], 300, chat.resolve_chat_template("chatml"))


def score(name: str, tokenizer, completions: list[str], **columns) -> list:  # noqa: ANN001
    (reward,) = rewards.load([name], tokenizer)
    return reward(prompts=[""] * len(completions), completions=completions, **columns)


# ------------------------------------------------------------------------------------------------ rewards


def test_exact_match_counts_the_reference_text_and_skips_call_turns(tokenizer) -> None:  # noqa: ANN001
    got = score(
        "exact_match", tokenizer, ["animal", " animal\n", "color", CALL], reference=["animal", "animal", "animal", ""]
    )
    assert got == [1.0, 1.0, 0.0, None]


def test_format_rewards_the_shape_of_the_reference(tokenizer) -> None:  # noqa: ANN001
    completions = [
        "red",
        "two words",
        "<tool_call>x</tool_call>",
        CALL,
        f"{CALL} and text",
        "<tool_call>{oops</tool_call>",
    ]
    got = score(
        "format",
        tokenizer,
        completions,
        reference=["blue", "blue", "blue", "", "", ""],
        expected_calls=["[]", "[]", "[]", WEATHER, WEATHER, WEATHER],
    )
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_tool_call_checks_names_and_arguments_against_the_expected_call(tokenizer) -> None:  # noqa: ANN001
    other_city = CALL.replace("Oslo", "Rome")
    other_tool = CALL.replace("get_weather", "get_daytime")
    completions = [CALL, other_city, other_tool, "sunny", "sunny", CALL, "4"]
    got = score(
        "tool_call", tokenizer, completions, expected_calls=[WEATHER] * 4 + ["[]"] * 3, tools=[TOOLS] * 6 + [None]
    )
    assert got == [1.0, 0.5, 0.0, 0.0, 1.0, 0.0, None]


def test_stop_looks_for_the_end_of_turn_token(tokenizer) -> None:  # noqa: ANN001
    end = chat.end_of_turn_token_id(tokenizer)
    assert end != tokenizer.eos_token_id
    got = score(
        "stop", tokenizer, ["a", "b", "c", ""], completion_ids=[[5, end], [5, 6], [5, tokenizer.eos_token_id], []]
    )
    assert got == [1.0, 0.0, 0.0, 0.0]


def test_a_user_function_is_named_module_and_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer
) -> None:  # noqa: ANN001
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent("""
        def brevity(prompts, completions, reference, **kwargs):
            return [1.0 / (1 + abs(len(c) - len(r))) for c, r in zip(completions, reference)]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (reward,) = rewards.load(["my_rewards:brevity"], tokenizer)
    assert reward.__name__ == "my_rewards:brevity"  # TRL logs rewards/my_rewards:brevity/mean
    assert reward(
        prompts=["p", "p"], completions=["abc", "a"], reference=["abc", "abc"], completion_ids=[[1], [1]]
    ) == [1.0, 1 / 3]
    with pytest.raises(ConfigError, match=r"grpo\.rewards\.0: module 'my_rewards' has no function 'nothing'"):
        rewards.load(["my_rewards:nothing"], tokenizer)
    with pytest.raises(ConfigError, match=r"grpo\.rewards\.1: could not import 'no_such_module'"):
        rewards.load(["exact_match", "no_such_module:f"], tokenizer)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("raise KeyError('answer')", r"the GRPO reward 'bad:reward' raised KeyError: 'answer'"),
        ("return [1.0]", r"the GRPO reward 'bad:reward' returned 1 values, for 2 completions"),
        ("return 'good'", r"the GRPO reward 'bad:reward' returned a str, for 2 completions"),
        ("return [1.0, float('nan')]", r"the GRPO reward 'bad:reward' returned nan \(a float\) among its values"),
        ("return [1.0, 'x']", r"the GRPO reward 'bad:reward' returned 'x' \(a str\) among its values"),
    ],
)
def test_a_broken_reward_stops_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer, body: str, message: str
) -> None:  # noqa: ANN001
    (tmp_path / "bad.py").write_text(f"def reward(prompts, completions, **kwargs):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad", raising=False)  # each case's own module, not the one imported before
    (reward,) = rewards.load(["bad:reward"], tokenizer)
    with pytest.raises(rewards.RewardError, match=message):
        reward(prompts=["p", "p"], completions=["a", "b"])


def test_recipe_mistakes_name_the_key(tmp_path: Path) -> None:
    path = grpo_recipe(tmp_path)
    with pytest.raises(
        ConfigError, match=r"grpo\.rewards\.1: 'exactmatch' is neither a built-in reward \(exact_match, format"
    ):
        load_recipe(path, ["grpo.rewards=[stop, exactmatch]"])
    with pytest.raises(
        ConfigError,
        match=r"grpo\.reward_weights has 1 weights for the 2 rewards of grpo\.rewards \(exact_match, stop\)",
    ):
        load_recipe(path, ["grpo.reward_weights=[1.0]"])
    with pytest.raises(ConfigError, match=r"grpo\.use_vllm is set by the pipeline from grpo\.generation"):
        load_recipe(path, ["grpo.use_vllm=true"])
    with pytest.raises(ConfigError, match=r"grpo\.global_batch_size=18 counts completions, 4 per prompt.*set it to 16"):
        load_recipe(path, ["grpo.global_batch_size=18"])
    with pytest.raises(
        ConfigError, match=r"grpo\.sources names data/nowhere\.jsonl, which data\.sources does not list"
    ):
        load_recipe(path, ["grpo.sources=[data/nowhere.jsonl]"])
    with pytest.raises(ConfigError, match=r"expected one of 'hf', 'vllm-colocate', 'vllm-server'"):
        load_recipe(path, ["grpo.generation=vllm"])


def test_vllm_generation_without_a_gpu_says_to_use_hf(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = prepare_with_sft(grpo_recipe(tmp_path, sft_steps=2), "grpo.generation=vllm-colocate")
    with pytest.raises(ConfigError, match=r"grpo\.generation is vllm-colocate, which samples with vLLM on a CUDA GPU"):
        grpo.run(recipe)


# ------------------------------------------------------------------------------------------------- prompts


def test_prompts_carry_the_reference_answer_and_the_expected_calls(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    call = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}
    tool_row = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "sunny"},
        ],
        "tools": TOOLS,
        "source": 1,
    }
    plain_row = {
        "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        "tools": None,
        "source": 0,
    }
    rows = rewards.prompt_rows([plain_row, tool_row], tokenizer)
    assert [(r["reference"], json.loads(r["expected_calls"]), r["source"]) for r in rows] == [
        ("hi", [], 0),
        ("", [{"name": "get_weather", "arguments": {"city": "Oslo"}}], 1),
        ("sunny", [], 1),
    ]
    asked = chat.render_ids(tokenizer, tool_row["messages"][:3], json.loads(TOOLS), add_generation_prompt=True)[
        "input_ids"
    ]
    assert tokenizer(text=rows[2]["prompt"])["input_ids"] == asked  # the ids TRL generates from are the served ones
    assert [r["source"] for r in rewards.prompt_rows([plain_row, tool_row], tokenizer, {1})] == [1, 1]


# -------------------------------------------------------------------------------------------------- the stage


def test_grpo_raises_the_mean_reward_and_writes_its_artifact(tmp_path: Path) -> None:
    # After 30 SFT steps the tiny model answers in the reference's shape about 80% of the time: the `format` reward
    # has room to rise, and full fine-tuning at a constant rate moves it within 16 steps. Measured with this recipe's
    # seed (7): first 4 steps 0.781, last 8 0.922, a rise of 0.141 with the native, avx2 and default CPU kernels
    # alike; the bound is half of it. The rise depends on the seed (seed 1: -0.047, seed 2: +0.016; 32 steps: +0.016,
    # +0.063), so this pins the seed: it shows the stage optimises its reward, not how much GRPO gains in general.
    recipe = prepare_with_sft(
        grpo_recipe(
            tmp_path,
            method="full",
            rewards=["format"],
            learning_rate=5e-3,
            lr_scheduler_type="constant",
            max_steps=16,
            beta=0.05,
        )
    )
    assert grpo.run(recipe) == stages.Outcome.RAN
    out = recipe.run_dir / "grpo"
    reward = logged(out, "reward")
    assert len(reward) == 16
    assert sum(reward[-8:]) / 8 > sum(reward[:4]) / 4 + 0.07, reward
    assert logged(out, "kl") and logged(out, "completions/mean_length")
    for plot in (artifacts.LOSS_PLOT, artifacts.REWARDS_PLOT, artifacts.KL_PLOT, artifacts.LENGTH_PLOT):
        assert (out / plot).is_file(), plot
    no_pickles(out)
    manifest = json.loads((out / artifacts.MANIFEST).read_text())
    assert set(manifest["inputs"]) == {"data", "sft"} and manifest["metrics"]["started_from"] == "sft"
    assert manifest["model"] == {"base": artifacts.MODEL_DIR, "base_inside_artifact": True, "adapter": False}
    metrics = manifest["metrics"]
    assert metrics["reward_end"] == reward[-1] and metrics["reward_start"] == reward[0] and "reward_format" in metrics
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0
    assert grpo.run(recipe) == stages.Outcome.SKIPPED


def test_unsolved_prompts_are_those_the_start_model_answers_wrong(tmp_path: Path) -> None:
    # Half the rows have one answer, which 30 SFT steps teach; the other half count, which they do not.
    greetings = [
        {"messages": [{"role": "user", "content": f"Greet guest {i}."}, {"role": "assistant", "content": "hello"}]}
        for i in range(32)
    ]
    recipe = prepare_with_sft(grpo_recipe(tmp_path, rows=greetings + chat_rows(32), prompts="unsolved", max_steps=1))
    grpo.run(recipe)
    metrics = artifacts.read_manifest(recipe.run_dir / "grpo")["metrics"]
    # The start model's greedy answers to every training prompt, checked here by plain text comparison (the test
    # rows call no tools).
    from pipeline.core import engines, models

    tokenizer = chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR)
    model = models.load(recipe.run_dir / "sft" / artifacts.MODEL_DIR, recipe.model)
    model.generation_config.eos_token_id = chat.stop_token_ids(tokenizer)
    import datasets

    train = datasets.load_from_disk(str(recipe.run_dir / "data" / artifacts.SFT_DATA_DIR))["train"]
    prompts = [row["messages"][:-1] for row in train]
    answers = engines.hf_generate(model, tokenizer, engines.prompt_ids(tokenizer, prompts), 8)
    wrong = sum(answer != row["messages"][-1]["content"] for answer, row in zip(answers, train))
    assert metrics["prompts_available"] == len(train)
    assert 0 < metrics["prompts_trained"] == wrong < len(train)
    print(f"{wrong} of {len(train)} training prompts unsolved")


@pytest.mark.parametrize("method", ["full", "qlora", "dora"])
def test_each_method_trains(tmp_path: Path, method: str) -> None:
    recipe = prepare_with_sft(grpo_recipe(tmp_path, sft_steps=10, method=method, max_steps=3))
    grpo.run(recipe)
    out = recipe.run_dir / "grpo"
    manifest = json.loads((out / artifacts.MANIFEST).read_text())
    assert manifest["metrics"]["method"] == method and manifest["metrics"]["optimizer_steps"] == 3
    if method == "full":
        assert (out / artifacts.MODEL_DIR / "model.safetensors").is_file() and not (
            out / artifacts.START_MODEL_DIR
        ).exists()
    else:
        assert json.loads((out / artifacts.MODEL_DIR / "adapter_config.json").read_text())["use_dora"] is (
            method == "dora"
        )
    assert all(value == value for value in logged(out, "loss"))  # no NaN


def test_a_broken_user_reward_ends_the_command_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text("def reward(prompts, completions, **kwargs):\n    return {}\n")
    path = grpo_recipe(tmp_path, sft_steps=2, rewards=["exact_match", "flaky:reward"])
    prepare_with_sft(path)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.grpo", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "the GRPO reward 'flaky:reward' returned a dict" in " ".join(result.stderr.split())


def test_a_recipe_without_rewards_has_no_grpo_stage(tmp_path: Path) -> None:
    recipe = load_recipe("configs/tiny.yaml")
    assert not stages.get("grpo").applies(recipe) and stages.get("grpo").applies(load_recipe(grpo_recipe(tmp_path)))
    with pytest.raises(ConfigError, match=r"gives grpo\.rewards no reward, so it has no GRPO stage"):
        grpo.run(recipe)


def test_missing_trained_model_names_the_sft_command(tmp_path: Path) -> None:
    recipe = prepare(grpo_recipe(tmp_path))
    with pytest.raises(
        MissingArtifactError, match=r"no complete dpo or sft artifact.*accelerate launch pipeline/sft\.py"
    ):
        grpo.run(recipe)


def test_two_ddp_processes_share_each_batch(tmp_path: Path) -> None:
    recipe = prepare_with_sft(grpo_recipe(tmp_path, sft_steps=10, max_steps=3))
    result = accelerate_launch("ddp.yaml", "grpo", recipe.source_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("grpo: ") == 1, result.stdout[-3000:]  # rank 0 alone reports
    out = recipe.run_dir / "grpo"
    metrics = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    assert (
        metrics["processes"] == 2
        and len(metrics["peak_memory_mb_per_process"]) == 2
        and metrics["optimizer_steps"] == 3
    )
    args = json.loads((out / artifacts.TRAINING_ARGS).read_text())
    # 16 completions a step: 8 on each process, still in whole groups of 4 (one prompt's completions).
    assert (
        args["per_device_train_batch_size"],
        args["gradient_accumulation_steps"],
        args["generation_batch_size"],
    ) == (8, 1, 16)
    assert logged(out, "reward") and not list(recipe.run_dir.glob("*.partial"))


def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # LoRA dropout draws random numbers every step and sampling draws them for every token: an exact match after
    # the resume shows the checkpoint brought back the random state as well as the weights.
    settings = {"max_steps": 12, "save_steps": 4, "lora": {**LORA, "lora_dropout": 0.1}}
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    reference = prepare_with_sft(grpo_recipe(reference_dir, sft_steps=10, **settings))
    grpo.run(reference)

    path = grpo_recipe(killed_dir, sft_steps=10, **settings)
    killed = prepare_with_sft(path)
    process = start_paused_at(4, "pipeline.grpo", "--config", str(path))
    signal_paused(process, signal.SIGKILL)
    process.wait()
    assert not artifacts.manifest_is_complete(killed.run_dir / "grpo")

    result = run_module("pipeline.grpo", "--config", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    out, expected = killed.run_dir / "grpo", reference.run_dir / "grpo"
    metrics = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    assert metrics["resumed_from"] in {"checkpoint-4", "checkpoint-8"} and metrics["optimizer_steps"] == 12
    want, got = adapter_tensors(expected), adapter_tensors(out)
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert logged(out, "reward")[-4:] == logged(expected, "reward")[-4:]


def test_pipeline_run_includes_grpo_and_exports_it(tmp_path: Path) -> None:
    small = ["evaluate.backend=hf", "export.targets=[hf]"]
    path = dpo_recipe(tmp_path, sft_method="full", sections={"grpo": grpo_section(max_steps=3)})
    rows = pipeline_run.run(load_recipe(path, small), small)
    assert [(r["stage"], r["status"]) for r in rows] == [(s.name, "ran") for s in stages.STAGES]
    recipe = load_recipe(path, small)
    assert set(artifacts.read_manifest(recipe.run_dir / "grpo")["inputs"]) == {
        "data",
        "dpo",
    }  # the newest model before it
    assert artifacts.read_manifest(recipe.run_dir / "export")["metrics"]["exported_from"] == "grpo"
    evaluated = json.loads((recipe.run_dir / "eval" / artifacts.METRICS_FILE).read_text())["models"]
    assert list(evaluated) == ["base", "sft", "dpo", "grpo"]
