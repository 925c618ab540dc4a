"""Distillation in the LAVIS family: what a LAVIS BLIP teacher and an Aurora student answer on one training
batch, the terms of `aurora_pet.distill` between them, and the staged training step a recipe's `distill:`
section runs (see docs/method.md, "Distillation").

Retrieval. LAVIS's `BlipRetrieval.forward` draws its ITM hard negatives inside the pass and returns neither
the drawn indices nor the in-batch similarities with their gradient, so a student that is distilled is made a
`DistillBlipRetrieval` (`DistillBlipRetrieval.from_model`, in place, as the video models are made): the same
losses in the same order (ITC against the momentum features and queues with momentum distillation, ITM on the
positives and on one hard negative caption and image each, drawn from the same RNG stream as LAVIS draws them),
plus, in its output, the student's responses and the pairs it scored. The teacher (a plain LAVIS model, frozen,
in eval mode) answers on those same pairs (`retrieval_responses`). Runs without `distill:` keep LAVIS's class
and forward untouched.

VQA. LAVIS's `BlipVQA.forward` already returns what distillation needs: the question encoder's output over the
image (the multimodal tokens) and the answer decoder's token logits of the given answers; the teacher runs the
same forward on the same samples, so the student keeps LAVIS's class.

`Distiller` is the training step of the staged scheme: `train_step(model, samples)` replaces the task's
`train_step` for the run (the runner installs it), and `start_epoch(epoch)` picks the epoch's stage from the
epoch number alone (so a resumed run continues in the right stage), freezing the adapter in `align`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lavis.common import dist_utils
from lavis.models.base_model import all_gather_with_grad, concat_all_gather
from lavis.models.blip_models.blip_outputs import BlipOutput
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from lavis.models.blip_models.blip_vqa import BlipVQA
from torch import nn

from .itc import momentum_itc
from ...distill import DistillConfig, Stage, itc_distillation, itm_distillation, relation_distillation, \
    token_distillation

__all__ = ["DISTILL_ARCHITECTURES", "TASK_PARTS", "DistillBlipRetrieval", "Distiller", "RetrievalDistillOutput",
           "RetrievalResponses", "retrieval_parts", "retrieval_responses", "vqa_parts"]

log = logging.getLogger(__name__)

DISTILL_ARCHITECTURES = ("blip_retrieval", "blip_vqa")  # the LAVIS architectures a recipe can distil
TASK_PARTS = {"blip_retrieval": ("itc", "itm", "relation"), "blip_vqa": ("answer", "relation")}


# -- retrieval ---------------------------------------------------------------------------------------

@dataclass
class RetrievalDistillOutput(BlipOutput):
    """`BlipOutput` (loss, loss_itc, loss_itm) plus the student's responses and the pairs its ITM loss scored.

    Flat tensor fields, so that DDP finds every tensor of the output (it does not look inside nested objects).
    `pair_texts` / `pair_images` index the caption and image pools the hard negatives were drawn from: this
    process's batch, or every process's batch in rank order with `negative_all_rank`."""

    similarity: Optional[torch.Tensor] = None  # S = v tᵀ, (B, B), image rows, with gradient
    itm_logits: Optional[torch.Tensor] = None  # (3B, 2): (j, j), then (caption j, its negative image), (neg., i)
    tokens: Optional[torch.Tensor] = None  # text encoder's output over the image of each ITM pair, (3B, L, D)
    token_mask: Optional[torch.Tensor] = None  # the pairs' caption mask, (3B, L)
    pair_texts: Optional[torch.Tensor] = None  # caption of each pair, index into the caption pool, (3B,)
    pair_images: Optional[torch.Tensor] = None  # image of each pair, index into the image pool, (3B,)
    text_ids: Optional[torch.Tensor] = None  # this process's captions as tokenized ([CLS] first), (B, L)
    text_mask: Optional[torch.Tensor] = None  # their attention mask, (B, L)


class DistillBlipRetrieval(BlipRetrieval):
    """LAVIS's `BlipRetrieval` whose training forward also returns its responses for distillation.

    The loss is LAVIS 1.0.2's, computed the same way (the tests compare the two under one seed); only the
    indexing of the drawn negatives is vectorised and the drawn indices are kept."""

    @classmethod
    def from_model(cls, model: nn.Module) -> "DistillBlipRetrieval":
        """Make a LAVIS `BlipRetrieval` this class, in place (same modules, weights, names and evaluation).

        Parameters
        ----------
        model : nn.Module
            A `BlipRetrieval` (e.g. from `build_blip`), not yet wrapped.

        Returns
        -------
        DistillBlipRetrieval
            `model`, now of this class.
        """
        if type(model) is cls:
            return model
        if type(model) is not BlipRetrieval:
            raise TypeError(f"{cls.__name__}.from_model needs a LAVIS BlipRetrieval, got {type(model).__name__}")
        model.__class__ = cls
        return model

    def forward(self, samples: Mapping[str, Any]) -> RetrievalDistillOutput:
        """ITC + ITM as LAVIS's `BlipRetrieval.forward`; `samples` as LAVIS reads them."""
        image, idx = samples["image"], samples["image_id"].view(-1, 1)
        alpha = self.alpha * self._rampup_factor(epoch=samples["epoch"], iters=samples["iters"],
                                                 num_iters_per_epoch=samples["num_iters_per_epoch"])
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.visual_encoder.forward_features(image)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long).to(image.device)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text = self.tokenizer(samples["text_input"], padding="max_length", truncation=True,
                              max_length=self.max_txt_len, return_tensors="pt").to(image.device)
        text_embeds = self.text_encoder.forward_text(text).last_hidden_state
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

        # ITC against the momentum features and the queues, with momentum distillation (LAVIS's)
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        loss_itc = momentum_itc(self, image_feat, text_feat, image_feat_m, text, idx, alpha)

        # ITM on the positives and on hard negatives drawn by ITC similarity (LAVIS's, indices kept)
        encoder_input_ids = text.input_ids.clone()
        encoder_input_ids[:, 0] = self.tokenizer.enc_token_id
        batch = image.size(0)
        output_pos = self.text_encoder(encoder_input_ids, attention_mask=text.attention_mask,
                                       encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                       return_dict=True)
        all_ranks = bool(self.negative_all_rank)
        idxs = concat_all_gather(idx)  # LAVIS gathers the ids in both branches
        gather = concat_all_gather if all_ranks else _same
        with torch.no_grad():
            mask = torch.eq(idx, idxs.t()) if all_ranks else torch.eq(idx, idx.t())
            weights_i2t = F.softmax(image_feat @ gather(text_feat).t() / self.temp, dim=1).masked_fill_(mask, 0)
            weights_t2i = F.softmax(text_feat @ gather(image_feat).t() / self.temp, dim=1).masked_fill_(mask, 0)
        image_pool = all_gather_with_grad(image_embeds) if all_ranks else image_embeds
        negative_images = [torch.multinomial(weights_t2i[b], 1).item() for b in range(batch)]
        ids_pool, atts_pool = gather(encoder_input_ids), gather(text.attention_mask)
        negative_texts = [torch.multinomial(weights_i2t[b], 1).item() for b in range(batch)]
        image_embeds_neg = image_pool[negative_images]
        text_atts_all = torch.cat([text.attention_mask, atts_pool[negative_texts]], dim=0)
        output_neg = self.text_encoder(torch.cat([encoder_input_ids, ids_pool[negative_texts]], dim=0),
                                       attention_mask=text_atts_all,
                                       encoder_hidden_states=torch.cat([image_embeds_neg, image_embeds], dim=0),
                                       encoder_attention_mask=torch.cat([image_atts, image_atts], dim=0),
                                       return_dict=True)
        tokens = torch.cat([output_pos.last_hidden_state, output_neg.last_hidden_state], dim=0)
        itm_logits = self.itm_head(tokens[:, 0, :])
        itm_labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)],
                               dim=0).to(self.device)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        offset = dist_utils.get_rank() * batch if all_ranks else 0  # this batch's place in the pools
        rows = torch.arange(batch, device=image.device) + offset
        pair_texts = torch.cat([rows, rows, torch.tensor(negative_texts, device=image.device)])
        pair_images = torch.cat([rows, torch.tensor(negative_images, device=image.device), rows])
        return RetrievalDistillOutput(
            loss=loss_itc + loss_itm, loss_itc=loss_itc, loss_itm=loss_itm, similarity=image_feat @ text_feat.t(),
            itm_logits=itm_logits, tokens=tokens, token_mask=torch.cat([text.attention_mask, text_atts_all], dim=0),
            pair_texts=pair_texts, pair_images=pair_images, text_ids=text.input_ids, text_mask=text.attention_mask)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class RetrievalResponses:
    """What a retrieval model answers on a batch: its ITC similarities and temperature, and its ITM logits
    and multimodal token features on given (caption, image) pairs."""

    similarity: torch.Tensor  # (B, B), image rows
    temperature: torch.Tensor | float
    itm_logits: torch.Tensor  # (P, 2)
    tokens: torch.Tensor  # (P, L, D)


