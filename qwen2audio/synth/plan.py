"""The build plan: every item of the corpus as a JSON-able spec, drawn up front from the seed.

All randomness is resolved here (texts, voices, sound parameters, augmentations) plus one
integer `seed` per item for the signal-level noise drawn while rendering. Rendering is then a
pure function of a spec, so the corpus is the same whatever `--jobs` is and whichever items a
resumed build still has to render. Each kind draws from its own random stream, and item i of a
kind does not depend on how many items follow it: a larger build extends a smaller one.
"""

from __future__ import annotations

import numpy as np

from . import asterisk, music, opentext, questions, sentences, sounds, tts
from .errors import SynthError
from .split import key_hash, split_of

KINDS = ("speech", "chat", "asterisk", "sound", "music", "mixture", "open")
TTS_SOURCES = ("espeak", "flite", "festival")
SOURCES = (*TTS_SOURCES, "asterisk", "sounds", "music")
ALL = -1  # asterisk count meaning "every usable clip"
SIZES = {
    "tiny": {"speech": 8, "chat": 8, "asterisk": 10, "sound": 8, "music": 4, "mixture": 4, "open": 8},
    "small": {"speech": 1500, "chat": 1500, "asterisk": 500, "sound": 600, "music": 300, "mixture": 400, "open": 1500},
    "medium": {"speech": 6000, "chat": 4500, "asterisk": ALL, "sound": 1800, "music": 1000, "mixture": 1200, "open": 6000},
    "full": {"speech": 8000, "chat": 8000, "asterisk": ALL, "sound": 3000, "music": 1500, "mixture": 2000, "open": 20000},
}
HELDOUT_EVERY = 10  # synthetic items 0, 10, 20, ... of a kind are held out (their content from the held-out side)
# Synthetic speech languages: English most of the time, the others share the rest.
LANGUAGE_WEIGHTS = {"en": 0.55, "de": 0.075, "es": 0.075, "fr": 0.075, "it": 0.075, "ru": 0.075, "zh": 0.075}
# Open-vocabulary speech (fortune sentences): the languages Debian has fortunes in.
OPEN_LANGUAGE_WEIGHTS = {"en": 0.6, "de": 0.1, "es": 0.1, "it": 0.1, "ru": 0.1}
# Backgrounds for mixtures: sounds that still make sense when stretched to any length.
MIX_SOUNDS = ("rain", "wind", "ocean waves", "white noise", "pink noise", "brown noise", "engine", "siren",
              "dial tone", "alarm")


def kind_sources(kind: str, sources: set[str]) -> bool:
    """Whether `kind` can be built from the selected sources."""
    speaks = bool(sources & set(TTS_SOURCES))
    return {"speech": speaks, "chat": speaks, "asterisk": "asterisk" in sources, "sound": "sounds" in sources,
            "music": "music" in sources, "mixture": speaks and bool(sources & {"sounds", "music"}),
            "open": speaks}[kind]


def parse_size(text: str, sources: set[str]) -> dict[str, int]:
    """`tiny|small|medium|full`, `kind=N,...` (kinds left out get 0; asterisk=all for every clip), or a
    named size with some kinds changed, e.g. `medium,music=4000`."""
    parts = text.split(",")
    named = parts[0].strip()
    if named in SIZES:
        counts = {k: (n if kind_sources(k, sources) else 0) for k, n in SIZES[named].items()}
        parts = parts[1:]
    else:
        counts = dict.fromkeys(KINDS, 0)
    for part in parts:
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name not in KINDS:
            raise SynthError(f"--size: unknown kind {name!r} in {text!r}; use {', '.join(SIZES)} "
                             f"or kind=N with kinds {', '.join(KINDS)}")
        if name == "asterisk" and value == "all":
            counts[name] = ALL
            continue
        if not value.isdigit():
            raise SynthError(f"--size: {part.strip()!r} needs a non-negative count, e.g. {name}=100")
        counts[name] = int(value)
        if counts[name] and not kind_sources(name, sources):
            raise SynthError(f"--size asks for {name} items but --sources has nothing to make them from")
    return counts


def _rng(seed: int, *names) -> np.random.Generator:
    return np.random.default_rng([seed, *(key_hash(str(n)) % 2**32 for n in names)])


def _augmentation(rng: np.random.Generator) -> dict:
    """Speed change, synthetic room and coloured noise, each sometimes; about a third stays clean."""
    aug = {}
    if rng.random() < 0.3:
        aug["speed"] = round(float(rng.uniform(0.9, 1.1)), 3)
    if rng.random() < 0.3:
        aug["rt60"] = round(float(rng.uniform(0.15, 0.8)), 3)
        aug["drr_db"] = round(float(rng.uniform(-3, 8)), 1)
    if rng.random() < 0.4:
        aug["noise"] = str(rng.choice(["white", "pink", "brown"]))
        aug["snr_db"] = round(float(rng.uniform(5, 30)), 1)
    return aug


def _item(kind: str, index: int, seed: int, split: str) -> dict:
    item_id = f"{kind}-{index:06d}"
    return {"id": item_id, "kind": kind, "split": split, "seed": key_hash(f"{seed}:{item_id}") % 2**63,
            "audio": f"audio/{kind}/{item_id}.wav"}


def _speech_items(count, seed, engines):
    rng = _rng(seed, "speech")
    languages = [lang for lang in LANGUAGE_WEIGHTS if any(lang in tts.engine_languages(e) for e in engines)]
    weights = np.array([LANGUAGE_WEIGHTS[lang] for lang in languages])
    for i in range(count):
        heldout = i % HELDOUT_EVERY == 0
        language = languages[int(rng.choice(len(languages), p=weights / weights.sum()))]
        text = sentences.sentence(rng, language, heldout)
        item = _item("speech", i, seed, split_of(text))
        item.update(language=language, text=text, voice=tts.choose_voice(rng, language, engines),
                    aug=_augmentation(rng), gain_db=round(float(rng.uniform(-12, -1)), 1))
        yield item


