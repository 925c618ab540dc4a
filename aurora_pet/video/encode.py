"""BLIP's image encoder applied to the frames of a video, for any model family.

BLIP has no video encoder; the method (as BLIP's own zero-shot video retrieval does) encodes each of a
video's N frames as an image with the unchanged ViT and lets the text side read all of them. For a batch
of B videos of N frames, with ``E`` the ViT mapping a frame to L tokens of width D (token 0 is CLS) and
an optional frame embedding ``τ ∈ R^{N×D}`` (``1_L`` a column of L ones):

    Z_{b,n} = E(x_{b,n}) ∈ R^{L×D}                              each frame alone, the image model unchanged
    V_b     = [Z_{b,1} + 1_L τ_1ᵀ; …; Z_{b,N} + 1_L τ_Nᵀ]        the frames' tokens in time order, (N·L)×D
    v_b     = (1/N) Σ_n Z_{b,n}[0] ∈ R^D                        the mean of the frames' CLS features

``V`` replaces the image tokens as the key/value input of the text encoder's cross-attention (ITM, VQA,
and Aurora's targets, ICE and GQT there), so word tokens attend jointly over every frame. ``v`` feeds ITC:
the projection is affine, so ``proj(v_b) = (1/N) Σ_n proj(Z_{b,n}[0])``, the mean of the projected frame
features that BLIP averages (normalised afterwards as for images).

Frame order. Attention sums over its keys, so without ``τ`` (BLIP's published form) the
text side sees the frames as a set: it can tell what is in some frames and not in others (a shape that
appears), but not what comes first (a direction of motion, a colour that changes). ``τ`` adds each
frame's time to its tokens; a learned ``τ`` initialised to zero starts exactly at BLIP's behaviour, and
with N = 1 and no ``τ`` this is exactly the image model.

Cost: the ViT runs on B·N frames; the cross-attention's keys grow N-fold (8 frames × 197 tokens at 224 px).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

# BLIP's pixel normalisation (OpenAI CLIP's): LAVIS's BlipImageBaseProcessor and transformers'
# BlipImageProcessor use the same values.
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FrameFeatures(NamedTuple):
    """A batch of videos encoded frame by frame."""

    tokens: torch.Tensor  # (B, N·L, D): frame tokens (plus τ) concatenated in time order, V above
    pooled: torch.Tensor  # (B, D): mean of the frames' CLS features, v above


class FrameEmbedding(nn.Module):
    """The learned frame (temporal) embedding ``τ ∈ R^{N×D}``, zero at initialisation.

    A module, not a bare parameter, so that an adapter can train it by name (``modules_to_save``: it is
    then counted, saved and loaded with the heads). At zero the video model is BLIP's concatenated-frame
    model exactly; ``encode_frames`` adds row n to every token of frame n.

    Parameters
    ----------
    num_frames : int
        ``N``, the frames every video of the model has.
    width : int
        ``D``, the width of the image encoder's tokens.
    """

    def __init__(self, num_frames: int, width: int) -> None:
        super().__init__()
        if num_frames < 1 or width < 1:
            raise ValueError(f"FrameEmbedding needs num_frames >= 1 and width >= 1, got {num_frames} and {width}")
        self.weight = nn.Parameter(torch.zeros(num_frames, width))

    @property
    def num_frames(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"num_frames={self.weight.shape[0]}, width={self.weight.shape[1]}"


def pixel_values(frames: torch.Tensor, mean: tuple[float, ...] = BLIP_MEAN,
                 std: tuple[float, ...] = BLIP_STD) -> torch.Tensor:
    """Decoded frames as a BLIP image encoder's input: scaled to [0, 1] and normalised per channel.

    Parameters
    ----------
    frames : torch.Tensor
        uint8, shape ``(..., N, H, W, 3)`` as ``read_frames`` returns them (already resized).
    mean, std : tuple of float
        Per-channel normalisation; BLIP's by default.

    Returns
    -------
    torch.Tensor
        float32, shape ``(..., N, 3, H, W)``.
    """
    if frames.dtype != torch.uint8 or frames.dim() < 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (..., N, H, W, 3), got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    pixels = frames.movedim(-1, -3).float().div_(255)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def encode_frames(encode_image: Callable[[torch.Tensor], torch.Tensor], video: torch.Tensor,
                  frame_embedding: torch.Tensor | None = None) -> FrameFeatures:
    """Encode every frame with an image encoder and join the results (equations in the module docstring).

    Parameters
    ----------
    encode_image : callable
        The image encoder: ``(B·N, 3, H, W)`` pixels to ``(B·N, L, D)`` tokens with CLS first, e.g. a LAVIS
        BLIP's ``visual_encoder`` or ``lambda x: hf_blip.vision_model(pixel_values=x).last_hidden_state``.
    video : torch.Tensor
        Pixels, shape ``(B, N, 3, H, W)``.
    frame_embedding : torch.Tensor, optional
        ``τ``, shape ``(N, D)``: added to every token of frame n in ``tokens`` (not to ``pooled``), the only
        way the text side can tell the order of frames.

    Returns
    -------
    FrameFeatures
        ``tokens`` of shape ``(B, N·L, D)`` and ``pooled`` of shape ``(B, D)``.
    """
    if video.dim() != 5:
        raise ValueError(f"expected a video batch of shape (B, N, 3, H, W), got {tuple(video.shape)}")
    batch, num_frames = video.shape[:2]
    tokens = encode_image(video.flatten(0, 1))
    if tokens.dim() != 3 or tokens.shape[0] != batch * num_frames:
        raise ValueError(f"the image encoder returned shape {tuple(tokens.shape)} for {batch * num_frames} "
                         "frames; expected (B·N, L, D)")
    per_frame = tokens.unflatten(0, (batch, num_frames))  # (B, N, L, D)
    pooled = per_frame[:, :, 0].mean(dim=1)
    if frame_embedding is not None:
        if frame_embedding.shape != (num_frames, tokens.shape[-1]):
            raise ValueError(f"frame_embedding has shape {tuple(frame_embedding.shape)}; expected "
                             f"(N, D) = ({num_frames}, {tokens.shape[-1]})")
        per_frame = per_frame + frame_embedding[:, None, :]
    return FrameFeatures(tokens=per_frame.flatten(1, 2), pooled=pooled)
