"""Distillation for transformers' BLIP (`BlipForImageTextRetrieval`, `BlipForQuestionAnswering`): what the
teacher and the student answer on one batch, and the terms of `aurora_pet.distill` between them.

Retrieval: each model gives, with the features of `families.hf.retrieval`::

    S      = v tᵀ                                   ITC cosine similarities, (B, B), image rows
    z_k    = itm_head(h_k[0])                       ITM logits of pair k = (caption c_k, image i_k), (P, 2)
    h_k    = text_encoder(c_k, encoder_hidden_states=E_{i_k})     multimodal token features, (L, D)

and the terms are `itc_distillation(S^S, S^T, τ_S, τ_T)`, `itm_distillation(z^S, z^T, τ)` and
`relation_distillation(h^S, h^T, caption mask)`. The ITM pairs are the B positives followed, when given, by
`BlipRetrievalLoss`'s hard negatives (its `negative_images`, `negative_texts`), so the student is distilled on
the very pairs its supervised ITM loss sees.

VQA, with the model's own answer loss (`labels`, teacher forcing)::

    q      = text_encoder(question, encoder_hidden_states=E)      multimodal question tokens, (B, L_q, D)
    z_bl   = text_decoder(answer_<l, encoder_hidden_states=q)     logits of answer token l, (B, L_a − 1, V)

and the terms are `token_distillation(z^S, z^T, answer mask)` ("answer": the answer distributions, at the
positions the supervised loss scores) and `relation_distillation(q^S, q^T, question mask)`. The student's
pass also gives its supervised loss, so a training step runs the student once.

The teacher runs without gradient; keep it in `eval()` mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...distill import DistillConfig, itc_distillation, itm_distillation, relation_distillation, token_distillation
from .retrieval import check_retrieval_model, forward_scope, image_features, text_features

__all__ = ["RetrievalResponses", "VQAResponses", "check_vqa_model", "itm_pairs", "retrieval_distillation",
           "retrieval_responses", "vqa_distillation", "vqa_responses"]

VQA_PARTS = ("vision_model", "text_encoder", "text_decoder")


@dataclass
class RetrievalResponses:
    """What one retrieval model answers on a batch, for distillation."""

    similarity: torch.Tensor  # S = v tᵀ, (B, B), image rows
    itm_logits: torch.Tensor  # (P, 2), column 1 "matches"
    tokens: torch.Tensor  # text encoder's output over the image, (P, L, D)
    token_mask: torch.Tensor  # the pairs' caption attention mask, (P, L)


def itm_pairs(batch_size: int, negative_texts: torch.Tensor | None = None,
              negative_images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption index, image index) of every ITM pair, laid out as `BlipRetrievalLoss` lays out its ITM logits.

    Parameters
    ----------
    batch_size : int
        B.
    negative_texts, negative_images : torch.Tensor, optional
        m(i), the negative caption of each image, and n(j), the negative image of each caption, both (B,);
        give both or neither.

    Returns
    -------
    tuple of torch.Tensor
        Caption and image indices, (B,) with positives only, else (3B,):
        [(j, j)]_j, then [(j, n(j))]_j, then [(m(i), i)]_i.
    """
    if (negative_texts is None) != (negative_images is None):
        raise ValueError("pass both negative_texts and negative_images (a RetrievalLossOutput's), or neither")
    if negative_texts is None:
        rows = torch.arange(batch_size)
        return rows, rows
    for name, negatives in (("negative_texts", negative_texts), ("negative_images", negative_images)):
        if negatives.shape != (batch_size,):
            raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(negatives.shape)}")
    rows = torch.arange(batch_size, device=negative_texts.device)
    return torch.cat([rows, rows, negative_texts]), torch.cat([rows, negative_images.to(rows.device), rows])


