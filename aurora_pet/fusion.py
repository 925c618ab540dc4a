"""Informative Context Enhancement (ICE) and Gated Query Transformation (GQT).

Both act at a *fusion site*: a BERT-style cross-attention module whose input T (B×L×d) is the text
(query) features of the layer and whose output O (B×L×d) is the fused features. With A the additive
self-attention mask that the layer passes to its cross-attention (padding, and causality in a decoder):

    GQT:  T̃ = γ ⊙ T + β,   g = σ([O; T̃]·w_g + b_g) (one gate per token),   O' = O + g ⊙ T̃
    ICE:  C = softmax(O' Tᵀ / √d + A) T,                                   O'' = O' + α ⊙ C

γ = β = α = 0 at initialisation, so O'' = O exactly; α, β, γ get gradients at the first step, w_g and
b_g from the second (once T̃ ≠ 0). Only the sample's own tokens enter (no batch statistics, nothing
about labels or about which image the text is paired with), the computation is the same in training
and evaluation, and each site holds O(d) parameters: α (d) for ICE; γ, β (d each), w_g (2d), b_g (1)
for GQT.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class InformativeContextEnhancement(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(d))

    def forward(self, fused: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = fused @ text.transpose(-1, -2) / math.sqrt(text.shape[-1])
        if mask is not None:
            scores = scores + _as_scores_mask(mask)
        context = torch.softmax(scores, dim=-1) @ text
        return fused + self.alpha * context


class GatedQueryTransformation(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(d))
        self.beta = nn.Parameter(torch.zeros(d))
        self.gate = nn.Linear(2 * d, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, fused: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        query = self.gamma * text + self.beta
        gate = torch.sigmoid(self.gate(torch.cat([fused, query], dim=-1)))
        return fused + gate * query


class FusionSite(nn.Module):
    """ICE and/or GQT for one cross-attention module, applied by a forward hook on it."""

    def __init__(self, d: int, ice: bool, gqt: bool) -> None:
        super().__init__()
        self.gqt = GatedQueryTransformation(d) if gqt else None
        self.ice = InformativeContextEnhancement(d) if ice else None

    def forward(self, fused: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.gqt is not None:
            fused = self.gqt(fused, text)
        if self.ice is not None:
            fused = self.ice(fused, text, mask)
        return fused


def cross_attention_io(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, attention_mask) of a BERT-style attention call, positional or by keyword."""
    text = args[0] if args else kwargs["hidden_states"]
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    return text, mask


def _as_scores_mask(mask: torch.Tensor) -> torch.Tensor:
    """BERT's extended mask is (B, 1, 1, L) or (B, 1, L, L); scores are (B, L, L)."""
    return mask[:, 0] if mask.dim() == 4 else mask
