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

Momentum distillation (BLIP/ALBEF; `alpha` = α > 0, LAVIS: 0.4; off by default). A momentum model — the
ITC parts θ_m = (vision_model, text_encoder, vision_proj, text_proj) — follows the trained one by an EMA,
updated in every training-mode forward before it is used (LAVIS's `_momentum_update`)::

    θ_m ← m θ_m + (1 − m) θ                                         (m = `momentum`, LAVIS: 0.995)

and gives momentum features v^m_i, t^m_j (no gradient). As in LAVIS, the ITC keys are then the momentum
features and the targets are softened by the momentum similarities, in both directions::

    s^{i→t}_ij = v_iᵀ t^m_j / τ,        s^{t→i}_ji = t_jᵀ v^m_i / τ
    q^{i→t}_ij ← α softmax_j(v^m_iᵀ t^m_j / τ) + (1 − α) q_ij         (q: the smoothed hard targets above)
    q^{t→i}_ji ← α softmax_i(t^m_jᵀ v^m_i / τ) + (1 − α) q_ji
    L_itc = ½ ( −1/B Σ_i Σ_j q^{i→t}_ij log softmax_j(s^{i→t}_i·)
                −1/B Σ_j Σ_i q^{t→i}_ji log softmax_i(s^{t→i}_j·) )

The soft targets are computed without gradient (τ gets its gradient through s only). ITM is unchanged; its
hard negatives are still drawn from the online similarities v_iᵀ t_j / τ. The momentum model runs in the
loss's train/eval mode (dropout as LAVIS's momentum encoders); ICE/GQT sit on cross-attention, which ITC
never runs, so they need no momentum copy. Only the
parts that have trainable parameters get a momentum copy (a frozen part is its own EMA): a plain model
fine-tuned in full copies all four. An `AuroraModel` copies no base weight: its encoders are frozen and
its update lives in the adapter's factors, so the loss keeps an EMA copy of the active adapter's factors
(U, V, P, λ / G) and runs the same base with them (`AuroraModel.use_factors`), plus copies of the
trainable heads (vision_proj, text_proj). α = 0 builds no momentum model and is the loss above, bit for
bit. LAVIS's α ramp (α·min(1, step / (2 · steps per epoch))) is the caller's: pass `alpha=` per call.
The feature queue (LAVIS: 57,600 momentum features of past batches) is left out: keys are the batch's,
or all ranks' batches (below).

