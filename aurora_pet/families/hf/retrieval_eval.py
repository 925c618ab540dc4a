"""Image–text retrieval evaluation of transformers BLIP by LAVIS's protocol (`compute_sim_matrix` + the
retrieval task's metrics), over the model's own submodules, so an `AuroraModel` around it evaluates with
its adapter.

Protocol, for I images and T captions (caption t describes image g(t); an image has one or more captions)::

    S_it   = v_iᵀ t_t                          (ITC cosine similarity, no temperature)
    image→text: for image i, the k = min(k_test, T) captions of largest S_i· are re-scored
        score_it = itm(c_t, E_i)[1] + S_it     (the ITM "matches" logit plus the cosine, as LAVIS adds them)
    text→image: for caption t, likewise over the k = min(k_test, I) images of largest S_·t
    every other entry scores −∞

The rank of a query is the 0-based position of its best-placed ground truth when its row is sorted by
score, descending; ties (only among the −∞ entries) are broken by index, a stable sort. R@K is the
percentage of queries ranked below K. LAVIS fills the entries it does not re-rank with −100 and sorts with
an unstable `argsort`: the ranks agree whenever the re-ranked scores are above −100, and with
k_test ≥ 10 (LAVIS uses 256 for Flickr30k, 128 for COCO) ties never reach R@1/5/10.

The keys are those of LAVIS's `RetrievalTask`: `txt_r*` image→text, `img_r*` text→image, and LAVIS's
`agg_metrics` is the image→text mean `txt_r_mean` (not `r_mean`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .retrieval import check_retrieval_model, forward_scope, image_features, itm_logits, text_features

__all__ = ["RECALL_AT", "RetrievalScores", "evaluate_retrieval", "retrieval_metrics", "retrieval_scores"]

RECALL_AT = (1, 5, 10)


class RetrievalScores(NamedTuple):
    """Score matrices of the protocol: `image_to_text` (I, T), `text_to_image` (T, I), and the ITC cosine
    similarities `similarity` (I, T); all on the CPU."""

    image_to_text: torch.Tensor
    text_to_image: torch.Tensor
    similarity: torch.Tensor


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _image_batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    return images.split(batch_size) if isinstance(images, torch.Tensor) else images


@torch.no_grad()
def retrieval_scores(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, *, k_test: int = 256, batch_size: int = 64,
                     itm_token_id: int | None = None, cache_on_cpu: bool = True,
                     progress: bool = True) -> RetrievalScores:
    """ITC similarities, then ITM re-ranking of each query's top `k_test` candidates (see the module doc).

    Parameters
    ----------
    model : nn.Module
        `BlipForImageTextRetrieval`, or an `AuroraModel` around one; evaluated in eval mode, its mode restored.
    images : torch.Tensor or iterable of torch.Tensor
        Pixel values of all I images, (I, 3, H, W), or their batches in order (e.g. from a DataLoader).
    input_ids, attention_mask : torch.Tensor
        All T captions, tokenised to one length, shape (T, L).
    k_test : int
        Candidates re-ranked per query (≥ 1; more than there are means all).
    batch_size : int
        Images, captions or (caption, image) pairs per forward pass.
    itm_token_id : int, optional
        First token of ITM inputs (BLIP's `[ENC]`); None keeps transformers' `[CLS]`. Use what training used.
    cache_on_cpu : bool
        Keep the image tokens of all images in CPU memory (as LAVIS does) rather than on the model's device.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    RetrievalScores
        `image_to_text` (I, T), `text_to_image` (T, I), `similarity` (I, T).
    """
    check_retrieval_model(model)
    if k_test < 1:
        raise ValueError(f"k_test must be ≥ 1, got {k_test}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be (T, L), got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    device = _device(model)
    with _evaluating(model):
        embeds, image_feat = _encode_images(model, images, batch_size, device, cache_on_cpu, progress)
        text_feat = _encode_texts(model, input_ids, attention_mask, batch_size, device, progress)
        similarity = (image_feat @ text_feat.T).float()
        ids, mask = input_ids.to(device), attention_mask.to(device)
        i2t = _rerank(model, similarity, embeds, ids, mask, k_test, batch_size, itm_token_id, progress,
                      images_are_queries=True)
        t2i = _rerank(model, similarity.T, embeds, ids, mask, k_test, batch_size, itm_token_id, progress,
                      images_are_queries=False)
    return RetrievalScores(i2t.cpu(), t2i.cpu(), similarity.cpu())


def _encode_images(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int,
                   device: torch.device, cache_on_cpu: bool, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens E (all images) and their normalised projected CLS features v."""
    embeds, feats = [], []
    for pixels in tqdm(_image_batches(images, batch_size), desc="image features", disable=not progress):
        with forward_scope(model):
            embed, feat = image_features(model, pixels.to(device))
        embeds.append(embed.cpu() if cache_on_cpu else embed)
        feats.append(feat)
    if not feats:
        raise ValueError("no images to evaluate")
    return torch.cat(embeds), torch.cat(feats)


def _encode_texts(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int,
                  device: torch.device, progress: bool) -> torch.Tensor:
    """Normalised projected CLS features t of all captions."""
    if input_ids.shape[0] == 0:
        raise ValueError("no captions to evaluate")
    feats = []
    for ids, mask in tqdm(zip(input_ids.split(batch_size), attention_mask.split(batch_size)), desc="text features",
                          total=-(-input_ids.shape[0] // batch_size), disable=not progress):
        with forward_scope(model):
            feats.append(text_features(model, ids.to(device), mask.to(device)))
    return torch.cat(feats)


def _rerank(model: nn.Module, similarity: torch.Tensor, embeds: torch.Tensor, input_ids: torch.Tensor,
            attention_mask: torch.Tensor, k_test: int, batch_size: int, itm_token_id: int | None, progress: bool,
            images_are_queries: bool) -> torch.Tensor:
    """Scores of one direction: query rows of `similarity`, ITM logit + cosine for each query's top k."""
    queries, candidates = similarity.shape
    top = similarity.topk(min(k_test, candidates), dim=1)
    rows = torch.arange(queries, device=similarity.device).repeat_interleave(top.indices.shape[1])
    cols = top.indices.flatten()
    image_index, text_index = (rows, cols) if images_are_queries else (cols, rows)
    itm = torch.cat([
        _pair_scores(model, embeds, input_ids, attention_mask, image_index[start:start + batch_size],
                     text_index[start:start + batch_size], itm_token_id)
        for start in tqdm(range(0, rows.numel(), batch_size), disable=not progress,
                          desc="ITM re-rank " + ("image→text" if images_are_queries else "text→image"))])
    scores = torch.full_like(similarity, float("-inf"))
    scores[rows, cols] = itm + top.values.flatten()
    return scores


def _pair_scores(model: nn.Module, embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_index: torch.Tensor, text_index: torch.Tensor, itm_token_id: int | None) -> torch.Tensor:
    """The ITM "matches" logit of (caption text_index[k], image image_index[k]) for each k."""
    image_embeds = embeds[image_index.to(embeds.device)].to(input_ids.device)
    with forward_scope(model):
        logits = itm_logits(model, image_embeds, input_ids[text_index], attention_mask[text_index], itm_token_id)
    return logits[:, 1].float()


# -- metrics ---------------------------------------------------------------------------------------

def retrieval_metrics(image_to_text: torch.Tensor, text_to_image: torch.Tensor,
                      text_image: Sequence[int] | torch.Tensor) -> dict[str, float]:
    """Recall@1/5/10 in both directions, in percent, with LAVIS's keys.

    Parameters
    ----------
    image_to_text : torch.Tensor
        Scores (I, T): row i ranks the captions for image i.
    text_to_image : torch.Tensor
        Scores (T, I): row t ranks the images for caption t.
    text_image : sequence of int or torch.Tensor
        g(t), the image index of each caption, length T; every image needs at least one caption.

    Returns
    -------
    dict of str to float
        `txt_r1`, `txt_r5`, `txt_r10`, `txt_r_mean` (image→text), `img_r1`, `img_r5`, `img_r10`, `img_r_mean`
        (text→image), `r_mean` (their mean) and `agg_metrics` (= `txt_r_mean`, as LAVIS reports it).
    """
    truth = _truth(image_to_text, text_to_image, text_image)
    txt = _recalls(_first_hit_ranks(image_to_text, truth))
    img = _recalls(_first_hit_ranks(text_to_image, truth.T))
    metrics = {f"txt_r{k}": value for k, value in zip(RECALL_AT, txt)}
    metrics["txt_r_mean"] = sum(txt) / len(txt)
    metrics.update({f"img_r{k}": value for k, value in zip(RECALL_AT, img)})
    metrics["img_r_mean"] = sum(img) / len(img)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    metrics["agg_metrics"] = metrics["txt_r_mean"]
    return metrics


def _truth(image_to_text: torch.Tensor, text_to_image: torch.Tensor,
           text_image: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """G[i, t] = (g(t) == i), after checking the shapes agree and every image has a caption."""
    if image_to_text.dim() != 2 or text_to_image.shape != image_to_text.T.shape:
        raise ValueError(f"image_to_text must be (I, T) and text_to_image (T, I), got {tuple(image_to_text.shape)} "
                         f"and {tuple(text_to_image.shape)}")
    images, texts = image_to_text.shape
    text_image = torch.as_tensor(text_image, dtype=torch.long).cpu()
    if text_image.shape != (texts,):
        raise ValueError(f"text_image must give one image index per caption ({texts}), got shape "
                         f"{tuple(text_image.shape)}")
    if texts and (text_image.min() < 0 or text_image.max() >= images):
        bad = text_image[(text_image < 0) | (text_image >= images)][0].item()
        raise ValueError(f"text_image holds image index {bad}, outside [0, {images})")
    truth = text_image[None, :] == torch.arange(images)[:, None]
    uncaptioned = (~truth.any(1)).nonzero().flatten()
    if uncaptioned.numel():
        raise ValueError(f"images {uncaptioned[:10].tolist()} have no caption in text_image")
    return truth


def _first_hit_ranks(scores: torch.Tensor, truth: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """Per row, the 0-based position of its best-placed true candidate under a stable descending sort.

    That candidate has the highest score among the true ones (the lowest index among equals); its position
    is the count of scores above it plus the count of equal scores at lower indices."""
    scores, truth = scores.float().cpu(), truth.cpu()
    index = torch.arange(scores.shape[1])
    ranks = []
    for chunk, hits in zip(scores.split(rows_per_chunk), truth.split(rows_per_chunk)):
        best = chunk.masked_fill(~hits, float("-inf")).max(1, keepdim=True).values
        first = torch.where(hits & (chunk == best), index, scores.shape[1]).min(1, keepdim=True).values
        ranks.append((chunk > best).sum(1) + ((chunk == best) & (index < first)).sum(1))
    return torch.cat(ranks)


def _recalls(ranks: torch.Tensor) -> list[float]:
    return [100.0 * (ranks < k).float().mean().item() for k in RECALL_AT]


def evaluate_retrieval(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, text_image: Sequence[int] | torch.Tensor, *, k_test: int = 256,
                       batch_size: int = 64, itm_token_id: int | None = None, cache_on_cpu: bool = True,
                       progress: bool = True) -> dict[str, float]:
    """LAVIS's retrieval evaluation: `retrieval_scores`, then `retrieval_metrics`.

    Parameters
    ----------
    model, images, input_ids, attention_mask, k_test, batch_size, itm_token_id, cache_on_cpu, progress
        As in `retrieval_scores`.
    text_image : sequence of int or torch.Tensor
        The image index of each caption (many captions to one image, as Flickr30k and COCO Karpathy).

    Returns
    -------
    dict of str to float
        LAVIS's retrieval metrics (see `retrieval_metrics`).
    """
    if len(text_image) != input_ids.shape[0]:  # before the costly part; `retrieval_metrics` checks the rest
        raise ValueError(f"text_image gives {len(text_image)} image indices for {input_ids.shape[0]} captions")
    scores = retrieval_scores(model, images, input_ids, attention_mask, k_test=k_test, batch_size=batch_size,
                              itm_token_id=itm_token_id, cache_on_cpu=cache_on_cpu, progress=progress)
    return retrieval_metrics(scores.image_to_text, scores.text_to_image, text_image)
