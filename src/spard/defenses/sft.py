"""Plain LoRA supervised fine-tuning: the undefended baseline."""

from __future__ import annotations

from spard.defenses.base import Defense, register


@register
class SFT(Defense):
    """No defense: fine-tune on the user's (possibly poisoned) data as given."""

    name = "sft"
