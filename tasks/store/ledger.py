"""Append-only ledger of rows that failed permanently, one JSON object per line."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

from tasks.store.worm import (
    SECRET_PARAMETER_NAMES,
    StoreError,
    append_json_line,
    make_directories,
    utc_timestamp,
)

logger = logging.getLogger(__name__)

#: Ledger file under the store root.
LEDGER_NAME = "failures.jsonl"

#: Maximum UTF-8 size of a phrase kept in a ledger line, in bytes. A longer phrase keeps
#: its first bytes and gains "phrase_sha256", the hash of the full phrase.
PHRASE_MAX_BYTES = 1024

#: Maximum UTF-8 size of a reason kept in a ledger line, in bytes.
REASON_MAX_BYTES = 1024

#: Text that replaces a credential found in a reason.
REDACTED = "REDACTED"

_SECRET_NAMES = "|".join(sorted(SECRET_PARAMETER_NAMES, key=len, reverse=True))

# Credentials as a query or form parameter (api_key=...), a JSON member ("token": "...")
# or an HTTP bearer token. Exception messages of HTTP clients often quote the full URL.
_SECRET_PATTERNS = (
    re.compile(rf"(?i)\b({_SECRET_NAMES})=[^&\s\"']+"),
    re.compile(rf"(?i)(\"(?:{_SECRET_NAMES})\"\s*:\s*)\"[^\"]*\""),
    re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"),
)
_SECRET_REPLACEMENTS = (rf"\1={REDACTED}", rf'\1"{REDACTED}"', rf"\1 {REDACTED}")


def redact_secrets(text: str) -> str:
    """Return ``text`` with credential values (api_key=..., bearer tokens) replaced by REDACTED."""
    for pattern, replacement in zip(_SECRET_PATTERNS, _SECRET_REPLACEMENTS):
        text = pattern.sub(replacement, text)
    return text


def truncate_utf8(text: str, max_bytes: int) -> str:
    """Return the longest prefix of ``text`` whose UTF-8 encoding fits in ``max_bytes``."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", "ignore")


class FailureLedger:
    """Append-only record of failed rows at ``root/failures.jsonl``.

    Each line is one JSON object with ``at`` (ISO-8601 UTC), ``file``, ``line``, ``phrase``,
    ``reason``, ``task_id`` and ``attempts``, plus ``phrase_sha256`` when the phrase was
    shortened. Lines from concurrent processes never interleave (see ``append_json_line``).
    """

    def __init__(self, root: Path) -> None:
        """Open the ledger under ``root``. The directory and file are created by ``record``."""
        self.root = Path(root)
        self.path = self.root / LEDGER_NAME

    def record(
        self,
        *,
        file: str,
        line: int,
        phrase: str,
        reason: str,
        task_id: str | None,
        attempts: int | None = None,
    ) -> None:
        """Append one failed row to the ledger and fsync it.

        ``file`` and ``line`` locate the CSV row. A phrase over PHRASE_MAX_BYTES is shortened,
        and a reason is cut to REASON_MAX_BYTES after credential values are redacted.
        Raises StoreError if the ledger cannot be written.
        """
        entry: dict[str, Any] = {
            "at": utc_timestamp(),
            "file": file,
            "line": line,
            "phrase": truncate_utf8(phrase, PHRASE_MAX_BYTES),
        }

        if entry["phrase"] != phrase:
            full_phrase = phrase.encode("utf-8", "surrogatepass")
            entry["phrase_sha256"] = hashlib.sha256(full_phrase).hexdigest()

        entry["reason"] = truncate_utf8(redact_secrets(reason), REASON_MAX_BYTES)
        entry["task_id"] = task_id
        entry["attempts"] = attempts

        make_directories(self.root)
        append_json_line(self.path, entry)

    def entries(self) -> Iterator[dict]:
        """Yield the ledger entries in file order, reading one line at a time.

        Lines that are not JSON objects are skipped and counted in one warning log.
        Yields nothing if the ledger does not exist. Raises StoreError if it cannot be read.
        """
        try:
            stream = self.path.open("rb")
        except FileNotFoundError:
            return
        except OSError as error:
            raise StoreError(f"failed to read the ledger ({error.strerror})", self.path) from error

        skipped = 0
        first_skipped = 0
        with stream:
            for line_number, raw in enumerate(stream, start=1):
                entry = _parse_line(raw)
                if entry is not None:
                    yield entry
                    continue

                skipped += 1
                first_skipped = first_skipped or line_number

        if skipped:
            logger.warning(
                "skipped %d malformed lines in %s, first at line %d",
                skipped,
                self.path,
                first_skipped,
            )


def _parse_line(raw: bytes) -> dict | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None
