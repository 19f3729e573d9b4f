"""Generate the shipped default data: small instruction tasks with exactly checkable answers.

Every task is one a model of a million parameters learns in a few CPU minutes: word categories and
opposites (facts seen under other phrasings in training), parity, comparing digits, counting words. Held-out
prompts are new phrasings or new numbers, so exact match measures learning. Preference pairs set the correct
answer against a plausible wrong one (another category, the word itself, the other parity, off by one).

Deterministic: the same seed writes byte-identical files. Run `python data/make_data.py` to regenerate.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CATEGORIES = {
    "animal": "tiger falcon rabbit turtle parrot spider dragon oyster beetle donkey".split(),
    "color": "yellow violet orange silver copper crimson indigo maroon scarlet amber".split(),
    "fruit": "apple lemon cherry mango banana grape melon papaya plum peach".split(),
    "tool": "hammer wrench ladder needle magnet kettle shovel chisel pliers anchor".split(),
    "place": "castle island harbor desert meadow forest tunnel garden bridge jungle".split(),
}
WORDS = [word for words in CATEGORIES.values() for word in words]
CATEGORY_OF = {word: category for category, words in CATEGORIES.items() for word in words}
OPPOSITES = dict(
    pair.split(":")
    for pair in (
        "hot:cold big:small fast:slow light:dark early:late happy:sad open:closed full:empty high:low hard:soft "
        "wet:dry loud:quiet rich:poor strong:weak young:old clean:dirty thick:thin sharp:dull near:far up:down"
    ).split()
)
OPPOSITES.update({b: a for a, b in list(OPPOSITES.items())})

SYSTEM_PROMPTS = (
    "You are a precise assistant. Answer with the result only.",
    "Reply with just the answer.",
)


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(2, 6))


def task_category(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    prompt = rng.choice(
        ["What kind of thing is {w}?", "Is {w} an animal, a color, a fruit, a tool or a place?", "Classify the word {w}."]
    ).format(w=word)
    answer = CATEGORY_OF[word]
    return prompt, answer, rng.choice([c for c in CATEGORIES if c != answer])


def task_opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(sorted(OPPOSITES))
    prompt = rng.choice(["What is the opposite of {w}?", "Give the antonym of {w}.", "Opposite of {w}?"]).format(w=word)
    return prompt, OPPOSITES[word], word


def task_parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(10000)
    prompt = rng.choice(["Is {n} even or odd?", "Tell me whether {n} is odd or even.", "Parity of {n}?"]).format(n=n)
    answer, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return prompt, answer, wrong


def task_compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(10), 2)
    prompt = rng.choice(["Is {a} greater than {b}?", "Is {a} bigger than {b}?", "{a} > {b}, true?"]).format(a=a, b=b)
    answer, wrong = ("yes", "no") if a > b else ("no", "yes")
    return prompt, answer, wrong


def task_count(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng)
    prompt = rng.choice(["How many words are in this list: {w}", "Count the words: {w}", "Number of words in: {w}"]).format(
        w=" ".join(words)
    )
    return prompt, str(len(words)), str(len(words) + rng.choice([-1, 1]))


TASKS = (task_category, task_opposite, task_parity, task_compare, task_count)


def _unique(make_row, rng: random.Random, count: int) -> list[dict]:
    """`count` distinct rows: the fact tasks have few distinct prompts, so repeats are redrawn, not shipped."""
    rows, seen = [], set()
    while len(rows) < count:
        row = make_row(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def sft_row(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    # Some two-turn conversations, so every assistant turn (not only the last) is trained.
    for _ in range(2 if rng.random() < 0.15 else 1):
        prompt, answer, _ = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def preference_row(rng: random.Random) -> dict:
    prompt, answer, wrong = rng.choice(TASKS)(rng)
    return {"prompt": prompt, "chosen": answer, "rejected": wrong}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sft-rows", type=int, default=6000)
    parser.add_argument("--preference-rows", type=int, default=3000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "sft.jsonl", _unique(sft_row, random.Random(args.seed), args.sft_rows))
    write_jsonl(args.out / "preference.jsonl", _unique(preference_row, random.Random(args.seed + 1), args.preference_rows))
    print(f"wrote {args.sft_rows} SFT rows and {args.preference_rows} preference pairs to {args.out}")


if __name__ == "__main__":
    main()
