"""Distillation losses and `DistillConfig` (`aurora_pet.distill`): each loss against a recomputation with Python
loops over plain floats, the teacher-equals-student zero, padding, gradients, and the config's checks."""

from __future__ import annotations

import math

import pytest
import torch

from aurora_pet.distill import (
    STAGES, DistillConfig, answer_distillation, itc_distillation, itm_distillation, kl_divergence,
    relation_distillation, token_distillation,
)
from aurora_pet.errors import AuroraConfigError


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kl_rows(student: list[list[float]], teacher: list[list[float]]) -> list[float]:
    """KL(softmax(t) ‖ softmax(s)) of each row, by hand; −inf teacher logits have probability 0."""
    def softmax(row: list[float]) -> list[float]:
        top = max(row)
        exps = [math.exp(x - top) for x in row]
        return [e / sum(exps) for e in exps]

    result = []
    for s_row, t_row in zip(student, teacher):
        p, q = softmax(t_row), softmax(s_row)
        result.append(sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q) if pk > 0))
    return result


def close(value: torch.Tensor, expected: float, tol: float = 1e-5) -> None:
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=tol, abs=tol)


# -- each loss equals a direct computation ---------------------------------------------------------

def test_kl_divergence_is_the_masked_mean_of_rowwise_kl():
    student, teacher = randn(3, 4, 5), randn(3, 4, 5, seed=1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rows = kl_rows(student.reshape(12, 5).tolist(), teacher.reshape(12, 5).tolist())
    close(kl_divergence(student, teacher), sum(rows) / 12)
    kept = [row for row, m in zip(rows, mask.flatten().tolist()) if m]
    close(kl_divergence(student, teacher, mask), sum(kept) / len(kept))
    assert kl_divergence(student, teacher, torch.zeros(3, 4)).item() == 0.0  # nothing counts: 0, not NaN


@pytest.mark.parametrize("shape", [(4, 4), (3, 5)])
def test_itc_distillation_is_both_directions_at_each_models_temperature(shape):
    student = torch.nn.functional.normalize(randn(shape[0], 8), dim=1) @ \
        torch.nn.functional.normalize(randn(shape[1], 8, seed=1), dim=1).T
    teacher = torch.nn.functional.normalize(randn(shape[0], 8, seed=2), dim=1) @ \
        torch.nn.functional.normalize(randn(shape[1], 8, seed=3), dim=1).T
    tau_s, tau_t = 0.05, 0.1
    s = [[x / tau_s for x in row] for row in student.tolist()]
    t = [[x / tau_t for x in row] for row in teacher.tolist()]
    columns = lambda m: [list(col) for col in zip(*m)]  # noqa: E731
    image_to_text = sum(kl_rows(s, t)) / shape[0]
    text_to_image = sum(kl_rows(columns(s), columns(t))) / shape[1]
    close(itc_distillation(student, teacher, tau_s, tau_t), (image_to_text + text_to_image) / 2)


def test_itm_distillation_is_the_mean_two_way_kl():
    student, teacher = randn(6, 2), randn(6, 2, seed=1)
    scaled = lambda m: [[x / 2.0 for x in row] for row in m.tolist()]  # noqa: E731
    close(itm_distillation(student, teacher, temperature=2.0), sum(kl_rows(scaled(student), scaled(teacher))) / 6)
    with pytest.raises(ValueError, match=r"ITM logits must have shape \(P, 2\), got \(6, 3\)"):
        itm_distillation(randn(6, 3), randn(6, 3))


def test_answer_distillation_skips_padded_candidates():
    student, teacher = randn(3, 5), randn(3, 5, seed=1)
    valid = [5, 3, 4]  # candidates per question; the rest of each row is padding scored −inf
    for b, n in enumerate(valid):
        student[b, n:] = teacher[b, n:] = float("-inf")
    expected = sum(kl_rows([student[b, :n].tolist()], [teacher[b, :n].tolist()])[0] for b, n in enumerate(valid)) / 3
    student.requires_grad_(True)
    loss = answer_distillation(student, teacher)
    close(loss, expected)
    loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad[1, 3:] == 0).all()


