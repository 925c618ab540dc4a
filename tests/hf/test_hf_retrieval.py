"""BLIP's retrieval losses and LAVIS's retrieval evaluation on transformers BLIP (`families.hf.retrieval`,
`families.hf.retrieval_eval`), checked against brute-force recomputations that go through the model's own
forward pass one (caption, image) pair at a time."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aurora_pet import AuroraConfig, get_aurora_model
from aurora_pet.errors import MergeError
from aurora_pet.families.hf.build import build_blip
from aurora_pet.families.hf.retrieval import (TEMPERATURE_RANGE, BlipRetrievalLoss, itm_logits,
                                              sample_hard_negatives)
from aurora_pet.families.hf.retrieval_eval import evaluate_retrieval, retrieval_metrics, retrieval_scores

from .conftest import perturb, pixels, text_batch

TINY_IMAGE = 32
CAPTIONS = ["a red circle", "a small red circle on the left", "two blue squares", "a green star above a square",
            "one big green star", "a yellow triangle next to two red circles and a star"]
IMAGE_IDS = [0, 0, 1, 2, 2, 3]  # pairs 0, 1 and 3, 4 show the same image: positives of each other


@pytest.fixture
def model():
    return build_blip("retrieval", "tiny")


@pytest.fixture
def batch(tokenizer):
    """Two views of images 0 and 2, as random augmentations give: with identical pixels, BLIP's targets
    (every caption of the image a positive) and one-hot targets would give the same ITC loss."""
    views = pixels(4, TINY_IMAGE)[IMAGE_IDS] + 0.3 * pixels(len(IMAGE_IDS), TINY_IMAGE, seed=1)
    return {**text_batch(tokenizer, CAPTIONS), "pixel_values": views, "image_ids": torch.tensor(IMAGE_IDS)}


def wrap(model, preset: str = "cross-attention", **options):
    options = {"rank": 4, "dropout": 0.0, **options}
    return get_aurora_model(model, AuroraConfig.from_preset(preset, **options))


def pair(model, batch, text: int, image: int, use_itm_head: bool) -> torch.Tensor:
    """The model's own forward on caption `text` with image `image`: the ITM logits (2,) or the cosine."""
    out = model(input_ids=batch["input_ids"][text:text + 1], attention_mask=batch["attention_mask"][text:text + 1],
                pixel_values=batch["pixel_values"][image:image + 1], use_itm_head=use_itm_head).itm_score
    return out[0] if use_itm_head else out[0, 0]


