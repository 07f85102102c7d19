"""Voice-chat content: spoken questions or instructions with their correct text answers.

Each generator returns {"kind", "question" (what is spoken, also its transcript), "answer",
"key", ...}. `key` is the canonical content used for the held-out split: "what is seven plus
five" and "how much is seven plus five" share the key `arithmetic:7 plus 5`, so a held-out sum
is never trained on in any wording. Answers write numbers as digits, questions as words.
"""

from __future__ import annotations

import numpy as np

from .sentences import english_sentence, number_words
from .split import is_heldout

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Australia": "Canberra", "India": "New Delhi", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Greece": "Athens", "Turkey": "Ankara", "Poland": "Warsaw", "Sweden": "Stockholm",
    "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin",
    "the United Kingdom": "London", "Austria": "Vienna", "Hungary": "Budapest", "the Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Switzerland": "Bern", "Cuba": "Havana", "Indonesia": "Jakarta", "Vietnam": "Hanoi",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Ukraine": "Kyiv",
}
# question -> answer; one wording each, the speaker's voice gives the variety.
FACTS = {
    "How many days are there in a week?": "There are 7 days in a week.",
    "How many months are there in a year?": "There are 12 months in a year.",
    "How many hours are there in a day?": "There are 24 hours in a day.",
    "How many minutes are there in an hour?": "There are 60 minutes in an hour.",
    "How many legs does a spider have?": "A spider has 8 legs.",
    "How many legs does a dog have?": "A dog has 4 legs.",
    "What colour is the sky on a clear day?": "The sky is blue on a clear day.",
    "What colour is fresh grass?": "Fresh grass is green.",
    "At what temperature does water freeze?": "Water freezes at 0 degrees Celsius.",
    "At what temperature does water boil?": "Water boils at 100 degrees Celsius at sea level.",
    "What is the largest planet in our solar system?": "Jupiter is the largest planet in our solar system.",
    "Which planet is called the red planet?": "Mars is called the red planet.",
    "What do bees make?": "Bees make honey.",
    "What is the largest ocean on Earth?": "The Pacific Ocean is the largest ocean on Earth.",
    "How many continents are there?": "There are 7 continents.",
    "How many sides does a triangle have?": "A triangle has 3 sides.",
    "How many sides does a square have?": "A square has 4 sides.",
    "What is frozen water called?": "Frozen water is called ice.",
    "What is the tallest mountain in the world?": "Mount Everest is the tallest mountain in the world.",
    "Which language is spoken in Brazil?": "Portuguese is spoken in Brazil.",
    "What is the closest star to the Earth?": "The Sun is the closest star to the Earth.",
    "What do cows drink?": "Cows drink water.",
}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
             "open": "closed", "early": "late", "loud": "quiet", "full": "empty", "old": "young", "wet": "dry",
             "hard": "soft", "high": "low", "long": "short", "rich": "poor", "strong": "weak", "thick": "thin",
             "clean": "dirty", "near": "far"}
SPELL_WORDS = ["cat", "dog", "sun", "tree", "house", "water", "apple", "green", "happy", "music", "river",
               "bread", "chair", "light", "mouse", "table", "phone", "cloud", "horse", "paper", "smile", "train",
               "zebra", "piano", "lemon", "book", "fish", "moon", "star", "garden"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GREETINGS = {
    "Hello, how are you?": "I'm doing well, thank you. How can I help you today?",
    "Good morning!": "Good morning! What can I do for you?",
    "Thank you very much.": "You're welcome!",
    "What is your name?": "I am an audio assistant. You can ask me about sounds and speech.",
    "Goodbye!": "Goodbye, have a nice day!",
}
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
ARITHMETIC_WORDINGS = ["What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Can you tell me what {a} {op} {b} is?",
                       "Please calculate {a} {op} {b}.", "What do you get for {a} {op} {b}?"]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


CAPITAL_WORDINGS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}."]


def _operands(op: str) -> tuple[int, int]:
    """[low, high) of both operands: times tables to 10, sums and differences to 20."""
    return (1, 11) if op == "times" else (0, 21)


# One builder per kind turns the content (numbers, words, wording) into the question dict; the
# random generators below draw the content and `every_question` enumerates it.
def _arithmetic(a: int, op: str, b: int, wording: str) -> dict:
    result = OPERATIONS[op](a, b)
    question = wording.format(a=number_words(a), op=op, b=number_words(b))
    return {"kind": "arithmetic", "question": question, "answer": f"{a} {op} {b} is {result}.",
            "key": f"arithmetic:{a} {op} {b}", "a": a, "op": op, "b": b, "result": result}


def _capital(country: str, wording: str) -> dict:
    return {"kind": "capital", "question": wording.format(c=country),
            "answer": f"The capital of {country} is {CAPITALS[country]}.", "key": f"capital:{country}"}


