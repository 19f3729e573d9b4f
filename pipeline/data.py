"""Data-prep stage: read, normalise, validate, de-duplicate, split, tokenize with the chat template, report.

    python -m pipeline.data [--config configs/tiny.yaml] [--force] [KEY=VALUE ...]

Writes `checkpoints/<run>/data/`: `sft/` and `preference/` (datasets Arrow folders with train/eval splits),
`tokenizer/` (with its chat template; trained here when the recipe asks), `stats.json`, `manifest.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import artifacts, chat, cli, formats, models, near_duplicates, stages
from pipeline.core.errors import DataError
from pipeline.core.schema import Recipe, SourceConfig

STAGE = stages.DATA


@dataclass
class Tally:
    """Rows read and dropped, per kind of data set, so the summary accounts for every row."""

    read: Counter = field(default_factory=Counter)  # by source label
    dropped: Counter = field(default_factory=Counter)  # by reason

    def as_dict(self) -> dict[str, Any]:
        return {"read": dict(self.read), "read_total": sum(self.read.values()), "dropped": dict(self.dropped)}


def _source_record(source: SourceConfig) -> dict[str, Any]:
    if source.path is not None:
        path = Path(source.path)
        if not path.is_file():
            raise DataError(f"data source {path} does not exist (data.sources: path: {source.path}).")
        return artifacts.input_record(path)
    table = formats.load_hub_table(source)
    # The cached Arrow files are the data the stage reads: their hashes identify this version of the dataset.
    cache_files = [Path(entry["filename"]) for entry in table.cache_files]
    return artifacts.files_record("hub", f"{source.hub}/{source.hub_config or ''}:{source.split}", cache_files)


def _collect(recipe: Recipe) -> tuple[list[dict], list[dict], Tally, Tally]:
    """Read every source, normalise each row, and sort it into SFT or preference rows (or a counted drop)."""
    from tqdm.auto import tqdm

    rows: dict[bool, list[dict]] = {False: [], True: []}
    tallies = {False: Tally(), True: Tally()}  # keyed by "is preference data"; undetectable rows count as SFT
    for index, source in enumerate(recipe.data.sources):
        fmt = source.format
        for location, row in tqdm(
            formats.read_source(source), desc=f"reading {source.label}", unit=" rows", file=sys.stderr
        ):
            try:
                if isinstance(row, formats.Malformed):
                    raise row
                if not isinstance(row, dict):
                    raise formats.Malformed(f"a row must be an object, got {type(row).__name__}")
                if fmt == "auto":
                    fmt = formats.detect_format(set(row))
                preference = formats.is_preference(fmt)
                record = formats.normalise_preference(row, fmt) if preference else formats.normalise_sft(row, fmt)
            except formats.Malformed as error:
                tally = tallies[formats.is_preference(fmt)]
                tally.read[source.label] += 1
                _malformed(recipe, location, error, tally)
                continue
            except formats.Drop as drop:
                tally = tallies[formats.is_preference(fmt)]
                tally.read[source.label] += 1
                tally.dropped[drop.args[0]] += 1
                continue
            tallies[preference].read[source.label] += 1
            record["source"] = index
            rows[preference].append(record)
    return rows[False], rows[True], tallies[False], tallies[True]


def _malformed(recipe: Recipe, location: str, error: Exception, tally: Tally) -> None:
    if recipe.data.on_error == "fail":
        raise DataError(
            f"{location}: {error}. Fix the row, or set data.on_error: skip to drop such rows (they are counted)."
        )
    tally.dropped["malformed"] += 1


def _prompt_key(record: dict[str, Any]) -> str:
    """What a row asks: its turns before the answer, without the system prompt or the tool list, which wrap a
    request without changing it (with them in the key, "Opposite of quiet?" asked with and without a system prompt
    landed on both sides of the split: 22% of the default data's held-out prompts)."""
    prompt = record["prompt"] if "prompt" in record else formats.sft_prompt(record["messages"])
    return formats.conversation_key([message for message in prompt if message["role"] != "system"])


def _full_key(record: dict[str, Any]) -> str:
    if "messages" in record:
        return formats.conversation_key(record["messages"]) + "\x1d" + (record.get("tools") or "")
    return "\x1d".join(formats.conversation_key(record[k]) for k in ("prompt", "chosen", "rejected"))


def _dedupe(rows: list[dict], tally: Tally) -> list[dict]:
    seen, kept = set(), []
    for record in rows:
        key = _full_key(record)
        if key in seen:
            tally.dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(record)
    return kept


def _is_eval(prompt_key: str, seed: int, eval_fraction: float) -> bool:
    """Split by a seeded hash of the normalised prompt: rows sharing a prompt always land on the same side,
    in SFT and preference data alike, so no eval prompt can occur in train."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _split(rows: list[dict], recipe: Recipe) -> tuple[list[dict], list[dict]]:
    train, held_out = [], []
    sources = recipe.data.sources
    for record in rows:
        evaluated = sources[record["source"]].held_out or _is_eval(
            _prompt_key(record), recipe.run.seed, recipe.data.eval_fraction
        )
        (held_out if evaluated else train).append(record)
    return train, held_out


def _apply_weights(rows: list[dict], sources: list[SourceConfig], seed: int) -> list[dict]:
    """Repeat each source's training rows floor(weight) times plus a seeded sample for the fraction."""
    rng = random.Random(seed)
    by_source: dict[int, list[dict]] = defaultdict(list)
    for record in rows:
        by_source[record["source"]].append(record)
    out = []
    for index in sorted(by_source):
        group, weight = by_source[index], sources[index].weight
        whole, fraction = int(weight), weight - int(weight)
        out += group * whole + rng.sample(group, round(fraction * len(group)))
    return out


def _training_conversations(rows: list[dict]) -> list[tuple[list[dict], list | None]]:
    """Every conversation training will see (a preference pair gives two), with its tools."""
    conversations = []
    for record in rows:
        tools = chat.parse_tools(record.get("tools"))
        if "messages" in record:
            conversations.append((record["messages"], tools))
        else:
            conversations += [(record["prompt"] + record[side], tools) for side in ("chosen", "rejected")]
    return conversations


def _tokenize_sft(batch: dict[str, list], tokenizer: Any) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "assistant_masks": [], "length": [], "assistant_tokens": []}
    for messages, tools in zip(batch["messages"], batch["tools"]):
        encoded = chat.render_ids(tokenizer, messages, chat.parse_tools(tools), with_assistant_mask=True)
        out["input_ids"].append(encoded["input_ids"])
        out["assistant_masks"].append(encoded["assistant_masks"])
        out["length"].append(len(encoded["input_ids"]))
        out["assistant_tokens"].append(sum(encoded["assistant_masks"]))
    return out


