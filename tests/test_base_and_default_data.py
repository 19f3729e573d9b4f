"""The offline default: shipped data regenerates identically, the tokenizer and base-model artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import base, data
from pipeline.core import artifacts, scoring, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import MissingArtifactError

from conftest import REPO, chat_rows, write_jsonl, write_recipe

sys.path.insert(0, str(REPO / "data"))
import make_data  # noqa: E402 - the generator of the shipped data


def test_shipped_data_regenerates_byte_for_byte(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "data" / "make_data.py"), "--out", str(tmp_path)], check=True, capture_output=True
    )
    for name in [*make_data.FILES, *make_data.FIXED_FILES, *make_data.CONTINUATIONS]:
        assert (tmp_path / name).read_bytes() == (REPO / "data" / name).read_bytes(), name


def test_held_out_sums_are_right_and_ask_nothing_the_training_sums_ask() -> None:
    trained = {make_data.sum_operands(row) for row in _rows("arithmetic.jsonl")}
    held_out = _rows("arithmetic_held_out.jsonl")
    assert len(held_out) == 500 and len({make_data.sum_operands(row) for row in held_out}) == 500
    for row in held_out:
        question, answer = row["messages"]
        numbers = [int(n) for n in make_data.sum_operands(row)]
        assert make_data.sum_operands(row) not in trained, question["content"]
        assert answer["content"] == str(sum(numbers) if len(numbers) == 2 else 2 * numbers[0]), question["content"]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (REPO / "data" / name).read_text().splitlines()]


def test_shipped_answers_are_right() -> None:
    checked = 0
    for row in _rows("sft.jsonl") + [r for r in _rows("tools.jsonl") if len(r["messages"]) == 2]:
        for question, answer in zip(row["messages"], row["messages"][1:]):
            if question["role"] != "user":
                continue
            text = question["content"]
            words = text.rstrip("?.").split()
            if text.startswith(("Repeat the word", "Say ", "Echo:")):
                assert answer["content"] == words[-1], text
            elif "opposite" in text.lower() or "antonym" in text:
                assert answer["content"] == make_data.OPPOSITES[words[-1]], text
            elif "kind of thing" in text or "Classify" in text or "animal, a color" in text:
                word = words[1] if text.startswith("Is ") else words[-1]
                assert answer["content"] == make_data.CATEGORY_OF[word], text
            elif "even" in text or "Parity" in text:
                number = int(next(w for w in words if w.isdigit()))
                assert answer["content"] == ("even" if number % 2 == 0 else "odd"), text
            else:
                assert text.startswith(("How many", "Count", "Number of")), text
                assert answer["content"] == str(len(text.split(":", 1)[1].split())), text
            checked += 1
    assert checked >= 4000


def test_tool_rows_call_the_right_tool_and_answer_with_its_result() -> None:
    calls = [r for r in _rows("tools.jsonl") if len(r["messages"]) == 4]
    assert len(calls) >= 500
    for row in calls:
        user, call, result, answer = row["messages"]
        function = call["tool_calls"][0]["function"]
        name = "get_weather" if any(w in user["content"].lower() for w in ("weather", "raining")) else "get_daytime"
        assert function["name"] == name and json.loads(function["arguments"])["city"] in user["content"]
        assert (
            result["role"] == "tool"
            and result["content"] in make_data.TOOLS[name][1]
            and answer["content"] == result["content"]
        )
        assert row["tools"] == make_data.TOOL_SCHEMAS


def test_abstention_pairs_ask_about_words_no_task_teaches() -> None:
    pairs = _rows("abstain.jsonl")
    preference = _rows("preference.jsonl")
    taught = json.dumps(_rows("sft.jsonl") + _rows("tools.jsonl") + preference)
    assert len(pairs) >= 1000 and {p["chosen"] for p in pairs} == {make_data.UNKNOWN}
    for pair in pairs[:200]:
        word = pair["prompt"].rstrip("?.").split()[1 if pair["prompt"].startswith("Is ") else -1]
        assert word not in make_data.KNOWN_WORDS and f" {word}" not in taught, pair
    # Only the abstention pairs teach "unknown" as an answer: no SFT row says it, and the other preference pairs
    # use it only as the rejected answer to a question a tool should have answered.
    assert make_data.UNKNOWN not in json.dumps(_rows("sft.jsonl") + _rows("tools.jsonl"))

    def text(answer: str | list[dict]) -> str:
        return answer if isinstance(answer, str) else answer[-1].get("content") or ""

    assert all(text(pair["chosen"]) != make_data.UNKNOWN for pair in preference)
    assert any(text(pair["rejected"]) == make_data.UNKNOWN and pair.get("tools") for pair in preference)


def test_tool_answer_pairs_prefer_the_tool_result_after_the_call() -> None:
    pairs = _rows("tool_answers.jsonl")
    assert len(pairs) >= 500
    for pair in pairs:
        user, call, result = pair["prompt"]
        name = call["tool_calls"][0]["function"]["name"]
        assert result["role"] == "tool" and pair["chosen"] == [{"role": "assistant", "content": result["content"]}]
        rejected = pair["rejected"][0]["content"]
        assert (
            rejected != result["content"]
            and rejected in make_data.TOOLS[name][1]
            and pair["tools"] == make_data.TOOL_SCHEMAS
        )


def test_tool_argument_pairs_prefer_the_city_the_question_names() -> None:
    pairs = _rows("tool_arguments.jsonl")
    assert len(pairs) >= 400
    for pair in pairs:
        (question,) = pair["prompt"]
        (chosen,) = pair["chosen"][0]["tool_calls"]
        (rejected,) = pair["rejected"][0]["tool_calls"]
        asked = json.loads(chosen["function"]["arguments"])["city"]
        other = json.loads(rejected["function"]["arguments"])["city"]
        assert asked in question["content"] and other not in question["content"] and other in make_data.CITIES
        assert chosen["function"]["name"] == rejected["function"]["name"] and pair["tools"] == make_data.TOOL_SCHEMAS


@pytest.fixture(scope="module")
def base_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, "object"]:
    tmp_path = tmp_path_factory.mktemp("base")
    recipe = load_recipe(write_recipe(tmp_path, [{"path": str(write_jsonl(tmp_path / "c.jsonl", chat_rows(30)))}]))
    data.run(recipe)
    base.run(recipe)
    return recipe.run_dir / "base", recipe


def test_replay_rows_are_the_models_right_answers_to_questions_the_retention_set_never_asks() -> None:
    """data/general_answers.jsonl keeps SmolLM2 what it knew while it is fine-tuned; data/general.jsonl measures
    whether it did. A question in both would measure memorisation, not retention."""
    import make_general_answers

    references = dict(make_general_answers.TRAINING_QUESTIONS)
    retained = {question for question, _ in make_data.GENERAL_QUESTIONS}
    replay = _rows("general_answers.jsonl")
    pairs = _rows("general_preference.jsonl")
    assert len(replay) == len(pairs) > 50
    for row, pair in zip(replay, pairs):
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert question not in retained and question in references
        assert scoring.contains_answer(answer, references[question]), (question, answer)
        assert pair == {"prompt": question, "chosen": answer, "rejected": make_data.UNKNOWN}


def test_base_artifact_layout_and_stop_tokens(base_artifact) -> None:
    folder, _ = base_artifact
    files = {p.name for p in folder.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "manifest.json",
    } <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
    stop = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(stop) == sorted([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    assert json.loads((folder / artifacts.MANIFEST).read_text())["metrics"]["parameters"] == sum(
        p.numel() for p in model.parameters()
    )


def test_base_is_seeded(base_artifact, tmp_path: Path) -> None:
    folder, recipe = base_artifact
    base.run(recipe, stages.Options(force=True))
    again = recipe.run_dir / "base"
    assert (
        artifacts.sha256_file(again / "model.safetensors")
        == json.loads((again / "manifest.json").read_text())["outputs"]["model.safetensors"]["sha256"]
    )
    first_hash = artifacts.sha256_file(again / "model.safetensors")
    base.run(recipe, stages.Options(force=True))
    assert artifacts.sha256_file(folder / "model.safetensors") == first_hash
    reseeded = load_recipe(recipe.source_path, ["run.seed=8", f"run.output_dir={tmp_path}"])
    data.run(reseeded)
    base.run(reseeded)
    assert artifacts.sha256_file(reseeded.run_dir / "base" / "model.safetensors") != first_hash


def test_base_refuses_without_a_complete_data_artifact(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, [{"path": "data/sft.jsonl"}]))
    with pytest.raises(
        MissingArtifactError,
        match=(
            r"needs the 'data' artifact, but .* does not exist\. Run `python -m pipeline\.data --config .*recipe\.yaml`"
            r" first"
        ),
    ):
        base.run(recipe)
    (recipe.run_dir / "data").mkdir(parents=True)
    (recipe.run_dir / "data" / "manifest.json").write_text('{"status": "running"}')
    with pytest.raises(MissingArtifactError, match="is incomplete"):
        base.run(recipe)
