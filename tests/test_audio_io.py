"""Tests for qwen2audio.audio: every input kind and format -> 16 kHz mono float32."""

import io

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from qwen2audio.audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, audio_duration, load_audio


def sine(freq=440.0, sr=SAMPLE_RATE, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wav, sr=SAMPLE_RATE):
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return np.argmax(spectrum) * sr / len(wav)


def check_output(wav):
    assert isinstance(wav, np.ndarray)
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.flags.c_contiguous


def av_encode(path, container, codec, rate, x):
    """Encode float audio `x` ((n,) mono or (2, n) stereo) at `rate` with PyAV."""
    av = pytest.importorskip("av")
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV build has no {codec} encoder")
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        layout = "mono" if x.ndim == 1 else "stereo"
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.atleast_2d(x), format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):  # flush
            out.mux(packet)


# ---------------------------------------------------------------- files


def test_wav_int16_stereo_44k(tmp_path):
    left, right = sine(440, 44100, amp=0.6), sine(440, 44100, amp=0.2)
    stereo = np.stack([left, right], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="PCM_16")
    wav = load_audio(path)
    check_output(wav)
    assert len(wav) == SAMPLE_RATE  # 1 s at 44.1 kHz -> 1 s at 16 kHz
    assert audio_duration(wav) == pytest.approx(1.0)
    expected = soxr.resample((left + right) / 2, 44100, SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(wav, expected, atol=2e-3)
    assert abs(wav).max() == pytest.approx(0.4, abs=0.01)  # average, not sum or left channel
    assert peak_hz(wav) == pytest.approx(440, abs=2)


def test_wav_stereo_16k_is_exact_channel_average(tmp_path):
    pcm = np.random.default_rng(0).integers(-20000, 20000, size=(4000, 2)).astype(np.int16)
    path = tmp_path / "exact.wav"
    sf.write(path, pcm, SAMPLE_RATE, subtype="PCM_16")
    wav = load_audio(str(path))  # str path as well as pathlib.Path
    expected = pcm.astype(np.float32).mean(axis=1) / 32768
    np.testing.assert_allclose(wav, expected, atol=1e-7)


@pytest.mark.parametrize(
    "ext, fmt, subtype, atol",
    [
        ("flac", "FLAC", "PCM_16", 1e-4),
        ("ogg", "OGG", "VORBIS", 0.05),
        ("opus", "OGG", "OPUS", 0.1),
    ],
)
def test_soundfile_formats(tmp_path, ext, fmt, subtype, atol):
    if not sf.check_format(fmt, subtype):
        pytest.skip(f"libsndfile cannot write {fmt}/{subtype}")
    rate = 48000 if subtype == "OPUS" else 22050
    x = sine(440, rate)
    path = tmp_path / f"tone.{ext}"
    sf.write(path, x, rate, format=fmt, subtype=subtype)
    wav = load_audio(path)
    check_output(wav)
    assert abs(len(wav) - SAMPLE_RATE) <= 400
    assert peak_hz(wav) == pytest.approx(440, abs=2)
    if atol < 0.1:  # lossless / vorbis are sample-aligned; check the waveform itself
        expected = soxr.resample(x, rate, SAMPLE_RATE, quality="HQ")
        np.testing.assert_allclose(wav[:15000], expected[:15000], atol=atol)


def test_mp3(tmp_path):
    x = sine(440, 44100)
    path = tmp_path / "tone.mp3"
    if sf.check_format("MP3", "MPEG_LAYER_III"):
        sf.write(path, x, 44100, format="MP3", subtype="MPEG_LAYER_III")
    else:
        av_encode(path, "mp3", "libmp3lame", 44100, x)
    wav = load_audio(path)
    check_output(wav)
    assert abs(len(wav) - SAMPLE_RATE) <= 1200  # encoder/decoder padding
    assert peak_hz(wav) == pytest.approx(440, abs=2)
    assert np.sqrt(np.mean(wav**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


@pytest.mark.parametrize(
    "name, container, codec, rate",
    [("tone.m4a", "ipod", "aac", 44100), ("tone.aac", "adts", "aac", 44100), ("tone.webm", "webm", "libopus", 48000)],
)
def test_pyav_only_formats(tmp_path, name, container, codec, rate):
    path = tmp_path / name
    av_encode(path, container, codec, rate, sine(440, rate))
    with pytest.raises(sf.LibsndfileError):  # proves the PyAV fallback is what decodes it
        sf.info(path)
    wav = load_audio(path)
    check_output(wav)
    assert abs(len(wav) - SAMPLE_RATE) <= 1200  # AAC priming samples are kept
    assert peak_hz(wav) == pytest.approx(440, abs=2)
    assert np.sqrt(np.mean(wav**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_pyav_stereo_is_plain_channel_average(tmp_path):
    path = tmp_path / "stereo.m4a"
    av_encode(path, "ipod", "aac", 44100, np.stack([sine(440, 44100, amp=0.6), sine(440, 44100, amp=0.2)]))
    wav = load_audio(path)
    # (0.6 + 0.2) / 2 = 0.4 peak; ffmpeg's own -3 dB downmix would give ~0.57
    assert np.sqrt(np.mean(wav**2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.05)
    assert peak_hz(wav) == pytest.approx(440, abs=2)


@pytest.mark.parametrize("ext", ["wav", "m4a"])
def test_bytes_equal_path(tmp_path, ext):
    path = tmp_path / f"tone.{ext}"
    if ext == "wav":
        sf.write(path, np.stack([sine(300, 44100), sine(500, 44100)], axis=1), 44100)
    else:
        av_encode(path, "ipod", "aac", 44100, sine(300, 44100))
    from_path = load_audio(path)
    data = path.read_bytes()
    for blob in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(load_audio(blob), from_path)


# ---------------------------------------------------------------- arrays


def test_array_tuple_resampling_preserves_frequency():
    x = sine(440, 44100, seconds=2.0)
    wav = load_audio((x, 44100))
    check_output(wav)
    assert len(wav) == 2 * SAMPLE_RATE
    assert peak_hz(wav) == pytest.approx(440, abs=1)
    # sampling_rate keyword gives the same result for a bare array
    np.testing.assert_array_equal(load_audio(x, 44100), wav)


def test_array_default_rate_is_16k_and_passthrough():
    x = sine(440, SAMPLE_RATE)
    wav = load_audio(x)
    np.testing.assert_array_equal(wav, x)
    np.testing.assert_array_equal(load_audio(x.astype(np.float64)), x)


def test_integer_pcm_scaling():
    n = MIN_SAMPLES + 3
    i16 = np.resize(np.array([0, 16384, -32768, 32767], np.int16), n)
    np.testing.assert_allclose(load_audio(i16)[:4], [0.0, 0.5, -1.0, 32767 / 32768])
    i32 = np.resize(np.array([0, 2**30, -(2**31)], np.int32), n)
    np.testing.assert_allclose(load_audio(i32)[:3], [0.0, 0.5, -1.0])
    u8 = np.resize(np.array([128, 192, 0], np.uint8), n)
    np.testing.assert_allclose(load_audio(u8)[:3], [0.0, 0.5, -1.0])


def test_2d_arrays_both_orientations():
    left, right = sine(440, amp=0.8), sine(440, amp=0.2)
    channels_first = np.stack([left, right])  # (2, N)
    channels_last = channels_first.T.copy()  # (N, 2)
    expected = (left + right) / 2
    np.testing.assert_allclose(load_audio(channels_first), expected, atol=1e-7)
    np.testing.assert_allclose(load_audio(channels_last), expected, atol=1e-7)
    np.testing.assert_allclose(load_audio(left[None, :]), left)  # (1, N) mono


def test_torch_tensor_matches_numpy():
    x = sine(440, 22050)
    expected = load_audio(x, 22050)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(x), 22050), expected)
    np.testing.assert_array_equal(load_audio((torch.from_numpy(x), 22050)), expected)
    stereo = torch.from_numpy(np.stack([x, x]))
    np.testing.assert_allclose(load_audio(stereo, 22050), expected, atol=1e-6)


def test_min_samples_boundary():
    assert len(load_audio(np.zeros(MIN_SAMPLES, np.float32))) == MIN_SAMPLES
    with pytest.raises(AudioError, match=r"<array>.*too short.*0\.02"):
        load_audio(np.zeros(MIN_SAMPLES - 1, np.float32))


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav.*not found"):
        load_audio(tmp_path / "nope.wav")


def test_directory(tmp_path):
    with pytest.raises(AudioError, match="directory") as exc:
        load_audio(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_non_audio_file(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all")
    with pytest.raises(AudioError, match="notes.wav.*cannot decode"):
        load_audio(path)


@pytest.mark.parametrize("blob", [b"hello", b"\x00" * 1000, b"RIFF\x24\x00\x00\x00WAVEfmt "])
def test_garbage_bytes(blob):
    with pytest.raises(AudioError, match=rf"<bytes, {len(blob)} bytes>.*cannot decode"):
        load_audio(blob)


def test_truncated_wav_header(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, sine(), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    path = tmp_path / "cut.wav"
    path.write_bytes(buf.getvalue()[:30])
    with pytest.raises(AudioError, match="cut.wav"):
        load_audio(path)
    with pytest.raises(AudioError, match="<bytes, 30 bytes>"):
        load_audio(buf.getvalue()[:30])


def test_empty_inputs(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)  # valid header, 0 frames
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_audio(path)
    with pytest.raises(AudioError, match="<bytes, 0 bytes>.*empty"):
        load_audio(b"")
    with pytest.raises(AudioError, match="<array>.*empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="empty"):
        load_audio(np.zeros((2, 0), np.float32))


def test_too_short(tmp_path):
    path = tmp_path / "blip.wav"
    sf.write(path, np.zeros(300, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"blip.wav.*too short.*0\.019 s.*0\.02 s") as exc:
        load_audio(path)
    assert str(MIN_SAMPLES) in str(exc.value)
    # 800 samples is enough at 16 kHz but only ~290 after resampling from 44.1 kHz
    assert len(load_audio(np.ones(800, np.float32) * 0.1)) == 800
    with pytest.raises(AudioError, match="too short"):
        load_audio((np.ones(800, np.float32) * 0.1, 44100))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad):
    x = sine()
    x[100] = bad
    with pytest.raises(AudioError, match="<array>.*NaN or Inf"):
        load_audio(x)
    with pytest.raises(AudioError, match="NaN or Inf"):
        load_audio((x, 8000))


@pytest.mark.parametrize("bad", [{"array": [0.0]}, 42, None, 3.5, object()])
def test_wrong_types(bad):
    with pytest.raises(AudioError, match="unsupported audio input type"):
        load_audio(bad)


@pytest.mark.parametrize(
    "arr", [np.zeros(1000, bool), np.zeros(1000, np.int64), np.zeros(1000, complex), np.array(["a"] * 1000)]
)
def test_unsupported_dtypes(arr):
    with pytest.raises(AudioError, match="<array>.*dtype"):
        load_audio(arr)


@pytest.mark.parametrize("rate", [0, -16000, float("nan"), True])
def test_bad_sampling_rate(rate):
    with pytest.raises(AudioError, match="sampling rate"):
        load_audio(sine(), rate)
    with pytest.raises(AudioError, match="sampling rate"):
        load_audio((sine(), rate))


def test_bad_tuple_and_dims():
    with pytest.raises(AudioError, match="tuple"):
        load_audio((sine(), SAMPLE_RATE, "extra"))
    with pytest.raises(AudioError, match=r"<array>.*1-D or 2-D.*\(2, 2, 1000\)"):
        load_audio(np.zeros((2, 2, 1000), np.float32))
    with pytest.raises(AudioError, match="1-D or 2-D"):
        load_audio(np.float32(0.5))  # 0-d array


def test_name_overrides_label():
    with pytest.raises(AudioError, match="^request-7: .*NaN"):
        load_audio(np.full(1000, np.nan, np.float32), name="request-7")


def test_audio_error_is_value_error():
    assert issubclass(AudioError, ValueError)
    with pytest.raises(ValueError):
        load_audio(b"hello")