def _tokenize_preference(batch: dict[str, list], tokenizer: Any) -> dict[str, list]:
    out: dict[str, list] = {"prompt_length": [], "chosen_length": [], "rejected_length": []}
    for prompt, chosen, rejected, tools in zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["tools"]):
        parsed = chat.parse_tools(tools)
        out["prompt_length"].append(
            len(chat.render_ids(tokenizer, prompt, parsed, add_generation_prompt=True)["input_ids"])
        )
        out["chosen_length"].append(len(chat.render_ids(tokenizer, prompt + chosen, parsed)["input_ids"]))
        out["rejected_length"].append(len(chat.render_ids(tokenizer, prompt + rejected, parsed)["input_ids"]))
    return out


def _length_stats(lengths: list[int]) -> dict[str, Any]:
    import numpy as np

    if not lengths:
        return {"count": 0}
    values = np.asarray(lengths)
    return {
        "count": int(values.size),
        "min": int(values.min()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
        "total_tokens": int(values.sum()),
    }


def _tokenize_and_filter(dataset: Any, kind: str, tokenizer: Any, recipe: Recipe, tally: Tally) -> Any:
    """Tokenize with the chat template (batched map) and drop, counting, what exceeds data.max_length."""
    max_length = recipe.data.max_length
    # One process maps in this one: datasets would start a pool of one worker, and swap os.environ for a copy.
    processes = recipe.data.num_proc if recipe.data.num_proc > 1 else None
    if kind == "sft":
        dataset = dataset.map(
            _tokenize_sft,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer},
            num_proc=processes,
            desc="tokenizing SFT rows",
        )
        keep = [length <= max_length for length in dataset["length"]]
    else:
        dataset = dataset.map(
            _tokenize_preference,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer},
            num_proc=processes,
            desc="tokenizing preference rows",
        )
        keep = [max(c, r) <= max_length for c, r in zip(dataset["chosen_length"], dataset["rejected_length"])]
    tally.dropped["too_long"] += keep.count(False)
    return dataset.select([i for i, ok in enumerate(keep) if ok])


