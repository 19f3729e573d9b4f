"""Generate the shipped default data: small instruction tasks with exactly checkable answers.

Every task is a rule a tiny model can learn in a few CPU minutes (compare, parity, successor, reorder,
pick, count), so exact match on held-out prompts measures learning, not memorisation. Preference pairs
set the correct answer against a plausible wrong one (off by one, the other operand, a near-miss order).

Deterministic: the same seed writes byte-identical files. Run `python data/make_data.py` to regenerate.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger lemon piano forest candle rocket garden silver mirror window "
    "planet orange pencil island thunder yellow basket dragon marble summer winter castle bottle "
    "jacket violet copper meadow falcon harbor lantern pepper rabbit saddle tunnel velvet wagon "
    "anchor bridge cactus desert engine feather glacier helmet insect jungle kettle ladder magnet "
    "needle oyster parrot quartz ribbon spider turtle"
).split()

SYSTEM_PROMPTS = (
    "You are a precise assistant. Answer with the result only.",
    "Reply with just the answer.",
)


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def task_larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(10, 1000), 2)
    prompt = rng.choice(
        ["Which number is larger: {a} or {b}?", "Which is bigger, {a} or {b}?", "Pick the larger number: {a}, {b}."]
    ).format(a=a, b=b)
    return prompt, str(max(a, b)), str(min(a, b))


def task_parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(10000)
    prompt = rng.choice(["Is {n} even or odd?", "Tell me whether {n} is odd or even."]).format(n=n)
    answer, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return prompt, answer, wrong


def task_successor(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(10000)
    prompt = rng.choice(["What number comes after {n}?", "What is {n} plus one?"]).format(n=n)
    wrong = rng.choice([n - 1, n + 2, n])
    return prompt, str(n + 1), str(wrong)


def task_reverse(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng)
    prompt = rng.choice(["Reverse the order of these words: {w}", "Write these words backwards: {w}"]).format(
        w=" ".join(words)
    )
    near_miss = words[::-1]
    i = rng.randrange(len(near_miss) - 1)
    near_miss[i], near_miss[i + 1] = near_miss[i + 1], near_miss[i]
    return prompt, " ".join(words[::-1]), " ".join(near_miss)


def task_sort(rng: random.Random) -> tuple[str, str, str]:
    digits = [rng.randrange(10) for _ in range(rng.randint(4, 6))]
    while len(set(digits)) < 2:
        digits = [rng.randrange(10) for _ in range(rng.randint(4, 6))]
    prompt = rng.choice(["Sort these digits in ascending order: {d}", "Put these digits in order: {d}"]).format(
        d=" ".join(map(str, digits))
    )
    ordered = sorted(digits)
    near_miss = list(ordered)
    i = next(i for i in range(len(near_miss) - 1) if near_miss[i] != near_miss[i + 1])
    near_miss[i], near_miss[i + 1] = near_miss[i + 1], near_miss[i]
    return prompt, " ".join(map(str, ordered)), " ".join(map(str, near_miss))


def task_last_word(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng)
    prompt = rng.choice(["What is the last word in: {w}?", "Name the final word of: {w}"]).format(w=" ".join(words))
    return prompt, words[-1], words[0]


def task_count(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng)
    prompt = rng.choice(["How many words are in this list: {w}", "Count the words: {w}"]).format(w=" ".join(words))
    return prompt, str(len(words)), str(len(words) + rng.choice([-1, 1]))


TASKS = (task_larger, task_parity, task_successor, task_reverse, task_sort, task_last_word, task_count)


def sft_rows(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        # Some two-turn conversations, so every assistant turn (not only the last) is trained.
        for _ in range(2 if rng.random() < 0.15 else 1):
            prompt, answer, _ = rng.choice(TASKS)(rng)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def preference_rows(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        prompt, answer, wrong = rng.choice(TASKS)(rng)
        rows.append({"prompt": prompt, "chosen": answer, "rejected": wrong})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sft-rows", type=int, default=6000)
    parser.add_argument("--preference-rows", type=int, default=1500)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "sft.jsonl", sft_rows(random.Random(args.seed), args.sft_rows))
    write_jsonl(args.out / "preference.jsonl", preference_rows(random.Random(args.seed + 1), args.preference_rows))
    print(f"wrote {args.sft_rows} SFT rows and {args.preference_rows} preference pairs to {args.out}")


if __name__ == "__main__":
    main()
