"""Train SafeGrad on the tiny model; run alone or under ``torch.distributed.run`` (gloo on CPU).

Usage: ``python ddp_safegrad_worker.py OUTPUT_DIR key=value ...`` (config overrides). Used by
``test_safegrad_ddp.py`` to compare a 2-process DDP run with a single process seeing the same global batches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tokenizer():
    """The word-level tokenizer of ``tests/conftest.py`` (same texts, so the same vocabulary)."""
    from spard.data.sources import load_source
    from spard.testing import tiny_tokenizer

    texts = [m["content"] for name in ("gsm8k", "beavertails", "safety")
             for r in load_source(name)[:300] for m in r.messages]
    return tiny_tokenizer(texts)


def sharp_tiny_model(tok):  # noqa: ANN001, ANN201
    """The tiny Llama with its final norm scaled ×10 (see ``test_safegrad.sharp_tiny_model``)."""
    from spard.testing import tiny_model

    model = tiny_model(tok)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    return model


def record_setup(out: str) -> None:
    """Make rank 0 write what the trainer looked like at setup (world size, wrapping) to ``out/worker.json``."""
    from spard.defenses.safegrad import SafeGrad
    from spard.io import atomic_write_json

    original = SafeGrad.setup

    def setup(self, trainer):  # noqa: ANN001, ANN202
        original(self, trainer)
        if trainer.is_world_process_zero():
            atomic_write_json(Path(out) / "worker.json", {
                "world_size": trainer.args.world_size,
                "distributed_type": trainer.accelerator.distributed_type.value,
                "model_wrapped": type(trainer.model_wrapped).__name__,
            })

    SafeGrad.setup = setup


def main(argv: list[str]) -> None:
    from spard.config import load_config
    from spard.jobs.finetune import train

    # one thread per process: two ranks share the 2 cores; the single-process reference uses the same setting
    torch.set_num_threads(1)
    out, overrides = argv[0], argv[1:]
    cfg = load_config(None, [f"train.output_dir={out}", *overrides])
    record_setup(out)
    tok = tokenizer()
    model = sharp_tiny_model(tok)
    train(cfg, model=model, tokenizer=tok)
    # Every rank saves the LoRA weights it ended with (train() adds the adapter to `model` in place), so the
    # test can check that the ranks applied identical updates and did not drift apart.
    from safetensors.torch import save_file

    lora = {n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    save_file(lora, str(Path(out) / f"lora_rank{os.environ.get('RANK', '0')}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1:])
