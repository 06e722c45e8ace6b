"""Keep secrets off the disk: every string spard writes passes :func:`redact` first.

A judge registers its API key's value here when it reads it (:func:`register_secret`); the write helpers of
:mod:`spard.io`, the bench's cell log and the CLI's log handler replace that value, and any
``Authorization: <scheme> <token>`` or ``Bearer <token>`` a server echoed back, with :data:`REDACTED`.
A leaf module (standard library only) so that :mod:`spard.io` can use it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["REDACTED", "redact", "redact_obj", "register_secret", "registered_secrets", "RedactFilter"]

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 4
"""Shorter values are not treated as secrets: replacing every "ab" in a results file would garble it."""

# "Authorization: Bearer sk-..." as a server may echo the header (also JSON-quoted or escaped), any scheme.
_AUTH_HEADER = re.compile(r"(?i)(authorization\\?[\"']?\s*[:=]\s*\\?[\"']?)(?:[A-Za-z][\w-]*\s+)?[^\s\"'\\,;}]+")
# A token, not prose ("the bearer of bonds"): 8+ token characters, at least one of them not a letter.
_BEARER = re.compile(r"\b([Bb]earer\s+)(?=[A-Za-z]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}")

_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember ``value`` (e.g. an API key read from the environment) so every later write redacts it."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _lock:
            _secrets.add(value)


def registered_secrets() -> frozenset[str]:
    """The values :func:`register_secret` was given in this process."""
    with _lock:
        return frozenset(_secrets)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with each of ``secrets`` (default: the registered ones) and any ``Authorization``/``Bearer``
    token replaced by :data:`REDACTED`. Pure apart from reading the registry when ``secrets`` is None."""
    values = registered_secrets() if secrets is None else secrets
    # longest first: a key that contains another key must go whole
    for value in sorted((v for v in values if v and len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def redact_obj(obj: Any, secrets: Iterable[str] | None = None) -> Any:
    """:func:`redact` applied to every string (keys included) of a JSON-like structure; other values as given."""
    values = registered_secrets() if secrets is None else frozenset(secrets)
    if isinstance(obj, str):
        return redact(obj, values)
    if isinstance(obj, dict):
        return {redact_obj(k, values): redact_obj(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, values) for v in obj]
    return obj


class RedactFilter(logging.Filter):
    """A logging filter for handlers that write files: the formatted message and traceback are redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def configure_logging(level: int) -> None:
    """The command line's logging: timestamped records at ``level``, chatty HTTP/lock libraries at WARNING, and
    every handler redacting registered secrets (a log redirected to a file must not carry a judge's key). Bench
    worker processes call it too, so their records look like the parent's."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactFilter())
