"""Evaluation stage on a small run: layout, gates, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import evaluate
from pipeline.core import artifacts, scoring
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError, MissingArtifactError, PipelineError

from conftest import run_module, write_jsonl, write_recipe
from test_dpo import dpo_recipe, prepare_with_sft
from test_sft import prepare


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("eval")
    path = dpo_recipe(tmp_path)
    recipe = prepare_with_sft(path, "evaluate.backend=hf")
    evaluate.run(recipe)
    return path


def test_every_model_is_evaluated_with_every_metric(small_run: Path) -> None:
    recipe = load_recipe(small_run, ["evaluate.backend=hf"])
    eval_dir = recipe.run_dir / "eval"
    metrics = json.loads((eval_dir / artifacts.METRICS_FILE).read_text())
    assert list(metrics["models"]) == ["base", "sft"]
    for scores in metrics["models"].values():
        assert {
            "exact_match",
            "rouge1",
            "rougeL",
            "sacrebleu",
            "perplexity",
            "preference_accuracy",
            "mean_margin",
            "chosen_match",
            "contains_answer",
        } <= set(scores)
        assert scores["perplexity"] > 1
        assert set(scores["by_source"]) == {s.label for s in recipe.data.sources}
        assert all(
            {"exact_match", "contains_answer"} <= set(v) for v in scores["by_source"].values() if "exact_match" in v
        )
    manifest = json.loads((eval_dir / artifacts.MANIFEST).read_text())
    assert set(manifest["inputs"]) == {"data", "base", "sft"} and manifest["metrics"]["backend"] == "hf"
    assert metrics["engine"] == {"backend": "hf", "dtype": "float32", "enforce_eager": True, "through_lora": []}


def test_scoring_batches_keep_their_logits_within_the_budget_and_every_row_in_order() -> None:
    vocab = 1000
    rows_fitting = scoring.LOGITS_BUDGET // (100 * vocab)
    lengths = [100] * (rows_fitting + 5) + [3000 * scoring.LOGITS_BUDGET // vocab] + [10] * 7
    batches = scoring._budgeted_batches(lengths, 64, vocab)
    assert [i for b in batches for i in range(len(lengths))[b]] == list(range(len(lengths)))
    assert (batches[0].stop - batches[0].start) == min(64, rows_fitting)
    for batch in batches:
        rows = lengths[batch]
        assert len(rows) <= 64
        assert len(rows) == 1 or len(rows) * max(rows) * vocab <= scoring.LOGITS_BUDGET
    assert scoring._budgeted_batches([], 64, vocab) == []


def test_likelihood_scores_do_not_depend_on_how_rows_are_batched(
    small_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.core import chat, models

    recipe = load_recipe(small_run, ["evaluate.backend=hf"])
    tokenizer = chat.load_tokenizer(recipe.run_dir / "data" / artifacts.TOKENIZER_DIR)
    held = scoring.HeldOut.load(recipe.run_dir / "data", tokenizer, recipe)
    model = models.load(recipe.run_dir / "base", recipe.model, "float32")
    whole = held.likelihood_scores(model, tokenizer, 64)
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 1)  # one row a batch
    one_by_one = held.likelihood_scores(model, tokenizer, 64)
    assert set(whole) == {"perplexity", "preference_accuracy", "mean_margin"}
    # Measured 1.9e-7 to 2.4e-7 (largest relative difference) natively and forced into the avx2 and SSE4.1
    # families and MKL's COMPATIBLE path: 400 times under this bound.
    assert one_by_one == pytest.approx(whole, rel=1e-4)


def test_a_contained_answer_is_whole_words_ignoring_case() -> None:
    assert scoring.contains_answer("The capital of France is Paris.", "paris")
    assert scoring.contains_answer('The answer is "carbon dioxide"', "Carbon dioxide")
    assert not scoring.contains_answer("Parisian cafes", "Paris")
    assert not scoring.contains_answer("12 + 7 = 19", "9")
    assert not scoring.contains_answer("anything", "  ")


def test_reused_results_are_scored_again_from_their_outputs(small_run: Path) -> None:
    """The cache saves generation; a scoring change must still reach results it reuses."""
    recipe = load_recipe(small_run, ["evaluate.backend=hf"])
    eval_dir = recipe.run_dir / "eval"
    before = json.loads((eval_dir / artifacts.METRICS_FILE).read_text())["models"]["sft"]
    cached_file = eval_dir / artifacts.EVAL_CACHE_DIR / "sft.json"
    cached = json.loads(cached_file.read_text())
    del cached["scores"]["contains_answer"]
    cached["scores"]["exact_match"] = -1.0
    cached_file.write_text(json.dumps(cached))
    result = run_module("pipeline.evaluate", "--config", str(small_run), "evaluate.backend=hf", "evaluate.gates={}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((eval_dir / artifacts.METRICS_FILE).read_text())
    assert "sft" in metrics["reused"]
    again = metrics["models"]["sft"]
    assert again["exact_match"] == before["exact_match"] and again["contains_answer"] == before["contains_answer"]
    assert again["perplexity"] == before["perplexity"]


def test_a_failed_gate_exits_non_zero_with_a_table_and_keeps_the_report(small_run: Path) -> None:
    result = run_module(
        "pipeline.evaluate",
        "--config",
        str(small_run),
        "evaluate.backend=hf",
        "evaluate.gates={sft.exact_match: 0.99, sft-base.perplexity: 0.0}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "evaluation gates failed: sft.exact_match" in result.stderr and "Traceback" not in result.stderr
    assert f"python -m pipeline.export --config {small_run} --allow-failed-gates" in result.stderr
    assert "| sft.exact_match |" in result.stderr and "FAIL" in result.stderr
    assert "| sft-base.perplexity |" in result.stderr  # lower perplexity than base passes
    line = next(row for row in result.stderr.splitlines() if row.startswith("| sft-base.perplexity"))
    assert line.rstrip().endswith("| pass |")
    recipe = load_recipe(small_run, ["evaluate.backend=hf"])
    assert (recipe.run_dir / "eval" / artifacts.REPORT_FILE).is_file()
    assert artifacts.read_manifest(recipe.run_dir / "eval")["metrics"]["gates_passed"] is False


def test_no_model_artifacts_names_the_stage_to_run(tmp_path: Path) -> None:
    recipe = load_recipe(dpo_recipe(tmp_path), ["evaluate.backend=hf"])
    from pipeline import data

    data.run(recipe)
    with pytest.raises(MissingArtifactError, match=r"no model artifacts .* Run `accelerate launch pipeline/sft\.py"):
        evaluate.run(recipe)


def test_tool_calls_are_scored_even_without_text_answers(tmp_path: Path) -> None:
    """Held-out conversations that end in a tool call have no text to match, but their calls are scored."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"call tool {i}"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            ],
            "tools": tools,
        }
        for i in range(30)
    ]
    path = write_recipe(
        tmp_path, [{"path": str(write_jsonl(tmp_path / "tools.jsonl", rows))}], evaluate={"backend": "hf"}
    )
    recipe = prepare(path)
    evaluate.run(recipe)
    scores = json.loads((recipe.run_dir / "eval" / artifacts.METRICS_FILE).read_text())["models"]["base"]
    assert "exact_match" not in scores and {"tool_call_rate", "tool_name_accuracy", "tool_arguments_accuracy"} <= set(
        scores
    )


