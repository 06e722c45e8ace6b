"""Gradient checkpointing: switching it on in the mode a run asks for, reading which mode a model is in, and taking
a defense's extra gradients so that they are right in every mode.

Why defenses care: with torch's *reentrant* checkpointing the layers' forward runs without autograd and their
parameter gradients exist only inside a nested ``backward`` run when the outer backward reaches them. A
``torch.autograd.grad(loss, params)`` never gets there, so it returns no gradient at all (zero-filled, a defense
trains as plain SFT), and activations recorded by forward hooks carry no graph. *Non-reentrant* checkpointing
keeps the outer graph and recomputes saved tensors on demand, so ``autograd.grad`` works; what a defense must
watch there is that anything the forward depended on (a perturbation, swapped-in parameters) is still in place
when the backward recomputes the layer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["SETTINGS", "OFF", "REENTRANT", "NON_REENTRANT", "resolve_setting", "checkpointing_mode",
           "enable_checkpointing", "parameter_gradients", "refuse_reentrant"]

log = logging.getLogger(__name__)

SETTINGS = ("auto", "false", "true", "reentrant")
"""``train.gradient_checkpointing`` values: ``auto`` (off, except non-reentrant on an 8/4-bit base), ``false``,
``true`` (torch's non-reentrant checkpointing) and ``reentrant``."""
OFF, REENTRANT, NON_REENTRANT = "off", "reentrant", "non_reentrant"


def resolve_setting(setting: str | bool, *, k_bit: bool) -> str:
    """The checkpointing mode (``off``, ``non_reentrant``, ``reentrant``) that ``train.gradient_checkpointing``
    means for a model that is (``k_bit``) or is not loaded in 8/4 bits."""
    value = str(setting).lower()
    if value == "auto":
        # peft's k-bit preparation turns checkpointing on (reentrant, by torch's default); spard keeps it on, for
        # the memory, but non-reentrant, the mode in which every defense's extra gradient is exact.
        return NON_REENTRANT if k_bit else OFF
    return {"false": OFF, "true": NON_REENTRANT, "reentrant": REENTRANT}[value]


def checkpointing_mode(model: torch.nn.Module) -> str:
    """Which checkpointing ``model`` (a transformers model, bare or inside peft or DDP) runs its layers with in
    training mode: ``off``, ``reentrant`` or ``non_reentrant``; read from the checkpoint function transformers
    installed on the layers, so it also tells the mode a user's own ``Trainer`` switched on."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None:
            continue
        reentrant = (getattr(func, "keywords", None) or {}).get("use_reentrant")
        # torch.utils.checkpoint treats a missing use_reentrant as True (with a warning)
        return REENTRANT if reentrant is None or reentrant else NON_REENTRANT
    return OFF


def enable_checkpointing(model: torch.nn.Module, mode: str, *, k_bit: bool) -> torch.nn.Module:
    """Prepare ``model`` (before the LoRA adapter is added) for training in checkpointing ``mode``; an 8/4-bit
    model goes through peft's k-bit preparation (which also freezes it and upcasts its norms)."""
    kwargs = {"use_reentrant": mode == REENTRANT}
    if k_bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=mode != OFF,
                                               gradient_checkpointing_kwargs=kwargs)
    if mode == OFF:
        return model
    if not getattr(model, "supports_gradient_checkpointing", False):
        from spard.errors import ConfigError

        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                          "checkpointing; set train.gradient_checkpointing=false")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == REENTRANT and hasattr(model, "enable_input_require_grads"):
        # reentrant checkpoints pass gradients only through inputs that require them; the embeddings are frozen
        model.enable_input_require_grads()
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    return model


def parameter_gradients(loss: Tensor, params: list[Tensor], *, mode: str) -> list[Tensor]:
    """``d loss / d params`` (zeros where ``loss`` does not depend on a parameter), leaving ``params``' ``.grad``
    as it was.

    Off or non-reentrant: ``torch.autograd.grad``. Reentrant: a plain ``backward`` (the only call that reaches a
    reentrant checkpoint's parameters) into emptied ``.grad`` slots, read out, and the previous ``.grad``
    restored. That backward runs the parameters' accumulation hooks, so under DDP it is only safe outside a
    forward/backward pair of the DDP-wrapped model (e.g. before the optimizer step, when DDP has finished)."""
    import torch

    if mode != REENTRANT:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def refuse_reentrant(model: torch.nn.Module, defense: str, why: str) -> None:
    """Stop a defense that cannot be exact under reentrant checkpointing, with the setting that fixes it."""
    if checkpointing_mode(model) == REENTRANT:
        from spard.errors import ConfigError

        raise ConfigError(f"{defense} does not support reentrant gradient checkpointing ({why}); use "
                          "train.gradient_checkpointing=true (non-reentrant: same memory, exact gradients) or false "
                          "(in your own Trainer: gradient_checkpointing_kwargs={'use_reentrant': False})")
