"""lm-evaluation-harness in the evaluation stage (`evaluate.harness`): recipe validation that refuses what cannot
run here in one paragraph, the benchmark table and its regression flag, gates on benchmark metrics, and lm-eval's HF
backend on a small run (the served route runs on the default recipe: tests/test_default_recipe.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import evaluate
from pipeline.core import artifacts, harness
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError

from test_dpo import dpo_recipe, prepare_with_sft

pytest.importorskip("lm_eval")

HELDOUT_TASKS = (
    "evaluate.harness=[{task: data/harness/heldout_answers.yaml}, {task: data/harness/heldout_preferences.yaml}]"
)


def test_a_hub_task_offline_is_refused_with_how_to_give_it_a_local_copy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_recipe(dpo_recipe(tmp_path), ["evaluate.harness=[{task: arc_easy, limit: 10}]"])
    message = str(refused.value)
    assert "evaluate.harness.0: the lm-eval task 'arc_easy' reads its data from the Hub" in message
    assert "allenai/ai2_arc" in message and "dataset_path: json" in message and "data_files" in message
    assert "Traceback" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("evaluate.harness=[{task: no_such_benchmark}]", "'no_such_benchmark' is not an lm-eval task, group or tag"),
        (
            "evaluate.harness=[{task: data/harness/missing.yaml}]",
            "the task file data/harness/missing.yaml does not exist",
        ),
        ("evaluate.harness=[{task: data/harness/heldout_answers.yaml, num_fewshot: -1}]", "num_fewshot"),
        ("evaluate.gates={dpo.harness.heldout_answers.exact_match: 0.5}", "evaluate.harness lists no task"),
    ],
    ids=["unknown-name", "missing-file", "negative-shots", "gate-without-task"],
)
def test_a_harness_mistake_is_one_paragraph_naming_the_key(tmp_path: Path, override: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_recipe(dpo_recipe(tmp_path), [override])


def test_a_task_file_reading_a_missing_local_file_is_refused(tmp_path: Path) -> None:
    task = tmp_path / "mine.yaml"
    task.write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: rows.jsonl\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
    )
    with pytest.raises(ConfigError, match=rf"the task file {task} reads {tmp_path / 'rows.jsonl'}, which does not"):
        load_recipe(dpo_recipe(tmp_path), [f"evaluate.harness=[{{task: {task}}}]"])
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1=", "a": "2"}\n')
    assert load_recipe(dpo_recipe(tmp_path), [f"evaluate.harness=[{{task: {task}}}]"]).evaluate.harness


def test_summary_names_a_metric_by_its_filter_only_where_a_task_has_several() -> None:
    output = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.1,
                "exact_match,flexible-extract": 0.5,
                "exact_match_stderr,flexible-extract": 0.11,
            },
            "heldout_answers": {"alias": "x", "exact_match,strip": 0.75, "exact_match_stderr,strip": 0.05},
        },
        "higher_is_better": {"gsm8k": {"exact_match": True}, "heldout_answers": {"exact_match": True}},
        "n-samples": {"gsm8k": {"original": 1319, "effective": 20}, "heldout_answers": {"effective": 4}},
    }
    summary = harness.summarize(output)
    assert summary["gsm8k"]["exact_match,flexible-extract"] == {"value": 0.5, "stderr": 0.11, "higher_is_better": True}
    assert summary["gsm8k"]["samples"] == 20
    assert summary["heldout_answers"] == {
        "exact_match": {"value": 0.75, "stderr": 0.05, "higher_is_better": True},
        "samples": 4,
    }


def entry(value: float, stderr: float, higher_is_better: bool = True) -> dict:
    return {"value": value, "stderr": stderr, "higher_is_better": higher_is_better}


def test_a_drop_beyond_two_standard_errors_is_a_regression_in_the_table_and_gates_read_benchmarks() -> None:
    results = {
        "base": {"harness": {"arc": {"acc": entry(0.60, 0.02), "samples": 500}, "wiki": {"ppl": entry(20, 1, False)}}},
        "sft": {"harness": {"arc": {"acc": entry(0.56, 0.02), "samples": 500}, "wiki": {"ppl": entry(23, 1, False)}}},
        "dpo": {"harness": {"arc": {"acc": entry(0.50, 0.02), "samples": 500}, "wiki": {"ppl": entry(22, 1, False)}}},
    }
    # 0.04 < 2 * sqrt(2) * 0.02 = 0.057: within the noise; 0.06 beyond it. Perplexity rising by 3 > 2.83 is a drop.
    assert not harness.is_regression(results["base"]["harness"]["arc"]["acc"], results["sft"]["harness"]["arc"]["acc"])
    assert harness.is_regression(results["sft"]["harness"]["arc"]["acc"], results["dpo"]["harness"]["arc"]["acc"])
    assert harness.is_regression(results["base"]["harness"]["wiki"]["ppl"], results["sft"]["harness"]["wiki"]["ppl"])
    table = "\n".join(harness.table(results))
    assert (
        "| arc | acc | 500 | 0.6000 ± 0.0200 | 0.5600 ± 0.0200 (-0.0400) | 0.5000 ± 0.0200 (-0.0600, **regression**) |"
        in table
    )
    assert (
        "| wiki | ppl |  | 20.0000 ± 1.0000 | 23.0000 ± 1.0000 (+3.0000, **regression**) | 22.0000 ± 1.0000 (-1.0000) |"
        in table
    )
    gates = evaluate.check_gates(
        {"dpo.harness.arc.acc": 0.55, "dpo-base.harness.wiki.ppl": 3.0, "dpo.harness.gsm8k.exact_match": 0.1}, results
    )
    assert [(g["passed"], g["value"]) for g in gates[:2]] == [(False, pytest.approx(0.5)), (True, pytest.approx(2.0))]
    assert gates[2]["why"] == "no harness.gsm8k.exact_match for dpo"


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run evaluated on transformers (no server), with the shipped held-out tasks."""
    path = dpo_recipe(tmp_path_factory.mktemp("harness"))
    evaluate.run(prepare_with_sft(path, "evaluate.backend=hf", HELDOUT_TASKS))
    return path


