"""A check that a defense's signal is really there.

A defense that adds something to training (SafeGrad's alignment gradient, SPARD's safety gradient, Lisa's
proximal term, Booster's, RepNoise's and Vaccine's terms) can lose it without any error: a precision or memory
path that cuts the autograd graph hands back zeros, and the run trains as plain fine-tuning under the defense's
name. :class:`SignalGuard` watches the signal's magnitude over its first observations and stops the run if it is
not finite or if every one of them is exactly zero. Some signals are zero at the very first step by design
(SafeGrad's KL gradient while the adapter is still the identity), so it decides only after ``window`` of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spard.errors import DefenseSignalError

__all__ = ["SignalGuard"]


@dataclass
class SignalGuard:
    """Stop a run whose defense signal is zero at each of its first ``window`` observations, or not finite in
    them. Observations after the window are not checked (a defense may handle a late non-finite step itself)."""

    defense: str
    """The defense's name, as the error names it."""
    signal: str
    """What is observed (``alignment gradient norm``...)."""
    window: int = 3
    """Observations that must not all be zero."""
    seen: int = 0
    nonzero: bool = False

    @property
    def done(self) -> bool:
        """The window has passed."""
        return self.seen >= self.window

    def observe(self, magnitude: float, step: int) -> None:
        """Record one step's signal magnitude (a norm, or an absolute value; the same on every rank)."""
        if self.done:
            return
        self.seen += 1
        if not math.isfinite(magnitude):
            raise DefenseSignalError(
                f"defense {self.defense!r}: the {self.signal} is {magnitude} at step {step}, one of the run's first "
                f"{self.window} observations; stopping instead of training on without the defense")
        if magnitude != 0.0:
            self.nonzero = True
        elif self.seen >= self.window and not self.nonzero:
            raise DefenseSignalError(
                f"defense {self.defense!r}: the {self.signal} is exactly 0 at each of the run's first {self.window} "
                f"observations (up to step {step}): the defense has no effect and the run would be plain "
                "fine-tuning. This happens when a precision or memory path cuts the gradient (e.g. reentrant "
                "gradient checkpointing around torch.autograd.grad); try train.gradient_checkpointing=true or false")
