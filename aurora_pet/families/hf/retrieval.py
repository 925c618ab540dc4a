"""BLIP's image–text retrieval training losses for transformers' `BlipForImageTextRetrieval`, which ships
none: image–text contrastive (ITC) and image–text matching (ITM) with hard negatives, written once over the
model's own submodules (`vision_model`, `text_encoder`, `vision_proj`, `text_proj`, `itm_head`).

Notation: a batch of B (image, caption) pairs; image i has pixels x_i and image id y_i (captions of the same
image share an id); caption j has tokens c_j.

Features::

    E_i = vision_model(x_i).last_hidden_state                      (image tokens; E_i[0] is the CLS)
    v_i = normalize(vision_proj(E_i[0]))
    t_j = normalize(text_proj(text_encoder(c_j)[0]))               (text only: no cross-attention)

ITC, with a learnable temperature τ clamped to [0.001, 0.5] before each step, as BLIP does::

    s_ij  = v_iᵀ t_j / τ
    q_ij  = [y_i = y_j] / Σ_k [y_i = y_k]                           (every caption of the image is a positive)
    q    ← (1 − ε) q + ε / B                                        (optional label smoothing ε, default 0)
    L_itc = ½ ( −1/B Σ_i Σ_j q_ij log softmax_j(s_i·)  −  1/B Σ_j Σ_i q_ji log softmax_i(s_·j) )

Hard negatives, drawn without gradient from a `torch.Generator` (never the global RNG when one is given)::

    n(j) ~ softmax_i(s_ij)  over images i with y_i ≠ y_j            (a negative image for caption j)
    m(i) ~ softmax_j(s_ij)  over captions j with y_j ≠ y_i          (a negative caption for image i)

(BLIP zeroes the positives' softmax weights and lets `multinomial` renormalise; masking the logits with −∞
first is the same distribution and cannot underflow to all zeros at small τ.)

ITM, on the first token of the text encoder cross-attending to the image tokens::

    h(c, E) = text_encoder(c, encoder_hidden_states=E)[0]
    L_itm   = CE over 3B pairs: (c_i, E_i) → 1,  (c_j, E_n(j)) → 0,  (c_m(i), E_i) → 0

    L = w_itc · L_itc + w_itm · L_itm

The first ITM token is transformers' (`[CLS]`, what `BlipForImageTextRetrieval.forward(use_itm_head=True)`
uses) unless `itm_token_id` is given: Salesforce's BLIP and LAVIS put `[ENC]` there (transformers issue
#25629); pass `tokenizer.convert_tokens_to_ids("[ENC]")` to train and evaluate as they do.

What is left out of LAVIS's loss: its momentum encoders, feature queue and momentum distillation (α = 0.4);
transformers' BLIP has no momentum encoder. This is BLIP's loss with α = 0, no queue, in-batch negatives
on one process (`negative_all_rank=False`).

Wrapped models: the losses call the submodules of the object they are given. An `AuroraModel` forwards
attribute access to its base model, whose modules hold the adapter's layers and the ICE/GQT hooks, so the
adapter runs; `forward_scope` repeats the one thing the wrapper's own `forward` adds to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

__all__ = ["TEMPERATURE_RANGE", "BlipRetrievalLoss", "RetrievalLossOutput", "check_retrieval_model",
           "forward_scope", "image_features", "itc_loss", "itm_logits", "itm_loss", "positive_mask",
           "sample_hard_negatives", "text_features"]

TEMPERATURE_RANGE = (0.001, 0.5)  # BLIP clamps its learnable temperature to this range every step
PARTS = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")


# -- features ------------------------------------------------------------------------------------

def check_retrieval_model(model: nn.Module) -> None:
    """Raise a `TypeError` naming the missing parts when `model` is no BLIP retrieval model (or wrapper)."""
    missing = [name for name in PARTS if not isinstance(getattr(model, name, None), nn.Module)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a BLIP retrieval model: it has no {', '.join(missing)} "
                        "(expected transformers' BlipForImageTextRetrieval or an AuroraModel around one)")


@contextlib.contextmanager
def forward_scope(model: nn.Module) -> Iterator[None]:
    """One forward pass of `model` made of direct submodule calls: `AuroraModel.forward_scope` for a wrapped
    model (what its own `forward` would do), nothing for a plain one."""
    scope = getattr(model, "forward_scope", None)
    if scope is None:
        yield
        return
    with scope():
        yield


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tokens E and the normalised projected CLS feature v.

    Parameters
    ----------
    model : nn.Module
        `BlipForImageTextRetrieval`, or an `AuroraModel` around one.
    pixel_values : torch.Tensor
        Images, shape (B, 3, H, W).

    Returns
    -------
    tuple of torch.Tensor
        E, shape (B, N, D_vision), and v = normalize(vision_proj(E[:, 0])), shape (B, D_proj).
    """
    embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    return embeds, F.normalize(model.vision_proj(embeds[:, 0]), dim=-1)


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The normalised projected CLS feature t of captions, from the text encoder without cross-attention.

    Parameters
    ----------
    model : nn.Module
        `BlipForImageTextRetrieval`, or an `AuroraModel` around one.
    input_ids, attention_mask : torch.Tensor
        Tokenised captions, shape (B, L).

    Returns
    -------
    torch.Tensor
        t = normalize(text_proj(text_encoder(c)[:, 0])), shape (B, D_proj).
    """
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(model.text_proj(hidden[:, 0]), dim=-1)


def itm_logits(model: nn.Module, image_embeds: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, itm_token_id: int | None = None) -> torch.Tensor:
    """ITM logits of (caption, image) pairs, row by row: caption k with image tokens k.

    Parameters
    ----------
    model : nn.Module
        `BlipForImageTextRetrieval`, or an `AuroraModel` around one.
    image_embeds : torch.Tensor
        Image tokens E, shape (P, N, D_vision).
    input_ids, attention_mask : torch.Tensor
        Captions, shape (P, L).
    itm_token_id : int, optional
        Replaces the first token (BLIP's `[ENC]`); None keeps it, as transformers' forward does.

    Returns
    -------
    torch.Tensor
        Logits, shape (P, 2); column 1 is "matches".
    """
    _check_batch(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask)
    if itm_token_id is not None:
        input_ids = input_ids.clone()
        input_ids[:, 0] = itm_token_id
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).last_hidden_state
    return model.itm_head(hidden[:, 0])


# -- losses --------------------------------------------------------------------------------------

def positive_mask(image_ids: torch.Tensor) -> torch.Tensor:
    """P[i, j] = (y_i == y_j): caption j describes image i."""
    return image_ids[:, None] == image_ids[None, :]


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor,
             temperature: torch.Tensor | float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's symmetric in-batch contrastive loss, every caption of the same image a positive.

    Parameters
    ----------
    image_feat, text_feat : torch.Tensor
        Normalised features v and t, shape (B, D).
    image_ids : torch.Tensor
        Image id of each pair, shape (B,).
    temperature : torch.Tensor or float
        τ (the caller clamps it).
    label_smoothing : float
        ε in [0, 1): the targets are (1 − ε) q + ε / B.

    Returns
    -------
    tuple of torch.Tensor
        The loss (scalar) and the logits s = v tᵀ / τ, shape (B, B), image rows.
    """
    _check_batch(image_feat=image_feat, text_feat=text_feat, image_ids=image_ids)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = image_feat @ text_feat.T / temperature
    targets = positive_mask(image_ids).to(logits.dtype)
    targets = targets / targets.sum(1, keepdim=True)
    if label_smoothing:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / targets.shape[1]
    # q is symmetric (y_i = y_j ⇔ y_j = y_i, and every row has the same sum 1), so the text rows use q too
    image_to_text = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
    text_to_image = -(F.log_softmax(logits.T, dim=1) * targets).sum(1).mean()
    return (image_to_text + text_to_image) / 2, logits


def sample_hard_negatives(logits: torch.Tensor, image_ids: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative caption per image and one negative image per caption, drawn with probability ∝ softmax
    of the ITC logits over the candidates of another image id (never a positive, nor a duplicate image).

    Parameters
    ----------
    logits : torch.Tensor
        ITC logits s, shape (B, B), image rows.
    image_ids : torch.Tensor
        Image id of each pair, shape (B,).
    generator : torch.Generator, optional
        The random source; sampling runs on its device. None uses the global RNG, as BLIP does.

    Returns
    -------
    tuple of torch.Tensor
        m, the caption index drawn for each image, and n, the image index drawn for each caption, both (B,).
    """
    _check_batch(logits=logits, image_ids=image_ids)
    if logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square (B, B), got shape {tuple(logits.shape)}")
    positives = positive_mask(image_ids)
    alone = positives.all(1)
    if alone.any():
        raise ValueError(f"no hard negative for image id {image_ids[alone][0].item()}: every pair of the batch has "
                         "that id (a batch needs at least two distinct images)")
    logits = logits.detach().float()
    if not torch.isfinite(logits).all():
        raise ValueError("ITC logits contain NaN or inf; cannot sample hard negatives")
    device = generator.device if generator is not None else logits.device
    texts = _draw(logits.masked_fill(positives, float("-inf")), device, generator)
    images = _draw(logits.T.masked_fill(positives.T, float("-inf")), device, generator)
    return texts.to(logits.device), images.to(logits.device)


def _draw(masked_logits: torch.Tensor, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row with probability softmax(row)."""
    weights = masked_logits.softmax(1).to(device)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ITM logits laid out as [B positives; 2B negatives].

    Parameters
    ----------
    logits : torch.Tensor
        ITM logits, shape (3B, 2).

    Returns
    -------
    tuple of torch.Tensor
        The loss (scalar) and the labels, shape (3B,): B ones, then 2B zeros.
    """
    if logits.dim() != 2 or logits.shape[1] != 2 or logits.shape[0] % 3:
        raise ValueError(f"ITM logits must have shape (3B, 2), got {tuple(logits.shape)}")
    batch = logits.shape[0] // 3
    labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
    labels = labels.to(logits.device)
    return F.cross_entropy(logits, labels), labels


# -- the module ------------------------------------------------------------------------------------

@dataclass
class RetrievalLossOutput(ModelOutput):
    """What `BlipRetrievalLoss` returns; `loss` first, so `transformers.Trainer` finds it.

    `itc_logits` are s = v tᵀ / τ (image rows); `itm_logits`/`itm_labels` are laid out as [B positive pairs;
    B (caption j, negative image n(j)); B (negative caption m(i), image i)]."""

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    itc_logits: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    negative_texts: torch.LongTensor | None = None
    negative_images: torch.LongTensor | None = None


class BlipRetrievalLoss(nn.Module):
    """A BLIP retrieval model under BLIP's training loss L = w_itc·L_itc + w_itm·L_itm (see the module doc).

    It owns the model (so that an optimizer over `parameters()` or `transformers.Trainer` trains what the
    model leaves trainable) and the learnable temperature `temp`. The temperature only shapes training:
    LAVIS's evaluation ranks by raw cosine similarity.

    Parameters
    ----------
    model : nn.Module
        `BlipForImageTextRetrieval`, or an `AuroraModel` around one.
    temperature : float
        Initial τ (BLIP: 0.07), within `TEMPERATURE_RANGE`.
    learn_temperature : bool
        Whether τ is trained.
    itc_weight, itm_weight : float
        w_itc, w_itm.
    label_smoothing : float
        ε of the ITC targets.
    itm_token_id : int, optional
        First token of ITM inputs (BLIP's `[ENC]`); None keeps transformers' `[CLS]`.
    generator : torch.Generator, optional
        Default random source of the hard-negative sampling (a call's `generator` overrides it).
    """

    def __init__(self, model: nn.Module, temperature: float = 0.07, learn_temperature: bool = True,
                 itc_weight: float = 1.0, itm_weight: float = 1.0, label_smoothing: float = 0.0,
                 itm_token_id: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_retrieval_model(model)
        low, high = TEMPERATURE_RANGE
        if not low <= temperature <= high:
            raise ValueError(f"temperature must be in [{low}, {high}] (BLIP's clamp), got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if itc_weight < 0 or itm_weight < 0:
            raise ValueError(f"loss weights must be ≥ 0, got itc_weight={itc_weight}, itm_weight={itm_weight}")
        self.model = model
        device = next((p.device for p in model.parameters()), None)
        self.temp = nn.Parameter(torch.tensor(float(temperature), device=device), requires_grad=learn_temperature)
        self.itc_weight, self.itm_weight = itc_weight, itm_weight
        self.label_smoothing = label_smoothing
        self.itm_token_id = itm_token_id
        self.generator = generator

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_ids: torch.Tensor | Sequence[int],
                generator: torch.Generator | None = None) -> RetrievalLossOutput:
        """The losses of a batch of B (caption, image) pairs.

        Parameters
        ----------
        input_ids, attention_mask : torch.Tensor
            Captions, shape (B, L).
        pixel_values : torch.Tensor
            Images, shape (B, 3, H, W); row k is the image of caption k.
        image_ids : torch.Tensor or sequence of int
            Image id of each pair, shape (B,); equal ids mark the same image (never each other's negative).
        generator : torch.Generator, optional
            Random source of this call's hard negatives; defaults to the module's.

        Returns
        -------
        RetrievalLossOutput
            `loss`, `loss_itc`, `loss_itm`, and the logits, labels and sampled negatives behind them.
        """
        image_ids = torch.as_tensor(image_ids, device=pixel_values.device)
        _check_batch(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_ids=image_ids)
        if image_ids.dim() != 1:
            raise ValueError(f"image_ids must be one id per pair, shape (B,), got {tuple(image_ids.shape)}")
        with torch.no_grad():
            self.temp.clamp_(*TEMPERATURE_RANGE)
        with forward_scope(self.model):
            image_embeds, image_feat = image_features(self.model, pixel_values)
            text_feat = text_features(self.model, input_ids, attention_mask)
            loss_itc, logits = itc_loss(image_feat, text_feat, image_ids, self.temp, self.label_smoothing)
            texts, images = sample_hard_negatives(logits, image_ids, generator or self.generator)
            pair_logits = itm_logits(self.model, torch.cat([image_embeds, image_embeds[images], image_embeds]),
                                     torch.cat([input_ids, input_ids, input_ids[texts]]),
                                     torch.cat([attention_mask, attention_mask, attention_mask[texts]]),
                                     self.itm_token_id)
        loss_itm, labels = itm_loss(pair_logits)
        return RetrievalLossOutput(loss=self.itc_weight * loss_itc + self.itm_weight * loss_itm, loss_itc=loss_itc,
                                   loss_itm=loss_itm, itc_logits=logits, itm_logits=pair_logits, itm_labels=labels,
                                   negative_texts=texts, negative_images=images)


def _check_batch(**tensors: torch.Tensor) -> None:
    """All tensors share their first dimension (the batch); the error names each size."""
    sizes = {name: int(tensor.shape[0]) if tensor.dim() else "scalar" for name, tensor in tensors.items()}
    if len(set(sizes.values())) > 1 or "scalar" in sizes.values():
        listed = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(f"mismatched batch sizes ({listed})")