def test_a_held_out_split_with_nothing_to_evaluate(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"call tool {i}"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            ]
        }
        for i in range(30)
    ]
    path = write_recipe(
        tmp_path, [{"path": str(write_jsonl(tmp_path / "calls.jsonl", rows))}], evaluate={"backend": "hf"}
    )
    recipe = prepare(path)
    with pytest.raises(PipelineError, match=r"has nothing to evaluate: no held-out answer with text, no tool call"):
        evaluate.run(recipe)


def test_tool_call_scores_read_calls_as_the_hermes_parser_does() -> None:
    from pipeline.core import scoring

    due = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    outputs = [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',  # right
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',  # wrong argument
        '<tool_call>{"name": "get_daytime", "arguments": {"city": "Oslo"}}</tool_call>',  # wrong tool
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # not JSON
        "sunny",  # no call where one is due
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',  # a call where none is due
        "4",
    ]
    scores = scoring.tool_call_scores(outputs, [due, due, due, due, due, [], []])
    assert scores == {
        "tool_call_rate": 3 / 5,
        "tool_name_accuracy": 2 / 5,
        "tool_arguments_accuracy": 1 / 5,
        "tool_false_call_rate": 1 / 2,
    }


def test_unknown_metric_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"'bertscore' is not shipped; the shipped metrics are: exact_match, rouge, sacrebleu"
    ):
        load_recipe(dpo_recipe(tmp_path), ["evaluate.metrics=[exact_match, bertscore]"])


