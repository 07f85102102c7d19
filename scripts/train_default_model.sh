#!/usr/bin/env bash
# Train the default model (see qwen2audio/bundle/train_default.py): build the seeded corpus, assemble the
# untrained model, train the current leg (resuming from training/default_model/ when the repository holds a
# newer checkpoint), copy its latest checkpoint back into training/default_model/ and export the projector.
#
#   bash scripts/train_default_model.sh                 # everything, in WORK=$HOME/work (hours on 2 cores)
#   bash scripts/train_default_model.sh train --leg leg1
#   bash scripts/train_default_model.sh save-state      # before a machine goes away: then commit training/
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m qwen2audio.bundle.train_default "${@:-all}"
