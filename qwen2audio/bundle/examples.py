"""The default model's example clips (qwen2audio/assets/examples/), one per interaction mode, rendered
deterministically by the corpus builder's own generators:

    capital_of_france.wav  voice chat: "What is the capital of France?" spoken by espeak-ng (en-us, fixed voice)
    siren.wav              audio analysis: a wailing siren (synth.sounds), asked "What's that sound?"

`examples.json` lists each clip with its prompt (null: voice chat, the question is in the audio), the key words a
right answer contains, and `answer`: what the current default model says, written by a real run (greedy, as
`qwen2audio ask` answers), not by hand.

    python -m qwen2audio.bundle.examples            # render the clips (answers already recorded are kept)
    python -m qwen2audio.bundle.examples --answer   # also ask the default model and record its answers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
INDEX = "examples.json"
QUESTION = "What is the capital of France?"
VOICE = {"engine": "espeak", "voice": "en-us", "variant": "m3", "gender": "male", "rate": 150, "pitch": 50}
SIREN = {"label": "siren", "style": "wailing", "freq": 700, "duration": 3.0}
EXAMPLES = (
    {"audio": "capital_of_france.wav", "mode": "voice chat", "prompt": None, "keywords": ["paris"],
     "source": f"espeak-ng {VOICE['voice']}+{VOICE['variant']}, {VOICE['rate']} words/min: {QUESTION!r}"},
    {"audio": "siren.wav", "mode": "audio analysis", "prompt": "What's that sound?", "keywords": ["siren"],
     "source": f"qwen2audio.synth.sounds: a {SIREN['style']} siren around {SIREN['freq']} Hz, {SIREN['duration']:g} s"},
)


def render(name: str) -> np.ndarray:
    """The clip `name` (an EXAMPLES audio name) as float32 at 16 kHz."""
    if name == "capital_of_france.wav":
        from ..synth.tts import speak

        return speak(QUESTION, VOICE)
    if name == "siren.wav":
        from ..synth.sounds import render as render_sound

        return render_sound(dict(SIREN), np.random.default_rng(0))  # the siren draws no random numbers
    raise ValueError(f"unknown example {name!r}")


def messages(example: dict, directory: Path = EXAMPLES_DIR) -> list[dict]:
    """The user turn `qwen2audio ask CLIP [--prompt PROMPT]` sends for an example."""
    content = [{"type": "audio", "audio": str(directory / example["audio"])}]
    if example["prompt"] is not None:
        content.append({"type": "text", "text": example["prompt"]})
    return [{"role": "user", "content": content}]


def read_index(directory: Path = EXAMPLES_DIR) -> list[dict]:
    return json.loads((directory / INDEX).read_text(encoding="utf-8"))


def write_examples(directory: Path = EXAMPLES_DIR, answers: dict[str, str] | None = None) -> list[dict]:
    """Render every clip into `directory` and write examples.json; `answers` (audio name -> answer) replace the
    recorded ones, which are kept otherwise."""
    from ..synth.dsp import write_wav

    directory = Path(directory)
    old = {e["audio"]: e.get("answer", "") for e in read_index(directory)} if (directory / INDEX).is_file() else {}
    old.update(answers or {})
    index = []
    for example in EXAMPLES:
        write_wav(directory / example["audio"], render(example["audio"]))
        index.append({**example, "answer": old.get(example["audio"], "")})
    (directory / INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return index


def answer_examples(directory: Path = EXAMPLES_DIR, model: str | None = None) -> dict[str, str]:
    """What the model (default: the default model) answers to each example, greedy as `qwen2audio ask`."""
    from ..api import load

    pipe = load(model, device="cpu", progress=False)
    return {e["audio"]: pipe.chat(messages(e, directory), temperature=0.0, max_new_tokens=256) for e in EXAMPLES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2audio.bundle.examples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=EXAMPLES_DIR, help="folder of the clips (default: %(default)s)")
    p.add_argument("--answer", action="store_true", help="record the default model's answers (or --model's)")
    p.add_argument("--model", default=None, help="checkpoint directory to answer with (default: the default model)")
    args = p.parse_args(argv)
    write_examples(args.output)
    if args.answer:
        write_examples(args.output, answer_examples(args.output, args.model))
    for example in read_index(args.output):
        print(f"{example['audio']}: {example['answer']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
