"""Informative Context Enhancement (ICE) and Gated Query Transformation (GQT).

Both act at a *fusion site*: a BERT-style cross-attention module whose input T (B×L×d) is the text
(query) features of the layer and whose output O (B×L×d) is the fused features. With A the additive
self-attention mask of the layer's text (padding, and causality in a decoder; where the model family
finds it is the family's business, see `aurora_pet.families`):

    GQT:  T̃ = γ ⊙ T + β,   g = σ([O; T̃]·w_g + b_g) (one gate per token),   O' = O + g ⊙ T̃
    ICE:  C = softmax(O' Tᵀ / √d + A) T,                                   O'' = O' + α ⊙ C

γ = β = α = 0 at initialisation, so O'' = O exactly; α, β, γ get gradients at the first step, w_g and
b_g from the second (once T̃ ≠ 0). Only the sample's own tokens enter (no batch statistics, nothing
about labels or about which image the text is paired with), the computation is the same in training
and evaluation, and each site holds O(d) parameters: α (d) for ICE; γ, β (d each), w_g (2d), b_g (1)
for GQT. The parameters stay float32; the computation runs in the features' dtype, so a half-precision
base model works unchanged.
"""

from __future__ import annotations

import math
import torch
from torch import nn


class InformativeContextEnhancement(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(d))

    def forward(self, fused: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = fused @ text.transpose(-1, -2) / math.sqrt(text.shape[-1])
        if mask is not None:
            scores = scores + _as_scores_mask(mask, scores.dtype)
        context = torch.softmax(scores, dim=-1) @ text
        return fused + self.alpha.to(fused.dtype) * context


class GatedQueryTransformation(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(d))
        self.beta = nn.Parameter(torch.zeros(d))
        self.gate = nn.Linear(2 * d, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, fused: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        dtype = fused.dtype
        query = self.gamma.to(dtype) * text + self.beta.to(dtype)
        logits = torch.cat([fused, query], dim=-1) @ self.gate.weight.to(dtype).T + self.gate.bias.to(dtype)
        return fused + torch.sigmoid(logits) * query


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


def _as_scores_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask for (B, L, L) scores. BERT's extended mask is (B, 1, 1, L) or (B, 1, L, L) and
    additive; a boolean mask (True = attend) becomes 0 / -inf; a 2-D (B, L) 0/1 padding mask as well."""
    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.dim() == 2:
        mask = mask[:, None, :].bool()
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)
