"""``qwen2audio synth``: build the synthetic training corpus (parsing only; the work is in build.py)."""

from __future__ import annotations

import argparse
import sys

from ..cli import positive_int

# Kept in step with plan.py without importing it: `--help` must not pay for numpy and torch.
SOURCES = ("espeak", "flite", "festival", "asterisk", "sounds", "music")

DESCRIPTION = """\
Build a reproducible training corpus for Qwen2-Audio: synthetic speech (espeak-ng, flite, festival
with many voices, plus noise and reverberation), real recordings with transcripts (Debian's Asterisk
prompts in en/es/fr/it/ru), generated sounds, music rendered by fluidsynth, and spoken commands mixed
over sounds or music. Writes 16 kHz WAV files and JSONL for SFT (ms-swift shape) and pre-training
(task records and raw base-model prompts), split into train and a fixed held-out set. Files already
in OUTPUT are kept, so an interrupted build continues where it stopped when run again."""

EPILOG = """\
sizes (items per kind: speech, chat, asterisk, sound, music, mixture, open):
  tiny    8, 8, 10, 8, 4, 4               (seconds; for tests)
  small   1500, 1500, 500, 600, 300, 400  (minutes; about 400 MB)
  medium  6000, 4500, all, 1800, 1000, 1200
  full    8000, 8000, all, 3000, 1500, 2000
  or kind=N,... e.g. --size speech=200,sound=50 (kinds left out get 0; asterisk=all for every clip)
  or a size with some kinds changed, e.g. --size medium,music=4000

Debian packages: espeak-ng, flite, festival festvox-us-slt-hts festvox-kallpc16k, fluidsynth
timgm6mb-soundfont, asterisk-core-sounds-{en,es,fr,it,ru} asterisk-core-sounds-{en,es,fr,it,ru}-g722."""


def _sources(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SOURCES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown source(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(SOURCES)}")
    return names


def register(subparsers) -> dict:
    p = subparsers.add_parser("synth", help="build a synthetic speech/sound/music training corpus",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="corpus folder (new, empty, or an "
                   "earlier build with the same settings to finish)")
    p.add_argument("--size", default="small", metavar="SIZE",
                   help="tiny, small, medium, full, kind=N,..., or e.g. medium,music=4000 "
                   "(default: small)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    p.add_argument("--jobs", "-j", type=positive_int, default=None, metavar="N",
                   help="worker processes (default: the number of CPUs)")
    p.add_argument("--sources", type=_sources, default=None, metavar="LIST",
                   help=f"comma-separated sources to use (default: all: {','.join(SOURCES)})")
    p.add_argument("--soundfont", metavar="SF2", default=None,
                   help="General MIDI soundfont for music (default: /usr/share/sounds/sf2/TimGM6mb.sf2, "
                        "else FluidR3_GM.sf2 there)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    return {"synth": run}


def run(args) -> int:
    from .build import build_corpus

    progress = not args.quiet and sys.stderr.isatty()
    manifest = build_corpus(args.output, size=args.size, seed=args.seed, jobs=args.jobs, sources=args.sources,
                            soundfont=args.soundfont, progress=progress)
    if not args.quiet:
        for split, s in manifest["splits"].items():
            kinds = ", ".join(f"{k} {n}" for k, n in s["items"].items())
            print(f"{split}: {sum(s['items'].values())} audio files ({s['total_seconds'] / 60:.1f} min: {kinds}), "
                  f"{s['sft_records']} SFT records, {sum(s['pretrain_tasks'].values())} pre-training records")
        print(f"wrote {args.output} in {manifest['build_seconds']:.1f} s ({manifest['rendered_now']} rendered, "
              f"{manifest['reused']} already there; {manifest['audio_bytes'] / 1e6:.1f} MB of audio)")
    return 0
