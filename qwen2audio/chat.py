"""Messages in the OpenAI chat shape -> Qwen2-Audio's ChatML prompt, plus base-model raw prompts.

The rendering equals the reference chat template; audio parts are collected in order so the k-th
`<|AUDIO|>` placeholder belongs to the k-th audio.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .errors import Qwen2AudioError
from .tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START

DEFAULT_SYSTEM = "You are a helpful assistant."
AUDIO_BLOCK = f"{AUDIO_BOS}{AUDIO}{AUDIO_EOS}"
ROLES = ("system", "user", "assistant")

# The reference template (Hugging Face's Qwen2-Audio default), written into saved checkpoints so
# that transformers renders exactly what `render_chat` renders.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or 'input_audio' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pre-training task prompts of the paper (SPEC section 1), for the base model.
TASK_PROMPTS = {
    "asr": "Detect the language and recognize the speech:",
    "caption": "Generate the caption in English:",
    "emotion": "Recognize the emotion with keywords in English:",
    "vocal_sound": "Classify the human vocal sound to VocalSound in English:",
}


class MessageError(Qwen2AudioError):
    """Messages that do not follow the chat schema."""


def is_audio_part(part: dict) -> bool:
    return part.get("type") in ("audio", "audio_url", "input_audio") or any(
        k in part for k in ("audio", "audio_url", "input_audio")
    )


def audio_source(part: dict) -> Any:
    """What to decode for one audio part: a path, bytes, an array, (array, sr) or a URL string."""
    if part.get("input_audio") is not None:
        data = part["input_audio"]
        data = data.get("data") if isinstance(data, dict) else data
        if not isinstance(data, str):
            raise MessageError("input_audio.data must be a base64 string")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise MessageError("input_audio.data is not valid base64") from None
    if part.get("audio_url") is not None:
        url = part["audio_url"]
        return resolve_url(url.get("url") if isinstance(url, dict) else url)
    if part.get("audio") is not None:
        return part["audio"]
    raise MessageError(f"audio part without data: {sorted(part)}")


def resolve_url(url: Any) -> Any:
    """A `data:` URI becomes its bytes, `file://` a path; remote URLs are never fetched here."""
    if not isinstance(url, str):
        raise MessageError("audio_url must be a string or {'url': string}")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise MessageError("audio_url data URIs must be base64-encoded (data:audio/...;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MessageError("audio_url data URI is not valid base64") from None
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.split(":", 1)[0].lower() in ("http", "https", "ftp"):
        raise MessageError(f"remote audio URL {url!r} is not fetched: download it and pass the file instead")
    return url


def validate_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise MessageError(f"message {i}: needs a role among {ROLES}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise MessageError(f"message {i}: content must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise MessageError(f"message {i} part {j}: expected an object, got {type(part).__name__}")
            if not is_audio_part(part) and not isinstance(part.get("text"), str):
                raise MessageError(f"message {i} part {j}: neither text nor audio ({part.get('type')!r})")


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[Any]]:
    """Render the ChatML prompt; return it and the audio sources in placeholder order."""
    validate_messages(messages)
    out, audios = [], []
    if messages[0]["role"] != "system":
        out.append(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n")
    for m in messages:
        out.append(f"{IM_START}{m['role']}\n")
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            for part in content:
                if is_audio_part(part):
                    audios.append(audio_source(part))
                    out.append(f"Audio {len(audios)}: {AUDIO_BLOCK}\n")
                else:
                    out.append(part["text"])
        out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out), audios


def raw_prompt(instruction: str, num_audios: int = 1) -> str:
    """The base model's prompt: audio blocks then the task instruction, no chat markup."""
    return AUDIO_BLOCK * num_audios + instruction


# Languages of the speech data Qwen2-Audio was trained on (the paper's ASR and speech-translation sets: Fleurs,
# Common Voice, CoVoST2, AISHELL, LibriSpeech), by the code of the tag its transcripts start with (<|en|>).
ASR_LANGUAGES = {
    "en": "English", "zh": "Chinese", "yue": "Cantonese", "de": "German", "fr": "French", "es": "Spanish",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "ru": "Russian", "pt": "Portuguese", "nl": "Dutch",
    "ar": "Arabic", "ca": "Catalan", "fa": "Persian", "et": "Estonian", "mn": "Mongolian", "tr": "Turkish",
    "sv": "Swedish", "lv": "Latvian", "sl": "Slovenian", "ta": "Tamil", "id": "Indonesian", "cy": "Welsh",
}


def asr_prompt(language: str | None = None) -> str:
    """ASR prompt; with a language the target's leading tag is given (`<|en|>`), else the model emits it."""
    prompt = TASK_PROMPTS["asr"]
    return f"{prompt} <|{language}|>" if language else prompt


def translation_prompt(source: str, target: str = "en") -> str:
    """The paper's speech-translation (S2TT) prompt, e.g. `Translate the German speech into English:`."""
    return f"Translate the {ASR_LANGUAGES[source]} speech into {ASR_LANGUAGES[target]}:"