def test_token_distillation_averages_over_answer_tokens_only():
    student, teacher = randn(2, 4, 7), randn(2, 4, 7, seed=1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rows = [(b, l) for b in range(2) for l in range(4) if mask[b, l]]
    scaled = lambda m: (m / 0.5).tolist()  # noqa: E731
    expected = sum(kl_rows([scaled(student[b, l])], [scaled(teacher[b, l])])[0] for b, l in rows) / len(rows)
    close(token_distillation(student, teacher, mask, temperature=0.5), expected)


def test_relation_distillation_is_one_minus_cosine_of_the_unpadded_self_correlations():
    student, teacher = randn(3, 5, 8), randn(3, 5, 12, seed=1)  # a wider teacher needs no projection
    lengths = [5, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])

    def correlation(tokens: list[list[float]]) -> list[float]:
        units = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in tokens]
        return [sum(a * b for a, b in zip(u, v)) for u in units for v in units]

    expected = 0.0
    for b, n in enumerate(lengths):  # only the sample's real tokens exist here: no mask to get wrong
        r_s, r_t = correlation(student[b, :n].tolist()), correlation(teacher[b, :n].tolist())
        dot = sum(x * y for x, y in zip(r_s, r_t))
        expected += 1 - dot / math.sqrt(sum(x * x for x in r_s) * sum(y * y for y in r_t))
    close(relation_distillation(student, teacher, mask), expected / 3)
    with pytest.raises(ValueError, match="same \\(B, L\\) tokens"):
        relation_distillation(student, teacher[:, :4])


# -- teacher = student, padding, gradients ------------------------------------------------------------

def test_a_teacher_identical_to_the_student_gives_zero():
    similarity = randn(4, 4).tanh()
    logits, tokens = randn(2, 4, 7), randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert itc_distillation(similarity, similarity.clone(), 0.07, 0.07).abs().item() < 1e-6
    assert itm_distillation(logits[0, :, :2], logits[0, :, :2].clone()).abs().item() < 1e-7
    assert answer_distillation(logits[0], logits[0].clone(), 3.0).abs().item() < 1e-7
    assert token_distillation(logits, logits.clone(), mask).abs().item() < 1e-7
    assert relation_distillation(tokens, tokens.clone(), mask).abs().item() < 1e-6