def test_lm_eval_on_transformers_scores_the_held_out_rows_as_the_stage_does(benchmarked: Path) -> None:
    """lm-eval's HF backend and the stage's HF scoring meet on the same tokens (every rendered row round-trips):
    log-likelihoods of the same float32 model, and greedy answers, right or wrong (the small models here answer
    nothing right: the base writes bytes to the token limit, the SFT model stops at once). Spread: native kernels
    (AVX-512), ATEN_CPU_CAPABILITY=avx2 + ONEDNN_MAX_CPU_ISA=AVX2, =default + SSE41, MKL_CBWR=COMPATIBLE: every answer
    equal and the accuracy equal in each; bounds: one answer, one pair (a near-tie met in another batch)."""
    recipe = load_recipe(benchmarked, ["evaluate.backend=hf", HELDOUT_TASKS])
    eval_dir = recipe.run_dir / "eval"
    summary = json.loads((eval_dir / artifacts.METRICS_FILE).read_text())
    predictions = [json.loads(line) for line in (eval_dir / artifacts.PREDICTIONS_FILE).read_text().splitlines()]
    stage_answers = [row["answers"] for row in predictions if row["set"] == "answers"]
    rows = summary["harness"]["heldout_rows"]
    assert rows["answers"] == rows["answers_round_trip"] > 0 and rows["pairs"] == rows["pairs_round_trip"] > 0
    for name, result in summary["models"].items():
        answers, pairs = result["harness"]["heldout_answers"], result["harness"]["heldout_preferences"]
        assert answers["samples"] == rows["answers"] and pairs["samples"] == rows["pairs"]
        assert answers["exact_match"]["value"] == pytest.approx(result["exact_match"], abs=1 / rows["answers"] + 1e-9)
        assert pairs["acc"]["value"] == pytest.approx(result["preference_accuracy"], abs=1 / rows["pairs"] + 1e-9)
        harness_answers = [
            json.loads(line)
            for line in (eval_dir / artifacts.HARNESS_DIR / name / "heldout_answers.jsonl").read_text().splitlines()
        ]
        differ = [a["doc_id"] for a in harness_answers if a["answer"][0] != stage_answers[a["doc_id"]][name].strip()]
        assert len(differ) <= 1, (name, differ)
    report = (recipe.run_dir / "eval" / artifacts.REPORT_FILE).read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in report and "| heldout_preferences | acc |" in report
