"""Worker for tests/test_fsdp.py: short defended runs on the tiny model, in one process or under torchrun + FSDP2.

    python tests/fsdp_worker.py OUT --batch-size 4 --safety-batch-size 2
    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT --fsdp --batch-size 2 \
        --safety-batch-size 1 --interrupt

With ``--fsdp`` the FSDP settings come from the environment, as ``accelerate launch --config_file
configs/accelerate/fsdp.yaml`` sets them (``ACCELERATE_USE_FSDP``, ``FSDP_*``; the test derives them from that
file). Each run (``OUT/<name>``) writes, on rank 0, ``worker.json``: world size, the engine accelerate chose,
whether the trainable parameters were DTensors and the model an ``FSDPModule`` (the proof that FSDP ran), and
the defense's log. ``--fsdp`` also checks :mod:`spard.distributed`'s reductions on a ``fully_shard`` model
directly (``OUT/reductions.json``).

The runs: every ``--cases`` case for ``--steps`` steps (spard's fine-tuning job, no checkpoint); every
``--resume-cases`` case for ``RESUME_STEPS`` steps with a checkpoint every ``RESUME_SAVE`` (``OUT/<case>-straight``)
and, with ``--interrupt``, the same run cut after ``checkpoint-RESUME_SAVE`` (a copy of the run directory as it was
then) and resumed with ``train.resume=true`` (``OUT/<case>-resumed``); with ``--hf``, a plain
``transformers.Trainer`` with ``spard.hf.DefenseCallback("spard")`` (``OUT/hf_spard``).

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
import shutil
from pathlib import Path

import torch

CASES = {
    "sft": ["defense.name=sft"],
    "spard_halfspace": ["defense.name=spard", "defense.projection=halfspace", "defense.max_step=0.5",
                        "defense.safety_k=3"],
    "spard_reference": ["defense.name=spard", "defense.projection=reference", "defense.safety_k=3"],
    "safegrad": ["defense.name=safegrad", "defense.alignment_examples=6", "defense.alignment_batch_size=2"],
    # 2 task examples + 2 added refusals: the global batch (4) is still the whole set
    "safeinstr": ["defense.name=safeinstr", "data.n_train=2", "defense.safety_examples=2"],
    "ptst": ["defense.name=ptst"],
    # states A F F (A F F A over 4 steps): steps 1 and 2 pull toward the anchor taken at step 1, a checkpoint after
    # step 2 holds it, and the resumed step 2 needs it
    "lisa": ["defense.name=lisa", "defense.align_steps=1", "defense.finetune_steps=2", "defense.rho=1.0",
             "defense.proximal_warmup_ratio=0", "defense.alignment_examples=6"],
    # "unaligned" model: the tiny model with seed 1 (written by the worker), the aligned one seed 0
    "safelora": ["defense.name=safelora", "defense.num_proj_layers=3"],
}
RESUME_STEPS, RESUME_SAVE = 4, 2
"""The resume runs: this many steps, a checkpoint every RESUME_SAVE steps; the cut run resumes from the first."""
HF_SAFETY_ROWS = 40
"""Safety pool of the DefenseCallback run, given in code (embedding the packaged pool would take most of the time)."""


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


def worker_parser(cases: dict, *, batch_help: str, hang_seconds: float) -> argparse.ArgumentParser:
    """The flags every multi-process test worker takes: OUT, the per-device batch, the cases, --fsdp and the hang
    timeout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True, help=batch_help)
    parser.add_argument("--cases", default=",".join(cases))
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--hang-seconds", type=float, default=hang_seconds, help="dump every stack and exit after this")
    return parser


def start_worker(args: argparse.Namespace) -> None:
    """Arm the hang dump (a collective mismatch hangs: show where), one thread per rank (two ranks on two cores)
    and, with --fsdp, the test-only FSDP-on-CPU patch."""
    faulthandler.dump_traceback_later(args.hang_seconds, exit=True)
    torch.set_num_threads(1)
    if args.fsdp:
        allow_fsdp_on_cpu()


