"""A small model with the shapes Aurora meets in BLIP: square, fused qkv, MLP fc1/fc2, and a BERT-style
cross-attention (signature and tuple output as in LAVIS's med.py / HF BERT) to host ICE and GQT."""

from __future__ import annotations

import torch
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.dense = (nn.Linear(d, d) for _ in range(4))

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_attentions=False):
        q, k, v = self.query(hidden_states), self.key(encoder_hidden_states), self.value(encoder_hidden_states)
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return (self.dense(attention @ v) + hidden_states, attention)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.crossattention = CrossAttention(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, image, mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores + mask[:, 0]
        x = x + self.proj(torch.softmax(scores, -1) @ v)
        x = self.crossattention(x, mask, None, image)[0]
        return x + self.fc2(torch.relu(self.fc1(x)))


class ToyModel(nn.Module):
    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x, image, mask=None):
        for block in self.blocks:
            x = block(x, image, mask)
        return self.head(x)


def toy_inputs(d: int = 16, batch: int = 2, tokens: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, d, generator=generator)
    image = torch.randn(batch, 7, d, generator=generator)
    mask = torch.zeros(batch, 1, 1, tokens)
    mask[0, ..., -2:] = -10000.0  # padding in the first sample
    return x, image, mask
