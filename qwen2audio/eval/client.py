"""A small client for OpenAI-compatible chat-completion servers (ours, vLLM, OpenAI, any judge).

Standard library only (urllib), with a timeout per request and retries with exponential backoff on
the failures that are worth retrying: connection errors, timeouts, HTTP 408/409/425/429 and 5xx.
Other HTTP errors (a wrong model name, a bad request) fail at once with the server's message.
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request

from ..errors import Qwen2AudioError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(Qwen2AudioError):
    """A server could not be reached, kept refusing, or refused one request.

    ``fatal`` is False only for a refusal of this request's content (HTTP 400, 413, 422: e.g. audio
    too long for the server), which the evaluator records against the item instead of stopping.
    """

    def __init__(self, message: str, fatal: bool = True):
        super().__init__(message)
        self.fatal = fatal


def chat_url(base_url: str) -> str:
    """'http://h:8000', 'http://h:8000/v1' or the full '.../v1/chat/completions' -> the completions URL."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class ChatClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0, retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 60.0, sleep=time.sleep):
        if not base_url.startswith(("http://", "https://")):
            raise EndpointError(f"endpoint URL must start with http:// or https://, got {base_url!r}")
        self.url = chat_url(base_url)
        self.models_url = self.url[: -len("/chat/completions")] + "/models"
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, url: str, payload: dict | None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
            try:
                req = urllib.request.Request(url, data=data, headers=self._headers(),
                                             method="GET" if data is None else "POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
                try:
                    return json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise EndpointError(f"{url}: the reply is not JSON: {body[:200]!r}") from None
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace").strip()
                if e.code not in RETRY_STATUS:
                    hint = " (check the API key and its environment variable)" if e.code in (401, 403) else ""
                    raise EndpointError(f"{url}: HTTP {e.code}: {detail or e.reason}{hint}",
                                        fatal=e.code not in (400, 413, 422)) from None
                last = f"HTTP {e.code}: {detail or e.reason}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.strip().isdigit():
                    wait = min(self.max_backoff, float(retry_after))
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", None) or e) or type(e).__name__
            if attempt < self.retries:
                self.sleep(wait)
        raise EndpointError(f"{url}: no answer after {self.retries + 1} attempts ({last})")

    def complete(self, messages: list[dict], **params) -> str:
        """POST a chat completion and return the first choice's text."""
        reply = self._request(self.url, {"messages": messages, **{k: v for k, v in params.items() if v is not None}})
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.url}: unexpected reply {json.dumps(reply)[:200]}") from None
        return content or ""

    def first_model(self) -> str:
        """The first model the server lists under /v1/models (what to ask for when none is named)."""
        try:
            reply = self._request(self.models_url, None)
        except EndpointError as e:
            raise EndpointError(f"{e}; name the model with --endpoint-model") from None
        try:
            return reply["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.models_url}: lists no model; name one with --endpoint-model") from None