def _fact(question: str) -> dict:
    return {"kind": "fact", "question": question, "answer": FACTS[question], "key": f"fact:{question}"}


def _count(start: int, end: int) -> dict:
    return {"kind": "count", "question": f"Count from {number_words(start)} to {number_words(end)}.",
            "answer": ", ".join(str(i) for i in range(start, end + 1)) + ".", "key": f"count:{start}-{end}"}


def _spell(word: str) -> dict:
    return {"kind": "spell", "question": f"How do you spell the word {word}?",
            "answer": f"{word.capitalize()} is spelled {'-'.join(word.upper())}.", "key": f"spell:{word}"}


def _sequence(names: list[str], what: str, i: int, relation: str) -> dict:
    j = (i + 1 if relation == "after" else i - 1) % len(names)
    return {"kind": "sequence", "question": f"What {what} comes {relation} {names[i]}?",
            "answer": f"{names[j]} comes {relation} {names[i]}.", "key": f"sequence:{relation} {names[i]}"}


def _opposite(word: str) -> dict:
    return {"kind": "opposite", "question": f"What is the opposite of {word}?",
            "answer": f"The opposite of {word} is {OPPOSITES[word]}.", "key": f"opposite:{word}"}


def _greeting(question: str) -> dict:
    return {"kind": "greeting", "question": question, "answer": GREETINGS[question], "key": f"greeting:{question}"}


def arithmetic(rng: np.random.Generator) -> dict:
    op = _pick(rng, list(OPERATIONS))
    low, high = _operands(op)
    a, b = int(rng.integers(low, high)), int(rng.integers(low, high))
    if op == "minus" and b > a:  # keep results non-negative
        a, b = b, a
    return _arithmetic(a, op, b, _pick(rng, ARITHMETIC_WORDINGS))


def capital(rng) -> dict:
    country = _pick(rng, list(CAPITALS))
    return _capital(country, _pick(rng, CAPITAL_WORDINGS))


def fact(rng) -> dict:
    return _fact(_pick(rng, list(FACTS)))


def repeat(rng) -> dict:
    phrase = english_sentence(rng)
    return {"kind": "repeat", "question": f"Repeat after me: {phrase}", "answer": phrase, "key": f"repeat:{phrase}"}


def count(rng) -> dict:
    start = int(rng.integers(1, 11))
    end = start + int(rng.integers(2, 6))
    return _count(start, end)


def spell(rng) -> dict:
    return _spell(_pick(rng, SPELL_WORDS))


def next_in_sequence(rng) -> dict:
    names, what = (DAYS, "day") if rng.random() < 0.5 else (MONTHS, "month")
    i = int(rng.integers(len(names)))
    relation = "after" if rng.random() < 0.6 else "before"
    return _sequence(names, what, i, relation)


def opposite(rng) -> dict:
    return _opposite(_pick(rng, list(OPPOSITES)))


def greeting(rng) -> dict:
    return _greeting(_pick(rng, list(GREETINGS)))


GENERATORS = {"arithmetic": (arithmetic, 0.3), "capital": (capital, 0.15), "fact": (fact, 0.1),
              "repeat": (repeat, 0.1), "count": (count, 0.07), "spell": (spell, 0.08),
              "sequence": (next_in_sequence, 0.07), "opposite": (opposite, 0.08), "greeting": (greeting, 0.05)}


def question(rng: np.random.Generator, heldout: bool) -> dict:
    """A random question whose key lies on the requested side of the split."""
    names = list(GENERATORS)
    weights = np.array([GENERATORS[n][1] for n in names])
    for _ in range(10_000):
        generate = GENERATORS[names[int(rng.choice(len(names), p=weights / weights.sum()))]][0]
        q = generate(rng)
        if is_heldout(q["key"]) == heldout:
            return q
    raise RuntimeError("question split sampling did not converge")


def every_question() -> list[dict]:
    """Every question the generators can ask, in every wording, on both sides of the split; `repeat`
    is left out (its phrases are open-ended sentences)."""
    out = []
    for op in OPERATIONS:
        operands = range(*_operands(op))
        for a in operands:
            for b in operands:
                if op != "minus" or b <= a:
                    out += [_arithmetic(a, op, b, w) for w in ARITHMETIC_WORDINGS]
    out += [_capital(c, w) for c in CAPITALS for w in CAPITAL_WORDINGS]
    out += [_fact(q) for q in FACTS]
    out += [_count(start, start + n) for start in range(1, 11) for n in range(2, 6)]
    out += [_spell(w) for w in SPELL_WORDS]
    out += [_sequence(names, what, i, relation) for names, what in ((DAYS, "day"), (MONTHS, "month"))
            for i in range(len(names)) for relation in ("after", "before")]
    out += [_opposite(w) for w in OPPOSITES]
    out += [_greeting(q) for q in GREETINGS]
    return out
