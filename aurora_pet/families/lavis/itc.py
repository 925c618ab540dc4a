"""BLIP's image–text contrastive loss as LAVIS's `BlipRetrieval.forward` computes it — against the momentum
features and the queues, with momentum distillation — shared by our LAVIS subclasses (video retrieval, the
distilling retrieval model), which encode the visual side differently but treat the text side alike."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["momentum_itc"]


def momentum_itc(model: Any, visual_feat: torch.Tensor, text_feat: torch.Tensor, visual_feat_m: torch.Tensor,
                 text: Any, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_itc = ½ (H(q_v2t, softmax(v·T_mᵀ/τ)) + H(q_t2v, softmax(t·V_mᵀ/τ))), with soft targets
    q = α·softmax(momentum similarities / τ) + (1 − α)·(same-image indicator, normalised), keys = this batch's
    momentum features followed by the queues; then the queues advance (`_dequeue_and_enqueue`).

    Parameters
    ----------
    model : BlipRetrieval
        A LAVIS retrieval model (or subclass) in training: its momentum text encoder and projection, queues,
        temperature.
    visual_feat, text_feat : torch.Tensor
        The online normalised projected features, (B, D).
    visual_feat_m : torch.Tensor
        The momentum visual features, (B, D): computed by the caller after `_momentum_update()` (images and
        videos are encoded differently), so the momentum encoders step once per batch.
    text : tokenizer output
        The captions, as the text encoders take them.
    idx : torch.Tensor
        Image ids, (B, 1).
    alpha : float
        The momentum-distillation weight of this step (LAVIS ramps it).

    Returns
    -------
    torch.Tensor
        The scalar ITC loss.
    """
    idx_all = torch.cat([idx.t(), model.idx_queue.clone().detach()], dim=1)
    pos_idx = torch.eq(idx, idx_all).float()
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    with torch.no_grad():
        visual_feat_m_all = torch.cat([visual_feat_m.t(), model.image_queue.clone().detach()], dim=1)
        text_embeds_m = model.text_encoder_m.forward_text(text).last_hidden_state
        text_feat_m = F.normalize(model.text_proj_m(text_embeds_m[:, 0, :]), dim=-1)
        text_feat_m_all = torch.cat([text_feat_m.t(), model.text_queue.clone().detach()], dim=1)
        v2t_targets = alpha * F.softmax(visual_feat_m @ text_feat_m_all / model.temp, dim=1) \
            + (1 - alpha) * sim_targets
        t2v_targets = alpha * F.softmax(text_feat_m @ visual_feat_m_all / model.temp, dim=1) \
            + (1 - alpha) * sim_targets
    loss_v2t = _soft_cross_entropy(visual_feat @ text_feat_m_all / model.temp, v2t_targets)
    loss_t2v = _soft_cross_entropy(text_feat @ visual_feat_m_all / model.temp, t2v_targets)
    model._dequeue_and_enqueue(visual_feat_m, text_feat_m, idx)
    return (loss_v2t + loss_t2v) / 2


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.sum(F.log_softmax(logits, dim=1) * targets, dim=1).mean()
