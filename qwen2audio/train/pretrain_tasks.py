"""Pre-training examples: (audio, label) pairs -> the paper's natural-language task prompts.

The base model reads a raw prompt (no chat markup): the audio block, then the instruction
(SPEC section 1), and learns to continue it with the target, e.g.

    <|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech:  ->  " <|en|>hello world"

Targets start with one space, as the evaluation prompts expect: the ASR prompt given a language is
`... speech: <|en|>` (see `chat.asr_prompt`), and SER/VSC answers are compared after a left-strip.
For `--stage pretrain` a JSONL file holds one task record per line:

    {"task": "asr", "audio": "a.wav", "label": "hello world", "language": "en"}
    {"task": "translation", "audio": "b.wav", "label": "Good morning.", "source_language": "de", "target_language": "en"}
    {"task": "caption" | "emotion" | "vocal_sound", "audio": "c.wav", "label": "..."}
    {"task": "custom", "audio": "d.wav", "prompt": "Describe the music in English:", "label": "..."}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..chat import ASR_LANGUAGES, TASK_PROMPTS, raw_prompt
from ..errors import Qwen2AudioError

TARGET_SEP = " "
TASKS = ("asr", "caption", "emotion", "vocal_sound", "translation", "custom")

class TaskError(Qwen2AudioError):
    """A pre-training record that cannot be turned into a prompt and target."""


def language_name(code_or_name: str) -> str:
    """`de` -> German; a full name (German) is kept as given."""
    if code_or_name in ASR_LANGUAGES:
        return ASR_LANGUAGES[code_or_name]
    if code_or_name in ASR_LANGUAGES.values():
        return code_or_name
    raise TaskError(f"unknown language {code_or_name!r}: use a code ({', '.join(sorted(ASR_LANGUAGES))}) or its English name")


def language_code(code_or_name: str) -> str:
    """The tag form (`en`) of a language given as a code or an English name."""
    if code_or_name in ASR_LANGUAGES:
        return code_or_name
    for code, name in ASR_LANGUAGES.items():
        if name == code_or_name:
            return code
    raise TaskError(f"unknown language {code_or_name!r}: use a code ({', '.join(sorted(ASR_LANGUAGES))}) or its English name")


def task_instruction(task: str, language: str | None = None, source_language: str | None = None,
                     target_language: str | None = None, prompt: str | None = None) -> str:
    """The instruction text that follows the audio block in the raw prompt."""
    if task == "asr":
        return TASK_PROMPTS["asr"]
    if task in ("caption", "emotion", "vocal_sound"):
        return TASK_PROMPTS[task]
    if task == "translation":
        if not source_language or not target_language:
            raise TaskError("task translation needs 'source_language' and 'target_language'")
        return f"Translate the {language_name(source_language)} speech into {language_name(target_language)}:"
    if task == "custom":
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskError("task custom needs a non-empty 'prompt'")
        return prompt
    raise TaskError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def task_target(task: str, label: str, language: str | None = None) -> str:
    """What the model learns to write after the instruction (ASR: the language tag, then the text)."""
    if not isinstance(label, str) or not label.strip():
        raise TaskError("'label' must be a non-empty string")
    if task == "asr":
        if not language:
            raise TaskError("task asr needs 'language' (the target starts with its tag, e.g. <|en|>)")
        return f"{TARGET_SEP}<|{language_code(language)}|>{label.strip()}"
    return TARGET_SEP + label.strip()


def make_example(task: str, audio: Any, label: str, language: str | None = None,
                 source_language: str | None = None, target_language: str | None = None,
                 prompt: str | None = None) -> dict:
    """One pre-training example: {"prompt": raw prompt with one audio block, "target": str, "audios": [audio]}."""
    instruction = task_instruction(task, language, source_language, target_language, prompt)
    return {"prompt": raw_prompt(instruction, 1), "target": task_target(task, label, language), "audios": [audio]}


def examples_from_pairs(pairs: Iterable[tuple[Any, str]], task: str, **options) -> list[dict]:
    """Many (audio, label) pairs of one task, e.g. `examples_from_pairs(zip(wavs, texts), "asr", language="en")`."""
    return [make_example(task, audio, label, **options) for audio, label in pairs]


RECORD_FIELDS = ("task", "audio", "label", "language", "source_language", "target_language", "prompt")


def example_from_record(record: dict) -> dict:
    """A JSONL task record -> make_example(...); raises TaskError naming the problem."""
    if "task" not in record:
        raise TaskError("missing 'task'")
    if not isinstance(record.get("audio"), str) or not record["audio"]:
        raise TaskError("missing 'audio' (a file path)")
    if "label" not in record:
        raise TaskError("missing 'label'")
    unknown = sorted(set(record) - set(RECORD_FIELDS))
    if unknown:
        raise TaskError(f"unknown field(s) {', '.join(unknown)}; task records have {', '.join(RECORD_FIELDS)}")
    options = {k: record[k] for k in ("language", "source_language", "target_language", "prompt") if k in record}
    for key, value in options.items():
        if not isinstance(value, str):
            raise TaskError(f"'{key}' must be a string")
    return make_example(record["task"], record["audio"], record["label"], **options)


def task_record(task: str, audio: str, label: str, **options) -> dict:
    """The JSONL form of one example (checked by building it once)."""
    record = {"task": task, "audio": str(audio), "label": label, **{k: v for k, v in options.items() if v is not None}}
    example_from_record(record)
    return record


def task_records_from_pairs(pairs: Iterable[tuple[str, str]], task: str, **options) -> list[dict]:
    """(audio path, label) pairs -> task records, e.g. for `write_task_jsonl`."""
    return [task_record(task, audio, label, **options) for audio, label in pairs]


def write_task_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write task records (see `task_record`) as a JSONL file for `qwen2audio train --stage pretrain`."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            example_from_record(record)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


__all__ = ["TASKS", "TaskError", "make_example", "examples_from_pairs", "example_from_record", "task_record",
           "task_records_from_pairs", "write_task_jsonl", "task_instruction", "task_target"]
