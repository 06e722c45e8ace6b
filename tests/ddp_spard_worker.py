"""Worker for tests/test_spard_ddp.py: a short SPARD run on the tiny model, in one process or under torchrun.

    python tests/ddp_spard_worker.py OUT --batch-size 4 --safety-batch-size 2
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_spard_worker.py OUT --batch-size 2 \
        --safety-batch-size 1

Runs one training per projection mode (``OUT/<mode>``) and, on rank 0, writes ``OUT/<mode>/worker.json``:
world size, the class that wrapped the model, and the safety log.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def tiny_tokenizer_like_conftest():
    """The tokenizer of the ``tiny_tok`` fixture (same texts, so the same vocabulary and model size)."""
    from spard.data.sources import load_source
    from spard.testing import tiny_tokenizer

    texts = [m["content"] for name in ("gsm8k", "beavertails", "safety")
             for r in load_source(name)[:300] for m in r.messages]
    return tiny_tokenizer(texts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True, help="per-device utility batch")
    parser.add_argument("--safety-batch-size", type=int, required=True, help="per-device safety batch")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--projections", default="halfspace,reference")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on two cores

    from spard.config import load_config
    from spard.defenses.spard import Spard
    from spard.jobs.finetune import train
    from spard.testing import tiny_model

    seen: dict[str, str] = {}
    setup = Spard.setup

    def recording_setup(self, trainer):  # noqa: ANN001
        seen["wrapped"] = type(trainer.model_wrapped).__name__
        setup(self, trainer)

    Spard.setup = recording_setup
    tok = tiny_tokenizer_like_conftest()
    for projection in args.projections.split(","):
        out = args.out / projection
        cfg = load_config(None, [
            f"train.output_dir={out}", "align.enabled=false", "data.n_train=4", "data.max_length=64",
            f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}", "train.lr=2e-2",
            "train.save_steps=1000", "lora.r=4", "lora.dropout=0", "attack.harmful_ratio=0.5",
            "defense.name=spard", f"defense.projection={projection}", "defense.max_step=0.5", "defense.safety_k=3",
            f"defense.safety_batch_size={args.safety_batch_size}",
        ])
        train(cfg, model=tiny_model(tok), tokenizer=tok)
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if int(os.environ.get("RANK", "0")) == 0:
            log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            summary = {"world_size": world, "wrapped": seen.get("wrapped"),
                       "safety": [{k: v for k, v in r.items() if k.startswith("safety")} for r in log]}
            (out / "worker.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
