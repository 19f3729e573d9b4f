"""Generate the shipped default data: small tasks with exactly checkable answers, one file per kind of teaching.

- `sft.jsonl`: instruction tasks a model of a million parameters learns in a few CPU minutes (word categories,
  opposites, parity, counting words, repeating a word), some with a system prompt and some two-turn.
- `tools.jsonl`: tool use in OpenAI's shape. Two tools are declared (`get_weather`, `get_daytime`); the model must
  call the right one with the city as its argument, then answer with what the tool returned. Some rows declare
  the tools for a question that needs none, which must be answered directly.
- `preference.jsonl`: the SFT tasks again as pairs, the correct answer against a plausible wrong one, and
  questions a tool answers, where calling it is preferred over an answer nobody checked.
- `abstain.jsonl`: a behaviour only the preference data shows. Asked about a word it was never taught (a made-up
  one), the model should answer "unknown" instead of guessing a category or an opposite. SFT never sees such a
  question, so the SFT model guesses; DPO on these pairs teaches it to abstain.
- `tool_answers.jsonl`: after a tool's result, the result preferred over another word the tool could have said:
  the turn the other pairs never show, so that preference tuning keeps what SFT taught of it.
- `tool_arguments.jsonl`: a call with the city the question names preferred over the same call with another city:
  copying the city into the call is what SFT learns last, at a step that varies with the seed.

- `arithmetic.jsonl`: adding two numbers below 100, answered with the sum alone. For the pretrained model's recipe
  (configs/smollm2-135m.yaml): SmolLM2-135M-Instruct gets 1 in 15 such sums right before training (and 0 of 15
  with three digits), so SFT and then GRPO, rewarded by exact match, have something to teach.
  `arithmetic_held_out.jsonl`: 500 more sums, none of them asking two numbers `arithmetic.jsonl` adds (in either
  order), never trained on (`held_out: true`): where GRPO's effect is measured.
- `general.jsonl`: a retention set, never trained on (`held_out: true` in a recipe): general questions that
  SmolLM2-135M-Instruct answers right before any training (its answer contains the reference: 52 of the 74 asked
  when the set was written), so that a stage which makes the model forget shows up in the report.
- `general_answers.jsonl` and `general_preference.jsonl` are not written here: `data/make_general_answers.py`
  writes them from SmolLM2-135M-Instruct's own answers to other general questions (replay, so that fine-tuning
  keeps what the model knew), which needs the model.

Held-out prompts are new phrasings, new numbers, new cities-and-results or new made-up words, so the held-out
metrics measure learning. Deterministic: the same seed writes byte-identical files.
Run `python data/make_data.py` to regenerate.
"""

from __future__ import annotations

import argparse
import json
import random
import re
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
CATEGORY_PROMPTS = (
    "What kind of thing is {w}?",
    "Is {w} an animal, a color, a fruit, a tool or a place?",
    "Classify the word {w}.",
)
OPPOSITE_PROMPTS = ("What is the opposite of {w}?", "Give the antonym of {w}.", "Opposite of {w}?")

SYSTEM_PROMPTS = (
    "You are a precise assistant. Answer with the result only.",
    "Reply with just the answer.",
)

CITIES = (
    "Paris Tokyo Lima Cairo Oslo Rome Delhi Quito Seoul Dakar Hanoi Perth Madrid Nairobi Lagos Sydney Boston Denver"
).split()
TOOLS = {  # name: (description, possible results, phrasings of a question that needs it)
    "get_weather": (
        "Current weather in a city.",
        "sunny rainy cloudy windy snowy foggy".split(),
        ("What is the weather in {c}?", "How is the weather in {c} today?", "Weather in {c}?", "Is it raining in {c}?"),
    ),
    "get_daytime": (
        "Current time of day in a city.",
        "morning noon evening night".split(),
        (
            "What time of day is it in {c}?",
            "Is it day or night in {c}?",
            "Time of day in {c}?",
            "Is it morning in {c}?",
        ),
    ),
}
TOOL_SCHEMAS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    for name, (description, _, _) in TOOLS.items()
]

# Made-up words for the abstention pairs: never one of the words the tasks teach.
SYLLABLES = (
    "ba be bi bo bu da de di do du fa fe fi fo ka ke ki ko lu ma me mi mo nu pa pe pi po ra re ri ro su ta te ti to va"
    " ve vi vo za zo".split()
)
KNOWN_WORDS = set(WORDS) | set(OPPOSITES)
UNKNOWN = "unknown"


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(2, 6))