def retrieval_responses(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        pixel_values: torch.Tensor, texts: torch.Tensor, images: torch.Tensor,
                        itm_token_id: int | None = None) -> RetrievalResponses:
    """ITC similarities, ITM logits and multimodal token features of `model` on a batch.

    The ITM pass is `retrieval.itm_logits`'s, kept whole here because relation distillation needs every token
    of the text encoder's output, not only the first.

    Parameters
    ----------
    model : nn.Module
        `BlipForImageTextRetrieval`, or an `AuroraModel` around one.
    input_ids, attention_mask : torch.Tensor
        Captions, (B, L).
    pixel_values : torch.Tensor
        Images, (B, 3, H, W).
    texts, images : torch.Tensor
        Caption and image index of each ITM pair, (P,) (see `itm_pairs`).
    itm_token_id : int, optional
        First token of the ITM inputs (BLIP's `[ENC]`); None keeps transformers' `[CLS]`.

    Returns
    -------
    RetrievalResponses
    """
    check_retrieval_model(model)
    texts, images = texts.to(input_ids.device), images.to(input_ids.device)
    with forward_scope(model):
        image_embeds, image_feat = image_features(model, pixel_values)
        text_feat = text_features(model, input_ids, attention_mask)
        pair_ids, pair_mask = input_ids[texts], attention_mask[texts]
        if itm_token_id is not None:
            pair_ids = pair_ids.clone()
            pair_ids[:, 0] = itm_token_id
        pair_images = image_embeds[images]
        image_mask = torch.ones(pair_images.shape[:-1], dtype=torch.long, device=pair_images.device)
        tokens = model.text_encoder(input_ids=pair_ids, attention_mask=pair_mask, encoder_hidden_states=pair_images,
                                    encoder_attention_mask=image_mask).last_hidden_state
        itm_logits = model.itm_head(tokens[:, 0])
    return RetrievalResponses(image_feat @ text_feat.T, itm_logits, tokens, pair_mask)


def retrieval_distillation(student: nn.Module, teacher: nn.Module, config: DistillConfig,
                           input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, *,
                           student_temperature: torch.Tensor | float, teacher_temperature: torch.Tensor | float,
                           negative_texts: torch.Tensor | None = None, negative_images: torch.Tensor | None = None,
                           itm_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """The retrieval distillation terms of a batch, for `DistillConfig.combine`.

    Parameters
    ----------
    student, teacher : nn.Module
        `BlipForImageTextRetrieval` models (or `AuroraModel`s around them) with the same tokenizer; widths
        may differ. The teacher runs under `torch.no_grad()`.
    config : DistillConfig
        Its temperature, if set, replaces both ITC temperatures and scales the ITM logits.
    input_ids, attention_mask, pixel_values : torch.Tensor
        The batch, as `BlipRetrievalLoss` takes it.
    student_temperature, teacher_temperature : torch.Tensor or float
        Each model's ITC temperature (the student's `BlipRetrievalLoss.temp`, the teacher's trained one).
    negative_texts, negative_images : torch.Tensor, optional
        The student's hard negatives (a `RetrievalLossOutput`'s); None distils the positive pairs only.
    itm_token_id : int, optional
        First token of the ITM inputs, as given to `BlipRetrievalLoss`.

    Returns
    -------
    dict of str to torch.Tensor
        "itc", "itm" and "relation" (scalars; gradients reach the student only).
    """
    texts, images = itm_pairs(input_ids.shape[0], negative_texts, negative_images)
    batch = (input_ids, attention_mask, pixel_values, texts, images, itm_token_id)
    mine = retrieval_responses(student, *batch)
    with torch.no_grad():
        theirs = retrieval_responses(teacher, *batch)
    tau_student, tau_teacher = config.itc_temperatures(student_temperature, teacher_temperature)
    return {"itc": itc_distillation(mine.similarity, theirs.similarity, tau_student, tau_teacher),
            "itm": itm_distillation(mine.itm_logits, theirs.itm_logits, config.response_temperature),
            "relation": relation_distillation(mine.tokens, theirs.tokens, mine.token_mask)}


# -- VQA -------------------------------------------------------------------------------------------

@dataclass
class VQAResponses:
    """What one VQA model answers on a batch (teacher forcing on the given answers), for distillation."""

    loss: torch.Tensor  # the model's own `labels` loss (the supervised VQA loss), a scalar
    logits: torch.Tensor  # next-token logits of the answer, (B, L_a − 1, V): row l predicts answer token l + 1
    answer_mask: torch.Tensor  # (B, L_a − 1): 1 where the supervised loss scores a token (label ≠ −100)
    tokens: torch.Tensor  # the question encoder's output over the image, (B, L_q, D)
    token_mask: torch.Tensor  # the questions' attention mask, (B, L_q)


def check_vqa_model(model: nn.Module) -> None:
    """Raise a `TypeError` naming the missing parts when `model` is no BLIP VQA model (or wrapper)."""
    missing = [name for name in VQA_PARTS if not isinstance(getattr(model, name, None), nn.Module)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a BLIP VQA model: it has no {', '.join(missing)} "
                        "(expected transformers' BlipForQuestionAnswering or an AuroraModel around one)")


def vqa_responses(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
                  decoder_attention_mask: torch.Tensor, labels: torch.Tensor) -> VQAResponses:
    """The answer loss, answer logits and multimodal question tokens of `model` on a batch.

    The pass is `BlipForQuestionAnswering.forward(..., labels=labels)`'s, made of its submodules so that the
    question encoder's tokens (which that forward discards) are kept for relation distillation.

    Parameters
    ----------
    model : nn.Module
        `BlipForQuestionAnswering`, or an `AuroraModel` around one.
    pixel_values : torch.Tensor
        Images, (B, 3, H, W).
    input_ids, attention_mask : torch.Tensor
        Questions, (B, L_q).
    decoder_input_ids, decoder_attention_mask : torch.Tensor
        Answers as decoder inputs (`[DEC]` first), (B, L_a).
    labels : torch.Tensor
        The answers' labels, −100 at padding, (B, L_a).

    Returns
    -------
    VQAResponses
    """
    check_vqa_model(model)
    with forward_scope(model):
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        tokens = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                    encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_mask).last_hidden_state
        answer = model.text_decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                                    encoder_hidden_states=tokens, encoder_attention_mask=attention_mask,
                                    labels=labels, reduction="mean")
    return VQAResponses(loss=answer.loss.mean(), logits=answer.logits[:, :-1], answer_mask=labels[:, 1:] != -100,
                        tokens=tokens, token_mask=attention_mask)


