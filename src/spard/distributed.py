"""The few collectives the defenses need, as no-ops in a single process.

SPARD and SafeGrad compute a second gradient outside the DDP forward (so the DDP reducer never sees it) and
sum it over ranks themselves; every rank then holds the same gradient and applies the same update.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what ``configs/accelerate/fsdp.yaml`` selects) parameters
and gradients are ``DTensor``s and each rank holds one shard. A whole-vector quantity (a norm, a dot product) is
then the sum over the shard group of each rank's partial sum over its local shard: :func:`per_tensor_dots`
computes the local partial sums of all tensors at once and :func:`combine_partials` sums the sharded entries
over ranks with one collective, leaving the replicated entries (plain tensors, held whole by every rank) alone.
The result is the same number on every rank, the one a single process computes up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from spard.errors import ConfigError

__all__ = ["world", "collective_device", "all_reduce_sum_", "all_reduce_flat_", "is_sharded", "local_part",
           "any_sharded", "shard_group", "combine_partials", "whole_sums", "per_tensor_dots", "per_tensor_sq_norms",
           "whole_dot", "full_tensor", "full_tensors", "shard_like", "copy_whole_", "is_fsdp_module",
           "fsdp_modules", "sharded_trainable_state", "check_engine"]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside ``torch.distributed``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor on ``device`` must be for a collective of ``backend``: NCCL reduces CUDA tensors only, so a
    CPU tensor (a count, a flag) goes to this process's GPU; gloo and the others take it where it is."""
    if backend == "nccl" and device.type == "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_reduce_sum_any_device_(tensor: Tensor) -> Tensor:
    """``all_reduce`` (sum) of ``tensor`` in place, through the backend's device when it cannot take it."""
    target = collective_device(str(torch.distributed.get_backend()), tensor.device)
    work = tensor if target == tensor.device else tensor.to(target)
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (identical result on every rank); returns it. A CPU tensor works under
    NCCL too (:func:`collective_device`)."""
    if world()[1] > 1:
        _all_reduce_sum_any_device_(tensor)
    return tensor


def all_reduce_flat_(tensors: list[Tensor]) -> list[Tensor]:
    """Sum ``tensors`` over ranks in place with one collective through a flat fp32 buffer; returns them.

    One call instead of one per LoRA tensor, and the sum is taken in fp32 even for bf16 gradients.
    """
    if world()[1] <= 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    _all_reduce_sum_any_device_(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors


# ---------------------------------------------------------------------------------------------------------
# Sharded (FSDP2 / DTensor) tensors
# ---------------------------------------------------------------------------------------------------------
def _dtensor_types() -> tuple[type, type] | None:
    """``(DTensor, Shard)``, or None on a torch build without ``torch.distributed``."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` split over ranks (some placement is a ``Shard``): each rank holds a part."""
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0]) and any(isinstance(p, types[1]) for p in t.placements)


def any_sharded(tensors: Sequence[Tensor]) -> bool:
    """Whether any of ``tensors`` is sharded (the model is under FSDP)."""
    return any(is_sharded(t) for t in tensors)


