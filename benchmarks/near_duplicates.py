"""Near-duplicate prompts: embedding and FAISS search speed on 100,000 generated prompts, and the threshold's
precision on 100 labelled pairs.

    python benchmarks/near_duplicates.py [--rows 100000] [--threshold 0.9] [--seed 0]

Prompts are generated from task families (capital cities, antonyms, translations, arithmetic, poems, e-mails,
code, itineraries, ...), each written in three to five wordings and filled from word lists, with an optional
instruction about length or tone appended, until there are `--rows` distinct prompts. Reported, through the
functions the data stage uses (pipeline/core/near_duplicates.py), on however many cores this machine has:
embedding rows/s (all-MiniLM-L6-v2 on the CPU); search rows/s for `within_train` (every prompt against the
prompts before it) and for `held_out_vs_train` (5% held out against the other 95%); and how many prompts each
scope flags at the threshold.

The labelled sample: 100 pairs from the same generator, labelled by how they were made. 50 near-duplicates: one
request (same family, same slot values, same appended instruction) in two different wordings. 50 distinct: the
same wording with one slot changed, 20 times a word ("capital of France" / "capital of Peru") and 15 times a
number ("What is 17 plus 25?" / "What is 18 plus 25?"), and 15 other requests about the same thing ("capital of
France" / "currency of France"). Precision and recall are printed over a range of
thresholds, and the share of each kind of pair flagged at `--threshold`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COUNTRIES = (
    "France Peru Japan Kenya Canada Brazil Norway Egypt India Mexico Chile Spain Italy Germany Poland Greece Turkey "
    "Vietnam Thailand Nigeria Ghana Morocco Argentina Colombia Sweden Finland Ireland Portugal Austria Hungary "
    "Indonesia Malaysia Australia Iceland Nepal Cuba Jamaica Ukraine Romania Denmark"
).split()
WORDS = (
    "happy bright ancient quick generous brave fragile honest quiet heavy narrow curious gentle rough humble loyal "
    "bitter calm clever dull eager empty fierce giant hollow idle jolly keen lazy modest noble odd proud rare "
    "sharp shy steady strict sweet tender timid vast warm wild wise young"
).split()
NOUNS = (
    "house river bread window mountain friend teacher garden book market bridge candle forest island kitchen "
    "letter mirror needle ocean pencil rabbit school shadow ticket village wallet winter yellow anchor blanket "
    "castle desert engine feather glacier harbor lantern meadow orchard pillow"
).split()
LANGUAGES = "French German Spanish Italian Portuguese Japanese Korean Dutch Swedish Turkish Polish Greek".split()
TOPICS = (
    "the ocean|autumn leaves|a lost cat|the night sky|city traffic|a first day at school|an old lighthouse|"
    "friendship|a rainy Monday|the mountains|a summer storm|coffee|a broken clock|the moon|migrating birds|"
    "a quiet library|the last train home|a garden in spring|snowfall|an empty stadium|a market at dawn|"
    "the desert at night|a paper boat|grandmother's kitchen|a forgotten song"
).split("|")
FORMS = "poem|haiku|short story|limerick|song".split("|")
CONCEPTS = (
    "photosynthesis|vaccines|compound interest|the immune system|a blockchain|a neural network|inflation|"
    "plate tectonics|the water cycle|public-key encryption|a black hole|supply and demand|the stock market|"
    "natural selection|a refrigerator|GPS|the internet|nuclear fission|a rainbow|the greenhouse effect|"
    "an electric motor|a credit score|machine translation|the placebo effect|jet engines|solar panels|"
    "a hash table|garbage collection|recursion|the Doppler effect"
).split("|")
AUDIENCES = "|to a ten-year-old|to a beginner|in simple terms|to an expert|in one paragraph".split("|")
HISTORY = (
    "the Roman Empire|the Ottoman Empire|the printing press|the Silk Road|the French Revolution|the Cold War|"
    "the Industrial Revolution|the Olympic Games|jazz|the bicycle|aviation|the telephone|the Renaissance|"
    "the Ming dynasty|the Aztec Empire|chess|the Great Wall of China|antibiotics|photography|the Vikings"
).split("|")
PEOPLE = (
    "my manager|a client|my landlord|the school principal|a new colleague|my team|a supplier|the city council|a"
    " professor|my neighbour".split("|")
)
SUBJECTS = (
    "a delayed delivery|next week's meeting|a refund request|a job offer|the quarterly report|a broken heater|"
    "a project deadline|a conference invitation|a price increase|a schedule change|a missing invoice|"
    "a holiday request|the new office policy|a thank-you for their help|a data breach"
).split("|")
CODE_LANGUAGES = "Python JavaScript Rust Go Java C++ Ruby TypeScript".split()
CODE_TASKS = (
    "reverses a string|checks whether a number is prime|reads a CSV file|merges two sorted lists|counts word "
    "frequencies|removes duplicates from a list|parses a date|computes a factorial|finds the largest element of an "
    "array|validates an e-mail address|flattens a nested list|converts Celsius to Fahrenheit|sorts a dictionary by "
    "value|sends an HTTP request|computes a moving average"
).split("|")
DISHES = (
    "lasagna|pancakes|tomato soup|fried rice|banana bread|guacamole|chicken curry|falafel|ramen|apple pie|risotto|chili"
).split("|")
DIETS = "| without eggs| that is vegan| for four people| in under 30 minutes| that is gluten-free".split("|")
CITIES = "Paris|Tokyo|Lisbon|Nairobi|Lima|Oslo|Cairo|Hanoi|Rome|Vienna|Seoul|Havana|Dublin|Reykjavik|Prague".split("|")
EXTRAS = (
    "|| Keep it short.| Answer in one sentence.| Use a friendly tone.| Be concise.| Explain your reasoning.|"
    " Use bullet points.| Give two examples."
).split("|")

# family: (wordings, slot maker). Wordings of one family ask the same thing: they make the labelled paraphrases.
FAMILIES = {
    "capital": (
        [
            "What is the capital of {c}?",
            "Which city is the capital of {c}?",
            "Name the capital city of {c}.",
            "Tell me the capital of {c}.",
        ],
        lambda r: {"c": r.choice(COUNTRIES)},
    ),
    "currency": (
        ["What currency is used in {c}?", "Which currency does {c} use?", "What is the official currency of {c}?"],
        lambda r: {"c": r.choice(COUNTRIES)},
    ),
    "language": (
        [
            "What language is spoken in {c}?",
            "Which languages do people speak in {c}?",
            "What is the main language of {c}?",
        ],
        lambda r: {"c": r.choice(COUNTRIES)},
    ),
    "antonym": (
        [
            "What is the opposite of {w}?",
            "Give the antonym of {w}.",
            "Name a word that means the opposite of {w}.",
            "Which word is the antonym of {w}?",
        ],
        lambda r: {"w": r.choice(WORDS)},
    ),
    "synonym": (
        ["Give a synonym for {w}.", "What is another word for {w}?", "Name a word that means the same as {w}."],
        lambda r: {"w": r.choice(WORDS)},
    ),
    "translate": (
        [
            "Translate the word '{n}' into {l}.",
            "How do you say '{n}' in {l}?",
            "What is the {l} word for '{n}'?",
            "Give the {l} translation of '{n}'.",
        ],
        lambda r: {"n": r.choice(NOUNS), "l": r.choice(LANGUAGES)},
    ),
    "sentence": (
        [
            "Use the word '{n}' in a sentence.",
            "Write a sentence that contains the word '{n}'.",
            "Give an example sentence with '{n}'.",
        ],
        lambda r: {"n": r.choice(NOUNS)},
    ),
    "add": (
        ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "What do you get when you add {a} to {b}?"],
        lambda r: {"a": r.randint(2, 999), "b": r.randint(2, 999)},
    ),
    "multiply": (
        ["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.", "What is the product of {a} and {b}?"],
        lambda r: {"a": r.randint(2, 99), "b": r.randint(2, 99)},
    ),
    "compare": (
        ["Is {a} bigger than {b}?", "Is {a} greater than {b}?", "Is {a} larger than {b}?", "Does {a} exceed {b}?"],
        lambda r: {"a": r.randint(0, 9999), "b": r.randint(0, 9999)},
    ),
    "creative": (
        [
            "Write a {f} about {t}.",
            "Compose a {f} on {t}.",
            "Can you write a {f} about {t}?",
            "I'd like a {f} about {t}.",
        ],
        lambda r: {"f": r.choice(FORMS), "t": r.choice(TOPICS)},
    ),
    "explain": (
        [
            "Explain how {x} works{a}.",
            "How does {x} work? Explain it{a}.",
            "Describe the way {x} works{a}.",
            "Give an explanation of how {x} works{a}.",
        ],
        lambda r: {"x": r.choice(CONCEPTS), "a": (" " + r.choice(AUDIENCES)).rstrip()},
    ),
    "history": (
        [
            "Summarize the history of {h}.",
            "Give me a summary of the history of {h}.",
            "Briefly describe the history of {h}.",
            "What is the history of {h}, in short?",
        ],
        lambda r: {"h": r.choice(HISTORY)},
    ),
    "email": (
        [
            "Write an e-mail to {p} about {s}.",
            "Draft an e-mail for {p} regarding {s}.",
            "Help me write an e-mail to {p} about {s}.",
            "Compose a message to {p} concerning {s}.",
        ],
        lambda r: {"p": r.choice(PEOPLE), "s": r.choice(SUBJECTS)},
    ),
    "code": (
        ["Write a {g} function that {k}.", "Show me {g} code that {k}.", "How do I write a function in {g} that {k}?"],
        lambda r: {"g": r.choice(CODE_LANGUAGES), "k": r.choice(CODE_TASKS)},
    ),
    "recipe": (
        [
            "Give me a recipe for {d}{v}.",
            "How do I make {d}{v}?",
            "What's a good recipe for {d}{v}?",
            "Tell me how to cook {d}{v}.",
        ],
        lambda r: {"d": r.choice(DISHES), "v": r.choice(DIETS)},
    ),
    "trip": (
        [
            "Plan a {n}-day trip to {y}.",
            "Make an itinerary for {n} days in {y}.",
            "What should I do during {n} days in {y}?",
            "Suggest a {n}-day travel plan for {y}.",
        ],
        lambda r: {"n": r.randint(1, 14), "y": r.choice(CITIES)},
    ),
    "difference": (
        ["What is the difference between {x} and {z}?", "How do {x} and {z} differ?", "Compare {x} and {z}."],
        lambda r: dict(zip("xz", r.sample(CONCEPTS, 2))),
    ),
}
# Families that ask another thing about the same slot values: pairs of distinct requests about the same subject.
SAME_SUBJECT = (
    ("capital", "currency"),
    ("capital", "language"),
    ("currency", "language"),
    ("antonym", "synonym"),
    ("add", "multiply"),
    ("translate", "sentence"),
)
QUALIFIERS = {"a", "v"}
NUMBER_FAMILIES = ("add", "multiply", "compare", "trip")
WORD_FAMILIES = tuple(f for f in FAMILIES if f not in NUMBER_FAMILIES)


def render(family: str, wording: int, slots: dict, extra: str) -> str:
    return FAMILIES[family][0][wording].format(**slots) + extra


def generate_prompts(count: int, seed: int) -> list[str]:
    """`count` distinct prompts: a family, one of its wordings, slot values and an optional instruction each."""
    rng = random.Random(seed)
    families = list(FAMILIES)
    prompts: dict[str, None] = {}
    while len(prompts) < count:
        family = rng.choice(families)
        wordings, slots = FAMILIES[family]
        prompts[render(family, rng.randrange(len(wordings)), slots(rng), rng.choice(EXTRAS))] = None
    return list(prompts)


def _one_slot_changed(family: str, slots: dict, rng: random.Random) -> dict:
    """The same slots but one content slot (not an audience or diet qualifier, which only refine the request)."""
    while True:
        name = rng.choice(sorted(set(slots) - QUALIFIERS))
        changed = {**slots, name: FAMILIES[family][1](rng)[name]}
        if changed != slots:
            return changed


def labelled_pairs(seed: int) -> list[tuple[str, str, str]]:
    """(kind, prompt, prompt): 50 paraphrases, then 20 other-content, 15 other-number and 15 other-request pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(50):
        family = rng.choice(list(FAMILIES))
        slots, extra = FAMILIES[family][1](rng), rng.choice(EXTRAS)
        first, second = rng.sample(range(len(FAMILIES[family][0])), 2)
        pairs.append(("paraphrase", render(family, first, slots, extra), render(family, second, slots, extra)))
    for kind, families, count in (("other content", WORD_FAMILIES, 20), ("other numbers", NUMBER_FAMILIES, 15)):
        for _ in range(count):
            family = rng.choice(families)
            slots, extra = FAMILIES[family][1](rng), rng.choice(EXTRAS)
            wording = rng.randrange(len(FAMILIES[family][0]))
            other = _one_slot_changed(family, slots, rng)
            pairs.append((kind, render(family, wording, slots, extra), render(family, wording, other, extra)))
    for _ in range(15):
        first, second = rng.choice(SAME_SUBJECT)
        slots, extra = FAMILIES[first][1](rng), rng.choice(EXTRAS)
        shared = {**FAMILIES[second][1](rng), **slots}  # the slots the two families share take the same values
        pairs.append(("other request", render(first, 0, slots, extra), render(second, 0, shared, extra)))
    return pairs


