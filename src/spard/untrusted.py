"""Model files spard did not write: refuse pickle weights, say out loud which model code will run.

Every model spard loads (the base model, the classifier judge, SafeLoRA's unaligned model, the DPP embedder,
export) goes through :func:`require_safetensors` first: a local directory that holds only pickle weights
(``pytorch_model.bin`` and kin, which can run code when unpickled) is refused with one clear error, and
loaders ask transformers for safetensors (``use_safetensors=True``) so a hub repo is held to the same rule.
:func:`warn_remote_code` logs which ``.py`` files ``trust_remote_code`` lets run. Standard library only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from spard.errors import ModelError

__all__ = ["PICKLE_SUFFIXES", "pickle_only_weights", "require_safetensors", "remote_code_files", "warn_remote_code"]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files torch would unpickle."""


def pickle_only_weights(directory: str | Path) -> list[str]:
    """The pickle weight files of a model directory that has no ``.safetensors`` file (sub-directories such as
    a sentence-transformers module included); empty when it has safetensors, or no weights at all."""
    d = Path(directory)
    if not d.is_dir():
        return []
    files = [p for p in d.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)]
    if any(p.suffix == ".safetensors" for p in files):
        return []
    return sorted(str(p.relative_to(d)) for p in files if p.suffix in PICKLE_SUFFIXES)


def require_safetensors(name_or_path: str | Path, *, key: str) -> None:
    """Refuse a local model directory whose weights are pickle files only (``key`` is the config field that
    named it, for the message). A hub id is left to ``use_safetensors=True`` at load time."""
    pickles = pickle_only_weights(Path(name_or_path).expanduser())
    if pickles:
        raise ModelError(
            f"{key}={str(name_or_path)!r}: the directory holds only pickle weights ({', '.join(pickles[:3])}); "
            "spard loads safetensors only, since unpickling a file can run arbitrary code. Convert it once where "
            "you trust it: AutoModel...from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


def remote_code_files(name_or_path: str | Path) -> list[str]:
    """The ``.py`` files of a local model directory (what ``trust_remote_code=True`` may import)."""
    d = Path(name_or_path).expanduser()
    return sorted(str(p.relative_to(d)) for p in d.rglob("*.py")) if d.is_dir() else []


def warn_remote_code(name_or_path: str | Path, *, key: str = "model.trust_remote_code") -> None:
    """Log, as a warning, that model code will run and which files it is."""
    files = remote_code_files(name_or_path)
    where = (f"these files of {name_or_path} may run: {', '.join(files)}" if files else
             f"{name_or_path} has no .py files here" if Path(name_or_path).expanduser().is_dir() else
             f"code of hub repo {name_or_path!r} (the files its config.json auto_map names) may run")
    log.warning("%s=true: model code executes with your permissions; %s", key, where)
