"""Keep secrets out of every text the system writes: exception messages and log lines."""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, quote_plus

#: An `apikey` query parameter in any URL, whatever its value.
_APIKEY_PARAM = re.compile(r"(apikey=)[^&\s'\"]+", re.IGNORECASE)

MASK = "***"


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Return `text` with each secret, raw or URL-encoded, and any `apikey=` value masked."""
    for secret in secrets:
        if not secret:
            continue
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
            text = text.replace(form, MASK)
    return _APIKEY_PARAM.sub(r"\1" + MASK, text)


class RedactingFilter(logging.Filter):
    """A logging filter that masks the secrets in each record's final message."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self._secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_redaction(secrets: tuple[str, ...]) -> None:
    """Attach a `RedactingFilter` to every handler of the root logger."""
    redacting = RedactingFilter(secrets)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(redacting)
