"""Worker for tests/test_fsdp.py: short defended runs on the tiny model, in one process or under torchrun + FSDP2.

    python tests/fsdp_worker.py OUT --batch-size 4 --safety-batch-size 2
    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT --fsdp --batch-size 2 \
        --safety-batch-size 1

With ``--fsdp`` the FSDP settings come from the environment, as ``accelerate launch --config_file
configs/accelerate/fsdp.yaml`` sets them (``ACCELERATE_USE_FSDP``, ``FSDP_*``; the test derives them from that
file). Each case (``OUT/<case>``) writes, on rank 0, ``worker.json``: world size, the engine accelerate chose,
whether the trainable parameters were DTensors and the model an ``FSDPModule`` (the proof that FSDP ran), and
the defense's log. ``--fsdp`` also checks :mod:`spard.distributed`'s reductions on a ``fully_shard`` model
directly (``OUT/reductions.json``).

TEST-ONLY PATCH (``allow_fsdp_on_cpu``): accelerate 1.15 turns an FSDP request into FSDP only for accelerator
devices (``AcceleratorState.__init__`` promotes MULTI_GPU/XPU/NPU/... to FSDP, never MULTI_CPU), so on a CPU the
HF Trainer silently runs DDP. torch's FSDP2 itself runs on CPU with gloo; the patch makes that one promotion for
MULTI_CPU too (same three assignments accelerate makes for GPUs). Nothing else of accelerate or the Trainer is
changed, so the Trainer's real FSDP path (fsdp2_prepare_model, FSDP gradient clipping, FSDP checkpointing) runs.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
from pathlib import Path

import torch

CASES = {
    "sft": ["defense.name=sft"],
    "spard_halfspace": ["defense.name=spard", "defense.projection=halfspace", "defense.max_step=0.5",
                        "defense.safety_k=3"],
    "spard_reference": ["defense.name=spard", "defense.projection=reference", "defense.safety_k=3"],
    "safegrad": ["defense.name=safegrad", "defense.alignment_examples=6", "defense.alignment_batch_size=2"],
}


def allow_fsdp_on_cpu() -> None:
    """Test-only: let accelerate select FSDP for a multi-process CPU (gloo) run (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def check_reductions(out: Path) -> None:
    """spard.distributed's whole-tensor reductions on a fully_shard model equal those of the gathered tensors."""
    from torch.distributed.fsdp import fully_shard

    from spard.distributed import full_tensors, is_sharded, per_tensor_dots
    from spard.projection import global_grad_norm, reference_scaled_grads
    from spard.surgery import flat_dot, project_conflicting

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))  # 5 rows: uneven shards
    fully_shard(model[0])
    fully_shard(model)
    plain = torch.randn(4)  # a replicated (plain) tensor mixed in: must not be summed over ranks
    a = [model[0].weight, model[1].weight, model[1].bias, plain]
    b = [p * 2 - 1 for p in a]
    whole_a = list(full_tensors(dict(enumerate(a))).values())
    whole_b = list(full_tensors(dict(enumerate(b))).values())
    dots = per_tensor_dots(a, b)
    expect = torch.stack([torch.sum(x * y) for x, y in zip(whole_a, whole_b)])
    neg = [-x for x in b]
    projected = project_conflicting(a, neg)
    whole_projected = list(full_tensors(dict(enumerate(projected))).values())
    scaled = list(full_tensors(dict(enumerate(reference_scaled_grads(a, 2.0, 0.2, 1.0)))).values())
    result = {
        "sharded": [is_sharded(t) for t in a],
        "dots_err": float((dots - expect).abs().max()),
        "norm_err": abs(global_grad_norm(a) - global_grad_norm(whole_a)),
        "flat_dot_err": abs(float(flat_dot(a, b)) - float(flat_dot(whole_a, whole_b))),
        "projected_err": max(float((x - y).abs().max()) for x, y in
                             zip(whole_projected, project_conflicting(whole_a, [-x for x in whole_b]))),
        "scaled_err": max(float((x - y).abs().max()) for x, y in
                          zip(scaled, reference_scaled_grads(whole_a, 2.0, 0.2, 1.0))),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "reductions.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True, help="per-device utility batch")
    parser.add_argument("--safety-batch-size", type=int, required=True, help="per-device SPARD safety batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--hang-seconds", type=float, default=240.0, help="dump every stack and exit after this")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.hang_seconds, exit=True)  # a collective mismatch hangs: show where
    torch.set_num_threads(1)  # two ranks on two cores
    if args.fsdp:
        allow_fsdp_on_cpu()

    from ddp_spard_worker import tiny_tokenizer_like_conftest
    from spard.config import load_config
    from spard.jobs.finetune import train
    from spard.testing import tiny_model
    from spard.trainer import DefenseHookCallback

    seen: dict[str, object] = {}
    on_train_begin = DefenseHookCallback.on_train_begin

    def recording(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
        from torch.distributed.fsdp import FSDPModule

        from spard.distributed import is_sharded

        trainer = self.trainer
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        seen.update(engine=str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
                    fsdp_module=isinstance(trainer.model, FSDPModule),
                    sharded=bool(trainable) and all(is_sharded(p) for p in trainable))
        return on_train_begin(self, args, state, control, **kwargs)

    DefenseHookCallback.on_train_begin = recording
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fsdp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        check_reductions(args.out)
    tok = tiny_tokenizer_like_conftest()
    for case in args.cases.split(","):
        out = args.out / case
        cfg = load_config(None, [
            f"train.output_dir={out}", "align.enabled=false", "data.n_train=4", "data.max_length=64",
            f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}", "train.lr=2e-2",
            "train.save_steps=1000", "lora.r=4", "lora.dropout=0", "attack.harmful_ratio=0.5",
            *CASES[case], *([f"defense.safety_batch_size={args.safety_batch_size}"] if "spard" in case else []),
        ])
        train(cfg, model=tiny_model(tok), tokenizer=tok)
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if int(os.environ.get("RANK", "0")) == 0:
            log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            summary = {"world_size": world, **seen, "log": log}
            (out / "worker.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
