"""One content hash of a module's weights, for cache keys (embedding caches, aligned-model caches)."""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(module: torch.nn.Module, samples: int = 64, *, exclude_lora: bool = False) -> str:
    """Hash of a module's weights: names, shapes, dtypes, a float64 sum and a strided sample per tensor.

    One reading pass and no hashing of all bytes (seconds for a 1B model); sums plus sampled values tell
    different checkpoints and a fine-tuned copy apart with overwhelming probability. ``exclude_lora`` skips
    PEFT's ``lora_`` tensors: the hash then names the base weights whatever the adapter holds (a resumed
    run's trained adapter must not change its base model's cache key).
    """
    digest = hashlib.sha256()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if exclude_lora and "lora_" in name:
            continue
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor: hash the whole tensor (the key a single process gets)
            tensor = tensor.full_tensor()  # collective: every rank fingerprints together
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if flat.numel() == 0 or flat.device.type == "meta":
            continue
        sample = flat[:: max(1, flat.numel() // samples)][:samples]
        digest.update(repr(float(torch.sum(flat, dtype=torch.float64))).encode())
        digest.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]
