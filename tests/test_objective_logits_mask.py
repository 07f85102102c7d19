"""The LM objective computes logits only where a target is predicted: same loss and gradients as the
full (B, T, V) logits."""

from __future__ import annotations

import torch
from tiny import save_reference_checkpoint

from qwen2audio import Qwen2AudioModel
from qwen2audio.train.objectives import LMObjective, lm_loss_sum
from qwen2audio.train.records import IGNORE


def test_masked_logits_give_the_full_loss_and_gradients(tmp_path):
    save_reference_checkpoint(tmp_path, "gqa_tied")
    model = Qwen2AudioModel.from_pretrained(tmp_path, dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[1, 9:] = IGNORE
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    labels[2, 10:] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    full_loss, n = lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    full_loss.backward()
    full_grad = model.language_model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    loss, stats = LMObjective(torch.device("cpu"))(model, batch)
    loss.backward()
    assert stats["targets"] == n == int((labels[:, 1:] != IGNORE).sum())
    assert torch.allclose(loss, full_loss, atol=1e-4, rtol=1e-5)
    assert torch.allclose(model.language_model.model.embed_tokens.weight.grad, full_grad, atol=1e-5)
