"""Parity against Hugging Face transformers (the reference) on tiny random models."""

import numpy as np
import pytest
import torch
from tiny import VARIANTS, build_reference_model, save_reference_checkpoint, sine

import qwen2audio
from qwen2audio.chat import raw_prompt
from qwen2audio.engine import generate_steps, prepare_prompt
from qwen2audio.features import log_mel_spectrogram, mel_filters

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(directory, reference model, reference processor, our model, our processor) per variant."""
    directory = tmp_path_factory.mktemp(request.param)
    ref, _ = save_reference_checkpoint(directory, request.param)
    ref_proc = transformers.AutoProcessor.from_pretrained(directory)
    ours = qwen2audio.Qwen2AudioModel.from_pretrained(directory)
    return directory, ref, ref_proc, ours, qwen2audio.Qwen2AudioProcessor.from_pretrained(directory)


def conversations():
    a = {"type": "audio", "audio": "placeholder"}
    return {
        "one_audio": [{"role": "user", "content": [a, {"type": "text", "text": "What's that sound?"}]}],
        "voice_chat": [{"role": "user", "content": [a]}],
        "several_audios": [{"role": "user", "content": [a, a, {"type": "text", "text": "Compare them."}]}],
        "multi_turn_system": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [a, {"type": "text", "text": "What's that sound?"}]},
            {"role": "assistant", "content": "A dog barks."},
            {"role": "user", "content": [a, {"type": "text", "text": "How about this one?"}]},
        ],
        "text_only": [{"role": "user", "content": "hello world"}],
    }


CLIPS = [sine(1.3, 440, seed=1), sine(4.0, 300, seed=2), sine(0.05, 700, seed=3), sine(12.5, 900, seed=4), sine(30.0, 200, seed=5)]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_reference(n_mels):
    from transformers import WhisperFeatureExtractor
    from transformers.audio_utils import mel_filter_bank

    ref_filters = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                  max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
    assert np.abs(ref_filters.T - mel_filters(n_mels)).max() < 1e-7
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    clips = CLIPS + [np.zeros(8000, np.float32), sine(35.0, seed=6)]  # silence, and over 30 s (cut here)
    ref = fe(clips, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    feats, mask = log_mel_spectrogram([c[:480000] for c in clips], n_mels)
    assert (feats - ref["input_features"]).abs().max() <= 1e-4
    assert torch.equal(mask, ref["attention_mask"].long())


def _texts_and_audio(proc, names):
    texts, audio, k = [], [], 0
    for name in names:
        text = proc.apply_chat_template(conversations()[name], add_generation_prompt=True, tokenize=False)
        n = text.count("<|AUDIO|>")
        texts.append(text)
        audio += [CLIPS[(k + i) % 4] for i in range(n)]  # clips <= 30 s: the reference cuts longer ones
        k += n
    return texts, audio


BATCHES = [["one_audio"], ["voice_chat"], ["several_audios"], ["multi_turn_system"], ["text_only"],
           ["one_audio", "multi_turn_system", "voice_chat"]]


@pytest.mark.parametrize("names", BATCHES, ids=["+".join(b) for b in BATCHES])
def test_processor_and_logits_match_reference(pair, names):
    _, ref, ref_proc, ours, proc = pair
    texts, audio = _texts_and_audio(proc, names)
    assert texts == _texts_and_audio(ref_proc, names)[0]  # same chat template rendering
    kwargs = dict(audio=audio) if audio else {}
    r = ref_proc(text=texts, return_tensors="pt", padding=True, sampling_rate=16000, **kwargs)
    o = proc(texts, **kwargs)
    assert sorted(o) == sorted(r)
    for key in r:
        assert o[key].shape == r[key].shape, key
        if key == "input_features":
            assert (o[key] - r[key]).abs().max() <= 1e-4
        else:
            assert torch.equal(o[key], r[key].long()), key
    # Left-padded rows need real positions; the reference's forward takes them as position_ids.
    positions = (r["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref_logits = ref(**r, position_ids=positions).logits
        our_logits = ours(**o, position_ids=positions).logits
    real = r["attention_mask"].bool()
    assert (ref_logits[real] - our_logits[real]).abs().max() <= 1e-4


def test_raw_base_prompts_match_reference(pair):
    _, ref, ref_proc, ours, proc = pair
    texts = [raw_prompt("Generate the caption in English:"), raw_prompt("Detect the language and recognize the speech:", 2)]
    audio = [CLIPS[0], CLIPS[3], CLIPS[1]]
    r = ref_proc(text=texts, audio=audio, return_tensors="pt", padding=True, sampling_rate=16000)
    o = proc(texts, audios=audio)  # `audios=` is an alias, never silently dropped
    for key in ("input_ids", "attention_mask", "feature_attention_mask"):
        assert torch.equal(o[key], r[key].long()), key
    positions = (r["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        diff = ref(**r, position_ids=positions).logits - ours(**o, position_ids=positions).logits
    assert diff[r["attention_mask"].bool()].abs().max() <= 1e-4


def test_greedy_generation_matches_reference(pair):
    directory, ref, ref_proc, _, proc = pair
    pipe = qwen2audio.load(directory, device="cpu")
    messages = conversations()["one_audio"]
    text = proc.apply_chat_template(messages)
    r = ref_proc(text=[text], audio=[CLIPS[1]], return_tensors="pt", padding=True, sampling_rate=16000)
    with torch.no_grad():
        out = ref.generate(**r, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    ref_tokens = out[0, r["input_ids"].shape[1]:].tolist()
    prompts = [prepare_prompt(pipe.tokenizer, text, [CLIPS[1]])]  # the engine's path: paged KV cache, its sampler
    params = qwen2audio.SamplingParams(max_new_tokens=40)
    ours = [s.tokens[0] for s in generate_steps(pipe.engine(prompts, params), prompts, params, ignore_eos=True)]
    assert len(ours) == 40 and ours == ref_tokens


def test_valid_length_encoder_equals_padded_reference(pair):
    _, ref, _, ours, proc = pair
    from transformers.masking_utils import create_bidirectional_mask

    inputs = proc(["<|AUDIO|>" * 4], audio=[CLIPS[0], CLIPS[1], CLIPS[3], CLIPS[4]])
    feats, fmask = inputs["input_features"], inputs["feature_attention_mask"]
    lengths = (fmask.sum(-1) - 1) // 2 + 1
    key_mask = (torch.arange(1500)[None] < lengths[:, None]).long()
    tower = ref.model.audio_tower
    attn = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(4, 1500, 1), attention_mask=key_mask)
    with torch.no_grad():
        ref_states = ref.model.multi_modal_projector(tower(feats, attention_mask=attn).last_hidden_state)
        our_states = ours.encode_audio(feats, fmask)
    for i, states in enumerate(our_states):
        n = int(((lengths[i] - 2) // 2 + 1))
        assert states.shape[0] == n
        assert (states - ref_states[i, :n]).abs().max() <= 1e-4


def test_checkpoint_round_trip_both_ways(pair, tmp_path):
    directory, ref, _, ours, proc = pair
    # ours -> transformers (sharded, to exercise the index)
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=200_000)
    proc.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    reloaded_ref = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    reloaded_ours = qwen2audio.Qwen2AudioModel.from_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        assert (reloaded_ref(input_ids=ids).logits - expected).abs().max() <= 1e-5
        assert (reloaded_ours(input_ids=ids).logits - expected).abs().max() <= 1e-4
    ref_keys = set(ref.state_dict())
    assert {k for k in reloaded_ref.state_dict()} == ref_keys


def _new_layout(k: str) -> str:
    if k.startswith("language_model.model."):
        return "model.language_model." + k[len("language_model.model."):]
    if k.startswith("language_model.lm_head."):
        return "lm_head." + k[len("language_model.lm_head."):]
    return "model." + k


def _doubled_decoder_layout(k: str) -> str:  # what transformers 5.17's save_pretrained writes
    return k.replace("language_model.model.", "language_model.model.model.", 1)


@pytest.mark.parametrize("layout", [_new_layout, _doubled_decoder_layout], ids=["new", "doubled_decoder"])
def test_other_hf_key_layouts_are_accepted(tmp_path, layout):
    """Checkpoints saved as model.audio_tower.* / model.language_model.* / lm_head.*, or with the decoder
    under language_model.model.model.*, load too."""
    from safetensors.torch import load_file, save_file

    ref, _ = save_reference_checkpoint(tmp_path, "base")
    state = load_file(tmp_path / "model.safetensors")
    renamed = {layout(k): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = qwen2audio.Qwen2AudioModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-4


def test_bf16_load_runs(tiny_checkpoint):
    directory, *_ = tiny_checkpoint
    model = qwen2audio.Qwen2AudioModel.from_pretrained(directory, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    proc = qwen2audio.Qwen2AudioProcessor.from_pretrained(directory)
    inputs = proc([raw_prompt("Generate the caption in English:")], audio=[CLIPS[1]])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_build_reference_model_is_deterministic():
    a, _ = build_reference_model("base", seed=3)
    b, _ = build_reference_model("base", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tied_checkpoint_without_lm_head_ties(tmp_path):
    from safetensors.torch import load_file, save_file

    ref, _ = save_reference_checkpoint(tmp_path, "gqa_tied")
    state = load_file(tmp_path / "model.safetensors")
    del state["language_model.lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = qwen2audio.Qwen2AudioModel.from_pretrained(tmp_path)
    lm = ours.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-4


def test_untied_checkpoint_without_lm_head_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    save_reference_checkpoint(tmp_path, "base")
    state = load_file(tmp_path / "model.safetensors")
    del state["language_model.lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qwen2audio.weights.CheckpointError, match="missing 1: language_model.lm_head.weight"):
        qwen2audio.Qwen2AudioModel.from_pretrained(tmp_path)


def test_tied_model_stays_tied_through_save_and_load(tmp_path):
    save_reference_checkpoint(tmp_path / "ref", "gqa_tied")
    ours = qwen2audio.Qwen2AudioModel.from_pretrained(tmp_path / "ref")
    lm = ours.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # stored lm_head equals the embeddings: tied
    ours.save_pretrained(tmp_path / "ours")
    again = qwen2audio.Qwen2AudioModel.from_pretrained(tmp_path / "ours").language_model
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in lm.parameters())
