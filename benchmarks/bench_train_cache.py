"""Training throughput with and without the frozen audio tower's output cache (`audio_cache_gb`).

Both runs train the same model on the same clips in one process, one after the other, with the same
seed; the cache only pays from the second epoch on, so the rate is taken over epochs 2 and later.
The losses of the two runs are compared too (they must agree: the cache changes speed, not results).

    python benchmarks/bench_train_cache.py                          # the default model (Whisper base)
    python benchmarks/bench_train_cache.py --model CHECKPOINT_DIR
    python benchmarks/bench_train_cache.py --precision fp32 --clips 48 --epochs 4

Run it on a quiet machine: with 2 cores, any other busy process stalls torch's parallel regions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen2audio.train.config import TrainConfig  # noqa: E402
from qwen2audio.train.loop import train  # noqa: E402

def make_clips(root: Path, n: int, seed: int = 0) -> Path:
    """n clips of 2-6 s (tones over noise) with ASR task records; the labels are short words."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        seconds = rng.uniform(2, 6)
        t = np.arange(int(seconds * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 3000) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(root / f"{i}.wav", wav.astype(np.float32), 16000)
        records.append({"task": "asr", "audio": f"{i}.wav", "label": f"clip number {i}", "language": "en"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "data.jsonl"


def run(model: str, data: Path, out: Path, steps: int, args, cache_gb: float) -> tuple[list[dict], int]:
    cfg = TrainConfig(model=model, data=str(data), output=str(out), stage="pretrain", max_steps=steps,
                      batch_size=args.batch_size, lr=1e-4, precision=args.precision, progress=False, device="cpu",
                      audio_cache_gb=cache_gb)
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's per-step log
        return train(cfg).history


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    args = p.parse_args()
    if args.model is None:
        from qwen2audio.bundle.assemble import default_model

        args.model = str(default_model())
    per_epoch = -(-args.clips // args.batch_size)
    steps = per_epoch * args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_clips(tmp, args.clips)
        histories = {name: run(args.model, data, tmp / name, steps, args, gb)
                     for name, gb in (("no cache", 0.0), ("cache", 4.0))}
    later = {name: [r["tokens"] / r["tokens_per_s"] for r in h[per_epoch:]] for name, h in histories.items()}
    print(f"model {args.model}, {args.clips} clips of 2-6 s, batch {args.batch_size}, {args.precision}, "
          f"{steps} steps; seconds per step over epochs 2-{args.epochs} (median):")
    for name, seconds in later.items():
        print(f"  {name:9s} {statistics.median(seconds):.3f} s")
    ratio = statistics.median(later["no cache"]) / statistics.median(later["cache"])
    print(f"  speed-up {ratio:.2f}x")
    losses = [[r["loss"] for r in h] for h in histories.values()]
    drift = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(*losses))
    print(f"  largest relative loss difference between the runs: {drift:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
