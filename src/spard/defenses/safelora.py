"""SafeLoRA (Hsu et al., NeurIPS 2024): post-hoc projection of the LoRA update onto the alignment subspace.

For every adapted weight matrix the *alignment direction* is ``V = W_aligned - W_unaligned`` (the aligned chat
model minus its unaligned base, same architecture). SafeLoRA's projector is ``C = V Vᵀ / ‖V‖_F`` (IBM/SafeLoRA
``model.py::get_aligned_matrix``; not idempotent, so not an exact orthogonal projector: the reference code's
choice, kept). After fine-tuning, each LoRA module's update ``ΔW = B A`` is compared with ``C ΔW`` by the cosine of
the flattened matrices; modules whose cosine is at most a threshold (``threshold`` mode), or the
``num_proj_layers`` least similar (``number`` mode, the reference default), get ``B ← C B`` (A, alpha and r are
unchanged, so ``ΔW ← C ΔW``). No data and no extra training steps.

In spard the aligned weights are the frozen base of the model being fine-tuned (the aligned model when the
alignment stage ran) and ``defense.unaligned_model`` names the unaligned one (default: the raw packaged
SmolLM2-135M-Instruct, i.e. the model spard's alignment stage started from). The projection runs in the
``after_train`` hook: the unprojected adapter is saved as ``final_unprojected/`` (with
``safelora_projection.json``, the per-module cosines) and the projected one becomes the run's ``final/``.

Several processes (DDP, FSDP2): every rank loads the unaligned weights and computes the same projection on whole
matrices (under FSDP the LoRA and base matrices are gathered from their shards one module at a time, in the same
order on every rank), then writes its own part of each projected ``B``; the saved adapter is the single
process's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spard.args import DefenseArgs, FieldError, check_choice, check_range
from spard.defenses.base import Defense, register
from spard.errors import ConfigError
from spard.io import atomic_write_json
from spard.rundir import FINAL_UNPROJECTED_DIR

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import Trainer

# torch is imported where it runs, so resolving a config that names this defense does not load it.

__all__ = ["SafeLoRA", "SafeLoRAArgs", "alignment_projector", "project_lora_b", "projected_similarity",
           "select_layers", "quantised_base", "UNPROJECTED_DIR", "PROJECTION_FILE"]

log = logging.getLogger(__name__)

SELECT_MODES = ("number", "threshold")
UNPROJECTED_DIR = FINAL_UNPROJECTED_DIR
"""Run-directory folder holding the adapter as trained, before the projection."""
PROJECTION_FILE = "safelora_projection.json"
"""In ``final_unprojected/``: per-module cosine and whether the module was projected."""
SIMILARITY_DECIMALS = 5
"""The reference rounds each cosine to 5 decimals before comparing it (``numpy.round(..., 5)``)."""


@dataclass
class SafeLoRAArgs(DefenseArgs):
    name: str = "safelora"
    """Defense name."""
    unaligned_model: str = "embedded"
    """The unaligned model whose difference to the aligned base gives the alignment direction: ``embedded`` (the
    raw packaged SmolLM2-135M-Instruct, what spard's alignment stage starts from), a hub id (e.g.
    ``Qwen/Qwen2.5-7B`` beside ``model.name_or_path=Qwen/Qwen2.5-7B-Instruct``) or a local directory. Same
    architecture as the fine-tuned model; loaded as safetensors, without remote code."""
    unaligned_revision: str | None = None
    """Hub revision of ``unaligned_model``."""
    select_layers_type: str = "number"
    """``number``: project the ``num_proj_layers`` LoRA modules least similar to their projection (the
    reference default); ``threshold``: project every module whose cosine is <= ``threshold``."""
    threshold: float = 0.5
    """Cosine at or below which a module is projected in ``threshold`` mode (reference default 0.5)."""
    num_proj_layers: int = 10
    """Modules projected in ``number`` mode (reference default 10); a module is one adapted matrix (each
    q_proj, v_proj ... of each block counts once); ties at the cut-off are projected too, as in the reference."""

    def __post_init__(self) -> None:
        if not isinstance(self.unaligned_model, str) or not self.unaligned_model:
            raise FieldError("unaligned_model", self.unaligned_model, "must name a model (embedded, a hub id or a "
                             "directory)")
        check_choice("select_layers_type", self.select_layers_type, SELECT_MODES)
        check_range("threshold", self.threshold, -1.0, 1.0)
        check_range("num_proj_layers", self.num_proj_layers, 1)


# ---------------------------------------------------------------------------------------------------------
# The projection math (pure functions)
# ---------------------------------------------------------------------------------------------------------
def alignment_projector(v: Tensor) -> Tensor:
    """SafeLoRA's ``C = V Vᵀ / ‖V‖_F`` for an alignment direction ``v`` of shape ``(out, in)``; ``(out, out)``."""
    import torch

    v = v.float()
    return v @ v.T / torch.linalg.matrix_norm(v)


def project_lora_b(v: Tensor, lora_b: Tensor) -> Tensor:
    """``C @ B`` without forming the ``(out, out)`` matrix C: ``V (Vᵀ B) / ‖V‖_F`` (fp32)."""
    import torch

    v = v.float()
    return v @ (v.T @ lora_b.float()) / torch.linalg.matrix_norm(v)