def test_malformed_gate_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'export\.exact_match' is not MODEL\.METRIC .* among base, sft, dpo"):
        load_recipe(dpo_recipe(tmp_path), ["evaluate.gates={export.exact_match: 0.5}"])


def test_a_gate_on_one_source_reads_that_sources_held_out_rows(tmp_path: Path) -> None:
    results = {
        "sft": {"exact_match": 0.8, "by_source": {"data/tools.jsonl": {"exact_match": 0.6}}},
        "dpo": {"exact_match": 0.9, "by_source": {"data/tools.jsonl": {"exact_match": 0.2}}},
    }
    gates = evaluate.check_gates(
        {
            "dpo-sft.exact_match": -0.05,
            "dpo-sft.exact_match@data/tools.jsonl": -0.3,
            "dpo.exact_match@data/other.jsonl": 0.1,
        },
        results,
    )
    assert [(g["passed"], g["value"]) for g in gates[:2]] == [(True, pytest.approx(0.1)), (False, pytest.approx(-0.4))]
    assert not gates[2]["passed"] and gates[2]["why"] == "no exact_match on source data/other.jsonl for dpo"
    recipe = dpo_recipe(tmp_path)
    source = load_recipe(recipe).data.sources[0].label
    assert load_recipe(recipe, [f"evaluate.gates={{dpo-sft.exact_match@{source}: -0.1}}"]).evaluate.gates
    with pytest.raises(ConfigError, match=r"names the source 'nowhere.jsonl', which data.sources does not have"):
        load_recipe(recipe, ["evaluate.gates={dpo-sft.exact_match@nowhere.jsonl: -0.1}"])


def test_shipped_metrics_are_deterministic_and_load_offline() -> None:
    from pipeline.core import scoring

    predictions, references = ["cat", "a dog", "x"], ["cat", "the dog", "y"]
    first = scoring.compute_metric("rouge", predictions, references)
    assert first == scoring.compute_metric("rouge", predictions, references)
    assert first["rouge1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert scoring.compute_metric("exact_match", predictions, references) == {"exact_match": pytest.approx(1 / 3)}


def test_hf_answers_stop_at_the_context_length_as_the_server_stops_them() -> None:
    """A prompt close to the context length gets only the tokens left before it (engines.new_token_budget), as vLLM's
    server with --max-model-len gives; a prompt that fills it gets no answer."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.core import engines

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0"
    )
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )
    model.generation_config.eos_token_id = [63]  # a token the prompts do not end on; random weights rarely pick it
    prompts = [list(range(1, 9)), list(range(1, 29)), list(range(1, 33))]
    free = engines.hf_generate(model, tokenizer, prompts, 8)
    capped = engines.hf_generate(model, tokenizer, prompts, 8, context_length=32)
    assert [engines.new_token_budget(len(p), 8, 32) for p in prompts] == [8, 4, 0]
    assert capped[0] == free[0] and capped[2] == ""
    assert free[1].startswith(capped[1]) and len(capped[1].split()) == min(4, len(free[1].split()))
