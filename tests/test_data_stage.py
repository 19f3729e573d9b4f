"""The data stage end to end on small files: every file type, every drop reason, split, stats, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import data
from pipeline.core import artifacts, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import DataError

from conftest import chat_rows, preference_rows, run_module, write_jsonl, write_recipe


def run_stage(tmp_path: Path, sources: list[dict], *overrides: str, force: bool = False, **sections: dict) -> Path:
    recipe = load_recipe(write_recipe(tmp_path, sources, **sections), list(overrides))
    data.run(recipe, stages.Options(force=force))
    return recipe.run_dir / "data"


def stats_of(folder: Path) -> dict:
    return json.loads((folder / artifacts.STATS).read_text())


def test_jsonl_json_parquet_and_csv_sources_mix(tmp_path: Path) -> None:
    import pandas as pd

    jsonl = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps([{"instruction": f"Echo {i}", "input": "", "output": str(i)} for i in range(20)]))
    parquet = tmp_path / "pairs.parquet"
    pd.DataFrame(preference_rows(20)).to_parquet(parquet)
    csv = tmp_path / "pc.csv"
    pd.DataFrame({"prompt": [f"Say {i}" for i in range(20)], "completion": [f"{i}" for i in range(20)]}).to_csv(
        csv, index=False
    )
    out = run_stage(tmp_path, [{"path": str(p)} for p in (jsonl, array, parquet, csv)])

    stats = stats_of(out)
    assert stats["sft"]["read"] == {str(jsonl): 20, str(array): 20, str(csv): 20}
    assert stats["preference"]["read"] == {str(parquet): 20}
    assert stats["sft"]["train_rows"] + stats["sft"]["eval_rows"] == 60
    assert stats["preference"]["train_rows"] + stats["preference"]["eval_rows"] == 20
    for kind in ("sft", "preference"):
        assert stats[kind]["eval_rows"] > 0
        lengths = stats[kind]["token_lengths"]["train"]
        assert lengths["min"] <= lengths["median"] <= lengths["p95"] <= lengths["max"]

    import datasets

    sft = datasets.load_from_disk(str(out / artifacts.SFT_DATA_DIR))
    assert set(sft) == {"train", "eval"}
    assert {"messages", "input_ids", "assistant_masks"} <= set(sft["train"].column_names)
    pref = datasets.load_from_disk(str(out / artifacts.PREFERENCE_DATA_DIR))
    assert {"prompt", "chosen", "rejected"} <= set(pref["train"].column_names)
    assert (out / artifacts.TOKENIZER_DIR / "chat_template.jinja").is_file()


def test_assistant_mask_covers_every_assistant_turn_and_its_end_of_turn_token(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": f"b{i}"},
            ]
        }
        for i in range(10)
    ]
    out = run_stage(tmp_path, [{"path": str(write_jsonl(tmp_path / "c.jsonl", rows))}])
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / artifacts.TOKENIZER_DIR)
    row = datasets.load_from_disk(str(out / artifacts.SFT_DATA_DIR))["train"][0]
    trained = tokenizer.decode([t for t, keep in zip(row["input_ids"], row["assistant_masks"]) if keep])
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    assert trained == f"{answers[0]}<|im_end|>{answers[1]}<|im_end|>"
    assert stats_of(out)["tokenizer"]["end_of_turn_token"] == "<|im_end|>"


def test_malformed_json_line_fails_with_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(5))
    with open(path, "a") as handle:
        handle.write('{"messages": [oops]}\n')
    with pytest.raises(DataError) as caught:
        run_stage(tmp_path, [{"path": str(path)}])
    assert str(caught.value).startswith(
        f"{path}:6: malformed JSON (Expecting value at column 15). Fix the row, or set data.on_error: skip"
    )


def test_malformed_rows_are_skipped_and_counted_with_on_error_skip(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(10))
    with open(path, "a") as handle:
        handle.write("not json\n" + json.dumps({"messages": "wrong"}) + "\n" + json.dumps([1, 2]) + "\n")
    out = run_stage(tmp_path, [{"path": str(path)}], "data.on_error=skip")
    stats = stats_of(out)["sft"]
    assert stats["read_total"] == 13 and stats["dropped"]["malformed"] == 3
    assert stats["train_rows"] + stats["eval_rows"] == 10


def test_broken_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON \(Expecting ',' delimiter at column 23\)"):
        run_stage(tmp_path, [{"path": str(path)}])


def test_every_drop_reason_is_counted(tmp_path: Path) -> None:
    rows = chat_rows(10) + chat_rows(3)  # three exact duplicates
    rows += [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "x"}]},
    ]
    pairs = preference_rows(6) + [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    out = run_stage(
        tmp_path,
        [
            {"path": str(write_jsonl(tmp_path / "c.jsonl", rows))},
            {"path": str(write_jsonl(tmp_path / "p.jsonl", pairs))},
        ],
        "data.max_length=64",
    )
    stats = stats_of(out)
    assert stats["sft"]["dropped"] == {
        "duplicate": 3,
        "empty_turn": 1,
        "unknown_role": 1,
        "no_assistant_turn": 1,
        "too_long": 1,
    }
    assert stats["sft"]["kept_before_weighting"] == 10
    assert stats["preference"]["dropped"]["chosen_equals_rejected"] == 1


def test_too_few_surviving_rows_fail_and_keep_the_previous_artifact(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "c.jsonl", chat_rows(10))
    first = run_stage(tmp_path, [{"path": str(good)}])
    manifest_before = (first / artifacts.MANIFEST).read_bytes()
    bad = write_jsonl(
        tmp_path / "c.jsonl", chat_rows(2) + [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(8)]
    )
    with pytest.raises(
        DataError, match=r"only 2 of 10 sft rows survived validation \(20\.0%, below data\.min_keep_fraction=0\.5\)"
    ):
        run_stage(tmp_path, [{"path": str(bad)}], "data.min_keep_fraction=0.5")
    assert (first / artifacts.MANIFEST).read_bytes() == manifest_before
    assert artifacts.manifest_is_complete(first)


def test_split_is_deterministic_and_depends_on_the_seed(tmp_path: Path) -> None:
    import datasets

    source = [{"path": str(write_jsonl(tmp_path / "c.jsonl", chat_rows(200)))}]

    def eval_prompts(out: Path) -> list[str]:
        return [r["messages"][0]["content"] for r in datasets.load_from_disk(str(out / "sft"))["eval"]]

    first = eval_prompts(run_stage(tmp_path, source))
    again = eval_prompts(run_stage(tmp_path, source, force=True))
    other_seed = eval_prompts(run_stage(tmp_path, source, "run.seed=8"))
    assert first == again
    assert first != other_seed
    assert 20 <= len(first) <= 60  # eval_fraction 0.2 of 200


def test_rows_sharing_a_prompt_stay_on_one_side_across_sft_and_preference(tmp_path: Path) -> None:
    import datasets

    prompts = [f"Is {i} even or odd?" for i in range(60)]
    sft = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p in prompts
        for a in ("x", "y")
    ]
    pairs = [{"prompt": p.upper(), "chosen": "a", "rejected": "b"} for p in prompts]  # same prompt once normalised
    out = run_stage(
        tmp_path,
        [
            {"path": str(write_jsonl(tmp_path / "s.jsonl", sft))},
            {"path": str(write_jsonl(tmp_path / "p.jsonl", pairs))},
        ],
    )
    sft_ds = datasets.load_from_disk(str(out / "sft"))
    pref_ds = datasets.load_from_disk(str(out / "preference"))
    train = {r["messages"][0]["content"].lower() for r in sft_ds["train"]} | {
        r["prompt"][0]["content"].lower() for r in pref_ds["train"]
    }
    held = {r["messages"][0]["content"].lower() for r in sft_ds["eval"]} | {
        r["prompt"][0]["content"].lower() for r in pref_ds["eval"]
    }
    assert held and not (train & held)
    assert stats_of(out)["sft"]["rows_sharing_a_prompt"] == 60


def test_source_weights_repeat_training_rows(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(40))
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(40, offset=1000))
    out = run_stage(tmp_path, [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5}])
    import datasets

    train = datasets.load_from_disk(str(out / "sft"))["train"]
    from collections import Counter

    per_source = Counter(train["source"])
    held_a = sum(1 for r in datasets.load_from_disk(str(out / "sft"))["eval"] if r["source"] == 0)
    held_b = sum(1 for r in datasets.load_from_disk(str(out / "sft"))["eval"] if r["source"] == 1)
    assert per_source[0] == 2 * (40 - held_a)
    assert per_source[1] == round(0.5 * (40 - held_b))


def test_a_held_out_source_is_evaluated_whole_and_never_trained_on(tmp_path: Path) -> None:
    trained = write_jsonl(tmp_path / "a.jsonl", chat_rows(40))
    retention = write_jsonl(tmp_path / "keep.jsonl", chat_rows(12, offset=1000))
    out = run_stage(tmp_path, [{"path": str(trained)}, {"path": str(retention), "held_out": True}])
    import datasets

    splits = datasets.load_from_disk(str(out / "sft"))
    assert 1 not in splits["train"]["source"]
    assert splits["eval"]["source"].count(1) == 12
    assert 0 in splits["train"]["source"]
    assert stats_of(out)["sft"]["eval_rows"] == 12 + splits["eval"]["source"].count(0)


def test_unchanged_inputs_skip_force_reruns_and_a_data_edit_reruns(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(10))
    first = run_stage(tmp_path, [{"path": str(path)}])
    stamp = json.loads((first / artifacts.MANIFEST).read_text())["finished_at"]
    capsys.readouterr()
    run_stage(tmp_path, [{"path": str(path)}])
    assert "data: up to date" in capsys.readouterr().out
    run_stage(tmp_path, [{"path": str(path)}], "sft.learning_rate=1e-5")  # not a data setting
    assert "data: up to date" in capsys.readouterr().out
    run_stage(tmp_path, [{"path": str(path)}], force=True)
    assert "data: up to date" not in capsys.readouterr().out
    write_jsonl(path, chat_rows(11))
    run_stage(tmp_path, [{"path": str(path)}])
    manifest = json.loads((first / artifacts.MANIFEST).read_text())
    assert manifest["metrics"]["sft_train_rows"] + manifest["metrics"]["sft_eval_rows"] == 11
    assert manifest["finished_at"] >= stamp


def test_manifest_lists_config_inputs_outputs_versions_and_git(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(10))
    out = run_stage(tmp_path, [{"path": str(path)}])
    manifest = json.loads((out / artifacts.MANIFEST).read_text())
    assert manifest["stage"] == "data" and manifest["status"] == "complete"
    assert manifest["config"]["data"]["sources"][0]["path"] == str(path)
    ((name, record),) = manifest["inputs"].items()
    assert record["sha256"] == artifacts.sha256_file(path)
    for rel, info in manifest["outputs"].items():
        assert artifacts.sha256_file(out / rel) == info["sha256"]
    assert "stats.json" in manifest["outputs"] and "tokenizer/tokenizer.json" in manifest["outputs"]
    assert {"torch", "transformers", "datasets", "trl"} <= set(manifest["versions"])
    assert "commit" in manifest["git"] and manifest["started_at"] <= manifest["finished_at"]
    # Tokenizing and writing take measurable time: a zero would mean the clock was read twice at the end.
    assert manifest["wall_seconds"] > 0


def test_killed_stage_leaves_no_complete_manifest(tmp_path: Path) -> None:
    """A run killed while writing leaves only the .partial folder; the next run starts clean."""
    recipe = load_recipe(write_recipe(tmp_path, [{"path": str(write_jsonl(tmp_path / "c.jsonl", chat_rows(10)))}]))
    stage = artifacts.StageRun("data", recipe.run_dir, {}, "x")
    stage.begin()
    (stage.work_dir / "half-written.arrow").write_bytes(b"\0" * 10)
    assert not artifacts.manifest_is_complete(stage.final_dir)
    data.run(recipe)
    out = recipe.run_dir / "data"
    assert artifacts.manifest_is_complete(out) and not stage.work_dir.exists()
    assert not (out / "half-written.arrow").exists()


def test_a_truncated_output_makes_the_artifact_incomplete(tmp_path: Path) -> None:
    out = run_stage(tmp_path, [{"path": str(write_jsonl(tmp_path / "c.jsonl", chat_rows(10)))}])
    (out / artifacts.STATS).write_text("{}")
    assert not artifacts.manifest_is_complete(out)


def test_hub_dataset_offline_says_it_is_not_cached(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"hub dataset 'no-such-org/no-such-set' .* only datasets already in the local cache load"
    ):
        run_stage(tmp_path, [{"hub": "no-such-org/no-such-set"}])


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data source .*nothing\.jsonl does not exist"):
        run_stage(tmp_path, [{"path": str(tmp_path / "nothing.jsonl")}])
    odd = tmp_path / "rows.xml"
    odd.write_text("<rows/>")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'"):
        run_stage(tmp_path, [{"path": str(odd)}])


def test_cli_reports_user_errors_without_traceback(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(3))
    with open(path, "a") as handle:
        handle.write("{broken\n")
    recipe = write_recipe(tmp_path, [{"path": str(path)}])
    result = run_module("pipeline.data", "--config", str(recipe))
    # The message is wrapped to the terminal's width wherever the (temporary) path ends: compare it unwrapped.
    assert result.returncode == 2
    assert f"error: {path}:4: malformed JSON" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    bad_key = run_module("pipeline.data", "--config", str(recipe), "data.max_lenght=5")
    assert bad_key.returncode == 2 and "Did you mean 'max_length'" in " ".join(bad_key.stderr.split())
    assert "Traceback" not in bad_key.stderr


def test_cli_help_is_instant() -> None:
    result = run_module("pipeline.data", "--help")
    assert result.returncode == 0 and "--config" in result.stdout and "--force" in result.stdout


def test_preview_marks_exactly_the_trained_tokens_and_a_smaller_vocabulary_is_reported(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, [{"path": str(write_jsonl(tmp_path / "c.jsonl", chat_rows(30)))}])
    result = run_module("pipeline.data", "--config", str(path), "--preview", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--- row 0:" in result.stdout and "--- row 1:" in result.stdout and "--- row 2:" not in result.stdout
    # The trained span of a chat row is the answer and its end-of-turn token, nothing of the prompt.
    first = result.stdout.split("--- row 0:")[1].split("--- row 1:")[0]
    trained = first.split(data.TRAINED_OPEN)[1].split(data.TRAINED_CLOSE)[0]
    assert trained.endswith("<|im_end|>") and "What number comes after" not in trained
    # 30 short rows cannot fill the 300 tokens the recipe asks for; the summary says how many it got.
    stats = json.loads((load_recipe(path).run_dir / "data" / artifacts.STATS).read_text())["tokenizer"]
    assert stats["vocab_size"] < stats["requested_vocab_size"] == 300
    assert f"tokenizer: {stats['vocab_size']} tokens (asked 300" in result.stdout