def projected_similarity(v: Tensor, lora_a: Tensor, lora_b: Tensor) -> float:
    """Cosine between the flattened ``C B A`` and ``B A`` (the update and its projection), rounded to 5 decimals
    as the reference does. ``lora_a``: ``(r, in)``, ``lora_b``: ``(out, r)``. The LoRA scale alpha/r cancels."""
    import torch.nn.functional as F

    a = lora_a.float()
    update = lora_b.float() @ a
    projected = project_lora_b(v, lora_b) @ a
    cos = F.cosine_similarity(projected.reshape(1, -1), update.reshape(1, -1)).item()
    return round(cos, SIMILARITY_DECIMALS)


def select_layers(similarities: Mapping[str, float], mode: str, *, threshold: float = 0.5,
                  number: int = 10) -> tuple[list[str], float]:
    """The modules to project and the cosine cut-off used: every module with similarity ``<= tau``, where
    ``tau = threshold`` (``threshold`` mode) or the ``number``-th smallest similarity (``number`` mode, so
    ties at the cut-off are projected too, as in the reference). Names come back in input order."""
    check_choice("select_layers_type", mode, SELECT_MODES)
    if not similarities:
        return [], threshold
    if mode == "threshold":
        tau = threshold
    else:
        ranked = sorted(similarities.values())
        tau = ranked[:number][-1]
    return [name for name, cos in similarities.items() if cos <= tau], tau


# ---------------------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------------------
def _load_unaligned_weights(args: SafeLoRAArgs, names: list[str], dtype: torch.dtype, *,
                            checkpoint: tuple[str, str | None, str] | None = None) -> dict[str, Tensor]:
    """The unaligned model's weights ``names`` (state-dict keys), on the CPU; ``checkpoint`` = (name, revision,
    the option that chose it) loads another model's instead (the aligned model, reloaded).

    Loaded with ``AutoModelForCausalLM`` rather than :func:`spard.models.load_model`, which also loads a
    tokenizer and requires a chat template: an unaligned *base* model (Llama-2-7b-hf) often has none."""
    from transformers import AutoModelForCausalLM

    from spard.models import resolve_model_path
    from spard.untrusted import require_safetensors

    name, revision, key = checkpoint or (args.unaligned_model, args.unaligned_revision, "defense.unaligned_model")
    path = resolve_model_path(name)
    require_safetensors(path, key=key)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision,
                                                     trust_remote_code=False, use_safetensors=True,
                                                     low_cpu_mem_usage=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={name!r}: could not load it ({e})") from e
    state = model.state_dict()
    missing = [n for n in names if n not in state]
    if missing:
        raise ConfigError(f"{key}={name!r} has no weights {missing[:3]}...: it must have the fine-tuned model's "
                          "architecture")
    out = {n: state[n].detach() for n in names}
    del model, state
    return out


def quantised_base(model: torch.nn.Module, weight_dtype: torch.dtype) -> bool:
    """Whether the fine-tuned model's base is loaded in 8/4 bit (flagged, or its base weights are not floats)."""
    flagged = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    return bool(flagged) or not weight_dtype.is_floating_point