def task_category(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    answer = CATEGORY_OF[word]
    return rng.choice(CATEGORY_PROMPTS).format(w=word), answer, rng.choice([c for c in CATEGORIES if c != answer])


def task_opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(sorted(OPPOSITES))
    return rng.choice(OPPOSITE_PROMPTS).format(w=word), OPPOSITES[word], word


def task_parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(10000)
    prompt = rng.choice(["Is {n} even or odd?", "Tell me whether {n} is odd or even.", "Parity of {n}?"]).format(n=n)
    answer, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return prompt, answer, wrong


def task_count(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng)
    prompt = rng.choice(
        ["How many words are in this list: {w}", "Count the words: {w}", "Number of words in: {w}"]
    ).format(w=" ".join(words))
    return prompt, str(len(words)), str(len(words) + rng.choice([-1, 1]))


def task_echo(rng: random.Random) -> tuple[str, str, str]:
    """Repeat a word: the copying the tool task needs (a call's argument, an answer read off a tool's result),
    practised on its own. Without it the model learns to call tools but answers by guessing."""
    pool = WORDS + CITIES + [result for _, results, _ in TOOLS.values() for result in results]
    word = rng.choice(pool)
    prompt = rng.choice(["Repeat the word {w}.", "Say {w}.", "Echo: {w}"]).format(w=word)
    return prompt, word, rng.choice([other for other in WORDS if other != word])


TASKS = (task_category, task_opposite, task_parity, task_count, task_echo)

ADDITION_PROMPTS = ("What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} = ?", "What is the sum of {a} and {b}?")

# Written for the retention set and kept where SmolLM2-135M-Instruct's greedy answer (shipped ChatML template, no
# system prompt) contained the reference; the ones it got wrong were left out (the largest planet, Neptune).
GENERAL_QUESTIONS = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Norway?", "Oslo"),
    ("What is the capital of Sweden?", "Stockholm"),
    ("What is the capital of Poland?", "Warsaw"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of India?", "New Delhi"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What gas do plants absorb from the air?", "Carbon dioxide"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is the chemical symbol for iron?", "Fe"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("How many days are in a week?", "7"),
    ("How many continents are there?", "7"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a hexagon have?", "6"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("Who developed the theory of relativity?", "Albert Einstein"),
    ("What is the freezing point of water in Celsius?", "0"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What is the largest ocean on Earth?", "Pacific Ocean"),
    ("What is the longest river in Africa?", "Nile"),
    ("What is the tallest mountain in the world?", "Mount Everest"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What currency is used in Japan?", "Yen"),
    ("What is the largest mammal?", "Blue whale"),
    ("What organ pumps blood through the body?", "Heart"),
    ("What is the primary language spoken in Mexico?", "Spanish"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("In which country is the Eiffel Tower?", "France"),
    ("Which country is home to the kangaroo?", "Australia"),
    ("What is the smallest prime number?", "2"),
    ("What is the largest desert in the world?", "Sahara"),
    ("What is H2O commonly called?", "Water"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("What is the opposite of north?", "South"),
    ("What color do you get by mixing blue and yellow?", "Green"),
    ("What is the name of our galaxy?", "Milky Way"),
    ("What is the largest bone in the human body?", "Femur"),
)


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


def _tool_question(rng: random.Random) -> tuple[str, str, str, dict]:
    """A question one of the tools answers: (prompt, tool, city, the assistant turn that calls it)."""
    name = rng.choice(sorted(TOOLS))
    city = rng.choice(CITIES)
    call = {"type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}
    return (
        rng.choice(TOOLS[name][2]).format(c=city),
        name,
        city,
        {"role": "assistant", "content": "", "tool_calls": [call]},
    )


def tool_row(rng: random.Random) -> dict:
    """A question that needs a tool: call it, read its result, answer with it. One in five needs no tool."""
    if rng.random() < 0.2:
        prompt, answer, _ = rng.choice(TASKS)(rng)
        return {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "tools": TOOL_SCHEMAS,
        }
    prompt, name, _, call = _tool_question(rng)
    result = rng.choice(TOOLS[name][1])
    messages = [
        {"role": "user", "content": prompt},
        call,
        {"role": "tool", "content": result},
        {"role": "assistant", "content": result},
    ]
    return {"messages": messages, "tools": TOOL_SCHEMAS}


def preference_row(rng: random.Random) -> dict:
    """A task, right against wrong; one in five a question a tool answers, where calling the tool is preferred
    over an unchecked answer (so preference tuning keeps the model calling tools)."""
    if rng.random() < 0.2:
        prompt, name, _, call = _tool_question(rng)
        unchecked = rng.choice([UNKNOWN, rng.choice(TOOLS[name][1])])
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [call],
            "rejected": [{"role": "assistant", "content": unchecked}],
            "tools": TOOL_SCHEMAS,
        }
    prompt, answer, wrong = rng.choice(TASKS)(rng)
    return {"prompt": prompt, "chosen": answer, "rejected": wrong}


def tool_answer_row(rng: random.Random) -> dict:
    """After a tool's result, answering with that result is preferred over another word the tool could have said.
    DPO's other pairs never show this turn, so without these pairs preference tuning can undo what SFT taught of it."""
    prompt, name, _, call = _tool_question(rng)
    result, other = rng.sample(TOOLS[name][1], 2)
    return {
        "prompt": [{"role": "user", "content": prompt}, call, {"role": "tool", "content": result}],
        "chosen": [{"role": "assistant", "content": result}],
        "rejected": [{"role": "assistant", "content": other}],
        "tools": TOOL_SCHEMAS,
    }


def tool_argument_row(rng: random.Random) -> dict:
    """The call with the city the question names, preferred over the same call with another city. SFT learns to
    copy the city late (seed 1 of the default recipe still named one fixed city for every question after 5 epochs
    and got it at about 8); the pair puts DPO's contrast on exactly that token."""
    prompt, name, city, call = _tool_question(rng)
    other = rng.choice([c for c in CITIES if c != city])
    wrong = {"type": "function", "function": {"name": name, "arguments": json.dumps({"city": other})}}
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [call],
        "rejected": [{"role": "assistant", "content": "", "tool_calls": [wrong]}],
        "tools": TOOL_SCHEMAS,
    }


def arithmetic_row(rng: random.Random) -> dict:
    """One sum. The phrasing follows from the numbers, so a pair of numbers is one row (`_unique` redraws repeats)
    and a held-out sum is never trained on in another phrasing."""
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    prompt = ADDITION_PROMPTS[(a * 100 + b) % len(ADDITION_PROMPTS)].format(a=a, b=b)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(a + b)}]}


def general_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        for question, answer in GENERAL_QUESTIONS
    ]


def made_up_word(rng: random.Random) -> str:
    while True:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) + rng.choice(["", "n", "x", "r", "l"])
        if word not in KNOWN_WORDS:
            return word