def test_padded_positions_do_not_change_the_losses():
    logits, teacher_logits, tokens, teacher_tokens = randn(2, 4, 7), randn(2, 4, 7, seed=1), randn(2, 4, 8), \
        randn(2, 4, 6, seed=2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    padded = (mask == 0).unsqueeze(-1)
    noise = lambda x, seed: x.masked_fill(padded, 0) + padded * 50 * randn(*x.shape, seed=seed)  # noqa: E731
    assert torch.equal(token_distillation(logits, teacher_logits, mask),
                       token_distillation(noise(logits, 3), noise(teacher_logits, 4), mask))
    torch.testing.assert_close(relation_distillation(tokens, teacher_tokens, mask),
                               relation_distillation(noise(tokens, 5), noise(teacher_tokens, 6), mask),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("loss", ["itc", "itm", "answer", "token", "relation"])
def test_gradients_reach_the_student_only(loss):
    shapes = {"itc": (4, 4), "itm": (5, 2), "answer": (3, 6), "token": (2, 3, 5), "relation": (2, 3, 8)}
    student = randn(*shapes[loss]).requires_grad_(True)
    teacher = randn(*shapes[loss], seed=1).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    value = {"itc": lambda: itc_distillation(student, teacher, torch.tensor(0.07), 0.05),
             "itm": lambda: itm_distillation(student, teacher),
             "answer": lambda: answer_distillation(student, teacher),
             "token": lambda: token_distillation(student, teacher, mask),
             "relation": lambda: relation_distillation(student, teacher, mask)}[loss]()
    value.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


# -- the config ---------------------------------------------------------------------------------------

def test_a_recipe_section_round_trips_and_schedules_its_stages():
    config = DistillConfig.from_mapping({"teacher": "ckpt/full.pth", "itc_weight": 0.5, "relation_weight": 2,
                                         "temperature": 2.0, "stages": [1, 0, 2]})
    assert config.teacher == "ckpt/full.pth" and config.itc_weight == 0.5 and config.weights()["relation"] == 2
    assert [stage.name for stage in config.schedule(5)] == ["align", "distill", "distill", "distill", "distill"]
    named = DistillConfig(stages=["align", "supervised", "supervised", "distill"])
    assert [stage.name for stage in named.schedule(4)] == ["align", "supervised", "supervised", "distill"]
    assert [stage.name for stage in DistillConfig().schedule(3)] == ["distill"] * 3
    assert not STAGES["align"].trains_adapter and not STAGES["align"].task_loss
    assert not STAGES["supervised"].distillation
    with pytest.raises(AuroraConfigError, match=r"distill.stages \[1, 0, 2\] takes 3 epochs .* max_epoch=2"):
        config.schedule(2)


def test_temperatures():
    assert DistillConfig().itc_temperatures(0.07, 0.05) == (0.07, 0.05)
    assert DistillConfig().response_temperature == 1.0
    assert DistillConfig(temperature=2.0).itc_temperatures(0.07, 0.05) == (2.0, 2.0)
    assert DistillConfig(temperature=2.0).response_temperature == 2.0


@pytest.mark.parametrize("key,value,message", [
    ("teacher", "", "distill.teacher must be a checkpoint path or null, got ''"),
    ("teacher", 3, "distill.teacher must be a checkpoint path or null, got 3"),
    ("itc_weight", -1.0, "distill.itc_weight must be a finite number ≥ 0, got -1.0"),
    ("relation_weight", "1", "distill.relation_weight must be a finite number ≥ 0, got '1'"),
    ("itm_weight", float("nan"), "distill.itm_weight must be a finite number ≥ 0, got nan"),
    ("answer_weight", True, "distill.answer_weight must be a finite number ≥ 0, got True"),
    ("temperature", 0, "distill.temperature must be a number > 0 or null, got 0"),
    ("stages", [], r"distill.stages must be a non-empty list .*got \[\]"),
    ("stages", "distill", "distill.stages must be a non-empty list .*got 'distill'"),
    ("stages", [1, 2], r"distill.stages as epoch counts must be 3 integers ≥ 0 .*got \[1, 2\]"),
    ("stages", [0, 0, 0], r"at least one > 0, got \[0, 0, 0\]"),
    ("stages", [1, -1, 2], r"distill.stages as epoch counts .*got \[1, -1, 2\]"),
    ("stages", ["align", "distil"], "distill.stages has unknown stage 'distil' \\(did you mean 'distill'\\?\\)"),
    ("stages", ["distill", "align"], "distill.stages must follow the scheme's order align → supervised → distill"),
])
def test_invalid_values_are_named(key, value, message):
    with pytest.raises(AuroraConfigError, match=message):
        DistillConfig.from_mapping({key: value})


def test_unknown_keys_and_empty_weights_are_named():
    with pytest.raises(AuroraConfigError, match=r"'distill.itc_wieght' \(did you mean 'itc_weight'\?\)"):
        DistillConfig.from_mapping({"itc_wieght": 1.0})
    with pytest.raises(AuroraConfigError, match="distill must be a mapping"):
        DistillConfig.from_mapping(["teacher"])
    with pytest.raises(AuroraConfigError, match="every weight is 0"):
        DistillConfig(itc_weight=0, itm_weight=0, answer_weight=0, relation_weight=0)


def test_combine_sums_what_the_stage_trains_on_and_logs_the_parts():
    config = DistillConfig(itc_weight=0.5, itm_weight=2.0, relation_weight=3.0)
    parts = {"itc": torch.tensor(1.0), "itm": torch.tensor(0.25), "relation": torch.tensor(0.1)}
    task = torch.tensor(4.0)
    total, logged = config.combine(parts, task=task)
    close(total, 4.0 + 0.5 * 1.0 + 2.0 * 0.25 + 3.0 * 0.1)
    assert logged == pytest.approx({"task": 4.0, "itc": 1.0, "itm": 0.25, "relation": 0.1, "distill": 1.3,
                                    "loss": 5.3})
    assert config.combine(parts, task=task, stage="supervised")[0].item() == 4.0
    close(config.combine(parts, task=task, stage="align")[0], 1.3)
    close(config.combine(parts, stage=STAGES["align"])[0], 1.3)
    with pytest.raises(ValueError, match="stage 'distill' trains on the task loss"):
        config.combine(parts)
    with pytest.raises(ValueError, match="stage 'align' distils"):
        config.combine({}, stage="align")
    with pytest.raises(ValueError, match=r"unknown distillation parts \['itx'\]"):
        config.combine({"itx": torch.tensor(1.0)}, task=task)
    with pytest.raises(ValueError, match="unknown stage 'dpt'"):
        config.combine(parts, task=task, stage="dpt")
