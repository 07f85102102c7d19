"""Training records of one item, from its spec alone.

- SFT conversations in the ms-swift shape: {"messages": [...], "audios": [path]}, the audio as an
  `<audio>` tag in the user text. Voice chat is a user turn that is only `<audio>`.
- Pre-training task records, exactly the fields `qwen2audio.train.pretrain_tasks` reads:
  {"task", "audio", "label", "language"?, "prompt"?}. Tasks the trainer has no name for (language
  identification, sound and instrument classification) are `custom` records with their prompt.
Which questions an item is asked is drawn from the item's own seed, so records are reproducible.
"""

from __future__ import annotations

import numpy as np

from . import music, sounds
from .sentences import LANGUAGE_NAMES

# Pre-training prompts for the tasks the paper names without giving their exact wording.
PROMPTS = {
    "lid": "Detect the language of the speech in English:",
    "sound": "Classify the sound event in English:",
    "instrument": "Recognize the musical instrument in English:",
}
MIX_BACKGROUND = {"rain": "falling rain", "wind": "gusty wind", "ocean waves": "ocean waves",
                  "white noise": "white noise", "pink noise": "pink noise", "brown noise": "a low rumbling noise",
                  "engine": "an idling engine", "siren": "a siren", "dial tone": "a telephone dial tone",
                  "alarm": "a beeping alarm"}
TRANSCRIBE = ["Transcribe this audio.", "What does the speaker say?", "Please write down what is said.",
              "Transcribe the speech."]
LANGUAGE_QUESTIONS = ["What language is the speaker using?", "Which language is spoken here?"]
SOUND_QUESTIONS = ["What's that sound?", "What can you hear in this recording?", "Describe the sound."]


def _conversation(audio: str, *turns: tuple[str, str]) -> dict:
    """turns: (user text, assistant text); the audio tag goes in front of the first user turn."""
    messages = []
    for i, (user, assistant) in enumerate(turns):
        messages.append({"role": "user", "content": ("<audio>" if i == 0 else "") + user})
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages, "audios": [audio]}