# -- the losses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_itc_loss_equals_a_pairwise_recomputation(model, batch, smoothing):
    criterion = BlipRetrievalLoss(model, temperature=0.05, label_smoothing=smoothing,
                                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = criterion(**batch)
        size = len(IMAGE_IDS)
        logits = torch.tensor([[pair(model, batch, j, i, False).item() for j in range(size)]
                               for i in range(size)]) / 0.05

    def target(a: int, b: int) -> float:  # uniform over the captions (images) of the same image id, smoothed
        positives = sum(y == IMAGE_IDS[a] for y in IMAGE_IDS)
        return (1 - smoothing) * (IMAGE_IDS[a] == IMAGE_IDS[b]) / positives + smoothing / size

    image_rows = [-sum(target(i, j) * logits[i].log_softmax(0)[j] for j in range(size)) for i in range(size)]
    text_rows = [-sum(target(j, i) * logits[:, j].log_softmax(0)[i] for i in range(size)) for j in range(size)]
    expected = (sum(image_rows) / size + sum(text_rows) / size) / 2
    torch.testing.assert_close(out.itc_logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss_itc, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("itm_token", [False, True])
def test_itm_loss_equals_a_pairwise_recomputation_with_the_same_negatives(model, batch, tokenizer, itm_token):
    token = tokenizer.convert_tokens_to_ids("[ENC]") if itm_token else None
    criterion = BlipRetrievalLoss(model, itm_token_id=token, generator=torch.Generator().manual_seed(1))
    reference = {**batch, "input_ids": batch["input_ids"].clone()}
    if itm_token:  # BLIP's [ENC] in place of [CLS]: the same pairs through transformers' forward
        reference["input_ids"][:, 0] = token
    with torch.no_grad():
        out = criterion(**batch)
        size = len(IMAGE_IDS)
        pairs = ([(k, k, 1) for k in range(size)]  # (caption, image, label)
                 + [(k, out.negative_images[k].item(), 0) for k in range(size)]
                 + [(out.negative_texts[k].item(), k, 0) for k in range(size)])
        logits = torch.stack([pair(model, reference, text, image, True) for text, image, _ in pairs])
    expected = sum(-logits[k].log_softmax(0)[label] for k, (_, _, label) in enumerate(pairs)) / len(pairs)
    torch.testing.assert_close(out.itm_logits, logits, rtol=1e-4, atol=1e-5)
    assert out.itm_labels.tolist() == [label for _, _, label in pairs]
    torch.testing.assert_close(out.loss_itm, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm)


def test_hard_negatives_never_share_the_image_id_and_follow_the_similarities():
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 3, 3])
    logits = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    logits[ids[:, None] == ids[None, :]] += 50.0  # positives dominate the softmax: they must still never come up
    logits[0, 5] = logits[5, 0] = 20.0  # the hardest negative of image 0 is caption 5 (and of caption 0, image 5)
    generator = torch.Generator().manual_seed(3)
    state = torch.get_rng_state()
    draws = [sample_hard_negatives(logits, ids, generator) for _ in range(300)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    texts, images = torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])
    assert (ids[texts] != ids).all() and (ids[images] != ids).all()
    assert (texts[:, 0] == 5).float().mean() > 0.9 and (images[:, 0] == 5).float().mean() > 0.9
    assert len(set(texts[:, 7].tolist())) > 1  # a sample, not an argmax
    again = sample_hard_negatives(logits, ids, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(again, draws[0]))  # reproducible from the seed


def test_a_batch_of_one_image_has_no_negative_and_says_so():
    with pytest.raises(ValueError, match="no hard negative for image id 7"):
        sample_hard_negatives(torch.zeros(3, 3), torch.tensor([7, 7, 7]))


def test_mismatched_inputs_are_named(model, batch):
    criterion = BlipRetrievalLoss(model)
    with pytest.raises(ValueError, match=r"mismatched batch sizes.*pixel_values: 5.*image_ids: 6"):
        criterion(**{**batch, "pixel_values": batch["pixel_values"][:5]})
    with pytest.raises(ValueError, match=r"temperature must be in \[0.001, 0.5\].*0.9"):
        BlipRetrievalLoss(model, temperature=0.9)
    with pytest.raises(TypeError, match="BlipForQuestionAnswering is not a BLIP retrieval model.*vision_proj"):
        BlipRetrievalLoss(build_blip("vqa", "tiny"))


# -- wrapped by Aurora ----------------------------------------------------------------------------