def _prepare_tokenizer(recipe: Recipe, train_rows: list[dict]) -> Any:
    model = recipe.model
    template = chat.resolve_chat_template(model.chat_template)
    if model.train_tokenizer_vocab_size is not None:
        return chat.train_tokenizer(_training_conversations(train_rows), model.train_tokenizer_vocab_size, template)
    if model.gguf is not None and model.tokenizer is None:
        gguf = models.GGUFFile.resolve(model.gguf)
        return chat.load_tokenizer(gguf.path.parent, template, gguf_file=gguf.path.name)
    return chat.load_tokenizer(
        model.tokenizer or model.name_or_path,
        template,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
    )


def run(recipe: Recipe, options: stages.Options = stages.Options()) -> stages.Outcome:
    sources = {
        f"source{index}:{source.label}": _source_record(source) for index, source in enumerate(recipe.data.sources)
    }
    if recipe.model.gguf is not None and recipe.model.tokenizer is None:  # the tokenizer comes from the file
        sources["gguf"] = artifacts.input_record(models.GGUFFile.resolve(recipe.model.gguf).path)
    outcome = stages.execute(STAGE, recipe, lambda run: _prepare_data(recipe, run), force=options.force, inputs=sources)
    if options.preview:
        print(render_preview(STAGE.folder(recipe), options.preview))
    return outcome


TRAINED_OPEN, TRAINED_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧: around the tokens training puts in the loss


def render_preview(data_dir: Path, count: int) -> str:
    """The first `count` training rows as the model sees them, every trained token span marked ⟦like this⟧."""
    import datasets

    tokenizer = chat.load_tokenizer(data_dir / artifacts.TOKENIZER_DIR)
    split = datasets.load_from_disk(str(data_dir / artifacts.SFT_DATA_DIR))["train"]
    shown = []
    for index, row in enumerate(split.select(range(min(count, len(split))))):
        spans, start = [], 0
        masks = row["assistant_masks"]
        for end in range(1, len(masks) + 1):
            if end == len(masks) or masks[end] != masks[start]:
                text = tokenizer.decode(row["input_ids"][start:end])
                spans.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if masks[start] else text)
                start = end
        trained = sum(masks)
        shown.append(f"--- row {index}: {len(masks)} tokens, {trained} trained\n{''.join(spans)}")
    return "\n".join(shown)


def _prepare_data(recipe: Recipe, run: artifacts.StageRun) -> stages.Result:
    # A pretrained tokenizer loads before any data is read, so a bad id fails early; a trained one needs the data.
    pretrained = None if recipe.model.train_tokenizer_vocab_size else _prepare_tokenizer(recipe, [])
    work = run.begin()

    import datasets

    sft_rows, pref_rows, sft_tally, pref_tally = _collect(recipe)
    if not sft_rows and not pref_rows:
        raise DataError(
            f"no usable rows in {', '.join(s.label for s in recipe.data.sources)} "
            f"(dropped: {dict(sft_tally.dropped + pref_tally.dropped)}). Check the sources' format."
        )
    sft_rows, pref_rows = _dedupe(sft_rows, sft_tally), _dedupe(pref_rows, pref_tally)
    splits = {"sft": _split(sft_rows, recipe), "preference": _split(pref_rows, recipe)}
    near = near_duplicates.check(splits, recipe.data.near_duplicates, _prompt_key)  # None when mode is off
    if near is not None:
        splits = near.splits
        sft_tally.dropped.update(near.dropped["sft"])
        pref_tally.dropped.update(near.dropped["preference"])

    tokenizer = (
        pretrained if pretrained is not None else _prepare_tokenizer(recipe, splits["sft"][0] + splits["preference"][0])
    )
    if sft_rows:
        chat.ensure_training_template(tokenizer)
    end_of_turn = chat.end_of_turn_token_id(tokenizer) if sft_rows else None
    tokenizer.save_pretrained(work / artifacts.TOKENIZER_DIR)

    stats: dict[str, Any] = {
        "tokenizer": {
            "vocab_size": len(tokenizer),
            "requested_vocab_size": recipe.model.train_tokenizer_vocab_size,
            "eos_token": tokenizer.eos_token,
            "end_of_turn_token": tokenizer.convert_ids_to_tokens(end_of_turn) if end_of_turn is not None else None,
            "trained": recipe.model.train_tokenizer_vocab_size is not None,
        }
    }
    if near is not None:
        stats["near_duplicates"] = near.stats
    tallies = {"sft": sft_tally, "preference": pref_tally}
    out_dirs = {"sft": artifacts.SFT_DATA_DIR, "preference": artifacts.PREFERENCE_DATA_DIR}
    for kind, (train, held_out) in splits.items():
        if not train and not held_out:
            continue
        tally = tallies[kind]
        weighted = _apply_weights(train, recipe.data.sources, recipe.run.seed)
        parts = {}
        for split, rows in (("train", weighted), ("eval", held_out)):
            table = datasets.Dataset.from_list(rows) if rows else None
            parts[split] = _tokenize_and_filter(table, kind, tokenizer, recipe, tally) if table is not None else None
        kept = {split: len(ds) if ds is not None else 0 for split, ds in parts.items()}
        lengths_key = "length" if kind == "sft" else "chosen_length"
        stats[kind] = {
            **tally.as_dict(),
            "kept_before_weighting": len(train) + len(held_out) - tally.dropped["too_long"],
            "train_rows": kept["train"],
            "eval_rows": kept["eval"],
            "rows_sharing_a_prompt": len(train) + len(held_out) - len({_prompt_key(r) for r in train + held_out}),
            "token_lengths": {
                split: _length_stats(ds[lengths_key] if ds is not None else []) for split, ds in parts.items()
            },
        }
        if kind == "sft" and parts["train"] is not None:
            stats[kind]["assistant_token_fraction"] = round(
                sum(parts["train"]["assistant_tokens"]) / max(1, sum(parts["train"]["length"])), 4
            )
        if kept["train"] == 0:
            raise DataError(
                f"no {kind} training rows survived (dropped: {dict(tally.dropped)}); with data.max_length="
                f"{recipe.data.max_length}, raise the limit or check the data."
            )
        datasets.DatasetDict({s: ds for s, ds in parts.items() if ds is not None}).save_to_disk(
            str(work / out_dirs[kind])
        )

    _check_survival(recipe, stats)
    (work / artifacts.STATS).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stages.Result(_headline(stats), _summary(stats, time.time() - run.started))