def check_reductions(out: Path) -> None:
    """spard.distributed's whole-tensor reductions on a fully_shard model equal those of the gathered tensors."""
    from torch.distributed.fsdp import fully_shard

    from spard.defenses.lisa import proximal_term
    from spard.distributed import copy_whole_, full_tensor, full_tensors, is_sharded, per_tensor_dots, shard_like
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
    # a whole tensor (the same on every rank) laid out as a shard and written into one
    target = torch.randn(5, 6)
    laid_out = full_tensor(shard_like(target, model[0].weight))
    copy = model[0].weight.detach().clone()
    copy_whole_(copy, target * 2)
    # Lisa's proximal term on the shards: whole value, and each shard's gradient rho (p - a) directly
    params = [model[0].weight, model[1].weight, plain.requires_grad_()]
    anchors = [p.detach() - 0.1 * (i + 1) for i, p in enumerate(params)]
    prox = proximal_term(params, anchors, rho=2.0)
    prox.backward()
    whole_params = list(full_tensors(dict(enumerate(params))).values())
    whole_anchors = list(full_tensors(dict(enumerate(anchors))).values())
    grads = list(full_tensors({i: p.grad for i, p in enumerate(params)}).values())
    result = {
        "sharded": [is_sharded(t) for t in a],
        "dots_err": float((dots - expect).abs().max()),
        "norm_err": abs(global_grad_norm(a) - global_grad_norm(whole_a)),
        "flat_dot_err": abs(float(flat_dot(a, b)) - float(flat_dot(whole_a, whole_b))),
        "projected_err": max(float((x - y).abs().max()) for x, y in
                             zip(whole_projected, project_conflicting(whole_a, [-x for x in whole_b]))),
        "scaled_err": max(float((x - y).abs().max()) for x, y in
                          zip(scaled, reference_scaled_grads(whole_a, 2.0, 0.2, 1.0))),
        "shard_like_err": max(float((laid_out - target).abs().max()),
                              float((full_tensor(copy) - target * 2).abs().max())),
        "prox_err": abs(float(prox) - float(proximal_term(whole_params, whole_anchors, rho=2.0))),
        "prox_grad_err": max(float((g - 2.0 * (p - x)).abs().max())
                             for g, p, x in zip(grads, whole_params, whole_anchors)),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "reductions.json").write_text(json.dumps(result))


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def cut_copy(straight: Path, resumed: Path, step: int) -> None:
    """``resumed``: the run directory of ``straight`` as it was right after its ``checkpoint-<step>`` (a run
    interrupted then): later checkpoints and the final results left out (metrics rows after it are dropped by the
    resume itself)."""
    from spard.rundir import FINAL_DIR, FINAL_UNPROJECTED_DIR, TRAIN_RESULT_FILE, checkpoint_step, checkpoints

    later = {c.name for c in checkpoints(straight) if checkpoint_step(c) > step}
    shutil.copytree(straight, resumed, ignore=lambda d, names: [
        n for n in names if Path(d) == straight and (n in later or n in (FINAL_DIR, FINAL_UNPROJECTED_DIR,
                                                                         TRAIN_RESULT_FILE))])


def run_hf(out: Path, tok, args: argparse.Namespace) -> None:  # noqa: ANN001
    """A user's own ``transformers.Trainer`` (its own arguments, no spard trainer) with ``DefenseCallback``."""
    from transformers import Trainer, TrainingArguments

    from spard.args import LoraArgs
    from spard.data.chat import collate, tokenize_records
    from spard.data.sources import load_source
    from spard.hf import DefenseCallback
    from spard.testing import tiny_model
    from spard.trainer import add_lora

    records = load_source("gsm8k")[:2] + load_source("beavertails")[:2]  # 4: the global batch is the whole set
    features, _ = tokenize_records(tok, records, 64)
    features = [{**f, "messages": list(r.messages)} for f, r in zip(features, records)]
    safety = [{"prompt": r.prompt, "response": r.response} for r in load_source("safety")[:HF_SAFETY_ROWS]]
    callback = DefenseCallback("spard", max_length=64, safety_k=3, safety_batch_size=args.safety_batch_size,
                               safety_data=safety)
    trainer = Trainer(
        model=add_lora(tiny_model(tok), LoraArgs(r=4, dropout=0.0), seed=0), processing_class=tok,
        train_dataset=features, data_collator=lambda batch: collate(batch, tok.pad_token_id), callbacks=[callback],
        args=TrainingArguments(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                               max_steps=args.steps, learning_rate=2e-2, seed=0, logging_steps=1, save_steps=1000,
                               report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True))
    trainer.train()
    if trainer.is_fsdp_enabled:  # HF's way to save whole weights from a sharded model
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out / "final"))
    if is_rank0():
        rows = [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in trainer.state.log_history]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if "loss" in r))