def local_part(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds: a ``DTensor``'s local shard, any other tensor itself."""
    types = _dtensor_types()
    return t.to_local() if types is not None and isinstance(t, types[0]) else t


def shard_group(tensors: Sequence[Tensor]) -> Any:
    """The process group the sharded ``tensors`` are split over (None when none is sharded).

    All sharded tensors must be split over one mesh dimension of one mesh (FSDP2 and HSDP shard every parameter
    the same way); anything else is refused rather than summed over the wrong ranks.
    """
    types = _dtensor_types()
    group, where = None, None
    for t in tensors:
        if not is_sharded(t):
            continue
        assert types is not None
        dims = [i for i, p in enumerate(t.placements) if isinstance(p, types[1])]
        if len(dims) != 1:
            raise ConfigError(f"a tensor sharded over {len(dims)} mesh dimensions ({t.placements}): spard's defenses "
                              "support one sharded dimension (FSDP2 / HSDP)")
        # two meshes built alike (fully_shard builds one per call) are told apart by their ranks, not identity
        this = t.device_mesh.get_group(dims[0])
        key = tuple(torch.distributed.get_process_group_ranks(this))
        if where is None:
            where, group = key, this
        elif key != where:
            raise ConfigError(f"tensors sharded over different groups of ranks ({where} and {key}): spard's defenses "
                              "need every parameter sharded over the same ranks")
    return group


def combine_partials(partials: Tensor, sharded: Sequence[bool], reduce_: Callable[[Tensor], Any]) -> Tensor:
    """Whole-tensor values from per-tensor partial sums: sharded entries summed over ranks, the others kept.

    ``partials[i]`` is this rank's sum over its part of tensor ``i``; ``reduce_`` sums a tensor over the shard
    group in place (one call, whatever the number of tensors). Replicated entries are masked out of the
    collective, so a tensor every rank holds whole is not counted once per rank.
    """
    if not any(sharded):
        return partials
    mask = torch.tensor(list(sharded), dtype=torch.bool, device=partials.device)
    summed = torch.where(mask, partials, torch.zeros_like(partials))
    reduce_(summed)
    return torch.where(mask, summed, partials)


def _accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def whole_sums(partials: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor sums over whole tensors from this rank's partial sums, keeping the partials' autograd graph.

    ``partials[i]`` is a sum over this rank's part of ``tensors[i]`` (:func:`local_part`). The value returned is
    the whole sum (sharded entries summed over the shard group with one collective, replicated ones kept); the
    gradient flows into this rank's partials only, so a term built from it (Lisa's proximal term) gives each rank
    the gradient of its own shard, the one a single process gives those entries.
    """
    sharded = [is_sharded(t) for t in tensors]
    if not any(sharded):
        return partials
    group = shard_group(tensors)
    whole = combine_partials(partials.detach().clone(), sharded,
                             lambda t: torch.distributed.all_reduce(t, group=group))
    return partials + (whole - partials.detach()) if partials.requires_grad else whole


def per_tensor_dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``[a_i · b_i]`` over whole tensors (sharded ones summed over their shard group), one collective.

    Accumulated in fp32 (fp64 when an input is fp64); the same vector on every rank. ``a_i`` and ``b_i`` must be
    sharded alike (both gradients or parameters of one FSDP module).
    """
    if len(a) != len(b):
        raise ValueError(f"tensor lists differ in length: {len(a)} vs {len(b)}")
    if not a:
        return torch.zeros(0)
    dtype = _accumulation_dtype([*a, *b])
    first = local_part(a[0])
    partials = torch.stack([
        torch.sum(local_part(x).detach().to(dtype) * local_part(y).detach().to(dtype)).to(first.device)
        for x, y in zip(a, b)])
    return whole_sums(partials, a)


def per_tensor_sq_norms(a: Sequence[Tensor]) -> Tensor:
    """``[‖a_i‖²]`` over whole tensors (see :func:`per_tensor_dots`)."""
    return per_tensor_dots(a, a)


def whole_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``a · b`` with both lists read as one flattened vector over whole tensors; a 0-d tensor."""
    if not a:
        return torch.zeros((), dtype=_accumulation_dtype([*a, *b]))
    return per_tensor_dots(a, b).sum()


def full_tensor(t: Tensor) -> Tensor:
    """``t`` whole, detached: a ``DTensor`` gathered from its ranks (collective: call on every rank)."""
    types = _dtensor_types()
    return (t.full_tensor() if types is not None and isinstance(t, types[0]) else t).detach()


def full_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor whole (see :func:`full_tensor`), in the dict's order (the same on every rank)."""
    return {k: full_tensor(v) for k, v in tensors.items()}


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` laid out as ``like``: a ``DTensor`` with ``like``'s mesh and placements when ``like`` is one (each
    rank keeps its part of its own copy of ``whole``; no communication), else ``whole`` itself. Every rank must
    hold the same ``whole`` (read from one file, or computed alike)."""
    types = _dtensor_types()
    if types is None or not isinstance(like, types[0]):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(device=local_part(like).device), like.device_mesh, like.placements,
                             src_data_rank=None)


def copy_whole_(dst: Tensor, whole: Tensor) -> Tensor:
    """Write the whole-tensor value ``whole`` into ``dst`` in place (a sharded ``dst``: this rank's part of it;
    no communication, so every rank must hold the same ``whole``); returns ``dst``."""
    with torch.no_grad():
        local_part(dst).copy_(local_part(shard_like(whole, dst)).to(dst.dtype))
    return dst


def is_fsdp_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 (``fully_shard``) module."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 (``fully_shard``) modules in ``model``; none outside FSDP2."""
    return [m for m in model.modules() if is_fsdp_module(m)]


def sharded_trainable_state(model: torch.nn.Module) -> dict[str, Tensor] | None:
    """Under FSDP2, the trainable tensors (the LoRA adapter, or every weight of a full fine-tune) gathered whole by
    name onto rank 0's CPU, for its ``save_pretrained(..., state_dict=...)``; the other ranks get an empty dict
    (collective: call on every rank). None when nothing is sharded (save as usual). Gathered one tensor at a
    time and kept only by rank 0, so no other rank ever holds more than one whole tensor; the frozen base is
    never gathered."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not any_sharded(list(named.values())):
        return None
    keep = world()[0] == 0
    state = {}
    for name, param in named.items():
        whole = full_tensor(param)
        if keep:
            state[name] = whole.cpu()
    return state


def check_engine(trainer: Any, who: str) -> None:
    """Refuse the distributed engines a defense cannot run under, naming the engine: DeepSpeed (gradients live
    in its partitioned buffers, not in ``param.grad``), FSDP1 (flat parameters), Megatron-LM and XLA.

    Single process, DDP and FSDP2 (``fsdp_version: 2``, ``configs/accelerate/fsdp.yaml``) are supported.
    """
    from accelerate.utils import DistributedType


    accelerator = getattr(trainer, "accelerator", None)
    state = getattr(accelerator, "state", None)
    dist = getattr(accelerator, "distributed_type", None)
    if getattr(trainer, "is_deepspeed_enabled", False) or dist == DistributedType.DEEPSPEED:
        stage = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None)
        raise ConfigError(f"{who} does not support DeepSpeed (ZeRO stage {stage}): gradients live in DeepSpeed's "
                          "partitioned buffers, not in param.grad; use FSDP2 (accelerate launch --config_file "
                          "configs/accelerate/fsdp.yaml) to shard the model, or DDP")
    plugin = getattr(state, "fsdp_plugin", None)
    if (getattr(trainer, "is_fsdp_enabled", False) or dist == DistributedType.FSDP) and plugin is not None:
        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(f"{who} supports FSDP2 only, got fsdp_version={version}: FSDP1 flattens parameters "
                              "into shards the defense cannot address; set fsdp_version: 2 "
                              "(configs/accelerate/fsdp.yaml)")
    if dist in (DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise ConfigError(f"{who} does not support distributed type {dist.value}; use FSDP2 or DDP")
