"""Audio sources of HTTP requests -> decoded 16 kHz waveforms, under the operator's policy.

Inline audio (`input_audio` base64, `data:` URIs) is always accepted. Local files are read only
below `--allowed-local-media-path` (symlinks resolved first, so a link cannot escape), and remote
URLs are fetched only with `--allow-remote-audio`, with a timeout and a size cap. Every refusal is
an APIError naming the offending part.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from ..audio import AudioError, AudioTooLong, load_audio
from ..errors import Qwen2AudioError
from .errors import APIError

_B64_SPACE = re.compile(rb"\s+")


@dataclass
class MediaPolicy:
    allowed_local_dir: Path | None = None  # resolved root, or None: no local files
    allow_remote: bool = False
    remote_timeout: float = 10.0  # seconds, for connect and for each read
    max_audio_bytes: int = 32 * 2**20  # per fetched or local file

    def __post_init__(self):
        if self.allowed_local_dir is not None:
            root = Path(self.allowed_local_dir).expanduser().resolve()
            if not root.is_dir():
                raise Qwen2AudioError(f"--allowed-local-media-path {self.allowed_local_dir}: not a directory")
            self.allowed_local_dir = root


def decode_base64(data, param: str) -> bytes:
    if not isinstance(data, str):
        raise APIError(400, f"{param} must be a base64 string", "invalid_audio", param)
    raw = _B64_SPACE.sub(b"", data.encode("ascii", "replace"))  # tolerate line-wrapped base64
    try:
        out = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", "invalid_audio", param) from None
    if not out:
        raise APIError(400, f"{param} is empty (0 bytes of audio)", "invalid_audio", param)
    return out


def fetch_source(part: dict, policy: MediaPolicy, param: str):
    """One audio content part -> bytes or a checked local path."""
    kind = part.get("type")
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise APIError(400, f"{param}.input_audio must be an object {{data, format}}", "invalid_audio", param)
        fmt = spec.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise APIError(400, f"{param}.input_audio.format must be a string such as 'wav' or 'mp3'",
                           "invalid_audio", param)
        return decode_base64(spec.get("data"), f"{param}.input_audio.data")
    if kind == "audio_url":
        spec = part.get("audio_url")
        if not isinstance(spec, dict):  # OpenAI's schema: {"url": ...}; a bare string is refused there too
            raise APIError(400, f"{param}.audio_url must be an object {{\"url\": ...}}, got "
                                f"{type(spec).__name__}", "invalid_audio", f"{param}.audio_url")
        return fetch_url(spec.get("url"), policy, f"{param}.audio_url.url")
    raise APIError(400, f"{param}: unsupported content part type {kind!r}", "invalid_content", param)


def fetch_url(url, policy: MediaPolicy, param: str):
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{param} must be a non-empty string", "invalid_audio", param)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise APIError(400, f"{param}: data URIs must be base64-encoded (data:audio/wav;base64,...)",
                           "invalid_audio", param)
        return decode_base64(payload, param)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return fetch_remote(url, policy, param)
    if scheme == "file":
        return local_path(unquote(urlparse(url).path), policy, param)
    if scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # a bare path
        return local_path(url, policy, param)
    raise APIError(400, f"{param}: unsupported URL scheme {scheme!r} (use data:, file:// or http(s)://)",
                   "invalid_audio", param)


def local_path(path: str, policy: MediaPolicy, param: str) -> str:
    root = policy.allowed_local_dir
    if root is None:
        raise APIError(403, f"{param}: local audio files are disabled on this server (the operator can allow "
                            f"a directory with --allowed-local-media-path)", "local_files_disabled", param)
    outside = APIError(403, f"{param}: {path} is outside the allowed media directory", "forbidden_path", param)
    if "\0" in path:
        raise outside
    # Decide by the path's text first, touching nothing: a path outside the directory gets the same 403
    # whether it exists or not (no existence oracle for /etc/...). Only then resolve symlinks, which may still
    # lead out of the directory, and only then ask whether the file exists.
    candidate = Path(os.path.normpath(root / path))  # an absolute `path` replaces root
    if not candidate.is_relative_to(root):
        raise outside
    try:
        real = candidate.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        raise APIError(400, f"{param}: file not found: {path}", "file_not_found", param) from None
    if not real.is_relative_to(root):
        raise outside
    if not real.exists():
        raise APIError(400, f"{param}: file not found: {path}", "file_not_found", param)
    if not real.is_file():
        raise APIError(400, f"{param}: {path} is not a regular file", "file_not_found", param)
    if real.stat().st_size > policy.max_audio_bytes:
        raise APIError(413, f"{param}: {path} is larger than {policy.max_audio_bytes} bytes", "audio_too_large",
                       param)
    return str(real)


def fetch_remote(url: str, policy: MediaPolicy, param: str) -> bytes:
    if not policy.allow_remote:
        raise APIError(403, f"{param}: remote audio URLs are not fetched by this server (the operator can "
                            f"enable them with --allow-remote-audio); send the audio inline as input_audio",
                       "remote_audio_disabled", param)
    import httpx

    cap = policy.max_audio_bytes
    try:
        with httpx.stream("GET", url, timeout=policy.remote_timeout, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise APIError(400, f"{param}: fetching {url} gave HTTP {resp.status_code}", "fetch_failed", param)
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > cap:
                raise APIError(413, f"{param}: {url} is larger than {cap} bytes", "audio_too_large", param)
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > cap:
                    raise APIError(413, f"{param}: {url} is larger than {cap} bytes", "audio_too_large", param)
                chunks.append(chunk)
    except httpx.TimeoutException:
        raise APIError(400, f"{param}: fetching {url} timed out after {policy.remote_timeout:g} s",
                       "fetch_failed", param) from None
    except httpx.HTTPError as e:
        raise APIError(400, f"{param}: could not fetch {url} ({type(e).__name__}: {e})", "fetch_failed",
                       param) from None
    return b"".join(chunks)


def decode_audio(source, param: str, max_seconds: float | None = None) -> np.ndarray:
    """Bytes or a checked path -> 16 kHz waveform; decoding stops once past `max_seconds` (a few kB of FLAC can
    hold hours of silence), so memory is bounded by the limit, not by what the file claims to hold."""
    try:
        return load_audio(source, name="audio", max_seconds=max_seconds)
    except AudioTooLong as e:
        raise APIError(400, f"{param}: {str(e).removeprefix('audio: ')}", "audio_too_long", param) from None
    except AudioError as e:
        raise APIError(400, f"{param}: {str(e).removeprefix('audio: ')}", "invalid_audio", param) from None