def test_wrapped_at_initialisation_gives_the_unwrapped_loss_and_runs_the_adapter(model, batch):
    reference = BlipRetrievalLoss(copy.deepcopy(model), generator=torch.Generator().manual_seed(2))
    aurora = wrap(model, ice=True, gqt=True, forward_mode="factored").eval()  # factored: z = x·V is cached
    criterion = BlipRetrievalLoss(aurora, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(criterion(**batch).loss, reference(**batch).loss, rtol=0, atol=0)
        perturb(aurora)
        adapted = criterion(**batch, generator=torch.Generator().manual_seed(2))
        with aurora.disable_adapter():
            plain = criterion(**batch, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(adapted.itm_logits, plain.itm_logits)  # factors, ICE and GQT took part
    assert not aurora._input_projections  # the per-forward cache is cleared as the wrapper's forward does


def test_gradients_reach_every_factor_fusion_parameter_head_and_the_temperature(model, batch):
    aurora = wrap(model, "reference", ice=True, gqt=True)  # both towers: ITC's and ITM's paths
    perturb(aurora)  # V ≠ 0, so that U, P and λ get a gradient too
    criterion = BlipRetrievalLoss(aurora, generator=torch.Generator().manual_seed(0)).train()
    criterion(**batch).loss.backward()
    trainable = {n: p for n, p in criterion.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.aurora_adapters.default.factors.") for n in trainable)
    assert any(n.startswith("model.aurora_adapters.default.fusion.") for n in trainable)
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert (aurora.aurora_factors.P.grad.abs().sum(1) > 0).all()  # every slice, vision and text, has its own
    assert aurora.heads and all(p.grad is not None for head in aurora.heads.values() for p in head.parameters())
    frozen = [n for n, p in criterion.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen


def test_a_few_steps_lower_the_loss_of_a_wrapped_model(model, batch):
    aurora = wrap(model, ice=True, gqt=True)
    perturb(aurora, scale=0.05)
    criterion = BlipRetrievalLoss(aurora).train()
    optimizer = torch.optim.AdamW([p for p in criterion.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):  # the same negatives every step, so the losses compare
        optimizer.zero_grad()
        loss = criterion(**batch, generator=torch.Generator().manual_seed(5)).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)
    assert TEMPERATURE_RANGE[0] <= criterion.temp.item() <= TEMPERATURE_RANGE[1]


def test_trains_under_transformers_trainer(model, batch, tmp_path):
    from transformers import Trainer, TrainingArguments

    aurora = wrap(model)
    criterion = BlipRetrievalLoss(aurora, generator=torch.Generator().manual_seed(0))
    samples = [{key: value[k] for key, value in batch.items()} for k in range(len(IMAGE_IDS))]
    before = {n: p.detach().clone() for n, p in criterion.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=2, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
                             dataloader_num_workers=0, disable_tqdm=True)
    collate = lambda rows: {key: torch.stack([row[key] for row in rows]) for key in rows[0]}  # noqa: E731
    result = Trainer(model=criterion, args=args, train_dataset=samples, data_collator=collate).train()
    assert math.isfinite(result.training_loss)
    assert any(not torch.equal(p, before[n]) for n, p in criterion.named_parameters() if n in before)


# -- evaluation -----------------------------------------------------------------------------------

EVAL_CAPTIONS = ["a red circle", "red round shape", "a circle in red", "two blue squares", "blue boxes",
                 "a green star above a square", "one big green star", "a yellow triangle", "a small triangle"]
EVAL_TEXT_IMAGE = [0, 0, 0, 1, 1, 2, 2, 3, 3]


def brute_force_metrics(model, texts, images, k_test):
    """Every (image, caption) pair through the model's own forward, LAVIS's re-rank rule, ranks by sorting."""
    n_images, n_texts = images.shape[0], len(EVAL_TEXT_IMAGE)
    data = {**texts, "pixel_values": images}
    with torch.no_grad():
        itc = torch.tensor([[pair(model, data, t, i, False).item() for t in range(n_texts)] for i in range(n_images)])
        itm = torch.tensor([[pair(model, data, t, i, True)[1].item() for t in range(n_texts)] for i in range(n_images)])

    def rerank(sim, match):
        scores = torch.full_like(sim, float("-inf"))
        for row in range(sim.shape[0]):
            for col in sim[row].argsort(descending=True)[:k_test].tolist():
                scores[row, col] = match[row, col] + sim[row, col]
        return scores

    def rank(row_scores, truth):
        order = sorted(range(len(row_scores)), key=lambda c: (-row_scores[c], c))
        return min(order.index(c) for c in truth)

    i2t, t2i = rerank(itc, itm), rerank(itc.T, itm.T)
    txt = [rank(i2t[i].tolist(), [t for t, g in enumerate(EVAL_TEXT_IMAGE) if g == i]) for i in range(n_images)]
    img = [rank(t2i[t].tolist(), [EVAL_TEXT_IMAGE[t]]) for t in range(n_texts)]
    recall = {f"txt_r{k}": 100 * sum(r < k for r in txt) / len(txt) for k in (1, 5, 10)}
    recall.update({f"img_r{k}": 100 * sum(r < k for r in img) / len(img) for k in (1, 5, 10)})
    recall["txt_r_mean"] = (recall["txt_r1"] + recall["txt_r5"] + recall["txt_r10"]) / 3
    recall["img_r_mean"] = (recall["img_r1"] + recall["img_r5"] + recall["img_r10"]) / 3
    recall["r_mean"] = (recall["txt_r_mean"] + recall["img_r_mean"]) / 2
    recall["agg_metrics"] = recall["txt_r_mean"]
    return recall, i2t, t2i


@pytest.mark.parametrize(("wrapped", "k_test"), [(False, 3), (True, 2), (False, 100)])
def test_evaluation_equals_a_brute_force_recall(model, tokenizer, wrapped, k_test):
    if wrapped:
        model = wrap(model, ice=True, gqt=True)
        perturb(model)
    model.eval()
    texts = text_batch(tokenizer, EVAL_CAPTIONS)
    images = pixels(4, TINY_IMAGE, seed=11)
    expected, i2t, t2i = brute_force_metrics(model, texts, images, k_test)
    scores = retrieval_scores(model, images.split(3), texts["input_ids"], texts["attention_mask"], k_test=k_test,
                              batch_size=4, progress=False)
    torch.testing.assert_close(scores.image_to_text, i2t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores.text_to_image, t2i, rtol=1e-4, atol=1e-5)
    metrics = evaluate_retrieval(model, images, texts["input_ids"], texts["attention_mask"], EVAL_TEXT_IMAGE,
                                 k_test=k_test, batch_size=5, progress=False)
    assert metrics == pytest.approx(expected)
    assert list(metrics) == ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                             "img_r_mean", "r_mean", "agg_metrics"]


def test_metrics_rank_by_the_best_placed_caption_and_break_ties_by_index():
    inf = float("-inf")
    i2t = torch.tensor([[0.1, 0.9, inf, inf],   # image 0: captions 0, 1 → caption 1 first: rank 0
                        [0.8, 0.2, inf, inf]])  # image 1: captions 2, 3 unranked (−inf): after 0, 1 → rank 2
    t2i = torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.0, 0.7], [inf, inf]])  # the last: a tie, index order → rank 1
    metrics = retrieval_metrics(i2t, t2i, [0, 0, 1, 1])
    assert (metrics["txt_r1"], metrics["txt_r5"]) == (50.0, 100.0)
    assert (metrics["img_r1"], metrics["img_r5"]) == (50.0, 100.0)  # ranks 0, 1, 0, 1
    assert metrics["agg_metrics"] == metrics["txt_r_mean"] == pytest.approx(250 / 3)