def is_voice_chat(record: dict) -> bool:
    """A voice-chat record: its first user turn is the audio alone, so the instruction is spoken."""
    messages = record.get("messages") or [{}]
    return messages[0].get("role") == "user" and messages[0].get("content") == "<audio>"


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _choose(rng, options: dict):
    """One key of {key: weight}, ignoring zero weights."""
    keys = [k for k, w in options.items() if w > 0]
    weights = np.array([options[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


def speaker_gender(spec: dict) -> str | None:
    return spec.get("gender") or (spec.get("voice") or {}).get("gender")


def noise_state(spec: dict) -> str | None:
    """'noisy' or 'clean' where the augmentation makes the answer unambiguous, else None."""
    aug = spec.get("aug") or {}
    if aug.get("noise") and aug["snr_db"] <= 20:
        return "noisy"
    if not aug.get("noise") and not aug.get("rt60"):
        return "clean"
    return None


def _speech_sft(spec, rng, audio):
    language = LANGUAGE_NAMES.get(spec["language"], spec["language"])
    gender, noise = speaker_gender(spec), noise_state(spec)
    ask = _choose(rng, {"transcribe": 0.5, "language": 0.25, "gender": 0.15 if gender else 0,
                        "noise": 0.1 if noise else 0})
    if ask == "transcribe":
        turns = [(str(rng.choice(TRANSCRIBE)), spec["text"])]
        if rng.random() < 0.2:  # a text-only follow-up turn about the same audio
            turns.append(("And which language is that?", f"It is {language}."))
        return _conversation(audio, *turns)
    if ask == "language":
        return _conversation(audio, (str(rng.choice(LANGUAGE_QUESTIONS)), f"The speaker is speaking {language}."))
    if ask == "gender":
        return _conversation(audio, ("Is the speaker male or female?", f"The speaker is {gender}."))
    answer = ("The recording is noisy: there is noise in the background." if noise == "noisy"
              else "The recording is clean, without background noise.")
    return _conversation(audio, ("Is this recording clean or noisy?", answer))


def _sound_sft(p, rng, audio):
    label = p["label"]
    options = {"describe": 0.45, "label": 0.25}
    if label == "tone":
        options["frequency"] = 0.3
    elif label in sounds.COUNTED:
        options["count"] = 0.3
    elif label == "chirp":
        options["direction"] = 0.3
    elif label == "heartbeat":
        options["bpm"] = 0.3
    ask = _choose(rng, options)
    if ask == "describe":
        return _conversation(audio, (str(rng.choice(SOUND_QUESTIONS)), sounds.caption(p)))
    if ask == "label":
        return _conversation(audio, ("Classify the sound. Answer with a short label.", label.capitalize() + "."))
    if ask == "frequency":
        return _conversation(audio, ("What is the frequency of this tone?", f"About {p['freq']} Hz."))
    if ask == "count":
        what = sounds.COUNTED[label]
        return _conversation(audio, (f"How many {what} do you hear?", f"I hear {p['n']} {what}."))
    if ask == "direction":
        verb = "rises" if p["direction"] == "rising" else "falls"
        return _conversation(audio, ("Does the pitch rise or fall?", f"The pitch {verb}."))
    return _conversation(audio, ("How fast is the heartbeat?", f"About {p['bpm']} beats per minute."))


def music_caption(p: dict) -> str:
    tempo = music.tempo_word(p["bpm"])
    if p["instrument"] == "drums":
        return f"A {tempo} drum beat at about {p['bpm']} beats per minute."
    return (f"{_article(tempo).capitalize()} {tempo} {p['instrument']} melody in {music.key_name(p)}, "
            f"at about {p['bpm']} beats per minute.")


def _music_sft(p, rng, audio):
    drums = p["instrument"] == "drums"
    ask = _choose(rng, {"instrument": 0.4, "key": 0 if drums else 0.2, "tempo": 0.15, "describe": 0.25})
    if ask == "instrument":
        answer = "Drums." if drums else f"{_article(p['instrument']).capitalize()} {p['instrument']}."
        return _conversation(audio, ("Which instrument is playing?", answer))
    if ask == "key":
        return _conversation(audio, ("What key is this music in?", f"{music.key_name(p)}."))
    if ask == "tempo":
        return _conversation(audio, ("What is the tempo of this music?",
                                     f"About {p['bpm']} beats per minute, a {music.tempo_word(p['bpm'])} tempo."))
    return _conversation(audio, ("Describe the music.", music_caption(p)))


def background_phrase(spec: dict) -> str:
    background = spec["background"]
    if "sound" in background:
        return MIX_BACKGROUND[background["sound"]["label"]]
    instrument = background["music"]["instrument"]
    return "drum music" if instrument == "drums" else f"{instrument} music"


def sft_records(spec: dict) -> list[dict]:
    rng = np.random.default_rng(spec["seed"] + 1)  # not the render stream: records never move audio
    audio, kind = spec["audio"], spec["kind"]
    if kind in ("speech", "asterisk", "open"):
        return [_speech_sft(spec, rng, audio)]
    if kind == "chat":
        return [_conversation(audio, ("", spec["question"]["answer"]))]
    if kind == "sound":
        return [_sound_sft(spec["sound"], rng, audio)]
    if kind == "music":
        return [_music_sft(spec["music"], rng, audio)]
    if kind == "mixture":
        ask = _choose(rng, {"chat": 0.6, "background": 0.2, "transcribe": 0.2})
        if ask == "chat":
            return [_conversation(audio, ("", spec["question"]["answer"]))]
        if ask == "background":
            phrase = background_phrase(spec)
            return [_conversation(audio, ("What sound is in the background?",
                                          f"In the background there is {phrase}."))]
        return [_conversation(audio, ("What does the speaker say?", spec["question"]["question"]))]
    raise ValueError(f"unknown item kind {kind!r}")


def pretrain_records(spec: dict) -> list[tuple[str, dict]]:
    """(task name for the manifest, task record) pairs of one item."""
    rng = np.random.default_rng(spec["seed"] + 2)
    audio, kind = spec["audio"], spec["kind"]
    if kind in ("speech", "asterisk", "chat", "open"):
        text = spec["text"] if kind != "chat" else spec["question"]["question"]
        out = [("asr", {"task": "asr", "audio": audio, "label": text, "language": spec["language"]})]
        if kind != "chat" and rng.random() < 0.3:  # ASR targets already start with the language tag
            name = LANGUAGE_NAMES.get(spec["language"], spec["language"])
            out.append(("lid", {"task": "custom", "audio": audio, "prompt": PROMPTS["lid"], "label": name,
                                "language": spec["language"]}))
        return out
    if kind == "sound":
        p = spec["sound"]
        return [("caption", {"task": "caption", "audio": audio, "label": sounds.caption(p)}),
                ("sound", {"task": "custom", "audio": audio, "prompt": PROMPTS["sound"], "label": p["label"]})]
    if kind == "music":
        p = spec["music"]
        return [("caption", {"task": "caption", "audio": audio, "label": music_caption(p)}),
                ("instrument", {"task": "custom", "audio": audio, "prompt": PROMPTS["instrument"],
                                "label": p["instrument"]})]
    if kind == "mixture":
        question = spec["question"]["question"]
        caption = f'A voice says "{question}" over {background_phrase(spec)}.'
        return [("caption", {"task": "caption", "audio": audio, "label": caption}),
                ("asr", {"task": "asr", "audio": audio, "label": question, "language": "en"})]
    raise ValueError(f"unknown item kind {kind!r}")


def item_metadata(spec: dict, duration: float) -> dict:
    """One line of items.jsonl: what the audio is, for evaluation and analysis."""
    keep = ("id", "kind", "split", "audio", "language", "text", "name", "split_key", "gender", "aug", "snr_db",
            "offset")
    out = {k: spec[k] for k in keep if k in spec}
    out["duration"] = round(duration, 3)
    if "voice" in spec:
        from .tts import voice_name

        out["voice"] = voice_name(spec["voice"])
        out["gender"] = spec["voice"].get("gender")
    if "question" in spec:
        out["question"] = {k: v for k, v in spec["question"].items()}
    if "sound" in spec:
        out["sound"] = {**spec["sound"], "caption": sounds.caption(spec["sound"])}
    if "music" in spec:
        out["music"] = {k: v for k, v in spec["music"].items() if k != "notes"}
        out["music"]["key"] = music.key_name(spec["music"])
    if "background" in spec:
        out["background"] = background_phrase(spec)
    return out
