"""RepNoise (Rosati et al., NeurIPS 2024, arXiv 2405.14577): representation noising.

Loss per step (reference: domenicrosati/representation-noising ``representation_noising/loss.py``
``rep_noise_loss``):

    L = CE(harmless) + β · (1/L) Σ_l MMD(mlp_l(harmful) ⊙ M, N(0, I) ⊙ M) − α · log(1 + H)

- ``mlp_l(harmful)``: the output of decoder layer ``l``'s MLP sub-module on the harmful batch; each
  sequence (T·H values, masked by ``M``) is one sample of the MMD, against masked standard-normal noise;
  the MMD is the reference's biased RBF estimator with five bandwidths around the mean pairwise squared
  distance (detached).
- ``H``: the harmful CE of the final logits plus the CE of a logit-lens readout ``lm_head(norm(h_j))`` of
  every hidden state ``h_j`` (embeddings included; the last one is already normed, as in the reference),
  summed and divided by the number of hidden states: ``L + 2`` terms over ``L + 1``, as the reference does.
  ``−α log(1 + H)`` raises the harmful loss with a gradient that fades as it grows.
- ``CE(harmless)`` is the trainer's loss on the alignment batch (refusals + benign data).

Two forwards per step (alignment batch, harmful batch with hidden states) and one backward.

Under DDP and FSDP2 every rank draws the same harmful batch, so the added terms are alike on all ranks and the
data-parallel average adds them once, as one process does. Under FSDP2 the readouts reuse the final norm and
head that the forward left gathered (accelerate shards them with ``reshard_after_forward=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spard.align_defenses.base import HarmfulDataArgs, HarmfulDataDefense, layer_modules, mean_over_ranks, register
from spard.args import check_range
from spard.data.chat import IGNORE_INDEX
from spard.signal_guard import SignalGuard

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import Trainer

# torch is imported where it runs, so resolving a config that names this defense does not load it.

__all__ = ["RepNoise", "RepNoiseArgs", "mmd_rbf", "noise_mmd", "masked_ce", "layerwise_harmful_loss",
           "repnoise_loss"]


@dataclass
class RepNoiseArgs(HarmfulDataArgs):
    name: str = "repnoise"
    """Alignment defense name."""
    alpha: float = 1.0
    """α, weight of the ascent term ``−log(1 + H)`` (reference ``rep_noise_loss`` default and demo: 1; the
    Booster repository's RepNoise runs use 0.1)."""
    beta: float = 0.001
    """β, weight of the noise (MMD) term (reference: 0.001)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("alpha", self.alpha, 0.0)
        check_range("beta", self.beta, 0.0)


def mmd_rbf(x: Tensor, y: Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> Tensor:
    """Biased MMD² estimate between samples ``x`` and ``y`` (rows), with a sum of ``kernel_num`` Gaussian
    kernels ``exp(−‖a−b‖² / bw_k)``, ``bw_k = bw · kernel_mul^(k − kernel_num//2)`` and ``bw`` the mean
    off-diagonal squared distance of the pooled samples, detached (the reference's ``MMD_loss``)."""
    import torch

    z = torch.cat([x, y]).float()
    n = z.shape[0]
    # ‖a − b‖² from the Gram matrix: memory O(n · dim), where the reference's pairwise differences take
    # O(n² · dim) (sequences of T·H values, every layer kept for backward); the diagonal is exactly 0
    sq = (z * z).sum(1)
    off_diagonal = 1.0 - torch.eye(n, dtype=z.dtype, device=z.device)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0) * off_diagonal
    bandwidth = d2.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-d2 / (bandwidth * kernel_mul**i)) for i in range(kernel_num))
    b = x.shape[0]
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()  # type: ignore[index]


def noise_mmd(activations: Sequence[Tensor], mask: Tensor, noise: Sequence[Tensor] | None = None) -> Tensor:
    """Mean over layers of ``mmd_rbf`` between each layer's masked activations ``[B, T, H]`` and masked
    standard-normal noise, one sample per sequence (flattened). ``noise`` (same shapes) defaults to fresh
    ``randn_like`` draws; tests pass it."""
    import torch

    m = mask[..., None].to(activations[0].dtype)
    total = activations[0].new_zeros((), dtype=torch.float32)
    for i, act in enumerate(activations):
        eps = torch.randn_like(act) if noise is None else noise[i]
        total = total + mmd_rbf((act * m).flatten(1), (eps * m).flatten(1))
    return total / len(activations)


