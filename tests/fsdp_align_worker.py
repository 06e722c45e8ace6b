"""Worker for tests/test_fsdp_align.py: short alignment-stage runs on the tiny model, in one process or under
torchrun + FSDP2.

    python tests/fsdp_align_worker.py OUT --batch-size 8
    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_align_worker.py OUT --fsdp --batch-size 4 \
        --again none

Each case runs :func:`spard.jobs.align.align` with ``align.output_dir=OUT/<case>``. Every rank writes
``OUT/<case>/worker-rank<r>.json`` (what its ``align`` returned, whether it trained, when it returned); rank 0 also
writes ``OUT/<case>/worker.json``: world size, the engine accelerate chose, whether the trainable parameters were
DTensors and the model an ``FSDPModule`` when training began (the proof that FSDP ran), the wrapper class, the
training log and metrics. ``--again CASE`` aligns CASE once more at the end (``again-rank<r>.json``: it must come
from the cache). ``OUT/started-rank<r>`` marks that a rank is about to align (the test holds the first case's
cache lock until both exist).

With ``--fsdp`` the FSDP settings come from the environment, as ``accelerate launch --config_file
configs/accelerate/fsdp.yaml`` sets them (the test derives them from that file), and accelerate's CPU fallback to
DDP is lifted by ``tests/fsdp_worker.py::allow_fsdp_on_cpu`` (test-only). Cases named ``*_ddp`` run in the same
launch as DDP (``ACCELERATE_USE_FSDP=false`` while they train).
"""

from __future__ import annotations

import json
import os
import time
import traceback

import torch

HARMFUL = ["align.defense.n_harmful=4", "align.defense.harmful_batch_size=2"]
FULL = ["align.full_finetune=true", "align.lr=2e-3"]
DPO = ["align.method=dpo", "align.n_benign=0", "align.n_safety=8"]
CASES = {
    "none": ["align.defense.name=none"],
    "full": ["align.defense.name=none", *FULL],
    "booster": ["align.defense.name=booster", *HARMFUL],
    "booster_full": ["align.defense.name=booster", *HARMFUL, *FULL],
    "repnoise": ["align.defense.name=repnoise", *HARMFUL],
    "vaccine": ["align.defense.name=vaccine"],
    "vaccine_ddp": ["align.defense.name=vaccine"],
    "dpo": DPO,
    "dpo_full": [*DPO, *FULL],
}


def main() -> None:
    from fsdp_worker import start_worker, worker_parser

    parser = worker_parser(CASES, batch_help="per-device alignment batch", hang_seconds=240.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--again", default="", help="a case to align once more at the end (from the cache)")
    parser.add_argument("--override", action="append", default=[], help="a config override for every case")
    args = parser.parse_args()
    start_worker(args)

    from accelerate.state import AcceleratorState
    from transformers.trainer_callback import CallbackHandler

    from ddp_spard_worker import tiny_tokenizer_like_conftest
    from spard.config import load_config
    from spard.jobs.align import align
    from spard.testing import tiny_model
    from spard.trainer import DefenseHookCallback

    seen: dict[str, object] = {}
    on_train_begin = CallbackHandler.on_train_begin

    def recording(self, args, state, control):  # noqa: ANN001
        from torch.distributed.fsdp import FSDPModule

        from spard.distributed import is_sharded

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        trainer = next((c.trainer for c in self.callbacks if isinstance(c, DefenseHookCallback)), None)
        seen.update(engine=str(AcceleratorState().distributed_type).rsplit(".", 1)[-1],
                    fsdp_module=isinstance(self.model, FSDPModule),
                    sharded=bool(trainable) and all(is_sharded(p) for p in trainable),
                    wrapped=None if trainer is None else type(trainer.model_wrapped).__name__)
        return on_train_begin(self, args, state, control)

    CallbackHandler.on_train_begin = recording
    args.out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    tok = tiny_tokenizer_like_conftest()
    (args.out / f"started-rank{rank}").touch()  # the test may hold the first case's cache lock until both started
    runs = [(case, "worker") for case in args.cases.split(",")] + ([(args.again, "again")] if args.again else [])
    for case, record in runs:
        out = args.out / case
        seen.clear()
        if args.fsdp:  # the "_ddp" cases run the same launch as DDP: accelerate reads this when the Trainer starts
            os.environ["ACCELERATE_USE_FSDP"] = "false" if case.endswith("_ddp") else "true"
        cfg = load_config(None, [
            f"align.output_dir={out}", "align.n_safety=4", "align.n_benign=4", "align.max_length=64",
            f"align.batch_size={args.batch_size}", f"align.epochs={args.epochs}", "align.lr=2e-2",
            "align.lora_r=4", "align.lora_dropout=0", *CASES[case], *args.override,
        ])
        try:
            result = align(cfg, model=tiny_model(tok), tokenizer=tok)
        except Exception:
            (args.out / f"{case}-error-rank{rank}.txt").write_text(traceback.format_exc())
            raise
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        returned = {"model_dir": str(result.model_dir), "cached": result.cached, "trained": bool(seen),
                    "time": time.time()}
        (out / f"{record}-rank{rank}.json").write_text(json.dumps(returned))
        if rank == 0 and record == "worker":
            log = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()] \
                if (out / "run" / "metrics.jsonl").is_file() else []
            summary = {"world_size": world, **seen, "log": log, "metrics": result.metrics}
            (out / "worker.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
