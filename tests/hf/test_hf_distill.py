"""Retrieval distillation on transformers BLIP (`families.hf.distill`): the responses equal the model's own
forward pass pair by pair, the terms equal the core losses on them, a teacher identical to the student gives
zero, and gradients reach the student only."""

from __future__ import annotations

import copy

import pytest
import torch

from aurora_pet import AuroraConfig, get_aurora_model
from aurora_pet.distill import DistillConfig, itc_distillation, itm_distillation, relation_distillation
from aurora_pet.families.hf.build import build_blip
from aurora_pet.families.hf.distill import itm_pairs, retrieval_distillation, retrieval_responses
from aurora_pet.families.hf.retrieval import BlipRetrievalLoss, itm_logits

from .conftest import perturb, pixels, text_batch

CAPTIONS = ["a red circle", "two blue squares", "a green star above a square", "a yellow triangle and a star"]
IMAGE_IDS = [0, 1, 2, 3]


@pytest.fixture
def batch(tokenizer):
    return {**text_batch(tokenizer, CAPTIONS), "pixel_values": pixels(len(CAPTIONS), 32)}


@pytest.fixture
def negatives(batch):
    """Hard negatives as the student's supervised loss draws them."""
    criterion = BlipRetrievalLoss(build_blip("retrieval", "tiny"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = criterion(**batch, image_ids=torch.tensor(IMAGE_IDS))
    return {"negative_texts": out.negative_texts, "negative_images": out.negative_images}


def wrap(model):
    return get_aurora_model(model, AuroraConfig.from_preset("cross-attention", rank=4, dropout=0.0)).eval()


def distill(student, teacher, batch, negatives, config=None, **temperatures):
    temperatures = {"student_temperature": 0.07, "teacher_temperature": 0.05, **temperatures}
    return retrieval_distillation(student, teacher, config or DistillConfig(), **batch, **negatives, **temperatures)


def test_responses_equal_the_models_own_forward_pair_by_pair(batch, negatives, tokenizer):
    model = build_blip("retrieval", "tiny")
    texts, images = itm_pairs(len(CAPTIONS), **negatives)
    assert texts.tolist()[4:8] == [0, 1, 2, 3] and images.tolist()[8:] == [0, 1, 2, 3]
    enc = tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        out = retrieval_responses(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                  texts, images, itm_token_id=enc)

        def forward(text: int, image: int, use_itm_head: bool) -> torch.Tensor:
            ids = batch["input_ids"][text:text + 1].clone()
            if use_itm_head:
                ids[:, 0] = enc
            return model(input_ids=ids, attention_mask=batch["attention_mask"][text:text + 1],
                         pixel_values=batch["pixel_values"][image:image + 1], use_itm_head=use_itm_head).itm_score[0]

        size = len(CAPTIONS)
        similarity = torch.tensor([[forward(j, i, False).item() for j in range(size)] for i in range(size)])
        logits = torch.stack([forward(t, i, True) for t, i in zip(texts.tolist(), images.tolist())])
        embeds = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        reference = itm_logits(model, embeds[images], batch["input_ids"][texts], batch["attention_mask"][texts], enc)
    torch.testing.assert_close(out.similarity, similarity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.itm_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.itm_logits, reference, rtol=0, atol=0)  # `retrieval.itm_logits`'s pass
    assert out.tokens.shape[:2] == out.token_mask.shape == (3 * size, batch["input_ids"].shape[1])


@pytest.mark.parametrize("temperature", [None, 2.0])
def test_terms_are_the_core_losses_on_the_responses(batch, negatives, temperature):
    student, teacher = build_blip("retrieval", "tiny"), build_blip("retrieval", "tiny", seed=1)
    config = DistillConfig(temperature=temperature)
    with torch.no_grad():
        parts = distill(student, teacher, batch, negatives, config)
        texts, images = itm_pairs(len(CAPTIONS), **negatives)
        args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], texts, images)
        mine, theirs = retrieval_responses(student, *args), retrieval_responses(teacher, *args)
    tau = (0.07, 0.05) if temperature is None else (temperature, temperature)
    torch.testing.assert_close(parts["itc"], itc_distillation(mine.similarity, theirs.similarity, *tau))
    torch.testing.assert_close(parts["itm"], itm_distillation(mine.itm_logits, theirs.itm_logits, temperature or 1.0))
    torch.testing.assert_close(parts["relation"], relation_distillation(mine.tokens, theirs.tokens, mine.token_mask))
    assert all(value.item() > 1e-4 for value in parts.values()), parts


def test_a_teacher_identical_to_the_student_gives_zero(batch, negatives):
    teacher = build_blip("retrieval", "tiny")
    for student in (copy.deepcopy(teacher), wrap(copy.deepcopy(teacher))):  # an adapter at init: ΔW = 0, fusion off
        with torch.no_grad():
            parts = distill(student, teacher, batch, negatives, teacher_temperature=0.07)
        assert parts["itc"].abs().item() < 1e-6 and parts["itm"].abs().item() < 1e-7, parts
        assert parts["relation"].abs().item() < 1e-6, parts


def test_gradients_reach_the_student_only_and_a_wider_teacher_works(batch, negatives):
    teacher = build_blip("retrieval", "tiny", seed=1, text_hidden_size=96, text_intermediate_size=192)
    teacher.requires_grad_(True)
    student = wrap(build_blip("retrieval", "tiny"))
    perturb(student)
    temperature = torch.tensor(0.07, requires_grad=True)
    parts = distill(student, teacher, batch, negatives, student_temperature=temperature)
    total, logged = DistillConfig().combine(parts, task=torch.tensor(0.0))
    total.backward()
    assert set(logged) == {"task", "itc", "itm", "relation", "distill", "loss"}
    assert all(p.grad is None for p in teacher.parameters())
    trained = dict(student.aurora_factors.named_parameters()) | dict(student.aurora_fusion.named_parameters())
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    assert temperature.grad is not None and temperature.grad != 0


def test_negatives_come_in_pairs():
    with pytest.raises(ValueError, match="pass both negative_texts and negative_images"):
        itm_pairs(4, negative_texts=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"negative_images must have shape \(4,\), got \(3,\)"):
        itm_pairs(4, torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