def _check_survival(recipe: Recipe, stats: dict[str, Any]) -> None:
    for kind in ("sft", "preference"):
        if kind not in stats:
            continue
        read = stats[kind]["read_total"]
        kept = stats[kind]["kept_before_weighting"]
        if read and kept / read < recipe.data.min_keep_fraction:
            raise DataError(
                f"only {kept} of {read} {kind} rows survived validation ({kept / read:.1%}, below "
                f"data.min_keep_fraction={recipe.data.min_keep_fraction}); dropped by reason: "
                f"{stats[kind]['dropped']}. Fix the data or lower data.min_keep_fraction. The previous artifact, if "
                "any, is untouched."
            )


def _headline(stats: dict[str, Any]) -> dict[str, Any]:
    headline = {}
    for kind in ("sft", "preference"):
        if kind in stats:
            headline[f"{kind}_train_rows"] = stats[kind]["train_rows"]
            headline[f"{kind}_eval_rows"] = stats[kind]["eval_rows"]
            headline[f"{kind}_dropped"] = sum(stats[kind]["dropped"].values())
    headline["vocab_size"] = stats["tokenizer"]["vocab_size"]
    return headline


def _summary(stats: dict[str, Any], seconds: float) -> str:
    parts = []
    for kind in ("sft", "preference"):
        if kind not in stats:
            continue
        s = stats[kind]
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(s["dropped"].items()) if n) or "none"
        parts.append(
            f"{kind}: read {s['read_total']}, kept {s['kept_before_weighting']} "
            f"(train {s['train_rows']} / eval {s['eval_rows']}), dropped {dropped}"
        )
    if "near_duplicates" in stats:
        parts.append(near_duplicates.summary(stats["near_duplicates"]))
    vocab = stats["tokenizer"]
    if vocab["trained"] and vocab["vocab_size"] != vocab["requested_vocab_size"]:
        # BPE stops early when the text offers no more merges; a smaller vocabulary than asked is not an error.
        parts.append(
            f"tokenizer: {vocab['vocab_size']} tokens (asked {vocab['requested_vocab_size']}: the data offers no more"
            " merges)"
        )
    return f"data: {'; '.join(parts)} ({seconds:.1f} s)"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preview",
        type=int,
        default=0,
        metavar="N",
        help="print the first N training rows as the model sees them, trained tokens marked",
    )


main = cli.stage_main(STAGE, run, _arguments)

if __name__ == "__main__":
    sys.exit(main())
