"""Keep secrets out of what qvltune prints or writes: Hub tokens, W&B keys, anything passed as a
token/key/secret/password environment variable."""

from __future__ import annotations

import os
import re

_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
    re.compile(r"(?i)((?:token|api[_-]?key|secret|password)[\"']?\s*[=:]\s*[\"']?)[^\s\"',]+"),
]
_SECRET_ENV = re.compile(r"(?i)(token|key|secret|password)")


def redact(text: str) -> str:
    text = _PATTERNS[0].sub("hf_***", text)
    text = _PATTERNS[1].sub(r"\1***", text)
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and len(value) >= 8 and value in text:
            text = text.replace(value, "***")
    return text
