"""Frames of a video through transformers BLIP's image encoder (`aurora_pet.video.encode`): the tokens the
text side cross-attends to, the pooled ITC feature, and one frame being exactly the image model."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import normalize
from transformers import BlipImageProcessor

from aurora_pet.families.hf.build import build_blip
from aurora_pet.video import BLIP_MEAN, BLIP_STD, encode_frames, pixel_values

from .conftest import text_batch

SIZE, TOKENS, WIDTH = 32, 1 + (32 // 8) ** 2, 64  # the tiny vision model: 8 px patches plus CLS, 64 wide


@pytest.fixture(scope="module")
def model():
    return build_blip("retrieval", "tiny")


def _vit(model):
    return lambda x: model.vision_model(pixel_values=x).last_hidden_state


def _video(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_tokens_are_the_frames_in_time_order_and_pooled_is_their_mean_cls(model):
    video = _video(2, 3)
    out = encode_frames(_vit(model), video)
    assert tuple(out.tokens.shape) == (2, 3 * TOKENS, WIDTH) and tuple(out.pooled.shape) == (2, WIDTH)
    for b in range(2):
        alone = [_vit(model)(video[b, n:n + 1])[0] for n in range(3)]
        torch.testing.assert_close(out.tokens[b], torch.cat(alone), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled[b], torch.stack([z[0] for z in alone]).mean(0), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_one_frame_is_the_image_model(model, tokenizer):
    images = _video(2, 1)[:, 0]
    out = encode_frames(_vit(model), images[:, None])
    torch.testing.assert_close(out.tokens, _vit(model)(images))
    text = text_batch(tokenizer, ["a red circle moves left", "a blue square appears next to a star"])
    itc = model(**text, pixel_values=images, use_itm_head=False).itm_score  # the model's own cosine similarity
    text_feat = normalize(model.text_proj(model.text_encoder(**text).last_hidden_state[:, 0]), dim=-1)
    torch.testing.assert_close(normalize(model.vision_proj(out.pooled), dim=-1) @ text_feat.t(), itc)


@torch.no_grad()
def test_frame_order_moves_token_blocks_and_keeps_the_pool(model):
    video, order = _video(1, 4), torch.tensor([2, 0, 3, 1])
    out, shuffled = encode_frames(_vit(model), video), encode_frames(_vit(model), video[:, order])
    blocks = out.tokens.unflatten(1, (4, TOKENS))
    torch.testing.assert_close(shuffled.tokens.unflatten(1, (4, TOKENS)), blocks[:, order])
    torch.testing.assert_close(shuffled.pooled, out.pooled, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_projection_of_the_pool_is_the_mean_of_projected_frames(model):
    """BLIP averages each frame's projected CLS feature; projecting the mean CLS feature is the same."""
    video = _video(2, 4)
    out = encode_frames(_vit(model), video)
    cls = out.tokens.unflatten(1, (4, TOKENS))[:, :, 0]
    torch.testing.assert_close(model.vision_proj(out.pooled), model.vision_proj(cls).mean(1), atol=1e-6, rtol=1e-5)


def _fused(model, text, frames, frame_embedding=None):
    """The text encoder's output with its cross-attention reading the frames' tokens (what ITM scores)."""
    tokens = encode_frames(_vit(model), frames, frame_embedding).tokens
    return model.text_encoder(**text, encoder_hidden_states=tokens,
                              encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long)).last_hidden_state


@torch.no_grad()
def test_text_side_cross_attends_to_every_frame(model, tokenizer):
    text = text_batch(tokenizer, ["a red circle moves left", "a blue square appears next to a star"])
    video = _video(2, 3)

    base = _fused(model, text, video)
    assert tuple(model.itm_head(base[:, 0]).shape) == (2, 2)
    for n in range(3):  # changing any one frame changes the fused features
        changed = video.clone()
        changed[:, n] = _video(2, 1, seed=n + 1)[:, 0]
        assert not torch.allclose(_fused(model, text, changed), base, atol=1e-3)


@torch.no_grad()
def test_frame_order_is_visible_only_through_a_frame_embedding(model, tokenizer):
    """Cross-attention sums over its keys: without τ, reversing the frames (left becomes right) changes
    nothing the text side computes; a zero τ changes nothing at all; a non-zero τ tells the order."""
    text = text_batch(tokenizer, ["a red circle moves left", "a blue square appears next to a star"])
    video, reverse = _video(2, 4), torch.arange(3, -1, -1)
    tau = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(3))
    forward = _fused(model, text, video)
    assert (_fused(model, text, video[:, reverse]) - forward).abs().max() < 1e-5  # rounding only
    torch.testing.assert_close(_fused(model, text, video, torch.zeros(4, WIDTH)), forward)
    # random weights attend almost uniformly, so the order shows only weakly, yet far above rounding
    with_tau = _fused(model, text, video, tau)
    assert (_fused(model, text, video[:, reverse], tau) - with_tau).abs().max() > 1e-4
    out = encode_frames(_vit(model), video, tau)
    torch.testing.assert_close(out.pooled, encode_frames(_vit(model), video).pooled)  # ITC stays order-free


def test_pixel_values_match_blips_image_processor():
    frames = torch.randint(0, 256, (2, 3, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    processor = BlipImageProcessor(do_resize=False)  # BLIP's defaults; frames come resized
    assert (list(processor.image_mean), list(processor.image_std)) == (list(BLIP_MEAN), list(BLIP_STD))
    expected = processor(list(frames.flatten(0, 1).numpy()), return_tensors="pt").pixel_values
    torch.testing.assert_close(pixel_values(frames).flatten(0, 1), expected, atol=1e-5, rtol=1e-5)


def test_wrong_shapes_are_refused(model):
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, W\)"):
        encode_frames(_vit(model), _video(2, 3)[:, 0])
    with pytest.raises(ValueError, match=r"expected \(B·N, L, D\)"):
        encode_frames(lambda x: model.vision_model(pixel_values=x).pooler_output, _video(2, 3))
    with pytest.raises(ValueError, match=r"expected \(N, D\) = \(3, 64\)"):
        encode_frames(_vit(model), _video(2, 3), torch.zeros(4, WIDTH))
    with pytest.raises(ValueError, match="uint8 frames"):
        pixel_values(torch.zeros(3, SIZE, SIZE, 3))