def vqa_distillation(student: nn.Module, teacher: nn.Module, config: DistillConfig, pixel_values: torch.Tensor,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
                     decoder_attention_mask: torch.Tensor, labels: torch.Tensor, *,
                     student_responses: VQAResponses | None = None) -> dict[str, torch.Tensor]:
    """The VQA distillation terms of a batch, for `DistillConfig.combine`.

    Parameters
    ----------
    student, teacher : nn.Module
        `BlipForQuestionAnswering` models (or `AuroraModel`s around them) with the same tokenizer; widths may
        differ. The teacher runs under `torch.no_grad()`, on the same questions, images and answers.
    config : DistillConfig
        Its temperature, if set, scales the answer logits of both (else 1).
    pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels : torch.Tensor
        The batch, as `BlipForQuestionAnswering.forward` takes it for training (see `vqa_responses`).
    student_responses : VQAResponses, optional
        The student's `vqa_responses` on this batch when the caller already has them (its supervised loss comes
        from the same pass); None runs the student here.

    Returns
    -------
    dict of str to torch.Tensor
        "answer" (KL of the answer tokens' distributions, padding excluded) and "relation" (the question
        tokens' self-correlations); scalars, gradients reach the student only.
    """
    batch = (pixel_values, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels)
    mine = student_responses if student_responses is not None else vqa_responses(student, *batch)
    with torch.no_grad():
        theirs = vqa_responses(teacher, *batch)
    if mine.logits.shape[-1] != theirs.logits.shape[-1]:
        raise ValueError(f"the student's and the teacher's decoders have different vocabularies "
                         f"({mine.logits.shape[-1]} and {theirs.logits.shape[-1]} tokens): answer distillation "
                         "needs one tokenizer")
    return {"answer": token_distillation(mine.logits, theirs.logits, mine.answer_mask, config.response_temperature),
            "relation": relation_distillation(mine.tokens, theirs.tokens, mine.token_mask)}
