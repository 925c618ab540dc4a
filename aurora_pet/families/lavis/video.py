"""BLIP on video in the LAVIS family: ``blip_video_retrieval`` and ``blip_video_qa``, registered in LAVIS's registry.

Each is LAVIS's image model (``BlipRetrieval``, ``BlipVQA``: same modules, names and weights, so pre-trained BLIP
checkpoints load as they are) with the learned frame embedding ``frame_embedding`` (``τ``, zero at
initialisation) and forward passes that read a batch of videos ``(B, N, 3, H, W)`` under ``samples["video"]``:
every frame goes through the ViT, the frames' tokens plus ``τ`` are concatenated as the text side's
cross-attention input, and ITC uses the mean of the frames' CLS features (``aurora_pet.video.encode``).

- Retrieval trains BLIP's ITC (momentum encoders and queues as for images; the momentum ViT sees the same
  frames) and ITM (hard negatives drawn by ITC similarity, from this process or from every process with
  ``negative_all_rank``); ``compute_sim_matrix`` ranks by ITC and re-ranks the top ``k_test`` by ITM, both
  ways, as LAVIS does for images.
- QA is BLIP VQA: the question encoder cross-attends to the frames, the answer decoder to the question;
  answers are ranked over an answer list or generated (``predict_answers``).

With one frame and ``τ = 0`` both are exactly the image models. Aurora's presets apply unchanged (the family
names the models by their image architecture); ``wrap_blip_video`` trains ``τ`` beside the adapter.
Importing this module also registers the video processors, dataset builders and the ``video_qa`` task
(``aurora_pet.video.lavis_data``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lavis.common import dist_utils
from lavis.common.registry import registry
from lavis.models.base_model import all_gather_with_grad, concat_all_gather
from lavis.models.blip_models.blip_outputs import BlipOutput
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from lavis.models.blip_models.blip_vqa import BlipVQA
from torch import nn

from ...config import AuroraConfig
from ...errors import AuroraConfigError
from ...model import AuroraModel, get_aurora_model
from ...targets import resolve_targets
from ...video import lavis_data  # noqa: F401  (registers the video processors, builders and task)
from .video_names import NUM_FRAMES, VIDEO_ARCHITECTURES, image_architecture
from ...video.encode import FrameEmbedding, FrameFeatures, encode_frames
from . import FAMILY
from .build import ARCHITECTURES, build_blip, load_checkpoint
from .itc import momentum_itc

__all__ = ["FRAME_EMBEDDING", "NUM_FRAMES", "VIDEO_ARCHITECTURES", "BlipVideoQA", "BlipVideoRetrieval",
           "build_blip_video", "image_architecture", "video_sim_matrix", "wrap_blip_video"]

log = logging.getLogger(__name__)

FRAME_EMBEDDING = "frame_embedding"  # the module holding τ; train it with the adapter (modules_to_save)
TEXT_BATCH = 256  # captions encoded at once in compute_sim_matrix, as LAVIS does


class VideoBlip:
    """What both video models add to their LAVIS image model: ``τ`` and the encoding of a batch of videos."""

    visual_encoder: nn.Module
    frame_embedding: FrameEmbedding

    def _add_frame_embedding(self, num_frames: int) -> None:
        device = next(self.visual_encoder.parameters()).device  # a model already moved keeps τ beside it
        self.frame_embedding = FrameEmbedding(num_frames, self.visual_encoder.vision_width).to(device)

    @property
    def num_frames(self) -> int:
        return self.frame_embedding.num_frames

    def encode_video(self, video: torch.Tensor) -> FrameFeatures:
        """The frames' tokens plus ``τ`` (cross-attention input) and their mean CLS feature (ITC), see
        ``aurora_pet.video.encode_frames``; ``video`` is ``(B, N, 3, H, W)`` with N = ``num_frames``."""
        if video.dim() != 5 or video.shape[1] != self.num_frames:
            raise ValueError(f"{type(self).__name__} reads videos of shape (B, {self.num_frames}, 3, H, W) "
                             f"(num_frames={self.num_frames}), got {tuple(video.shape)}")
        return encode_frames(self.visual_encoder.forward_features, video, self.frame_embedding.weight)

    @classmethod
    def from_image_model(cls, model: nn.Module, num_frames: int = NUM_FRAMES) -> nn.Module:
        """Turn a LAVIS image model into this video model, in place: the same modules, weights and settings,
        the video forward passes, and ``τ = 0``.

        Parameters
        ----------
        model : nn.Module
            A ``BlipRetrieval`` (for ``BlipVideoRetrieval``) or ``BlipVQA`` (for ``BlipVideoQA``), e.g. from
            ``build_blip``.
        num_frames : int
            Frames per video.

        Returns
        -------
        nn.Module
            ``model``, now of this class.
        """
        image_class = next(base for base in cls.__mro__ if base.__module__.startswith("lavis."))
        if type(model) is not image_class:
            raise TypeError(f"{cls.__name__}.from_image_model needs a LAVIS {image_class.__name__}, "
                            f"got {type(model).__name__}")
        model.__class__ = cls
        model._add_frame_embedding(num_frames)
        return model


@registry.register_model("blip_video_retrieval")
class BlipVideoRetrieval(VideoBlip, BlipRetrieval):
    """BLIP retrieval over videos. ``samples``: ``video`` (B, N, 3, H, W), ``text_input`` (B captions),
    ``image_id`` (B video ids: captions of one video are positives of each other), ``epoch``, ``iters``,
    ``num_iters_per_epoch`` (the momentum-distillation ramp), as LAVIS's ``BlipRetrieval``."""

    def __init__(self, *args: Any, num_frames: int = NUM_FRAMES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_frame_embedding(num_frames)

    def forward(self, samples: Mapping[str, Any]) -> BlipOutput:
        video, idx = samples["video"], samples["image_id"].view(-1, 1)
        alpha = self.alpha * self._rampup_factor(epoch=samples["epoch"], iters=samples["iters"],
                                                 num_iters_per_epoch=samples["num_iters_per_epoch"])
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        frames = self.encode_video(video)
        video_feat = F.normalize(self.vision_proj(frames.pooled), dim=-1)
        text = self.tokenizer(samples["text_input"], padding="max_length", truncation=True,
                              max_length=self.max_txt_len, return_tensors="pt").to(video.device)
        text_embeds = self.text_encoder.forward_text(text).last_hidden_state
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)
        loss_itc = self._contrastive_loss(video, text, video_feat, text_feat, idx, alpha)
        loss_itm = self._matching_loss(frames.tokens, text, video_feat, text_feat, idx)
        return BlipOutput(loss=loss_itc + loss_itm, loss_itc=loss_itc, loss_itm=loss_itm)

    def _contrastive_loss(self, video: torch.Tensor, text: Any, video_feat: torch.Tensor, text_feat: torch.Tensor,
                          idx: torch.Tensor, alpha: float) -> torch.Tensor:
        """BLIP's ITC against the momentum features and the queues, with momentum distillation; the momentum
        encoders are updated first and see the same frames; the queues advance."""
        with torch.no_grad():
            self._momentum_update()
            video_pooled_m = encode_frames(self.visual_encoder_m, video).pooled
            video_feat_m = F.normalize(self.vision_proj_m(video_pooled_m), dim=-1)
        return momentum_itc(self, video_feat, text_feat, video_feat_m, text, idx, alpha)

    def _matching_loss(self, video_embeds: torch.Tensor, text: Any, video_feat: torch.Tensor,
                       text_feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """BLIP's ITM: each pair, one hard negative video per caption and one hard negative caption per video,
        drawn in proportion to their ITC similarity (never a pair of the same video)."""
        input_ids = text.input_ids.clone()
        input_ids[:, 0] = self.tokenizer.enc_token_id
        video_atts = torch.ones(video_embeds.shape[:-1], dtype=torch.long, device=video_embeds.device)
        output_pos = self.text_encoder(input_ids, attention_mask=text.attention_mask,
                                       encoder_hidden_states=video_embeds, encoder_attention_mask=video_atts,
                                       return_dict=True)
        all_ranks = self.negative_all_rank
        gather = concat_all_gather if all_ranks else _same
        with torch.no_grad():
            mask = torch.eq(idx, gather(idx).t())
            weights_v2t = F.softmax(video_feat @ gather(text_feat).t() / self.temp, dim=1).masked_fill_(mask, 0)
            weights_t2v = F.softmax(text_feat @ gather(video_feat).t() / self.temp, dim=1).masked_fill_(mask, 0)
        embeds_pool = all_gather_with_grad(video_embeds) if all_ranks else video_embeds
        ids_pool, atts_pool = gather(input_ids), gather(text.attention_mask)
        batch = video_embeds.size(0)
        video_neg = torch.stack([embeds_pool[torch.multinomial(weights_t2v[b], 1).item()] for b in range(batch)])
        text_neg = [torch.multinomial(weights_v2t[b], 1).item() for b in range(batch)]
        output_neg = self.text_encoder(
            torch.cat([input_ids, ids_pool[text_neg]], dim=0),
            attention_mask=torch.cat([text.attention_mask, atts_pool[text_neg]], dim=0),
            encoder_hidden_states=torch.cat([video_neg, video_embeds], dim=0),
            encoder_attention_mask=torch.cat([video_atts, video_atts], dim=0), return_dict=True)
        logits = self.itm_head(torch.cat([output_pos.last_hidden_state[:, 0, :],
                                          output_neg.last_hidden_state[:, 0, :]]))
        labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
        return F.cross_entropy(logits, labels.to(logits.device))

    def compute_sim_matrix(self, data_loader: Any, task_cfg: Any) -> tuple[np.ndarray, np.ndarray]:
        """What LAVIS's retrieval task calls: ``video_sim_matrix`` with the run's ``k_test``."""
        return video_sim_matrix(self, data_loader, k_test=int(task_cfg.k_test))


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def video_sim_matrix(model: BlipVideoRetrieval, data_loader: Any, k_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Video→text and text→video scores for retrieval evaluation, as LAVIS's ``compute_sim_matrix`` for images.

    Every pair gets its ITC similarity ``s = v·t`` (normalised projections of the pooled video and of the
    caption's CLS). For each video the ``k_test`` captions of highest ``s`` (and for each caption the ``k_test``
    videos) are re-scored ``s + ITM logit of "match"``, computed with the caption cross-attending to the
    video's frame tokens; all other pairs score -100. Rows are split over the processes and summed.

    Parameters
    ----------
    model : BlipVideoRetrieval
        The model (the adapter merged or not).
    data_loader : iterable
        Batches ``{"video": (B, N, 3, H, W)}`` in the dataset's order; ``data_loader.dataset`` has ``text``
        (every caption) and ``image`` (every video), as LAVIS's ``VideoRetrievalEvalDataset``.
    k_test : int
        Candidates re-ranked by ITM, at most the number of videos and of captions.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Scores of shape (videos, captions) and (captions, videos).
    """
    dataset = data_loader.dataset
    start = time.time()
    text_feat, text_ids, text_atts = _caption_features(model, dataset.text)
    tokens, feats = [], []
    for samples in data_loader:
        frames = model.encode_video(samples["video"].to(model.device))
        tokens.append(frames.tokens.cpu())
        feats.append(F.normalize(model.vision_proj(frames.pooled), dim=-1))
    video_tokens, video_feat = torch.cat(tokens), torch.cat(feats)
    if k_test > min(len(video_feat), len(text_feat)):
        raise ValueError(f"k_test={k_test} is larger than the {len(video_feat)} videos or {len(text_feat)} captions")
    sims = video_feat @ text_feat.t()

    def itm(video_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        encoder = video_tokens[video_rows.cpu()].to(model.device)
        output = model.text_encoder(text_ids[text_rows], attention_mask=text_atts[text_rows],
                                    encoder_hidden_states=encoder, encoder_attention_mask=torch.ones(
                                        encoder.shape[:-1], dtype=torch.long, device=model.device), return_dict=True)
        return model.itm_head(output.last_hidden_state[:, 0, :])[:, 1]

    v2t = _rerank(sims, k_test, lambda row, top: itm(torch.full_like(top, row), top))
    t2v = _rerank(sims.t(), k_test, lambda row, top: itm(top, torch.full_like(top, row)))
    if dist_utils.is_dist_avail_and_initialized():
        torch.distributed.barrier()
        torch.distributed.all_reduce(v2t)
        torch.distributed.all_reduce(t2v)
    log.info("video retrieval scores: %d videos x %d captions, k_test=%d, %.1f s", len(video_feat), len(text_feat),
             k_test, time.time() - start)
    return v2t.cpu().numpy(), t2v.cpu().numpy()


def _caption_features(model: BlipVideoRetrieval,
                      captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised ITC features of every caption, and its token ids (``[ENC]`` first, for ITM) and mask."""
    feats, ids, atts = [], [], []
    for begin in range(0, len(captions), TEXT_BATCH):
        text = model.tokenizer(captions[begin:begin + TEXT_BATCH], padding="max_length", truncation=True,
                               max_length=model.max_txt_len, return_tensors="pt").to(model.device)
        embeds = model.text_encoder.forward_text(text).last_hidden_state
        feats.append(F.normalize(model.text_proj(embeds[:, 0, :]), dim=-1))
        ids.append(text.input_ids)
        atts.append(text.attention_mask)
    input_ids = torch.cat(ids)
    input_ids[:, 0] = model.tokenizer.enc_token_id
    return torch.cat(feats), input_ids, torch.cat(atts)


def _rerank(sims: torch.Tensor, k_test: int, itm: Any) -> torch.Tensor:
    """-100 everywhere but each row's top ``k_test`` by ``sims``, which score ``sims + itm(row, top)``; this process
    fills its share of the rows (LAVIS's split)."""
    scores = torch.full_like(sims, -100.0)
    step = sims.size(0) // dist_utils.get_world_size() + 1
    first = dist_utils.get_rank() * step
    for row in range(first, min(sims.size(0), first + step)):
        top_sims, top = sims[row].topk(k=k_test, dim=0)
        scores[row, top] = itm(row, top) + top_sims
    return scores


@registry.register_model("blip_video_qa")
class BlipVideoQA(VideoBlip, BlipVQA):
    """BLIP VQA over videos. ``samples``: ``video`` (B, N, 3, H, W), ``text_input`` (B questions) and, for
    training, ``answer``, ``weight`` and ``n_answers`` as LAVIS's ``BlipVQA`` reads them."""

    def __init__(self, *args: Any, num_frames: int = NUM_FRAMES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_frame_embedding(num_frames)

    def forward(self, samples: Mapping[str, Any]) -> BlipOutput:
        return super().forward(_video_as_visual_input(samples))

    def predict_answers(self, samples: Mapping[str, Any], *args: Any, **kwargs: Any) -> list[str]:
        """LAVIS's ``BlipVQA.predict_answers`` (``inference_method`` "rank" over ``answer_list``, or "generate")."""
        return super().predict_answers(_video_as_visual_input(samples), *args, **kwargs)

    def forward_encoder(self, samples: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """The question encoder cross-attending to the frame tokens (LAVIS's; the video is in ``samples["image"]``,
        see ``_video_as_visual_input``)."""
        questions = self.tokenizer(samples["text_input"], padding="longest", truncation=True,
                                   max_length=self.max_txt_len, return_tensors="pt").to(self.device)
        questions.input_ids[:, 0] = self.tokenizer.enc_token_id
        samples["tokenized_text"] = questions
        video_embeds = self.encode_video(samples["image"]).tokens
        return self.text_encoder.forward_automask(tokenized_text=questions, visual_embeds=video_embeds), video_embeds


def _video_as_visual_input(samples: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``samples`` with the video where LAVIS's ``BlipVQA`` reads its visual input (and batch size)."""
    if "video" not in samples:
        raise KeyError(f"a video model reads samples['video'] (B, N, 3, H, W); got keys {sorted(samples)}")
    return {**samples, "image": samples["video"]}


VIDEO_CLASSES: dict[str, type[VideoBlip]] = {"blip_video_retrieval": BlipVideoRetrieval, "blip_video_qa": BlipVideoQA}
def build_blip_video(arch: str, model_type: str | None = None, *, num_frames: int = NUM_FRAMES, size: str = "base",
                     checkpoint: str | None = None, strict: bool = True, **kwargs: Any) -> nn.Module:
    """A LAVIS BLIP video model built offline: ``build_blip`` of its image architecture, made a video model.

    Parameters
    ----------
    arch : str
        ``blip_video_retrieval`` or ``blip_video_qa``.
    model_type : str, optional
        A model type of the image architecture (its LAVIS yaml settings): ``coco``/``flickr`` for retrieval,
        ``vqav2`` for QA; default the first.
    num_frames : int
        Frames per video (the rows of ``τ``).
    size : str
        ``"base"`` (BLIP-base) or ``"tiny"``.
    checkpoint : str, optional
        Weights to load after the video model is made, so a video checkpoint (with ``frame_embedding``) loads
        as well as an image one (without it, ``τ`` stays 0); a BLIP-base checkpoint needs bert-base-uncased's
        vocabulary (see ``build_blip``).
    strict : bool
        Refuse a checkpoint whose keys differ (else load what matches and log the rest, as ``load_checkpoint``).
    **kwargs
        ``build_blip``'s other arguments (``vocab_file``, ``allow_download``, ``image_size``, overrides).

    Returns
    -------
    nn.Module
        A ``BlipVideoRetrieval`` or ``BlipVideoQA``.
    """
    if arch not in VIDEO_CLASSES:
        raise AuroraConfigError(f"unknown LAVIS video arch {arch!r}; choose one of {sorted(VIDEO_CLASSES)}")
    image_arch = VIDEO_ARCHITECTURES[arch]
    kwargs.setdefault("pretrained_weights", checkpoint is not None)
    model = build_blip(image_arch, model_type or ARCHITECTURES[image_arch][0], size=size, **kwargs)
    model = VIDEO_CLASSES[arch].from_image_model(model, num_frames)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict)
        if hasattr(model, "reset_queue_ptr"):
            model.reset_queue_ptr()  # as LAVIS's from_config: fine-tuning starts a fresh queue
    return model


def wrap_blip_video(model: nn.Module, config: AuroraConfig | str = "cross-attention", **overrides: Any) -> AuroraModel:
    """Wrap a video model with Aurora, training ``τ`` beside the adapter.

    ``config`` is an ``AuroraConfig`` or a preset name of the image architecture ("cross-attention",
    "text-attention", "reference", or a full name), with ``overrides``; ``frame_embedding`` is added to the
    heads in ``modules_to_save`` (the preset's when not overridden), so ``τ`` trains, is counted in the parameter
    report and is saved with the adapter.

    Parameters
    ----------
    model : nn.Module
        A ``BlipVideoRetrieval`` or ``BlipVideoQA``.
    config : AuroraConfig or str
        The adapter, or a preset name.
    **overrides
        ``AuroraConfig`` fields.

    Returns
    -------
    AuroraModel
    """
    if not isinstance(model, VideoBlip):
        raise TypeError(f"wrap_blip_video needs a BlipVideoRetrieval or BlipVideoQA, got {type(model).__name__}")
    if isinstance(config, str):
        config = AuroraConfig.from_preset(FAMILY.preset(model, config).name, **overrides)
    elif overrides:
        config = AuroraConfig.from_dict({**config.to_dict(), **overrides})
    heads = resolve_targets(model, config, FAMILY).modules_to_save  # the preset's heads where not set
    if FRAME_EMBEDDING not in heads:
        config = AuroraConfig.from_dict({**config.to_dict(), "modules_to_save": [*heads, FRAME_EMBEDDING]})
    return get_aurora_model(model, config)