def precision_table(pairs: list[tuple[str, str, str]], threshold: float) -> list[str]:
    import numpy as np

    from pipeline.core import near_duplicates
    from pipeline.core.formats import normalise_text

    left = near_duplicates.embed([normalise_text(a) for _, a, _ in pairs])
    right = near_duplicates.embed([normalise_text(b) for _, _, b in pairs])
    scores = (left * right).sum(axis=1)
    positive = np.array([kind == "paraphrase" for kind, _, _ in pairs])
    lines = ["threshold  flagged  precision  recall"]
    for value in sorted({0.8, 0.85, 0.88, 0.9, 0.92, 0.95, 0.97, threshold}):
        flagged = scores >= value
        precision = (flagged & positive).sum() / max(1, flagged.sum())
        lines.append(
            f"{value:9.2f}  {flagged.sum():7d}  {precision:9.3f}  {(flagged & positive).sum() / positive.sum():6.3f}"
        )
    lines.append(f"share flagged at {threshold} by kind of pair:")
    for kind in dict.fromkeys(k for k, _, _ in pairs):
        chosen = np.array([k == kind for k, _, _ in pairs])
        lines.append(
            f"  {kind:14s} {(scores[chosen] >= threshold).mean():.2f}  (similarity median"
            f" {np.median(scores[chosen]):.3f})"
        )
    wrong = [(s, k, a, b) for s, (k, a, b) in zip(scores, pairs) if (s >= threshold) != (k == "paraphrase")]
    lines.append("misjudged at the threshold:")
    lines += [f"  {s:.3f} {k}: {a!r} ~ {b!r}" for s, k, a, b in sorted(wrong, reverse=True)]
    return lines