def _open_items(count, seed, engines):
    """Speech of open-vocabulary sentences (`opentext`): the words of real prose, not of templates."""
    rng = _rng(seed, "open")
    languages = [lang for lang in OPEN_LANGUAGE_WEIGHTS if any(lang in tts.engine_languages(e) for e in engines)]
    weights = np.array([OPEN_LANGUAGE_WEIGHTS[lang] for lang in languages])
    for i in range(count):
        language = languages[int(rng.choice(len(languages), p=weights / weights.sum()))]
        text = opentext.sentence(rng, language, heldout=i % HELDOUT_EVERY == 0)
        item = _item("open", i, seed, split_of(text))
        item.update(language=language, text=text, voice=tts.choose_voice(rng, language, engines),
                    aug=_augmentation(rng), gain_db=round(float(rng.uniform(-12, -1)), 1))
        yield item


def _chat_items(count, seed, engines):
    rng = _rng(seed, "chat")
    for i in range(count):
        q = questions.question(rng, heldout=i % HELDOUT_EVERY == 0)
        item = _item("chat", i, seed, split_of(q["key"]))
        item.update(language="en", question=q, voice=tts.choose_voice(rng, "en", engines),
                    aug=_augmentation(rng), gain_db=round(float(rng.uniform(-12, -1)), 1))
        yield item


def _asterisk_items(count, seed):
    """Clips of every language, in a seeded order that puts a held-out clip at every tenth place
    (so small builds have some); the split itself is fixed by the clip's name."""
    languages = sorted(asterisk.VOICES)
    per_language = None if count == ALL else -(-count // len(languages))
    index = 0
    for language in languages:
        rng = _rng(seed, "asterisk", language)
        clips = asterisk.clips(language)
        held = [clips[i] for i in rng.permutation(len(clips)) if split_of(clips[i]["split_key"]) == "heldout"]
        train = [clips[i] for i in rng.permutation(len(clips)) if split_of(clips[i]["split_key"]) == "train"]
        order = []
        while held or train:
            take_held = held and (not train or len(order) % HELDOUT_EVERY == 0)
            order.append((held if take_held else train).pop(0))
        for clip in order[:per_language]:
            item = _item("asterisk", index, seed, split_of(clip["split_key"]))
            item["audio"] = f"audio/asterisk/{language}/{clip['name'].replace('/', '_')}.wav"
            item.update(language=language, name=clip["name"], split_key=clip["split_key"], text=clip["text"],
                        source_path=clip["path"], gender=asterisk.VOICES[language][1],
                        aug=_augmentation(rng) if rng.random() < 0.3 else {},
                        gain_db=round(float(rng.uniform(-12, -1)), 1))
            index += 1
            yield item


def _sound_items(count, seed):
    rng = _rng(seed, "sound")
    for i in range(count):
        item = _item("sound", i, seed, "heldout" if i % HELDOUT_EVERY == 0 else "train")
        item.update(sound=sounds.sample(rng, sounds.LABELS[int(rng.integers(len(sounds.LABELS)))]),
                    aug={"rt60": round(float(rng.uniform(0.1, 0.6)), 3)} if rng.random() < 0.2 else {},
                    gain_db=round(float(rng.uniform(-12, -1)), 1))
        yield item


def _music_items(count, seed):
    rng = _rng(seed, "music")
    names = list(music.INSTRUMENTS)
    for i in range(count):
        item = _item("music", i, seed, "heldout" if i % HELDOUT_EVERY == 0 else "train")
        item.update(music=music.sample(rng, names[int(rng.integers(len(names)))]),
                    gain_db=round(float(rng.uniform(-12, -1)), 1))
        yield item


def _mixture_items(count, seed, engines, sources):
    rng = _rng(seed, "mixture")
    backgrounds = [b for b in ("sounds", "music") if b in sources]
    names = list(music.INSTRUMENTS)
    for i in range(count):
        q = questions.question(rng, heldout=i % HELDOUT_EVERY == 0)
        item = _item("mixture", i, seed, split_of(q["key"]))
        if backgrounds[int(rng.integers(len(backgrounds)))] == "sounds":
            background = {"sound": sounds.sample(rng, MIX_SOUNDS[int(rng.integers(len(MIX_SOUNDS)))])}
        else:
            background = {"music": music.sample(rng, names[int(rng.integers(len(names)))])}
        # Speech 3-15 dB above the background: hard, but the command stays intelligible.
        item.update(language="en", question=q, voice=tts.choose_voice(rng, "en", engines), background=background,
                    snr_db=round(float(rng.uniform(3, 15)), 1), offset=round(float(rng.uniform(0.3, 1.0)), 2),
                    gain_db=round(float(rng.uniform(-12, -1)), 1))
        yield item


def make_plan(counts: dict[str, int], seed: int, sources: set[str]) -> list[dict]:
    engines = [e for e in TTS_SOURCES if e in sources]
    plan = []
    makers = {"speech": lambda n: _speech_items(n, seed, engines), "chat": lambda n: _chat_items(n, seed, engines),
              "asterisk": lambda n: _asterisk_items(n, seed), "sound": lambda n: _sound_items(n, seed),
              "music": lambda n: _music_items(n, seed), "mixture": lambda n: _mixture_items(n, seed, engines, sources),
              "open": lambda n: _open_items(n, seed, engines)}
    for kind in KINDS:
        if counts.get(kind):
            plan.extend(makers[kind](counts[kind]))
    return plan
