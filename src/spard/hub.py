"""Telling hub ids from local paths, with ``huggingface_hub``'s own validator (one check for models and data)."""

from __future__ import annotations

from pathlib import Path


def is_hub_id(text: str) -> bool:
    """``owner/name`` that is a valid hub repo id and not an existing local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