def _timed(work):
    """The result, wall seconds and CPU seconds of this process (all its threads): on a shared machine the CPU
    seconds show what the work costs when the neighbours' load slows the wall clock."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def speed(rows: int, threshold: float, seed: int) -> list[str]:
    import os

    import numpy as np
    import torch

    from pipeline.core import near_duplicates
    from pipeline.core.formats import normalise_text

    prompts = [normalise_text(p) for p in generate_prompts(rows, seed)]
    near_duplicates.load_model()  # loading is timed apart from embedding
    load = os.getloadavg()[0]
    vectors, embed_s, embed_cpu = _timed(lambda: near_duplicates.embed(prompts))
    (scores, _), within_s, within_cpu = _timed(lambda: near_duplicates.nearest_earlier(vectors))
    held = np.random.default_rng(seed).random(len(prompts)) < 0.05
    (cross, _), cross_s, cross_cpu = _timed(lambda: near_duplicates.nearest(vectors[held], vectors[~held]))
    words = np.mean([len(p.split()) for p in prompts])
    return [
        (
            f"{len(prompts)} distinct prompts, {words:.1f} words on average; {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, load average {load:.1f} before and {os.getloadavg()[0]:.1f} after"
        ),
        f"embedding: {len(prompts) / embed_s:,.0f} rows/s ({embed_s:.1f} s wall, {embed_cpu:.1f} CPU-s)",
        (
            f"within_train search: {len(prompts) / within_s:,.0f} rows/s ({within_s:.1f} s wall, {within_cpu:.1f}"
            f" CPU-s); {(scores >= threshold).sum()} prompts have an earlier twin at {threshold}"
        ),
        (
            f"held_out_vs_train search: {held.sum() / cross_s:,.0f} held-out rows/s against {(~held).sum()}"
            f" ({cross_s:.2f} s wall, {cross_cpu:.2f} CPU-s); {(cross >= threshold).sum()} of {held.sum()} have a twin"
            f" at {threshold}"
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="300 prompts: the logic, not the speed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows = 300
    print("\n".join(precision_table(labelled_pairs(args.seed), args.threshold)), flush=True)
    print("\n".join(speed(args.rows, args.threshold, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