def masked_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100 (HF's causal-LM loss)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def layerwise_harmful_loss(logits: Tensor, hidden_states: Sequence[Tensor], readout: Any, labels: Tensor) -> Tensor:
    """``H = (CE(logits) + Σ_j CE(readout(h_j))) / len(hidden_states) + 1``: the reference's layer-averaged
    harmful loss plus one (so ``log`` of it is >= 0). ``readout(h)`` is ``lm_head(norm(h))``.

    The readouts run only at the positions that predict an answer token: the others have label -100 and add
    nothing to a CE, and one vocabulary projection per hidden state is most of this loss's cost."""
    import torch.nn.functional as F

    total = masked_ce(logits, labels)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    answer_targets = targets[keep]
    for h in hidden_states:
        total = total + F.cross_entropy(readout(h[:, :-1][keep]).float(), answer_targets)
    return total / len(hidden_states) + 1


def repnoise_loss(harmless_loss: Tensor, noise: Tensor, harmful: Tensor, alpha: float, beta: float) -> Tensor:
    """``harmless + β · noise − α · log(harmful)`` (``harmful`` is the ``H`` above, already ``+ 1``)."""
    import torch

    return harmless_loss + beta * noise - alpha * torch.log(harmful)


def _backbone_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The final norm of a causal LM's backbone (``model.model.norm`` in Llama-like models, through PEFT)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix, None)
    norm = getattr(backbone, "norm", None)
    if norm is None:
        raise AttributeError(f"repnoise: cannot find the final norm of {type(base).__name__} "
                             f"(expected .{base.base_model_prefix}.norm)")
    return norm


@register
class RepNoise(HarmfulDataDefense):
    """Align on refusals while pushing harmful inputs' MLP representations toward Gaussian noise."""

    name = "repnoise"
    Args = RepNoiseArgs
    args: RepNoiseArgs

    def __init__(self, args: RepNoiseArgs) -> None:
        super().__init__(args)
        self.noise_guard = SignalGuard(self.name, "noise (MMD) term, as a differentiable value,")
        self.harmful_guard = SignalGuard(self.name, "harmful-loss term, as a differentiable value,")

    def setup(self, trainer: Trainer) -> None:
        from spard.checkpointing import refuse_reentrant

        refuse_reentrant(trainer.model, "align.defense.name='repnoise'", "the MLP activations its noise term is "
                         "computed on carry no gradient there")
        self.noise_guard = SignalGuard(self.name, "noise (MMD) term, as a differentiable value,")
        self.harmful_guard = SignalGuard(self.name, "harmful-loss term, as a differentiable value,")
        super().setup(trainer)

    def harmful_terms(self, model: torch.nn.Module, batch: dict[str, Tensor], noise: Sequence[Tensor] | None = None
                      ) -> tuple[Tensor, Tensor]:
        """The noise MMD and the layer-averaged harmful loss ``H`` of ``batch`` under ``model``. The mask
        of both is the harmful answer's tokens (``labels != -100``)."""
        mlps = layer_modules(model, "mlp")
        acts: list[Tensor | None] = [None] * len(mlps)

        def recorder(i: int):  # noqa: ANN202
            def hook(module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
                acts[i] = output
            return hook

        handles = [m.register_forward_hook(recorder(i)) for i, m in enumerate(mlps)]
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        noise_term = noise_mmd(acts, mask, noise)  # type: ignore[arg-type]
        head, norm = model.get_output_embeddings(), _backbone_norm(model)
        harmful = layerwise_harmful_loss(out.logits, out.hidden_states, lambda h: head(norm(h)), labels)
        return noise_term, harmful

    def loss(self, trainer: Trainer, model: torch.nn.Module, inputs: dict[str, Tensor],
             loss: Tensor, outputs: Any) -> Tensor:
        if not model.training:
            return loss
        batch = self.harmful_batch(trainer)
        with trainer.accelerator.autocast():
            noise_term, harmful = self.harmful_terms(trainer.model, batch)
        total = repnoise_loss(loss, noise_term, harmful, self.args.alpha, self.args.beta)
        step = trainer.state.global_step + 1
        # a term that does not require grad adds nothing to the step (a cut graph): observed as 0
        if self.args.beta > 0:
            self.noise_guard.observe(abs(float(noise_term.detach())) if noise_term.requires_grad else 0.0, step)
        if self.args.alpha > 0:
            self.harmful_guard.observe(abs(float(harmful.detach())) if harmful.requires_grad else 0.0, step)
        # the harmful terms are alike on every rank (one harmful batch for all); the alignment loss is each rank's
        # share of its batch, averaged so the log shows the whole batch's loss
        harmless = mean_over_ranks([float(loss.detach())], trainer.args.device)[0]
        self.last = {"repnoise_harmless_loss": harmless, "repnoise_mmd": float(noise_term.detach()),
                     "repnoise_harmful_loss": float(harmful.detach()) - 1.0}
        return total
