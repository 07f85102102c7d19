"""Multiple-choice scoring: AIR-Bench foundation (official letter rule) and MMAU (official string match)."""

from __future__ import annotations

import re
from collections import defaultdict

LETTERS = "ABCD"
FOUNDATION_INSTRUCTION = ("Choose the most suitable answer from options A, B, C, and D to respond the question in "
                          "next line, you may only choose A or B or C or D.")


# ---- AIR-Bench foundation ----------------------------------------------------------------------
def foundation_prompt(item: dict) -> str:
    """The benchmark's prompt; absent options C/D print as 'None', as the official inference script does."""
    choices = "\n".join(f"{letter}. {item.get('choice_' + letter.lower())}" for letter in LETTERS)
    return f"{FOUNDATION_INSTRUCTION}\n{item['question']}\n{choices}"


def foundation_letter(response: str | None) -> str | None:
    """The official rule: the first character if it is A-D, else the second-to-last ('The answer is B.').

    Returns None for an unparsable answer (empty, the text 'None', or neither position holds A-D).
    """
    if response is None:
        return None
    text = response.strip().replace("\n", "")
    if not text or text == "None":
        return None
    if text[0] in LETTERS:
        return text[0]
    if len(text) > 1 and text[-2] in LETTERS:
        return text[-2]
    return None


def foundation_answer_letter(item: dict) -> str | None:
    """The letter whose choice text equals answer_gt (None when no choice does: a broken item)."""
    for letter in LETTERS:
        if item.get("choice_" + letter.lower()) == item.get("answer_gt"):
            return letter
    return None


def foundation_scores(records: list[dict]) -> dict:
    """Accuracy per task_name_dataset_name. The official figure leaves unparsable answers out of the
    denominator; 'strict' counts them as wrong."""
    per: dict[str, dict] = defaultdict(lambda: {"correct": 0, "parsed": 0, "unparsable": 0})
    for r in records:
        stats = per[f"{r['task_name']}_{r['dataset_name']}"]
        letter = foundation_letter(r.get("response"))
        if letter is None:
            stats["unparsable"] += 1
            continue
        stats["parsed"] += 1
        stats["correct"] += letter == foundation_answer_letter(r)
    tasks = {}
    for name, s in per.items():
        total = s["parsed"] + s["unparsable"]
        tasks[name] = {**s, "accuracy": s["correct"] / s["parsed"] if s["parsed"] else None,
                       "strict_accuracy": s["correct"] / total if total else None}
    correct = sum(s["correct"] for s in per.values())
    parsed = sum(s["parsed"] for s in per.values())
    unparsable = sum(s["unparsable"] for s in per.values())
    scored = [t["accuracy"] for t in tasks.values() if t["accuracy"] is not None]
    strict = [t["strict_accuracy"] for t in tasks.values() if t["strict_accuracy"] is not None]
    return {
        "tasks": dict(sorted(tasks.items())),
        "correct": correct, "parsed": parsed, "unparsable": unparsable,
        "accuracy": correct / parsed if parsed else None,
        "strict_accuracy": correct / (parsed + unparsable) if parsed + unparsable else None,
        "task_average": sum(scored) / len(scored) if scored else None,  # mean over tasks, as the paper averages
        "strict_task_average": sum(strict) / len(strict) if strict else None,
    }


# ---- MMAU --------------------------------------------------------------------------------------
def mmau_prompt(item: dict) -> str:
    options = "\n".join(f"({LETTERS[i] if i < 4 else chr(65 + i)}) {c}" for i, c in enumerate(item["choices"]))
    return f"{item['question']}\nSelect one option from the provided choices.\n{options}"


def _words(text: str) -> set[str]:
    return set(re.findall(r"\b\w+\b", text.lower()))


def mmau_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU's ``string_match``: every word of the answer is in the prediction, and the prediction has
    no word that belongs only to a wrong choice."""
    predicted, wanted = _words(prediction), _words(answer)
    if not predicted:
        return False
    wrong = set()
    for choice in choices:
        words = _words(choice)
        if words != wanted:
            wrong |= words - wanted
    return wanted <= predicted and predicted.isdisjoint(wrong)


_BARE_LETTER = re.compile(r"^\s*\(?([A-Za-z])[\).:]?\s*$")


def mmau_prediction(response: str, choices: list[str]) -> str:
    """Our prompt labels the options (A)..(D); a reply that is only a letter ('B', '(B)', 'B.') is
    replaced by that option's text before MMAU's string match, which would otherwise never match it."""
    m = _BARE_LETTER.match(response or "")
    if m:
        i = ord(m.group(1).upper()) - 65
        if 0 <= i < len(choices):
            return choices[i]
    return response or ""


def mmau_scores(records: list[dict]) -> dict:
    groups = {"task": defaultdict(lambda: [0, 0]), "difficulty": defaultdict(lambda: [0, 0]),
              "sub-category": defaultdict(lambda: [0, 0])}
    correct = letters = 0
    for r in records:
        prediction = mmau_prediction(r.get("response", ""), r["choices"])
        letters += prediction != (r.get("response") or "")
        ok = mmau_match(r["answer"], prediction, r["choices"])
        correct += ok
        for field, table in groups.items():
            if r.get(field) is not None:
                table[r[field]][0] += ok
                table[r[field]][1] += 1
    out = {"correct": correct, "total": len(records), "accuracy": correct / len(records) if records else None,
           "letter_answers": letters}
    for field, table in groups.items():
        out[field.replace("-", "_")] = {k: {"correct": c, "total": n, "accuracy": c / n}
                                        for k, (c, n) in sorted(table.items())}
    return out