def test_evaluation_refuses_bad_arguments(model, tokenizer):
    texts = text_batch(tokenizer, EVAL_CAPTIONS)
    images = pixels(4, TINY_IMAGE)
    with pytest.raises(ValueError, match="k_test must be ≥ 1, got 0"):
        retrieval_scores(model, images, texts["input_ids"], texts["attention_mask"], k_test=0, progress=False)
    with pytest.raises(ValueError, match="text_image gives 3 image indices for 9 captions"):
        evaluate_retrieval(model, images, texts["input_ids"], texts["attention_mask"], [0, 1, 2], progress=False)
    with pytest.raises(ValueError, match=r"images \[3\] have no caption"):
        retrieval_metrics(torch.zeros(4, 3), torch.zeros(3, 4), [0, 1, 2])
    with pytest.raises(ValueError, match="image index 4, outside"):
        retrieval_metrics(torch.zeros(4, 3), torch.zeros(3, 4), [0, 1, 4])


# -- momentum distillation ------------------------------------------------------------------------

def features(parts, batch):
    """v and t written out from the parts' own modules (the brute-force side of the momentum tests)."""
    image = parts.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state[:, 0]
    text = parts.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return F.normalize(parts.vision_proj(image), dim=-1), F.normalize(parts.text_proj(text[:, 0]), dim=-1)


