"""The evaluation report: `report.md` with a verdict per stage, the metrics by model and by source, the gates,
plots, and the examples the final model gets wrong first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.core import artifacts, chat, harness, scoring, stages

# Metrics a stage is judged by in its one-line verdict, the most telling first.
VERDICT_METRICS = ("exact_match", "chosen_match", "preference_accuracy", "tool_arguments_accuracy", "tool_answer_match")
PLOTTED = ("exact_match", "chosen_match", "preference_accuracy", "tool_arguments_accuracy", "perplexity")
EXAMPLES = 12
CELL_CHARACTERS = 60


def gate_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| gate | value | threshold | result |", "| --- | --- | --- | --- |"]
    for row in rows:
        value = "n/a" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(
            f"| {row['gate']} | {value} | {row['threshold']} |"
            f" {'pass' if row['passed'] else 'FAIL ' + row.get('why', '')} |"
        )
    return "\n".join(lines)


def verdicts(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per model against the model before it: what the stage changed."""
    names = list(results)
    lines = []
    for before, after in zip(names, names[1:]):
        changes = []
        for metric in VERDICT_METRICS:
            if metric in results[before] and metric in results[after]:
                changes.append(
                    f"{metric} {results[after][metric] - results[before][metric]:+.3f} ({results[before][metric]:.3f}"
                    f" -> {results[after][metric]:.3f})"
                )
        if "mean_margin" in results[after]:
            changes.append(f"mean preference margin {results[after]['mean_margin']:.2f}")
        lines.append(f"{after.upper()} vs {before}: " + ", ".join(changes))
    return lines


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in PLOTTED if any(m in r for r in results.values())]
    names = list(results)
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        values = [results[n].get(metric, float("nan")) for n in names]
        ax.bar(names, values, color=["#999999", "#4c72b0", "#dd8452", "#55a868"][: len(names)])
        if not scoring.higher_is_better(metric):
            ax.set_title(f"{metric} (lower is better)")
        else:
            ax.set_title(metric)
        if metric == "perplexity":
            ax.set_yscale("log")  # a random base sits orders of magnitude above trained models
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _copy_training_plots(work: Path, run_dir: Path) -> list[str]:
    copied = []
    for stage in stages.trained_stages():
        for plot in (artifacts.LOSS_PLOT, artifacts.REWARDS_PLOT):
            source = run_dir / stage.name / plot
            if source.is_file():
                shutil.copy2(source, work / f"{stage.name}_{plot}")
                copied.append(f"{stage.name}_{plot}")
    return copied


def _cell(value: Any) -> str:
    if isinstance(value, list):  # expected tool calls
        value = (
            "; ".join(f"{c['name']}({', '.join(f'{k}={v!r}' for k, v in c['arguments'].items())})" for c in value)
            or "(no call)"
        )
    text = str(value).replace("\n", " ")
    if len(text) > CELL_CHARACTERS:  # an untrained model repeats one token to the end of its budget
        text = text[: CELL_CHARACTERS - 1] + "…"
    return text.replace("|", "\\|")


def _examples(held: scoring.HeldOut, outputs: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Held-out items, those the final model gets wrong first, each set represented."""
    final = list(outputs)[-1]
    rows = []
    for name, items in held.sets.items():
        for index, item in enumerate(items):
            answer = outputs[final][name][index]
            if name == "tool_calls":
                right = chat.served_reply(answer)[1] == item["reference"]
            else:
                right = scoring.same_answer(answer, item["reference"])
            # The question, also where the conversation ends in a tool's result.
            prompt = next((m.get("content") or "" for m in reversed(item["prompt"]) if m["role"] == "user"), "")
            rows.append(
                (
                    right,
                    name,
                    [
                        name,
                        held.sources[item["source"]],
                        prompt,
                        item["reference"],
                        *[outputs[m][name][index] for m in outputs],
                    ],
                )
            )
    rows.sort(key=lambda r: r[0])  # stable: wrong ones first, in set order
    return [[_cell(c) for c in row] for _, _, row in rows[:EXAMPLES]]


def contamination(data_dir: Path) -> list[str]:
    """The held-out contamination the data stage measured by meaning (data.near_duplicates), if it did."""
    stats = data_dir / artifacts.STATS
    near = json.loads(stats.read_text(encoding="utf-8")).get("near_duplicates", {}) if stats.is_file() else {}
    held = near.get("held_out_vs_train")
    if held is None:
        return []
    fate = (
        "the data stage dropped them, so the held-out split scored here is free of them at this threshold"
        if near["dropped"]
        else "they are still held out, so these metrics partly measure memory of their twins"
    )
    return [
        "",
        (
            f"Held-out contamination by meaning: {held['prompts']} of {held['of']} held-out prompts"
            f" ({held['fraction']:.1%}) have a near twin in training (cosine >= {near['threshold']}, {near['model']});"
            f" {fate}."
        ),
    ]


def write(
    work: Path, recipe: Any, summary: dict[str, Any], held: scoring.HeldOut, outputs: dict[str, dict[str, list[str]]]
) -> None:
    results = summary["models"]
    engine = summary["engine"]
    metrics = sorted({m for r in results.values() for m, v in r.items() if isinstance(v, float)})
    lines = [
        f"# Evaluation of run `{recipe.run.name}`",
        "",
        (
            f"Held-out split of the data artifact ({held.describe()}); greedy decoding through **{engine['backend']}**"
            f" in {engine['dtype']}, at most {recipe.evaluate.max_new_tokens} new tokens. `chosen_match` is the share"
            " of held-out preference prompts answered exactly with the chosen answer; perplexity is over assistant"
            " tokens (lower is better)."
        ),
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in verdicts(results)],
        "",
        "## Metrics",
        "",
        "| model | " + " | ".join(metrics) + " |",
        "| --- |" + " --- |" * len(metrics),
    ]
    for name, values in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" if m in values else "" for m in metrics) + " |")
    lines += contamination(stages.DATA.folder(recipe))
    sources = sorted({label for r in results.values() for label in r.get("by_source", {})})
    if sources:
        lines += [
            "",
            "## By source",
            "",
            "| source | metric | " + " | ".join(results) + " |",
            "| --- | --- |" + " --- |" * len(results),
        ]
        for label in sources:
            for metric in sorted({m for r in results.values() for m in r.get("by_source", {}).get(label, {})}):
                values = [results[n].get("by_source", {}).get(label, {}).get(metric) for n in results]
                lines.append(
                    f"| {label} | {metric} | " + " | ".join("" if v is None else f"{v:.4f}" for v in values) + " |"
                )
    lines += harness.table(results)
    if summary["gates"]:
        lines += ["", "## Gates", "", gate_table(summary["gates"])]
    _plot(results, work / artifacts.METRICS_PLOT)
    plots = [artifacts.METRICS_PLOT, *_copy_training_plots(work, recipe.run_dir)]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        f"## Examples (the {list(results)[-1]} model's mistakes first)",
        "",
        "| set | source | prompt | reference | " + " | ".join(results) + " |",
        "| --- | --- | --- | --- |" + " --- |" * len(results),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in _examples(held, outputs)]
    (work / artifacts.REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