Across ranks (`negative_all_rank=True`, LAVIS's option, on a torch.distributed group of W > 1 processes;
otherwise in-batch as above). Each rank's keys are all ranks' features, concatenated rank by rank
(N = W·B columns): gathered with their gradient (`gather_with_grad`, LAVIS's `all_gather_with_grad`: the
backward pass sums every rank's gradient of a rank's slice and returns it to that rank), or the gathered
momentum features when α > 0. The rows stay local::

    s^{i→t}_ij = v_iᵀ t_j / τ,  s^{t→i}_ji = t_jᵀ v_i / τ          (rows: this rank's; columns: all N)
    q_ij = [y_i = y_j] / Σ_{k ≤ N} [y_i = y_k]                       (image ids gathered too)

and the hard negatives are drawn from these online similarities over all N candidates: negative images
(their token embeddings E gathered with gradient) and negative captions (ids and masks gathered; texts are
padded to the longest caption of any rank first). The negatives' indices then index the gathered batch.
Averaged over the ranks (what DDP does), the loss and its gradient are those of one process holding the
concatenated batch with the same negatives.

Wrapped models: the losses call the submodules of the object they are given. An `AuroraModel` forwards
attribute access to its base model, whose modules hold the adapter's layers and the ICE/GQT hooks, so the
adapter runs; `forward_scope` repeats the one thing the wrapper's own `forward` adds to them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ...model import AuroraModel

__all__ = ["TEMPERATURE_RANGE", "BlipRetrievalLoss", "RetrievalLossOutput", "check_retrieval_model",
           "distilled_itc_loss", "forward_scope", "gather", "gather_with_grad", "image_features", "itc_loss",
           "itm_logits", "itm_loss", "positive_mask", "sample_hard_negatives", "sample_negatives",
           "text_features"]

TEMPERATURE_RANGE = (0.001, 0.5)  # BLIP clamps its learnable temperature to this range every step
PARTS = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")
ITC_PARTS = PARTS[:4]  # what the momentum model consists of (ITC only, as BLIP)


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


def distilled_itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_keys: torch.Tensor,
                       text_keys: torch.Tensor, image_ids: torch.Tensor, key_ids: torch.Tensor,
                       temperature: torch.Tensor | float, label_smoothing: float = 0.0, alpha: float = 0.0,
                       soft_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITC of local rows against keys that may be momentum features and/or all ranks' (module doc), with the
    hard targets mixed with soft ones: q ← α·soft + (1 − α)·q.

    Parameters
    ----------
    image_feat, text_feat : torch.Tensor
        The rows: online features v and t, shape (B, D).
    image_keys, text_keys : torch.Tensor
        The columns: image and text features, shape (N, D).
    image_ids, key_ids : torch.Tensor
        Image ids of the rows (B,) and of the keys (N,).
    temperature : torch.Tensor or float
        τ.
    label_smoothing : float
        ε of the hard targets, over the N columns.
    alpha : float
        α in [0, 1]; with 0 the soft targets are not used.
    soft_targets : tuple of torch.Tensor, optional
        Image→text and text→image target distributions, each (B, N) (softmax of the momentum similarities).

    Returns
    -------
    tuple of torch.Tensor
        The loss (scalar), and the image→text and text→image logits, each (B, N).
    """
    _check_batch(image_feat=image_feat, text_feat=text_feat, image_ids=image_ids)
    _check_batch(image_keys=image_keys, text_keys=text_keys, key_ids=key_ids)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    _check_alpha(alpha)
    image_to_text = image_feat @ text_keys.T / temperature
    text_to_image = text_feat @ image_keys.T / temperature
    targets = (image_ids[:, None] == key_ids[None, :]).to(image_to_text.dtype)
    targets = targets / targets.sum(1, keepdim=True)
    if label_smoothing:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / targets.shape[1]
    image_targets = text_targets = targets  # row i's positives are the keys with its id, in either direction
    if alpha:
        if soft_targets is None:
            raise ValueError("alpha > 0 needs the soft targets (the momentum similarities' softmax)")
        image_targets = alpha * soft_targets[0] + (1.0 - alpha) * targets
        text_targets = alpha * soft_targets[1] + (1.0 - alpha) * targets
    loss_i2t = -(F.log_softmax(image_to_text, dim=1) * image_targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(text_to_image, dim=1) * text_targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, image_to_text, text_to_image


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
    return sample_negatives(logits, logits.T, image_ids, image_ids, generator)


def sample_negatives(image_to_text: torch.Tensor, text_to_image: torch.Tensor, image_ids: torch.Tensor,
                     candidate_ids: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_hard_negatives` over N candidates that may be more than the B rows (all ranks' pairs).

    Parameters
    ----------
    image_to_text, text_to_image : torch.Tensor
        Logits of the local images against the N candidate captions, and of the local captions against the
        N candidate images, each (B, N).
    image_ids, candidate_ids : torch.Tensor
        Image ids of the rows (B,) and of the candidates (N,).
    generator : torch.Generator, optional
        The random source (captions are drawn first, then images); None uses the global RNG.

    Returns
    -------
    tuple of torch.Tensor
        The candidate caption drawn for each image and the candidate image drawn for each caption, in [0, N).
    """
    _check_batch(image_to_text=image_to_text, text_to_image=text_to_image, image_ids=image_ids)
    if image_to_text.shape != text_to_image.shape or image_to_text.shape[1] != candidate_ids.shape[0]:
        raise ValueError(f"logits must both be (B, N) with N = {candidate_ids.shape[0]} candidates, got "
                         f"{tuple(image_to_text.shape)} and {tuple(text_to_image.shape)}")
    positives = image_ids[:, None] == candidate_ids[None, :]
    alone = positives.all(1)
    if alone.any():
        raise ValueError(f"no hard negative for image id {image_ids[alone][0].item()}: every pair of the batch has "
                         "that id (a batch needs at least two distinct images)")
    image_to_text, text_to_image = image_to_text.detach().float(), text_to_image.detach().float()
    if not (torch.isfinite(image_to_text).all() and torch.isfinite(text_to_image).all()):
        raise ValueError("ITC logits contain NaN or inf; cannot sample hard negatives")
    device = generator.device if generator is not None else image_to_text.device
    texts = _draw(image_to_text.masked_fill(positives, float("-inf")), device, generator)
    images = _draw(text_to_image.masked_fill(positives, float("-inf")), device, generator)
    return texts.to(image_to_text.device), images.to(image_to_text.device)


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


# -- across ranks ----------------------------------------------------------------------------------

def world_size() -> int:
    """Processes of the default torch.distributed group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of each slice and hands each rank its own
    (LAVIS's `GatherLayer`; `torch.distributed.all_gather` alone cuts the gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        size = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * size:(rank + 1) * size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, rank by rank, the gradient flowing back to each rank's
    slice (summed over the ranks that used it). Equal shapes on every rank."""
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, rank by rank, without gradient (LAVIS's
    `concat_all_gather`). Equal shapes on every rank."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _common_text_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions padded (mask 0) to the longest of any rank, so that they gather; every rank's batch size must be
    the same (the error names them). Padding changes no output: padded positions are masked out."""
    shapes = gather(torch.tensor([list(input_ids.shape)], device=input_ids.device))
    sizes = shapes[:, 0].tolist()
    if len(set(sizes)) > 1:
        raise ValueError(f"negative_all_rank needs the same batch size on every rank, got {sizes} (drop the "
                         "incomplete last batch)")
    extra = int(shapes[:, 1].max()) - input_ids.shape[1]
    if extra:
        input_ids = F.pad(input_ids, (0, extra), value=0)
        attention_mask = F.pad(attention_mask, (0, extra), value=0)
    return input_ids, attention_mask


# -- the module ------------------------------------------------------------------------------------

@dataclass
class RetrievalLossOutput(ModelOutput):
    """What `BlipRetrievalLoss` returns; `loss` first, so `transformers.Trainer` finds it.

    `itc_logits` are the image→text logits s^{i→t} (image rows; v tᵀ / τ in-batch without distillation),
    `itc_text_logits` the text→image ones (caption rows), each (B, N) with N the keys (B, or all ranks' W·B);
    `itm_logits`/`itm_labels` are laid out as [B positive pairs; B (caption j, negative image n(j)); B
    (negative caption m(i), image i)]; the negatives index the keys (the gathered batch across ranks)."""

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    itc_logits: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    negative_texts: torch.LongTensor | None = None
    negative_images: torch.LongTensor | None = None
    itc_text_logits: torch.FloatTensor | None = None


class BlipRetrievalLoss(nn.Module):
    """A BLIP retrieval model under BLIP's training loss L = w_itc·L_itc + w_itm·L_itm (see the module doc).

    It owns the model (so that an optimizer over `parameters()` or `transformers.Trainer` trains what the
    model leaves trainable), the learnable temperature `temp` and, with α > 0, the momentum model's own
    tensors (`momentum_parts`, `momentum_factors`: frozen parameters, so that checkpoints of the loss carry
    them). The temperature only shapes training: LAVIS's evaluation ranks by raw cosine similarity.

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
    alpha : float
        α of momentum distillation, in [0, 1]; 0 (default) builds no momentum model. LAVIS: 0.4.
    momentum : float
        m of the momentum model's EMA, in [0, 1). LAVIS: 0.995.
    negative_all_rank : bool
        ITC keys and hard negatives from every rank of the torch.distributed group (LAVIS's option); without
        a group of more than one process the batch's own, as by default.
    """

    def __init__(self, model: nn.Module, temperature: float = 0.07, learn_temperature: bool = True,
                 itc_weight: float = 1.0, itm_weight: float = 1.0, label_smoothing: float = 0.0,
                 itm_token_id: int | None = None, generator: torch.Generator | None = None, alpha: float = 0.0,
                 momentum: float = 0.995, negative_all_rank: bool = False) -> None:
        super().__init__()
        check_retrieval_model(model)
        low, high = TEMPERATURE_RANGE
        if not low <= temperature <= high:
            raise ValueError(f"temperature must be in [{low}, {high}] (BLIP's clamp), got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if itc_weight < 0 or itm_weight < 0:
            raise ValueError(f"loss weights must be ≥ 0, got itc_weight={itc_weight}, itm_weight={itm_weight}")
        _check_alpha(alpha)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) (θ_m ← m θ_m + (1 − m) θ), got {momentum}")
        self.model = model
        device = next((p.device for p in model.parameters()), None)
        self.temp = nn.Parameter(torch.tensor(float(temperature), device=device), requires_grad=learn_temperature)
        self.itc_weight, self.itm_weight = itc_weight, itm_weight
        self.label_smoothing = label_smoothing
        self.itm_token_id = itm_token_id
        self.generator = generator
        self.alpha, self.momentum, self.negative_all_rank = float(alpha), float(momentum), bool(negative_all_rank)
        self.momentum_parts = nn.ModuleDict()
        self.momentum_factors: nn.Module | None = None
        self.momentum_adapter: str | None = None
        if self.alpha > 0:
            self._build_momentum_model()

    # -- the momentum model ----------------------------------------------------------------------
    def _build_momentum_model(self) -> None:
        """Frozen copies of the ITC parts that train (a frozen part is its own EMA) and, for an
        `AuroraModel`, of the active adapter's factors: never of an adapted base module."""
        for name in ITC_PARTS:
            part = getattr(self.model, name)
            if any(p.requires_grad for p in part.parameters()):
                patched = [n or name for n, m in part.named_modules() if "forward" in vars(m)]
                if patched:
                    raise ValueError(f"momentum distillation cannot copy {name}: it has trainable parameters and "
                                     f"adapted modules ({', '.join(patched[:3])}); freeze its base weights (the "
                                     "adapter's factors get their momentum copy) or train it without an adapter")
                self.momentum_parts[name] = copy.deepcopy(part).requires_grad_(False)
        if isinstance(self.model, AuroraModel):
            self.momentum_adapter = self.model.active_adapter
            self.momentum_factors = copy.deepcopy(self.model.aurora_factors).requires_grad_(False)

    def _online_factors(self) -> nn.Module:
        """The factors the momentum factors follow: the adapter that was active when the loss was built."""
        if self.model.active_adapter != self.momentum_adapter:
            raise RuntimeError(f"the momentum factors follow adapter {self.momentum_adapter!r}, but "
                               f"{self.model.active_adapter!r} is active; build the loss after set_adapter()")
        return self.model.aurora_factors

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_m ← m θ_m + (1 − m) θ for every momentum copy (parts and factors), as LAVIS's `_momentum_update`;
        `forward` calls it in training mode when α > 0."""
        pairs = [(self.momentum_parts[name], getattr(self.model, name)) for name in self.momentum_parts]
        if self.momentum_factors is not None:
            pairs.append((self.momentum_factors, self._online_factors()))
        for tracking, online in pairs:
            for tracked, source in zip(tracking.parameters(), online.parameters()):
                tracked.mul_(self.momentum).add_(source.detach().to(tracked.dtype), alpha=1.0 - self.momentum)

    @contextlib.contextmanager
    def momentum_model(self) -> Iterator[SimpleNamespace]:
        """The momentum model as an object with the ITC parts (`vision_model`, ...): the copies where there
        are some, else the online parts; an `AuroraModel` runs its momentum factors inside the block."""
        if self.alpha <= 0:
            raise RuntimeError("there is no momentum model: alpha is 0")
        parts = SimpleNamespace(**{name: self.momentum_parts[name] if name in self.momentum_parts
                                   else getattr(self.model, name) for name in ITC_PARTS})
        if self.momentum_factors is None:
            yield parts
            return
        self._online_factors()
        with self.model.use_factors(self.momentum_factors):
            yield parts

    @torch.no_grad()
    def momentum_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v^m and t^m of a batch: normalised projected CLS features of the momentum model, each (B, D)."""
        with self.momentum_model() as momentum:
            _, image_feat = image_features(momentum, pixel_values)
            return image_feat, text_features(momentum, input_ids, attention_mask)

    # -- the loss --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_ids: torch.Tensor | Sequence[int], generator: torch.Generator | None = None,
                alpha: float | None = None) -> RetrievalLossOutput:
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
        alpha : float, optional
            This call's α (e.g. LAVIS's ramp over the first two epochs), in [0, the module's α]; None: the
            module's. The momentum model's EMA steps whenever the module's α > 0, whatever this call's.

        Returns
        -------
        RetrievalLossOutput
            `loss`, `loss_itc`, `loss_itm`, and the logits, labels and sampled negatives behind them.
        """
        if alpha is None:
            alpha = self.alpha
        elif not 0.0 <= alpha <= self.alpha:
            raise ValueError(f"alpha of a call must be in [0, {self.alpha}] (the module's alpha), got {alpha}")
        image_ids = torch.as_tensor(image_ids, device=pixel_values.device)
        _check_batch(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_ids=image_ids)
        if image_ids.dim() != 1:
            raise ValueError(f"image_ids must be one id per pair, shape (B,), got {tuple(image_ids.shape)}")
        with torch.no_grad():
            self.temp.clamp_(*TEMPERATURE_RANGE)
        across = self.negative_all_rank and world_size() > 1
        if across:
            input_ids, attention_mask = _common_text_length(input_ids, attention_mask)
        with forward_scope(self.model):
            image_embeds, image_feat = image_features(self.model, pixel_values)
            text_feat = text_features(self.model, input_ids, attention_mask)
            if not across and self.alpha <= 0:  # BLIP with α = 0, in-batch: the plain loss
                loss_itc, logits = itc_loss(image_feat, text_feat, image_ids, self.temp, self.label_smoothing)
                text_logits = None
                texts, images = sample_hard_negatives(logits, image_ids, generator or self.generator)
                key_embeds, key_ids, key_mask = image_embeds, input_ids, attention_mask
            else:
                loss_itc, logits, text_logits, (texts, images), (key_embeds, key_ids, key_mask) = self._general_itc(
                    image_embeds, image_feat, text_feat, input_ids, attention_mask, pixel_values, image_ids,
                    float(alpha), across, generator or self.generator)
            pair_logits = itm_logits(self.model, torch.cat([image_embeds, key_embeds[images], image_embeds]),
                                     torch.cat([input_ids, input_ids, key_ids[texts]]),
                                     torch.cat([attention_mask, attention_mask, key_mask[texts]]),
                                     self.itm_token_id)
        loss_itm, labels = itm_loss(pair_logits)
        return RetrievalLossOutput(loss=self.itc_weight * loss_itc + self.itm_weight * loss_itm, loss_itc=loss_itc,
                                   loss_itm=loss_itm, itc_logits=logits, itm_logits=pair_logits, itm_labels=labels,
                                   negative_texts=texts, negative_images=images, itc_text_logits=text_logits)

    def _general_itc(self, image_embeds: torch.Tensor, image_feat: torch.Tensor, text_feat: torch.Tensor,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                     image_ids: torch.Tensor, alpha: float, across: bool, generator: torch.Generator | None):
        """ITC with momentum keys and soft targets and/or all ranks' keys, and the hard negatives drawn from
        the online similarities over the same candidates; returns the loss, both logits, the negatives and
        the candidates the negatives index (image tokens, caption ids, masks)."""
        if across:
            key_ids = gather(image_ids)
            image_all, text_all = gather_with_grad(image_feat), gather_with_grad(text_feat)
        else:
            key_ids, image_all, text_all = image_ids, image_feat, text_feat
        image_keys, text_keys, soft = image_all, text_all, None
        if self.alpha > 0:
            with torch.no_grad():
                if self.training:
                    self.momentum_update()
                image_m, text_m = self.momentum_features(pixel_values, input_ids, attention_mask)
                image_keys, text_keys = (gather(image_m), gather(text_m)) if across else (image_m, text_m)
                soft = (F.softmax(image_m @ text_keys.T / self.temp, dim=1),
                        F.softmax(text_m @ image_keys.T / self.temp, dim=1))
        loss, logits, text_logits = distilled_itc_loss(image_feat, text_feat, image_keys, text_keys, image_ids,
                                                       key_ids, self.temp, self.label_smoothing, alpha, soft)
        with torch.no_grad():
            online_i2t = image_feat @ text_all.T / self.temp
            online_t2i = text_feat @ image_all.T / self.temp
        if across:
            negatives = sample_negatives(online_i2t, online_t2i, image_ids, key_ids, generator)
            candidates = (gather_with_grad(image_embeds), gather(input_ids), gather(attention_mask))
        else:
            negatives = sample_hard_negatives(online_i2t, image_ids, generator)
            candidates = (image_embeds, input_ids, attention_mask)
        return loss, logits, text_logits, negatives, candidates


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the momentum model's soft ITC targets) must be in [0, 1], got {alpha}")


def _check_batch(**tensors: torch.Tensor) -> None:
    """All tensors share their first dimension (the batch); the error names each size."""
    sizes = {name: int(tensor.shape[0]) if tensor.dim() else "scalar" for name, tensor in tensors.items()}
    if len(set(sizes.values())) > 1 or "scalar" in sizes.values():
        listed = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(f"mismatched batch sizes ({listed})")
