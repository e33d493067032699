"""The exceptions that decide what happens to a row: retried, recorded as failed, or fatal."""

from __future__ import annotations


class SettingError(Exception):
    """A setting is missing or malformed; the message names it, the value and what is expected."""


class FetchError(Exception):
    """The phrase API did not return a usable answer for one request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(FetchError):
    """A transient fault (connection error, timeout, 5xx, 429) that a later try may not hit."""

    def __init__(
        self, message: str, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status)
        self.retry_after_s = retry_after_s


class PermanentError(FetchError):
    """A fault that will repeat on every try (other 4xx, an answer that is not the expected JSON)."""


class DispatchError(Exception):
    """Task messages could not be sent to the broker."""
