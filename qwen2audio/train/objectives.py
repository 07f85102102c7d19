"""Training objectives: next-token loss on target tokens, and DPO (Rafailov et al., sigmoid loss).

Losses are returned as sums with their counts (tokens or pairs): the loop divides by the count of
the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and data
parallelism give the same update as one big batch. `LMObjective` / `DPOObjective` run one batch
through the model (the part of the training step that differs between stages).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import lora as lora_lib
from .data import n_targets
from .records import IGNORE


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token: logits (B, T, V), labels (B, T) -> (B, T-1) log-probs and target mask.

    Position t predicts token t+1; positions whose next label is IGNORE get 0 and mask False.
    """
    targets = labels[:, 1:]
    flat = logits[:, :-1].flatten(0, 1).float()
    # cross_entropy is the fused log_softmax + gather; it gives 0 at ignored positions.
    nll = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(targets.shape), targets != IGNORE


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens, and their count."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum(), int(mask.sum())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) total log-probability of each row's target tokens."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(-1)


@dataclass
class DPOOutput:
    losses: torch.Tensor  # (P,) per pair
    chosen_rewards: torch.Tensor  # (P,) beta * (log pi(y_w) - log ref(y_w)), detached
    rejected_rewards: torch.Tensor  # (P,)

    def sums(self) -> dict[str, float]:
        """Per-step sums (divided by the pair count when logged)."""
        margins = self.chosen_rewards - self.rejected_rewards
        return {"rewards/chosen": float(self.chosen_rewards.sum()), "rewards/rejected": float(self.rejected_rewards.sum()),
                "rewards/margins": float(margins.sum()), "rewards/accuracy": float((margins > 0).float().sum())}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DPOOutput:
    """-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) per pair, from sequence log-probs."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return DPOOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def split_pairs(values: torch.Tensor, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A DPO batch's rows are all chosen, then all rejected."""
    return values[:n_pairs], values[n_pairs:]


__all__ = ["DPOOutput", "dpo_loss", "lm_loss_sum", "sequence_logps", "split_pairs", "token_logprobs"]


# ---- one batch through the model, per stage -------------------------------------------------------
MODEL_INPUTS = ("input_ids", "attention_mask", "input_features", "feature_attention_mask")


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) labels -> the positions whose next token is a target (B, T) bool, and those targets in the mask's
    row-major order: what `logits_of(..., logits_mask)` needs to compute logits only where they are scored."""
    targets = labels[:, 1:]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = targets != IGNORE
    return predicts, targets[targets != IGNORE]


def logits_of(model: nn.Module, batch: dict, device: torch.device, logits_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Through the module's __call__ (so DDP sees the forward): (B, T, V) logits, or (N, V) at the
    positions `logits_mask` (B, T) marks."""
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if logits_mask is not None:
        inputs["logits_mask"] = logits_mask
    return model(**inputs).logits


class LMObjective:
    """Next-token loss on target tokens only (labels are -100 on prompt, audio and non-assistant turns)."""

    count_key = "targets"

    def __init__(self, device: torch.device):
        self.device = device

    def count(self, batch: dict) -> int:
        return n_targets(batch)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        # Logits only where position t predicts a target t+1: a few percent of an audio-heavy sequence,
        # and the (positions x vocabulary) lm_head product dominated short steps.
        predicts, targets = target_positions(batch["labels"].to(self.device))
        logits = logits_of(model, batch, self.device, predicts)
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        return loss_sum, {"loss": float(loss_sum.detach()), "targets": int(predicts.sum())}


class DPOObjective:
    """Sigmoid DPO on (chosen, rejected) rows; the reference is a frozen copy, the adapters switched
    off (LoRA), or log-probs computed once before training (`tables`, by split and example index)."""

    count_key = "pairs"

    def __init__(self, device: torch.device, beta: float, reference: nn.Module | None = None,
                 lora_base: nn.Module | None = None, tables: dict[str, torch.Tensor] | None = None,
                 rpo_alpha: float = 0.0):
        self.device, self.beta, self.rpo_alpha = device, beta, rpo_alpha
        self.reference, self.lora_base, self.tables = reference, lora_base, tables

    def count(self, batch: dict) -> int:
        return batch["n_pairs"]

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tables is not None:
            table = self.tables[batch["split"]][batch["index"]].to(self.device)  # (P, 2)
            return table[:, 0], table[:, 1]
        if self.lora_base is not None:
            with lora_lib.lora_disabled(self.lora_base):
                logits = logits_of(self.lora_base, batch, self.device)
        else:
            logits = logits_of(self.reference, batch, self.device)
        return split_pairs(sequence_logps(logits, batch["labels"].to(self.device)), batch["n_pairs"])

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ref_chosen, ref_rejected = self.reference_logps(batch)
        logp, scored = token_logprobs(logits_of(model, batch, self.device), batch["labels"].to(self.device))
        chosen, rejected = split_pairs(logp.sum(-1), batch["n_pairs"])
        out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        losses, extra = out.losses, {}
        if self.rpo_alpha:
            # RPO (Pang et al., 2024): plain DPO may lower the chosen answer's likelihood as long as the rejected one
            # falls faster, and greedy decoding then drifts; the chosen answer's mean token NLL holds it up.
            chosen_tokens, _ = split_pairs(scored.sum(-1).clamp(min=1), batch["n_pairs"])
            nll = -chosen / chosen_tokens
            losses = losses + self.rpo_alpha * nll
            extra["nll/chosen"] = float(nll.detach().sum())
        loss_sum = losses.sum()
        stats = {"loss": float(loss_sum.detach()), "pairs": batch["n_pairs"], **out.sums(), **extra,
                 "logps/chosen": float(chosen.detach().sum()), "logps/rejected": float(rejected.detach().sum())}
        return loss_sum, stats


@torch.no_grad()
def precompute_reference(model: nn.Module, batches, device: torch.device, size: int, autocast) -> torch.Tensor:
    """(size, 2) reference log-probs (chosen, rejected) of this rank's batches; rows it did not see are 0."""
    table = torch.zeros(size, 2, dtype=torch.float64)
    seen = torch.zeros(size, dtype=torch.float64)
    for batch in batches:
        with autocast():
            logits = logits_of(model, batch, device)
        chosen, rejected = split_pairs(sequence_logps(logits, batch["labels"].to(device)), batch["n_pairs"])
        table[batch["index"], 0] = chosen.double().cpu()
        table[batch["index"], 1] = rejected.double().cpu()
        seen[batch["index"]] = 1
    return torch.cat([table, seen[:, None]], 1)  # the loop sums these over ranks, then divides by `seen`




__all__ = ["DPOObjective", "DPOOutput", "LMObjective", "dpo_loss", "lm_loss_sum", "logits_of", "precompute_reference",
           "sequence_logps", "split_pairs", "target_positions", "token_logprobs"]
