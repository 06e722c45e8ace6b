"""Hub ids: telling them from local paths (``huggingface_hub``'s own validator, one check for models and
data), and failing fast when one can be neither read from the cache nor reached."""

from __future__ import annotations

import os
from pathlib import Path

from spard.errors import SpardError


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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def in_local_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the Hugging Face cache holds (some snapshot of) ``repo_id``."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)).is_dir()


def ensure_reachable(repo_id: str, *, key: str, repo_type: str = "model", timeout: float = 10.0) -> None:
    """Fail once, fast and clearly, when hub id ``repo_id`` (set by config key ``key``) can be neither read
    from the local cache nor reached: instead of the libraries' minute of retries and repeated warnings.
    Honours ``HF_HUB_OFFLINE``."""
    if in_local_cache(repo_id, repo_type):
        return
    kind_flag = " --repo-type dataset" if repo_type == "dataset" else ""
    local_hint = (f"; to use a local copy set {key}=/path/to/a/directory (e.g. one written by "
                  f"`huggingface-cli download {repo_id}{kind_flag} --local-dir DIR`)")
    if _offline():
        raise SpardError(f"{key}={repo_id!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
                         + local_hint)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except RepositoryNotFoundError:
        raise SpardError(f"{key}={repo_id!r}: no such {repo_type} on the hub (or it is private: log in with "
                         "`huggingface-cli login`)" + local_hint) from None
    except HfHubHTTPError as e:
        raise SpardError(f"{key}={repo_id!r}: the hub refused the request ({e})" + local_hint) from None
    except Exception as e:  # connection refused, DNS failure, timeout: no network
        raise SpardError(f"{key}={repo_id!r}: cannot reach the Hugging Face hub ({type(e).__name__}: {e})"
                         + local_hint) from None