def _aligned_weight(module: Any) -> Tensor:
    """The frozen base weight of a LoRA layer, de-quantised when the base is loaded in 8/4 bit."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module.get_base_layer()).detach()


def _lora_modules(model: torch.nn.Module) -> dict[str, tuple[Any, str]]:
    """``{state-dict key of the base weight: (LoRA layer, adapter name)}`` for every LoRA-adapted linear layer."""
    from peft.tuners.lora import LoraLayer

    adapter = getattr(model, "active_adapter", "default")
    prefix = "base_model.model."
    out: dict[str, tuple[Any, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if getattr(module, "fan_in_fan_out", False):
                raise ConfigError(f"defense.name='safelora': module {name} stores its weight transposed "
                                  "(fan_in_fan_out); only nn.Linear LoRA layers are supported")
            key = name[len(prefix):] if name.startswith(prefix) else name
            out[f"{key}.weight"] = (module, adapter)
    return out


@register
class SafeLoRA(Defense):
    """Project the trained LoRA update of the least alignment-like modules onto the alignment subspace."""

    name = "safelora"
    Args = SafeLoRAArgs
    args: SafeLoRAArgs

    def __init__(self, args: SafeLoRAArgs) -> None:
        super().__init__(args)
        self.stats: dict[str, float] = {}
        self.similarities: dict[str, float] = {}
        self.projected: list[str] = []

    def project(self, model: torch.nn.Module, unaligned: Mapping[str, Tensor],
                aligned_weights: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """Compute every module's similarity, select, and rewrite ``lora_B`` of the selected ones in place.
        ``unaligned`` maps base-weight keys (``model.layers.0.self_attn.q_proj.weight``) to unaligned weights;
        ``aligned_weights`` (same keys), when given, stand in for the fine-tuned model's own base weights."""
        import torch

        from spard.distributed import copy_whole_, full_tensor

        modules = _lora_modules(model)
        directions: dict[str, Tensor] = {}
        skipped: list[str] = []
        for key, (module, _) in modules.items():
            # whole matrices: under FSDP gathered from the shards (collective, same order on every rank)
            aligned = full_tensor(_aligned_weight(module)) if aligned_weights is None else aligned_weights[key]
            if aligned.shape != unaligned[key].shape:
                raise ConfigError(f"defense.unaligned_model={self.args.unaligned_model!r}: {key} has shape "
                                  f"{tuple(unaligned[key].shape)}, the fine-tuned model {tuple(aligned.shape)}")
            v = aligned.float() - unaligned[key].to(aligned.device).float()
            if not bool(v.any()):
                skipped.append(key)  # no alignment direction here (the reference would divide 0 by 0)
                continue
            directions[key] = v
        if not directions:
            raise ConfigError(
                f"defense.unaligned_model={self.args.unaligned_model!r} has the same weights as the fine-tuned "
                "model in every adapted module, so there is no alignment direction: SafeLoRA needs the aligned model "
                "as model (align.enabled=true, or a chat model) and its unaligned base as defense.unaligned_model")
        with torch.no_grad():
            self.similarities = {}
            for key, v in directions.items():
                module, adapter = modules[key]
                self.similarities[key] = projected_similarity(v, full_tensor(module.lora_A[adapter].weight),
                                                              full_tensor(module.lora_B[adapter].weight))
            self.projected, tau = select_layers(self.similarities, self.args.select_layers_type,
                                                threshold=self.args.threshold, number=self.args.num_proj_layers)
            for key in self.projected:
                module, adapter = modules[key]
                weight = module.lora_B[adapter].weight
                copy_whole_(weight, project_lora_b(directions[key], full_tensor(weight)).to(weight.dtype))
        if skipped:
            log.warning("safelora: %d adapted modules have no alignment direction (aligned == unaligned) and are "
                        "left unprojected: %s", len(skipped), skipped[:5])
        sims = list(self.similarities.values())
        return {"safelora_modules": float(len(modules)), "safelora_projected": float(len(self.projected)),
                "safelora_skipped": float(len(skipped)), "safelora_cutoff": float(tau),
                "safelora_min_similarity": min(sims), "safelora_mean_similarity": sum(sims) / len(sims)}

    def setup(self, trainer: Trainer) -> None:
        from spard.distributed import check_engine

        # refused before training, not after it: under DeepSpeed ZeRO-3 or FSDP1 the projection would read flat
        # partitions instead of the LoRA and base matrices (FSDP2's DTensors are gathered whole)
        check_engine(trainer, "defense.name='safelora'")

    def after_train(self, trainer: Trainer) -> None:
        import torch

        from spard.distributed import sharded_trainable_state

        start = time.perf_counter()
        model = trainer.accelerator.unwrap_model(trainer.model)
        modules = _lora_modules(model)
        if not modules:
            raise ConfigError("defense.name='safelora' needs a LoRA (peft) model")
        dtype = next(iter(modules.values()))[0].get_base_layer().weight.dtype
        aligned = None
        if quantised_base(model, dtype):
            # De-quantised 8/4-bit weights carry the quantisation error (int8: up to half a step, a row's
            # absmax/254), often larger than the alignment update V measures. Both sides are therefore loaded
            # alike from their checkpoints in fp32, as the reference loads both models.
            dtype = torch.float32
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            aligned = _load_unaligned_weights(self.args, list(modules), dtype, checkpoint=(
                base.config.name_or_path, getattr(base.config, "_commit_hash", None), "model.name_or_path"))
        unaligned = _load_unaligned_weights(self.args, list(modules), dtype)
        loaded = time.perf_counter()
        run_dir = Path(trainer.args.output_dir)
        unprojected = sharded_trainable_state(model)  # FSDP2: gathered to rank 0 (a collective)
        if trainer.is_world_process_zero():
            model.save_pretrained(run_dir / UNPROJECTED_DIR, safe_serialization=True, state_dict=unprojected)
        stats = self.project(model, unaligned, aligned)
        done = time.perf_counter()
        stats["safelora_load_seconds"] = round(loaded - start, 3)
        stats["safelora_projection_seconds"] = round(done - loaded, 3)
        self.stats = stats
        if trainer.is_world_process_zero():
            atomic_write_json(run_dir / UNPROJECTED_DIR / PROJECTION_FILE, {
                "select_layers_type": self.args.select_layers_type, "cutoff": stats["safelora_cutoff"],
                "modules": [{"module": k, "similarity": c, "projected": k in self.projected}
                            for k, c in self.similarities.items()]})
        log.info("safelora: projected %d of %d modules (cosine cut-off %.5f) in %.2f s (+%.2f s loading)",
                 len(self.projected), len(self.similarities), stats["safelora_cutoff"],
                 stats["safelora_projection_seconds"], stats["safelora_load_seconds"])

    def log_stats(self) -> dict[str, float]:
        """After training: modules adapted / projected / without alignment direction, the cosine cut-off, the
        minimum and mean similarity, and the one-off load and projection times (seconds)."""
        return dict(self.stats)