def abstain_row(rng: random.Random) -> dict:
    """A category or opposite question about a made-up word: "unknown" is preferred over a confident guess."""
    word = made_up_word(rng)
    if rng.random() < 0.5:
        return {
            "prompt": rng.choice(CATEGORY_PROMPTS).format(w=word),
            "chosen": UNKNOWN,
            "rejected": rng.choice(list(CATEGORIES)),
        }
    return {
        "prompt": rng.choice(OPPOSITE_PROMPTS).format(w=word),
        "chosen": UNKNOWN,
        "rejected": rng.choice(sorted(OPPOSITES)),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


FILES = {  # file: (row maker, default count, seed offset)
    "sft.jsonl": (sft_row, 4000, 0),
    "tools.jsonl": (tool_row, 800, 2),
    "preference.jsonl": (preference_row, 1800, 1),
    "abstain.jsonl": (abstain_row, 1200, 3),
    "tool_answers.jsonl": (tool_answer_row, 600, 4),
    "tool_arguments.jsonl": (tool_argument_row, 400, 5),
    "arithmetic.jsonl": (arithmetic_row, 2000, 6),
}
FIXED_FILES = {"general.jsonl": general_rows}  # written as they are, not drawn


def sum_operands(row: dict) -> frozenset[str]:
    """What a sum asks, whatever the order of its numbers: 12 + 7 and 7 + 12 are one fact."""
    return frozenset(re.findall(r"\d+", row["messages"][0]["content"]))


# Held-out continuations: drawn on from a file's own stream (so the file stays as it was) and kept where they ask
# nothing the file asks. 500 sums measure an accuracy near 0.5 to about 0.02 (one standard error).
CONTINUATIONS = {"arithmetic_held_out.jsonl": ("arithmetic.jsonl", 500, sum_operands)}


def _continue(make_row, rng: random.Random, shipped: list[dict], count: int, fact) -> list[dict]:
    seen = {fact(row) for row in shipped}
    rows = []
    while len(rows) < count:
        row = make_row(rng)
        if fact(row) not in seen:
            seen.add(fact(row))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    continued = {source: (name, extra, fact) for name, (source, extra, fact) in CONTINUATIONS.items()}
    for name, (make_row, count, offset) in FILES.items():
        rng = random.Random(args.seed + offset)
        rows = _unique(make_row, rng, count)
        write_jsonl(args.out / name, rows)
        print(f"wrote {count} rows to {args.out / name}")
        if name in continued:
            held_out_name, extra, fact = continued[name]
            write_jsonl(args.out / held_out_name, _continue(make_row, rng, rows, extra, fact))
            print(f"wrote {extra} rows to {args.out / held_out_name}")
    for name, make_rows in FIXED_FILES.items():
        rows = make_rows()
        write_jsonl(args.out / name, rows)
        print(f"wrote {len(rows)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
