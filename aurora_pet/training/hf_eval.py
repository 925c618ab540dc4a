"""Evaluation of a split for the transformers family, with LAVIS's protocols and metric names.

- Retrieval: ``families.hf.retrieval_eval.evaluate_retrieval`` (ITC similarities, ITM re-ranking of the top
  ``k_test``, R@1/5/10 both directions; ``agg_metrics`` = mean image→text recall, as LAVIS).
- VQA: an answer per question, by ranking the split's answer list (``inference_method: rank``, LAVIS's
  ``_rank_answers``: the ``num_ans_candidates`` answers whose first token the decoder finds most likely,
  re-scored by their full log-likelihood under the model's own ``labels`` loss) or by generation
  (``generate``: beam search of ``max_len`` tokens); written to ``result/<split>_vqa_result.json`` and, where
  the split has official files, scored with the official VQA accuracy (``hf_vqa_accuracy``).

A wrapped model is evaluated with its factors merged into the weights (base-model speed; the exact weights are
put back after, see ``AuroraModel.temporarily_merged``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import atomic_text
from ..model import AuroraModel
from .data import DataError, SplitData
from .hf_data import Collate, RetrievalEvalDataset, VQAEvalDataset
from .hf_vqa_accuracy import vqa_accuracy

__all__ = ["evaluate_split", "merged", "rank_answers"]


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[None]:
    """The model in eval mode, an ``AuroraModel`` with its factors folded in; both undone after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (model.temporarily_merged() if isinstance(model, AuroraModel)
                               else contextlib.nullcontext()):
            yield
    finally:
        model.train(was_training)


def evaluate_split(model: nn.Module, dataset: RetrievalEvalDataset | VQAEvalDataset, collate: Collate,
                   run_cfg: Any, *, result_dir: Path, device: torch.device, progress: bool = True) -> dict[str, float]:
    """LAVIS's metrics of ``model`` on one evaluation split (see the module doc)."""
    with merged(model):
        if isinstance(dataset, RetrievalEvalDataset):
            return _retrieval(model, dataset, collate, run_cfg, progress)
        return _vqa(model, dataset, collate, run_cfg, result_dir, device, progress)


def _loader(dataset, batch_size: int, run_cfg: Any, collate=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=int(run_cfg.num_workers),
                      collate_fn=collate)


def _retrieval(model: nn.Module, dataset: RetrievalEvalDataset, collate: Collate, run_cfg: Any,
               progress: bool) -> dict[str, float]:
    from ..families.hf.retrieval_eval import evaluate_retrieval

    texts = collate.tokenizer(dataset.texts, padding="longest", truncation=True, max_length=collate.max_length,
                              return_tensors="pt")
    images = _loader(dataset, int(run_cfg.batch_size_eval), run_cfg)
    return evaluate_retrieval(model, images, texts.input_ids, texts.attention_mask, dataset.text_image,
                              k_test=int(run_cfg.k_test), batch_size=int(run_cfg.batch_size_eval),
                              itm_token_id=collate.enc_token_id, progress=progress)


def _vqa(model: nn.Module, dataset: VQAEvalDataset, collate: Collate, run_cfg: Any, result_dir: Path,
         device: torch.device, progress: bool) -> dict[str, float]:
    data: SplitData = dataset.data
    rank = run_cfg.inference_method == "rank"
    if rank:
        answer_list = _answer_list(data)
        answers = collate.answers(answer_list)
        answer_ids, answer_mask = answers["decoder_input_ids"].to(device), answers["decoder_attention_mask"].to(device)
    results = []
    loader = _loader(dataset, int(run_cfg.batch_size_eval), run_cfg, collate)
    for batch in tqdm(loader, desc=f"eval {data.split}: VQA", disable=not progress, leave=False, dynamic_ncols=True):
        inputs = {k: batch[k].to(device) for k in ("pixel_values", "input_ids", "attention_mask")}
        if rank:
            best = rank_answers(model, **inputs, answer_ids=answer_ids, answer_mask=answer_mask,
                                num_candidates=int(run_cfg.num_ans_candidates))
            predictions = [answer_list[i] for i in best.tolist()]
        else:
            tokens = model.generate(**inputs, max_length=int(run_cfg.max_len), min_length=int(run_cfg.min_len),
                                    num_beams=int(run_cfg.num_beams))
            predictions = collate.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        results += [{"question_id": int(q), "answer": a} for q, a in zip(batch["question_id"].tolist(), predictions)]
    result_dir.mkdir(parents=True, exist_ok=True)
    atomic_text(result_dir / f"{data.split}_vqa_result.json", json.dumps(results))
    official = data.official_files
    return vqa_accuracy(results, *official) if official else {}


def _answer_list(data: SplitData) -> list[str]:
    if data.answer_list is None:
        raise DataError(f"{data.files[0]}: the {data.split} split lists no answer list file (its second "
                        "annotation file), which run.inference_method=rank ranks; add it or use generate")
    try:
        answers = json.loads(data.answer_list.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{data.answer_list}: cannot read the answer list ({error})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{data.answer_list}: expected a non-empty JSON list of answer strings")
    return answers


@torch.no_grad()
def rank_answers(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 answer_ids: torch.Tensor, answer_mask: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """The index in the answer list of each question's best answer, by LAVIS's ``_rank_answers``.

    Parameters
    ----------
    model : nn.Module
        transformers' ``BlipForQuestionAnswering``, or an ``AuroraModel`` around one.
    pixel_values, input_ids, attention_mask : torch.Tensor
        Images (B, 3, H, W) and questions (B, L).
    answer_ids, answer_mask : torch.Tensor
        Every candidate answer, ``[DEC]`` first, (A, L_a); padding (mask 0) is not scored.
    num_candidates : int
        k: answers re-scored per question, the k most likely by their first token.

    Returns
    -------
    torch.Tensor
        (B,) indices into the answer list: argmax over the k candidates of Σ_t log p(a_t | a_<t, question, image)
        (the decoder's ``labels`` loss, reduction "none", negated).
    """
    from ..families.hf.retrieval import forward_scope

    batch, k = input_ids.shape[0], min(num_candidates, answer_ids.shape[0])
    with forward_scope(model):
        image = model.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        question = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                      encoder_attention_mask=image_mask).last_hidden_state
    with forward_scope(model):
        start = model.text_decoder(input_ids=answer_ids[:1, :1].expand(batch, 1), encoder_hidden_states=question,
                                   encoder_attention_mask=attention_mask).logits[:, 0]
    first = start.softmax(dim=-1).index_select(1, answer_ids[:, 1])
    top = first.topk(k, dim=1).indices  # (B, k)
    ids, mask = answer_ids[top].flatten(0, 1), answer_mask[top].flatten(0, 1)
    with forward_scope(model):
        out = model.text_decoder(input_ids=ids, attention_mask=mask,
                                 encoder_hidden_states=question.repeat_interleave(k, 0),
                                 encoder_attention_mask=attention_mask.repeat_interleave(k, 0),
                                 labels=ids.masked_fill(mask == 0, -100), reduction="none")
    scores = -out.loss.view(batch, k)
    return top.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
