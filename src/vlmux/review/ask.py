""""Ask another model": one image captioned through a running `vlmux serve` (or any OpenAI-compatible server) over
its chat API, the answer kept as one more candidate for that image."""
from __future__ import annotations

import base64
import json
import mimetypes
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from vlmux.config import DEFAULT_PROMPT
from vlmux.serve.cli import request

ASKED_PREFIX = "serve:"  # a served model's answers are candidates named serve:NAME, apart from the output's models


class AskError(Exception):
    """The server refused or could not be reached; the message is the server's own where it sent one."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Asker:
    url: str
    api_key: str | None = None
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 64
    timeout: float = 600.0  # the server may have to load the model first

    def models(self) -> list[str]:
        return [entry["id"] for entry in self._call("/v1/models", None)["data"]]

    def caption(self, image: Path, model: str) -> str:
        kind = mimetypes.guess_type(image.name)[0] or "image/png"
        url = f"data:{kind};base64," + base64.b64encode(image.read_bytes()).decode()
        answer = self._call("/v1/chat/completions", {
            "model": model, "max_tokens": self.max_tokens, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": self.prompt}]}]})
        return answer["choices"][0]["message"]["content"].strip()

    def _call(self, path: str, body: dict | None) -> dict:
        try:
            return request(self.url, path, body, self.api_key, self.timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise AskError(e.code, f"{self.url} answered {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise AskError(502, f"{self.url} cannot be reached: {getattr(e, 'reason', e)}; is `vlmux serve` running?") from None