def retrieval_responses(model: nn.Module, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                        pair_texts: torch.Tensor, pair_images: torch.Tensor, *,
                        all_ranks: bool = False) -> RetrievalResponses:
    """A LAVIS retrieval model's responses on a batch and on given ITM pairs (the teacher's side).

    Parameters
    ----------
    model : nn.Module
        A LAVIS `BlipRetrieval` (any width; the same tokenizer as the student's).
    image : torch.Tensor
        The batch's images, (B, 3, H, W).
    text_ids, text_mask : torch.Tensor
        The batch's captions as the student tokenized them ([CLS] first), (B, L).
    pair_texts, pair_images : torch.Tensor
        Caption and image of each ITM pair, (P,), indices into the pools (see `RetrievalDistillOutput`).
    all_ranks : bool
        Whether the pools are every process's batch (the student's `negative_all_rank`); then every process
        must call this together.

    Returns
    -------
    RetrievalResponses
    """
    image_embeds = model.visual_encoder.forward_features(image)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_embeds = model.text_encoder(text_ids, attention_mask=text_mask, return_dict=True,
                                     mode="text").last_hidden_state
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0, :]), dim=-1)
    encoder_ids = text_ids.clone()
    encoder_ids[:, 0] = model.tokenizer.enc_token_id
    gather = concat_all_gather if all_ranks else _same
    image_pool, ids_pool, mask_pool = gather(image_embeds), gather(encoder_ids), gather(text_mask)
    pair_embeds = image_pool[pair_images]
    tokens = model.text_encoder(ids_pool[pair_texts], attention_mask=mask_pool[pair_texts],
                                encoder_hidden_states=pair_embeds,
                                encoder_attention_mask=torch.ones(pair_embeds.shape[:-1], dtype=torch.long,
                                                                  device=pair_embeds.device),
                                return_dict=True).last_hidden_state
    return RetrievalResponses(image_feat @ text_feat.t(), model.temp, model.itm_head(tokens[:, 0, :]), tokens)


