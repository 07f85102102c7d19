"""The frozen audio tower's output cache: same states as encoding every time, reused across batches of
any composition, bf16 under bf16 autocast, within its byte budget, and a training run that uses it
gives the losses of one that does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import sine

from qwen2audio import Qwen2AudioModel
from qwen2audio.features import log_mel_spectrogram
from qwen2audio.train.config import TrainConfig
from qwen2audio.train.loop import train
from qwen2audio.train.tower_cache import TowerCache

CLIPS = [sine(1.0, 300, seed=1), sine(2.5, 1200, seed=2), sine(0.4, 5000, seed=3), sine(1.7, 700, seed=4)]


@pytest.fixture()
def model(tiny_checkpoint):
    return Qwen2AudioModel.from_pretrained(tiny_checkpoint[0]).eval().requires_grad_(False)


def encode(model, clips):
    features, mask = log_mel_spectrogram(clips, model.config.audio_config.num_mel_bins)
    return model.encode_audio(features, mask)


def test_cached_states_equal_encoding_every_time(model):
    expected = encode(model, CLIPS)
    keys_before = set(model.state_dict())
    cache = TowerCache.install(model.audio_tower, max_bytes=2**30)
    assert set(model.state_dict()) == keys_before  # checkpoints see the same module tree
    first = encode(model, CLIPS[:2])
    assert (cache.hits, cache.misses) == (0, 2)
    mixed = encode(model, [CLIPS[3], CLIPS[1], CLIPS[2], CLIPS[0]])  # two seen, two new, another order
    assert (cache.hits, cache.misses) == (2, 4)
    again = encode(model, CLIPS)
    assert (cache.hits, cache.misses) == (6, 4) and len(cache.states) == 4
    for got, want in zip([*first, *[mixed[3], mixed[1], mixed[2], mixed[0]], *again],
                         [*expected[:2], *expected, *expected]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_a_frozen_tower_and_within_the_budget(model):
    model.audio_tower.conv1.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        TowerCache.install(model.audio_tower, max_bytes=2**30)
    model.audio_tower.requires_grad_(False)
    expected = encode(model, CLIPS)
    cache = TowerCache.install(model.audio_tower, max_bytes=1)  # nothing fits: encodes every time
    for _ in range(2):
        for got, want in zip(encode(model, CLIPS), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cache.states == {} and cache.bytes == 0 and cache.hits == 0


def test_bf16_autocast_keeps_bf16_states_and_the_same_embeddings(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = encode(model, CLIPS)
        cache = TowerCache.install(model.audio_tower, max_bytes=2**30)
        encode(model, CLIPS)
        cached = encode(model, CLIPS)
    assert cache.hits == len(CLIPS) and all(s.dtype == torch.bfloat16 for s in cache.states.values())
    for got, want in zip(cached, expected):  # the projector casts its input to bf16 either way
        assert torch.equal(got, want)


def test_training_with_the_cache_matches_training_without(tiny_checkpoint, tmp_path):
    for i, clip in enumerate(CLIPS):
        sf.write(tmp_path / f"{i}.wav", clip, 16000)
    records = [{"messages": [{"role": "user", "content": "<audio>What is it?"},
                             {"role": "assistant", "content": f"tone number {i}"}], "audios": [f"{i}.wav"]}
               for i in range(len(CLIPS))]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = dict(model=str(tiny_checkpoint[0]), data=str(tmp_path / "sft.jsonl"), stage="sft", max_steps=6,
                  batch_size=2, lr=3e-3, progress=False, device="cpu", eval_data=str(tmp_path / "sft.jsonl"))
    cached = train(TrainConfig(output=str(tmp_path / "cached"), **common))
    plain = train(TrainConfig(output=str(tmp_path / "plain"), audio_cache_gb=0, **common))
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)
    assert cached.history[-1]["eval_loss"] == pytest.approx(plain.history[-1]["eval_loss"], rel=1e-5)
    cache = cached.model.audio_tower.forward.__self__
    # 6 steps of 2 over 4 clips (3 epochs: 4 new, 8 reused) and the held-out pass (4 reused).
    assert isinstance(cache, TowerCache) and cache.misses == 4 and cache.hits == 8 + 4
    assert not isinstance(getattr(plain.model.audio_tower.forward, "__self__", None), TowerCache)
    assert np.isfinite(cached.history[-1]["loss"])
