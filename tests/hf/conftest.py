"""Shared inputs for the transformers BLIP tests: tiny models (random weights, built from configs) and
tokenised text with padding, so the masks the real forward passes see are the ones users' batches give."""

from __future__ import annotations

import pytest
import torch

from ..conftest import require_family

require_family("hf", "transformers", minversion="5")

from aurora_pet.families.hf.build import blip_tokenizer  # noqa: E402

CAPTIONS = ["a red circle", "two blue squares on the left of a big green star"]
QUESTIONS = ["what color?", "how many squares are on the left of the star?"]
ANSWERS = ["red", "two squares"]


@pytest.fixture(scope="session")
def tokenizer():
    return blip_tokenizer()


def text_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch.attention_mask == 0).any(), "the batch must contain padding"
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def repad(ids: torch.Tensor, mask: torch.Tensor, value: int) -> torch.Tensor:
    """`ids` with every padded position set to `value` (what no output may depend on)."""
    return ids.masked_fill(mask == 0, value)


def perturb(aurora, scale: float = 0.3, seed: int = 7) -> None:
    """Random non-zero factors, ICE and GQT: a stand-in for a trained adapter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in list(aurora.aurora_factors.parameters()) + list(aurora.aurora_fusion.parameters()):
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