def main() -> None:
    parser = worker_parser(CASES, batch_help="per-device utility batch", hang_seconds=300.0)
    parser.add_argument("--safety-batch-size", type=int, required=True, help="per-device SPARD safety batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume-cases", default="", help="cases also run with checkpoints (and resumed)")
    parser.add_argument("--interrupt", action="store_true", help="resume each --resume-cases run from a cut copy")
    parser.add_argument("--hf", action="store_true", help="also run DefenseCallback in a plain Trainer")
    args = parser.parse_args()
    start_worker(args)

    from ddp_spard_worker import tiny_tokenizer_like_conftest
    from spard.config import load_config
    from spard.jobs.finetune import train
    from spard.testing import save_tiny_chat_model, tiny_model
    from spard.trainer import DefenseHookCallback

    seen: dict[str, object] = {}
    on_train_begin = DefenseHookCallback.on_train_begin

    def recording(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
        from torch.distributed.fsdp import FSDPModule

        from spard.distributed import is_sharded

        trainer = self.trainer
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        seen.update(engine=str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
                    fsdp_module=isinstance(trainer.model, FSDPModule), start_step=state.global_step,
                    sharded=bool(trainable) and all(is_sharded(p) for p in trainable))
        return on_train_begin(self, args, state, control, **kwargs)

    DefenseHookCallback.on_train_begin = recording
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fsdp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        check_reductions(args.out)
    tok = tiny_tokenizer_like_conftest()
    unaligned = args.out / "unaligned"
    if is_rank0():
        save_tiny_chat_model(unaligned, tok, seed=1)
    barrier()

    def report(out: Path) -> None:
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if is_rank0():
            log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            (out / "worker.json").write_text(json.dumps({"world_size": world, **seen, "log": log}))

    def run(out: Path, case: str, steps: int, save_steps: int, *extra: str) -> None:
        seen.clear()
        cfg = load_config(None, [
            f"train.output_dir={out}", "align.enabled=false", "data.n_train=4", "data.max_length=64",
            f"train.batch_size={args.batch_size}", f"train.max_steps={steps}", "train.lr=2e-2",
            f"train.save_steps={save_steps}", "lora.r=4", "lora.dropout=0", "attack.harmful_ratio=0.5",
            *CASES[case], *([f"defense.safety_batch_size={args.safety_batch_size}"] if "spard" in case else []),
            *([f"defense.unaligned_model={unaligned}"] if case == "safelora" else []), *extra,
        ])
        train(cfg, model=tiny_model(tok), tokenizer=tok)
        report(out)

    for case in filter(None, args.cases.split(",")):
        run(args.out / case, case, args.steps, 1000)
    for case in filter(None, args.resume_cases.split(",")):
        straight, resumed = args.out / f"{case}-straight", args.out / f"{case}-resumed"
        run(straight, case, RESUME_STEPS, RESUME_SAVE)
        if args.interrupt:
            if is_rank0():
                cut_copy(straight, resumed, RESUME_SAVE)
            barrier()
            run(resumed, case, RESUME_STEPS, RESUME_SAVE, "train.resume=true")
    if args.hf:
        seen.clear()
        run_hf(args.out / "hf_spard", tok, args)
        report(args.out / "hf_spard")


if __name__ == "__main__":
    main()