def shake(module, scale: float = 0.05, seed: int = 3) -> None:
    """Move a momentum copy away from the online model, so that using the wrong one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def distilled_rows(v, t, v_m, t_m, ids, temperature, alpha):
    """Per-row −Σ q log softmax of both directions, element by element: keys v^m, t^m; q mixed with the
    momentum softmax (a target: no gradient, as in LAVIS)."""
    size = len(ids)
    hard = torch.tensor([[float(ids[a] == ids[b]) / sum(y == ids[a] for y in ids) for b in range(size)]
                         for a in range(size)])
    rows = []
    for query, keys, query_m, keys_m in ((v, t_m, v_m, t_m), (t, v_m, t_m, v_m)):
        logits, soft = query @ keys.T / temperature, (query_m @ keys_m.T / temperature).softmax(1).detach()
        rows.append(torch.stack([-sum((alpha * soft[a, b] + (1 - alpha) * hard[a, b]) * logits[a].log_softmax(0)[b]
                                      for b in range(size)) for a in range(size)]))
    return rows


@pytest.mark.parametrize("wrapped", [False, True])
def test_momentum_distillation_itc_equals_a_brute_force_recomputation(model, batch, wrapped):
    if wrapped:
        model = wrap(model, "reference", ice=True, gqt=True)  # ViT and text self-attention: ITC's path
        perturb(model)
    criterion = BlipRetrievalLoss(model, temperature=0.05, alpha=0.4, generator=torch.Generator().manual_seed(0))
    criterion.eval()  # no EMA step: the momentum model is what the test set
    shake(criterion.momentum_parts)
    if wrapped:
        shake(criterion.momentum_factors, scale=0.3)
        momentum = copy.deepcopy(model)  # the momentum model written out: a second adapter copy, its factors
        momentum.aurora_factors.load_state_dict(criterion.momentum_factors.state_dict())
        for name, part in criterion.momentum_parts.items():
            getattr(momentum, name).load_state_dict(part.state_dict())
    else:
        momentum = copy.deepcopy(model)
        for name, part in criterion.momentum_parts.items():
            setattr(momentum, name, part)
    with torch.no_grad():
        out = criterion(**batch)
        v, t = features(model, batch)
        v_m, t_m = features(momentum, batch)
        image_rows, text_rows = distilled_rows(v, t, v_m, t_m, IMAGE_IDS, 0.05, 0.4)
        torch.testing.assert_close(out.itc_logits, v @ t_m.T / 0.05, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.itc_text_logits, t @ v_m.T / 0.05, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.loss_itc, (image_rows.mean() + text_rows.mean()) / 2, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(v_m, v, atol=1e-3) and not torch.allclose(t_m, t, atol=1e-3)
        # the hard negatives still follow the online similarities: the same draws as without distillation
        plain = BlipRetrievalLoss(model, temperature=0.05, generator=torch.Generator().manual_seed(0))(**batch)
    assert torch.equal(out.negative_texts, plain.negative_texts)
    assert torch.equal(out.negative_images, plain.negative_images)
    torch.testing.assert_close(out.loss_itm, plain.loss_itm)


@pytest.mark.parametrize("wrapped", [False, True])
def test_the_momentum_model_follows_the_ema_formula_in_training_mode(model, batch, wrapped):
    if wrapped:
        model = wrap(model, "reference")
    criterion = BlipRetrievalLoss(model, alpha=0.4, momentum=0.9).train()
    tracked = list(criterion.momentum_parts.parameters())
    online = [p for name in criterion.momentum_parts for p in getattr(model, name).parameters()]
    if wrapped:
        tracked += list(criterion.momentum_factors.parameters())
        online += list(model.aurora_factors.parameters())
    assert tracked and len(tracked) == len(online)
    perturb(model) if wrapped else shake(model)  # θ moves away from θ_m
    for parameter in online:
        if not wrapped or parameter.requires_grad:
            with torch.no_grad():
                parameter.add_(0.1)
    before, now = [p.clone() for p in tracked], [p.detach().clone() for p in online]
    criterion(**batch).loss.backward()
    for m_after, m_before, theta in zip(tracked, before, now):
        torch.testing.assert_close(m_after, 0.9 * m_before + 0.1 * theta, rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad or p.grad is not None for p in tracked)
    criterion.eval()
    again = [p.clone() for p in tracked]
    with torch.no_grad():
        criterion(**batch)
    assert all(torch.equal(a, b) for a, b in zip(again, tracked))  # evaluation does not step the EMA


def test_alpha_zero_is_the_plain_loss_and_builds_no_momentum_model(model, batch):
    reference = BlipRetrievalLoss(model, generator=torch.Generator().manual_seed(4))(**batch)
    criterion = BlipRetrievalLoss(model, alpha=0.0, momentum=0.5, negative_all_rank=True,  # no process group
                                  generator=torch.Generator().manual_seed(4))
    out = criterion(**batch)
    assert sum(p.numel() for p in criterion.parameters()) == sum(p.numel() for p in model.parameters()) + 1
    for key in ("loss", "loss_itc", "loss_itm", "itc_logits", "itm_logits", "negative_texts", "negative_images"):
        assert torch.equal(out[key], reference[key]), key
    assert out.itc_text_logits is None


def test_an_aurora_model_gets_momentum_factors_and_heads_not_a_base_copy(model, batch):
    aurora = wrap(model, "reference", ice=True, gqt=True)  # factors on ITC's path (ViT, text self-attention)
    perturb(aurora)
    size = sum(p.numel() for p in aurora.parameters())
    criterion = BlipRetrievalLoss(aurora, alpha=0.4)
    heads = sum(p.numel() for name in ("vision_proj", "text_proj") for p in getattr(aurora, name).parameters())
    assert set(criterion.momentum_parts) == {"vision_proj", "text_proj"}
    assert sum(p.numel() for p in criterion.parameters()) == size + 1 + aurora.aurora_factors.num_parameters() + heads
    assert aurora.aurora_factors_m is None  # the adapter (and its files) stay as they were
    shake(criterion.momentum_factors, scale=0.3)
    criterion.eval()
    with torch.no_grad():
        online = features(aurora, batch)
        v_m, t_m = criterion.momentum_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        with aurora.use_factors(criterion.momentum_factors):  # the momentum factors, the online heads
            swapped = features(aurora, batch)
        assert torch.equal(features(aurora, batch)[0], online[0])  # swapped back
        own_heads = BlipRetrievalLoss(aurora, alpha=0.4).eval()
        own_heads.momentum_factors.load_state_dict(criterion.momentum_factors.state_dict())
        same_heads = own_heads.momentum_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(same_heads[0], swapped[0])
    torch.testing.assert_close(same_heads[1], swapped[1])
    assert not torch.allclose(swapped[0], online[0], atol=1e-3)  # the factors took part
    shake(criterion.momentum_parts)  # and the momentum heads do too
    with torch.no_grad():
        moved = criterion.momentum_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(moved[0], v_m, atol=1e-3)


def test_use_factors_checks_the_layout_and_the_merge(model):
    aurora = wrap(model)
    other = wrap(build_blip("retrieval", "tiny"), rank=2)
    with pytest.raises(ValueError, match="use_factors needs a ModeFactors with the layout of adapter 'default'"):
        with aurora.use_factors(other.aurora_factors):
            pass
    aurora.merge()
    with pytest.raises(MergeError, match="merged"):
        with aurora.use_factors(copy.deepcopy(aurora.aurora_factors)):
            pass


def test_bad_momentum_options_are_named(model, batch):
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\], got 1.5"):
        BlipRetrievalLoss(model, alpha=1.5)
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\], got -0.1"):
        BlipRetrievalLoss(model, alpha=-0.1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\).*got 1.0"):
        BlipRetrievalLoss(model, alpha=0.4, momentum=1.0)
    with pytest.raises(ValueError, match=r"alpha of a call must be in \[0, 0.4\].*got 0.5"):
        BlipRetrievalLoss(model, alpha=0.4)(**batch, alpha=0.5)


# -- across ranks ---------------------------------------------------------------------------------

RANK_IDS = [0, 0, 1, 2, 2, 3, 3, 4]  # two ranks of four pairs; image 2 on both
RANK_CAPTIONS = CAPTIONS + ["a blue star", "the yellow triangle and a large red circle on the right side"]
WORLD, PER_RANK = 2, 4


def rank_batch(tokenizer):
    views = pixels(5, TINY_IMAGE)[RANK_IDS] + 0.3 * pixels(len(RANK_IDS), TINY_IMAGE, seed=1)
    return {**text_batch(tokenizer, RANK_CAPTIONS), "pixel_values": views, "image_ids": torch.tensor(RANK_IDS)}


def _distributed_worker(rank: int, directory: str) -> None:
    """One rank of the gloo group: its half of the batch (its captions only padded to its own longest), the
    loss with negative_all_rank, and the gradient averaged over the ranks as DDP does."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    try:
        inputs = torch.load(Path(directory) / "inputs.pt")
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        local = {key: value[part] for key, value in inputs["batch"].items()}
        length = int(local["attention_mask"].sum(1).max())
        for key in ("input_ids", "attention_mask"):
            local[key] = local[key][:, :length]
        results = {}
        for alpha in (0.0, 0.4):
            model = build_blip("retrieval", "tiny")
            model.load_state_dict(inputs["model"])
            criterion = BlipRetrievalLoss(model, temperature=0.05, alpha=alpha, negative_all_rank=True,
                                          generator=torch.Generator().manual_seed(rank)).eval()
            if alpha:
                criterion.momentum_parts.load_state_dict(inputs["momentum"])
            out = criterion(**local)
            out.loss.backward()
            grads = {}
            for name, parameter in criterion.named_parameters():
                if parameter.requires_grad:
                    dist.all_reduce(parameter.grad)
                    grads[name] = parameter.grad / WORLD
            results[alpha] = {"loss_itc": out.loss_itc.detach(), "loss_itm": out.loss_itm.detach(),
                              "texts": out.negative_texts, "images": out.negative_images, "grads": grads,
                              "length": length}
        torch.save(results, Path(directory) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes: about a minute, mostly start-up
def test_negatives_across_ranks_equal_one_process_over_the_concatenated_batch(tokenizer, tmp_path):
    import torch.multiprocessing as mp

    model = build_blip("retrieval", "tiny").eval()
    full = rank_batch(tokenizer)
    momentum = BlipRetrievalLoss(model, alpha=0.4).momentum_parts
    shake(momentum)
    torch.save({"model": model.state_dict(), "batch": full, "momentum": momentum.state_dict()}, tmp_path / "inputs.pt")
    mp.spawn(_distributed_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert ranks[0][0.0]["length"] != ranks[1][0.0]["length"]  # the ranks' captions were padded differently
    for alpha in (0.0, 0.4):
        criterion = BlipRetrievalLoss(model, temperature=0.05, alpha=alpha).eval()
        if alpha:
            criterion.momentum_parts.load_state_dict(momentum.state_dict())
        embeds = model.vision_model(pixel_values=full["pixel_values"]).last_hidden_state
        v, t = features(model, full)
        if alpha:
            with torch.no_grad():
                v_m, t_m = features(criterion.momentum_parts, full)
        else:  # keys are the online features of every rank, with their gradient; q the hard targets
            v_m, t_m = v, t
        image_rows, text_rows = distilled_rows(v, t, v_m, t_m, RANK_IDS, criterion.temp, alpha)
        total = 0.0
        for rank, result in enumerate(ranks):
            result = result[alpha]
            rows = list(range(rank * PER_RANK, (rank + 1) * PER_RANK))
            texts, images = result["texts"].tolist(), result["images"].tolist()
            assert all(RANK_IDS[n] != RANK_IDS[k] for k, n in zip(rows, images))
            assert all(RANK_IDS[m] != RANK_IDS[k] for k, m in zip(rows, texts))
            loss_itc = (image_rows[rows].mean() + text_rows[rows].mean()) / 2
            pairs = [(k, k) for k in rows] + list(zip(rows, images)) + list(zip(texts, rows))  # (caption, image)
            captions, pictures = [c for c, _ in pairs], [i for _, i in pairs]
            logits = itm_logits(model, embeds[pictures], full["input_ids"][captions], full["attention_mask"][captions])
            labels = torch.tensor([1] * PER_RANK + [0] * 2 * PER_RANK)
            loss_itm = F.cross_entropy(logits, labels)
            torch.testing.assert_close(result["loss_itc"], loss_itc.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(result["loss_itm"], loss_itm.detach(), rtol=1e-5, atol=1e-5)
            total = total + (loss_itc + loss_itm) / WORLD
        total.backward()
        for name, parameter in criterion.named_parameters():
            if parameter.requires_grad:
                torch.testing.assert_close(ranks[0][alpha]["grads"][name], parameter.grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, name=name: f"{name}: {m}")
        criterion.zero_grad()
