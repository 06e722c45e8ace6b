"""No alignment-stage defense: the alignment stage is plain LoRA SFT on refusals + benign data."""

from __future__ import annotations

from spard.align_defenses.base import AlignDefense, register


@register
class NoAlignDefense(AlignDefense):
    """Plain refusal SFT (the alignment stage as it always was)."""

    name = "none"