def retrieval_parts(config: DistillConfig, output: RetrievalDistillOutput, student: nn.Module, teacher: nn.Module,
                    samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The retrieval terms of one step: ITC (both directions), ITM on the student's own ITM pairs, relation.

    Parameters
    ----------
    config : DistillConfig
        Weights (a term of weight 0 is not computed) and temperature.
    output : RetrievalDistillOutput
        The student's forward on the batch.
    student : nn.Module
        The student's LAVIS model (its ITC temperature).
    teacher : nn.Module
        The teacher, frozen and in eval mode; run here under `torch.no_grad()`.
    samples : Mapping
        The batch (`image`).

    Returns
    -------
    dict of str to torch.Tensor
        "itc", "itm", "relation" (those of weight > 0).
    """
    weights = config.weights()
    with torch.no_grad():
        theirs = retrieval_responses(teacher, samples["image"], output.text_ids, output.text_mask, output.pair_texts,
                                     output.pair_images, all_ranks=bool(student.negative_all_rank))
    parts: dict[str, torch.Tensor] = {}
    if weights["itc"] > 0:
        tau_student, tau_teacher = config.itc_temperatures(student.temp, theirs.temperature)
        parts["itc"] = itc_distillation(output.similarity, theirs.similarity, tau_student, tau_teacher)
    if weights["itm"] > 0:
        parts["itm"] = itm_distillation(output.itm_logits, theirs.itm_logits, config.response_temperature)
    if weights["relation"] > 0:
        parts["relation"] = relation_distillation(output.tokens, theirs.tokens, output.token_mask)
    return parts


# -- VQA -----------------------------------------------------------------------------------------------

def vqa_parts(config: DistillConfig, output: BlipOutput, student: nn.Module, teacher: nn.Module,
              samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The VQA terms of one step: the answer decoder's token distributions of the batch's answers (`answer`,
    `token_distillation` over the answer tokens, padding out) and relation on the question encoder's tokens.

    Parameters
    ----------
    config : DistillConfig
        Weights (a term of weight 0 is not computed) and temperature.
    output : BlipOutput
        The student's LAVIS `BlipVQA.forward` on the batch (its `intermediate_output`).
    student : nn.Module
        The student's LAVIS model (its tokenizer, for the question mask).
    teacher : nn.Module
        The teacher, frozen and in eval mode; its LAVIS forward runs here under `torch.no_grad()`.
    samples : Mapping
        The batch, as `BlipVQA.forward` reads it.

    Returns
    -------
    dict of str to torch.Tensor
        "answer", "relation" (those of weight > 0).
    """
    weights = config.weights()
    with torch.no_grad():
        theirs = teacher(dict(samples)).intermediate_output
    mine = output.intermediate_output
    parts: dict[str, torch.Tensor] = {}
    if weights["answer"] > 0:
        # the decoder predicts token l+1 at position l; labels are -100 at padding (LAVIS's targets)
        mask = mine.decoder_labels[:, 1:] != -100
        parts["answer"] = token_distillation(mine.decoder_output.logits[:, :-1], theirs.decoder_output.logits[:, :-1],
                                             mask, config.response_temperature)
    if weights["relation"] > 0:
        questions = student.tokenizer(list(samples["text_input"]), padding="longest", truncation=True,
                                      max_length=student.max_txt_len, return_tensors="pt")
        mask = questions.attention_mask.to(mine.encoder_output.last_hidden_state.device)
        parts["relation"] = relation_distillation(mine.encoder_output.last_hidden_state,
                                                  theirs.encoder_output.last_hidden_state, mask)
    return parts


# -- the staged training step --------------------------------------------------------------------------

PartsFunction = Callable[[DistillConfig, Any, nn.Module, nn.Module, Mapping[str, Any]], dict[str, torch.Tensor]]


class Distiller:
    """The training step of a run with `distill:`: the stage of each epoch, the loss, the frozen teacher.

    Parameters
    ----------
    config : DistillConfig
        The recipe's `distill:` section.
    teacher : nn.Module
        The teacher (a LAVIS model of the student's architecture); frozen and put in eval mode here. It is held
        here, not inside the student, so it is never saved, optimised or counted as trainable.
    student : nn.Module
        The student's LAVIS model (inside the `AuroraModel`, if any): a `DistillBlipRetrieval` or a `BlipVQA`.
    heads : iterable of nn.Module
        The modules that train in every stage (`AuroraModel.heads`); every other trainable parameter of
        `model` is the adapter, frozen in the `align` stage.
    model : nn.Module
        What the runner trains (the `AuroraModel`, or the LAVIS model for full fine-tuning).
    max_epoch : int
        The run's epochs (`DistillConfig.schedule`).
    log_freq : int
        Steps between two log lines of the loss parts.
    """

    def __init__(self, config: DistillConfig, teacher: nn.Module, student: nn.Module, heads: list[nn.Module],
                 model: nn.Module, max_epoch: int, log_freq: int = 50) -> None:
        if isinstance(student, DistillBlipRetrieval):
            self.parts_function: PartsFunction = retrieval_parts
        elif isinstance(student, BlipVQA):
            self.parts_function = vqa_parts
        else:
            raise TypeError("distillation needs a DistillBlipRetrieval or BlipVQA student, got "
                            f"{type(student).__name__}")
        wanted = BlipRetrieval if isinstance(student, BlipRetrieval) else BlipVQA
        if not isinstance(teacher, wanted):
            raise TypeError(f"the teacher of a {type(student).__name__} student must be a LAVIS {wanted.__name__}, "
                            f"got {type(teacher).__name__}")
        if wanted is BlipVQA and teacher.text_decoder.config.vocab_size != student.text_decoder.config.vocab_size:
            raise ValueError(f"the teacher's answer decoder has {teacher.text_decoder.config.vocab_size} tokens, the "
                             f"student's {student.text_decoder.config.vocab_size}: answer distillation needs one "
                             "vocabulary")
        self.config = config
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        self.schedule = config.schedule(max_epoch)
        head_ids = {id(p) for head in heads for p in head.parameters()}
        self.adapter_parameters = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        self.log_freq = max(1, int(log_freq))
        self.stage: Stage = self.schedule[0]
        self._sums: dict[str, float] = {}
        self._steps = 0

    @property
    def freezes_adapter(self) -> bool:
        """Whether some epoch trains the heads only (DDP must then allow parameters without gradient)."""
        return any(not stage.trains_adapter for stage in self.schedule)

    def stage_of(self, epoch: int) -> Stage:
        """The stage of `epoch` (0-based), from the epoch number alone: resume-safe."""
        return self.schedule[min(epoch, len(self.schedule) - 1)]

    def start_epoch(self, epoch: int, device: torch.device | str | None = None) -> Stage:
        """Enter `epoch`'s stage: freeze or unfreeze the adapter, move the teacher to `device`, reset the sums.

        Call after the optimizer exists (it must hold the adapter's parameters though they are frozen now).

        Parameters
        ----------
        epoch : int
            The epoch about to train (0-based).
        device : torch.device or str, optional
            Where the student runs.

        Returns
        -------
        Stage
        """
        self.stage = self.stage_of(epoch)
        for parameter in self.adapter_parameters:
            parameter.requires_grad_(self.stage.trains_adapter)
            if not self.stage.trains_adapter:
                parameter.grad = None
        if device is not None:
            self.teacher.to(device)
        self.teacher.eval()
        self._sums, self._steps = {}, 0
        log.info("epoch %d: distillation stage %r (task loss: %s, distillation: %s, adapter trains: %s)", epoch,
                 self.stage.name, self.stage.task_loss, self.stage.distillation, self.stage.trains_adapter)
        return self.stage

    def train_step(self, model: nn.Module, samples: Mapping[str, Any]) -> torch.Tensor:
        """The step's loss (what LAVIS's `BaseTask.train_step` returns): `DistillConfig.combine` of the task loss
        and the distillation terms, as the current stage says; the parts are summed for `epoch_stats`.

        Parameters
        ----------
        model : nn.Module
            The runner's model (DDP, `AuroraModel` or the LAVIS model): the student's forward goes through it.
        samples : Mapping
            The batch.

        Returns
        -------
        torch.Tensor
            The scalar loss to backpropagate.
        """
        output = model(samples)
        parts = self.parts_function(self.config, output, self.student, self.teacher, samples) \
            if self.stage.distillation else {}
        loss, logged = self.config.combine(parts, output["loss"], self.stage)
        for key, value in logged.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._steps += 1
        if self._steps % self.log_freq == 0:
            log.info("distill [%s] step %d: %s", self.stage.name, self._steps,
                     ", ".join(f"{k}={v:.4f}" for k, v in logged.items()))
        return loss

    def epoch_stats(self) -> dict[str, Any]:
        """The epoch's mean of each logged part over every step of every process, and the stage's name.

        A collective call when a process group exists (every process must call it)."""
        keys = sorted(self._sums)
        values = torch.tensor([self._sums[k] for k in keys] + [float(self._steps)], dtype=torch.float64)
        if dist_utils.is_dist_avail_and_initialized() and dist_utils.get_world_size() > 1:
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            values = values.to(device)
            torch.distributed.all_reduce(values)
        values = values.cpu().tolist()
        steps = values[-1]
        stats: dict[str, Any] = {"stage": self.stage.name}
        stats.update({f"loss_{k}": (v / steps if steps else math.nan) for k, v in zip(keys, values) if k != "loss"})
        return stats  # the total is LAVIS's own "loss"
