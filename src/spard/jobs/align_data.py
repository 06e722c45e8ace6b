"""The alignment stage's SFT data: refusals and benign instructions, sampled deterministically, with the packaged
over-refusal evaluation prompts kept out (shared by ``align.method`` sft and dpo)."""

from __future__ import annotations

from spard.args import AlignArgs
from spard.data.build import load_safety_pool, normalise_prompt, sample
from spard.data.records import Record
from spard.data.sources import load_source
from spard.evaluate.tasks.over_refusal import DEFAULT_BENIGN_SETS


def alignment_records(align: AlignArgs) -> list[Record]:
    """``n_safety`` refusals + ``n_benign`` benign instructions, shuffled, deterministic by ``align.seed``.

    Benign instructions that are also prompts of the packaged over-refusal sets (Alpaca is the source of both)
    are left out, so the benign answer rate is measured on prompts the alignment never trained on."""
    safety = sample(load_safety_pool(align.safety_source, align.safety_path, need=align.n_safety),
                    align.n_safety, align.seed)
    benign = benign_alignment_records(align)
    return sample(safety + benign, align.n_safety + align.n_benign, align.seed + 2)


def benign_alignment_records(align: AlignArgs) -> list[Record]:
    """``n_benign`` examples of ``align.benign_source`` whose prompt is in no packaged over-refusal set (those
    measure the benign answer rate); deterministic by ``align.seed``."""
    held_out = {normalise_prompt(r.prompt) for s in DEFAULT_BENIGN_SETS for r in load_source(s, split="test")}
    pool = [r for r in load_source(align.benign_source, kind="benign") if normalise_prompt(r.prompt) not in held_out]
    return sample(pool, align.n_benign, align.seed + 1)
