"""Knowledge distillation from a teacher into an Aurora student (LLaVA-KD's losses and stages, for BLIP).

A teacher (a fully fine-tuned or a larger model of the same task) guides the student through two kinds of
loss, both written here on plain tensors so that every model family's training loop computes them alike:

*Response distillation* — the student's output distributions should match the teacher's::

    KL(p ‖ q) = Σ_k p_k (log p_k − log q_k),      p = softmax(z^T / τ_T),  q = softmax(z^S / τ_S)

on the ITC similarity distributions in both directions and the ITM match probabilities (retrieval), or on
the answer distributions (VQA).

*Relation distillation* — the student's multimodal tokens should relate to each other as the teacher's do::

    R = M ⊙ (F̂ F̂ᵀ),   F̂ = rows of F scaled to unit norm,   M = m mᵀ (m: the token mask)
    L_rel = 1/B Σ_b (1 − cos(vec R^S_b, vec R^T_b))

R is L×L whatever the feature width, so a teacher wider than the student needs no projection.

The teacher is never trained: every loss detaches its inputs, so gradients reach the student only. All
losses are computed in float32. Hinton's τ² factor is not applied; the weights of `DistillConfig` carry
the scale. The staged scheme and the weights live in `DistillConfig`; docs/method.md ("Distillation")
states the equations.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .config import _check, _is_int, _is_number
from .errors import AuroraConfigError

__all__ = ["PARTS", "STAGES", "DistillConfig", "Stage", "answer_distillation", "itc_distillation",
           "itm_distillation", "kl_divergence", "relation_distillation", "self_correlation", "token_distillation"]

PARTS = ("itc", "itm", "answer", "relation")  # the distillation terms, each weighted by `<part>_weight`


# -- response distillation -------------------------------------------------------------------------

def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) ‖ softmax(student)) along the last dimension.

    The teacher's distribution is the target (forward KL, as in LLaVA-KD): the student must cover every
    outcome the teacher finds likely. Classes the teacher gives probability 0 (logit −inf, e.g. padding of
    an answer list) contribute 0.

    Parameters
    ----------
    student_logits, teacher_logits : torch.Tensor
        Logits z^S, z^T of the same shape (..., K), temperatures already applied.
    mask : torch.Tensor, optional
        Shape (...): the positions that count (true / 1); None counts every position.

    Returns
    -------
    torch.Tensor
        Σ_n m_n KL_n / Σ_n m_n (a scalar; 0 when no position counts), with
        KL_n = Σ_k p_nk (log p_nk − log q_nk), p = softmax(z^T), q = softmax(z^S).
    """
    _check_same_shape(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    p = log_p.exp()
    per_position = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(f"mask must have shape {tuple(per_position.shape)} (the logits' without the last "
                         f"dimension), got {tuple(mask.shape)}")
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)


def itc_distillation(student_similarity: torch.Tensor, teacher_similarity: torch.Tensor,
                     student_temperature: torch.Tensor | float,
                     teacher_temperature: torch.Tensor | float) -> torch.Tensor:
    """KL between the teacher's and the student's in-batch contrastive distributions, both directions.

    Both directions, as BLIP's ITC loss: image→text ranks the captions of an image, text→image the images
    of a caption, and a student can match one while missing the other.

    Parameters
    ----------
    student_similarity, teacher_similarity : torch.Tensor
        Cosine similarities S = v tᵀ, shape (B_image, B_text), image rows.
    student_temperature, teacher_temperature : torch.Tensor or float
        τ_S, τ_T: each model's ITC temperature, or one distillation temperature for both. A tensor
        τ_S with a gradient (BLIP's learnable temperature) is trained by this loss too.

    Returns
    -------
    torch.Tensor
        ½ [ 1/B_image Σ_i KL(softmax_j(S^T_ij/τ_T) ‖ softmax_j(S^S_ij/τ_S))
          + 1/B_text  Σ_j KL(softmax_i(S^T_ij/τ_T) ‖ softmax_i(S^S_ij/τ_S)) ].
    """
    _check_same_shape(student_similarity, teacher_similarity, "similarity matrices")
    if student_similarity.dim() != 2:
        raise ValueError(f"similarities must be (B_image, B_text) matrices, got shape "
                         f"{tuple(student_similarity.shape)}")
    student = student_similarity / student_temperature
    teacher = teacher_similarity.detach() / teacher_temperature
    return (kl_divergence(student, teacher) + kl_divergence(student.T, teacher.T)) / 2


def itm_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """KL between the teacher's and the student's match probabilities of the same (caption, image) pairs.

    Parameters
    ----------
    student_logits, teacher_logits : torch.Tensor
        ITM logits, shape (P, 2) (column 1 is "matches").
    temperature : float
        τ, applied to both.

    Returns
    -------
    torch.Tensor
        1/P Σ_k KL(softmax(z^T_k/τ) ‖ softmax(z^S_k/τ)) over the 2 classes.
    """
    if student_logits.dim() != 2 or student_logits.shape[1] != 2:
        raise ValueError(f"ITM logits must have shape (P, 2), got {tuple(student_logits.shape)}")
    return kl_divergence(student_logits / temperature, teacher_logits.detach() / temperature)


def answer_distillation(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """KL between the teacher's and the student's distributions over a list of candidate answers.

    For VQA ranked over an answer list (BLIP's `rank` inference): the scores are each answer's
    log-likelihood (or any logit); a candidate scored −inf by the teacher (a padded list) does not count.

    Parameters
    ----------
    student_scores, teacher_scores : torch.Tensor
        Scores of the same candidates, shape (B, A).
    temperature : float
        τ, applied to both.

    Returns
    -------
    torch.Tensor
        1/B Σ_b KL(softmax_a(s^T_ba/τ) ‖ softmax_a(s^S_ba/τ)).
    """
    if student_scores.dim() != 2:
        raise ValueError(f"answer scores must have shape (B, A), got {tuple(student_scores.shape)}")
    return kl_divergence(student_scores / temperature, teacher_scores.detach() / temperature)


def token_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """KL between the teacher's and the student's next-token distributions of a generated answer.

    For VQA generated by the decoder: one distribution per answer token, padding excluded by the mask, so
    that a batch's longest answer does not decide what a short one is distilled on.

    Parameters
    ----------
    student_logits, teacher_logits : torch.Tensor
        Decoder logits over the vocabulary, shape (B, L, V).
    mask : torch.Tensor
        Shape (B, L): 1 at answer tokens, 0 at padding (and at whatever else should not count).
    temperature : float
        τ, applied to both.

    Returns
    -------
    torch.Tensor
        Σ_{b,l} m_bl KL(softmax(z^T_bl/τ) ‖ softmax(z^S_bl/τ)) / Σ_{b,l} m_bl.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"token logits must have shape (B, L, V), got {tuple(student_logits.shape)}")
    return kl_divergence(student_logits / temperature, teacher_logits.detach() / temperature, mask)


# -- relation distillation -------------------------------------------------------------------------

def self_correlation(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarities between the tokens of each sample, padded tokens zeroed.

    Parameters
    ----------
    features : torch.Tensor
        Token features F, shape (B, L, D).
    mask : torch.Tensor, optional
        Shape (B, L): 1 at real tokens, 0 at padding; None: every token is real.

    Returns
    -------
    torch.Tensor
        R_b = (m_b m_bᵀ) ⊙ (F̂_b F̂_bᵀ), shape (B, L, L), F̂ = F with unit-norm rows.
    """
    if features.dim() != 3:
        raise ValueError(f"token features must have shape (B, L, D), got {tuple(features.shape)}")
    unit = F.normalize(features.float(), dim=-1)
    if mask is not None:
        if mask.shape != features.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(features.shape[:2])} (B, L), got {tuple(mask.shape)}")
        unit = unit * mask.to(unit.dtype).unsqueeze(-1)  # zero rows: padded rows and columns of R are 0
    return unit @ unit.transpose(1, 2)


def relation_distillation(student_features: torch.Tensor, teacher_features: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine between the teacher's and the student's token self-correlation matrices, batch mean.

    It transfers how the teacher's multimodal tokens relate (which caption words attend to the same image
    evidence) rather than the features themselves, so the student's width and basis stay free.

    Parameters
    ----------
    student_features, teacher_features : torch.Tensor
        Multimodal token features of the same inputs, shapes (B, L, D_S) and (B, L, D_T).
    mask : torch.Tensor, optional
        Shape (B, L): 1 at real tokens, 0 at padding.

    Returns
    -------
    torch.Tensor
        1/B Σ_b (1 − ⟨R^S_b, R^T_b⟩ / (‖R^S_b‖ ‖R^T_b‖)), Frobenius inner product and norms.
    """
    if student_features.shape[:2] != teacher_features.shape[:2]:
        raise ValueError(f"student and teacher features must cover the same (B, L) tokens, got shapes "
                         f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}")
    student = self_correlation(student_features, mask).flatten(1)
    teacher = self_correlation(teacher_features.detach(), mask).flatten(1)
    return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str = "logits") -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher {what} must have the same shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")


# -- configuration and the staged scheme -----------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One stage of the staged scheme: which losses the step sums and whether the adapter trains.

    The task heads (`modules_to_save`) train in every stage."""

    name: str
    task_loss: bool
    distillation: bool
    trains_adapter: bool


# LLaVA-KD's distilled pre-training → supervised fine-tuning → distilled fine-tuning, for BLIP: first the
# heads (few parameters) imitate the teacher's responses with the adapter frozen, so that the adapter starts
# behind heads that already answer as the teacher does; then the adapter learns the task from the labels;
# then from the labels and the teacher together.
STAGES = {
    "align": Stage("align", task_loss=False, distillation=True, trains_adapter=False),
    "supervised": Stage("supervised", task_loss=True, distillation=False, trains_adapter=True),
    "distill": Stage("distill", task_loss=True, distillation=True, trains_adapter=True),
}


@dataclass
class DistillConfig:
    """The `distill:` section of a recipe: the teacher, the weights of the losses, the temperature and
    the staged scheme; validated on construction, every error naming the key and the value.

    teacher:          the teacher checkpoint (a model of the same task, fully fine-tuned, or a larger one);
                      None when the caller passes the teacher model itself.
    itc_weight, itm_weight, answer_weight, relation_weight:
                      w of each term in Σ_k w_k L_k (≥ 0; a task uses the terms it has).
    temperature:      τ of every response distillation; None: each model's own ITC temperature for ITC
                      and 1 (the logits as they are) for ITM and answers.
    stages:           epochs per stage, either three counts [align, supervised, distill] (0 skips one), or
                      one stage name per epoch in the scheme's order, e.g. ["align", "distill", "distill"].
                      The last listed stage continues for any further epoch: ["distill"] (the default)
                      distils every epoch.
    """

    teacher: str | None = None
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    answer_weight: float = 1.0
    relation_weight: float = 1.0
    temperature: float | None = None
    stages: list[int] | list[str] = field(default_factory=lambda: ["distill"])

    def __post_init__(self) -> None:
        if isinstance(self.stages, tuple):
            self.stages = list(self.stages)
        self.validate()

    def validate(self) -> None:
        """Check every field; the message names the recipe key (`distill.<field>`) and the value."""
        _check(self.teacher is None or (isinstance(self.teacher, str) and bool(self.teacher)),
               f"distill.teacher must be a checkpoint path or null, got {self.teacher!r}")
        for part in PARTS:
            weight = getattr(self, f"{part}_weight")
            _check(_is_number(weight) and math.isfinite(weight) and weight >= 0,
                   f"distill.{part}_weight must be a finite number ≥ 0, got {weight!r}")
        _check(any(getattr(self, f"{part}_weight") > 0 for part in PARTS),
               "distill: every weight is 0, so nothing would be distilled (set one of "
               f"{', '.join(f'{part}_weight' for part in PARTS)} > 0, or drop the section)")
        _check(self.temperature is None or (_is_number(self.temperature) and math.isfinite(self.temperature)
                                            and self.temperature > 0),
               f"distill.temperature must be a number > 0 or null, got {self.temperature!r}")
        self._epoch_stages()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "DistillConfig":
        """The config of a recipe's `distill:` mapping; an unknown key is named with the closest field."""
        if not isinstance(data, Mapping):
            raise AuroraConfigError(f"distill must be a mapping of settings, got {type(data).__name__}: {data!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, 1)
                hints.append(f"'distill.{key}'" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise AuroraConfigError(f"unknown distill keys: {', '.join(hints)}; known: {', '.join(known)}")
        return cls(**data)

    def weights(self) -> dict[str, float]:
        """w_k of every term, by part name."""
        return {part: getattr(self, f"{part}_weight") for part in PARTS}

    def itc_temperatures(self, student: torch.Tensor | float,
                         teacher: torch.Tensor | float) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(τ_S, τ_T) for `itc_distillation`: the distillation temperature for both when one is set, else
        each model's own."""
        if self.temperature is not None:
            return self.temperature, self.temperature
        return student, teacher

    @property
    def response_temperature(self) -> float:
        """τ for ITM and answer distillation: the distillation temperature, else 1."""
        return 1.0 if self.temperature is None else self.temperature

    def schedule(self, max_epoch: int) -> list[Stage]:
        """The stage of each of `max_epoch` epochs; an error when the stages list more epochs than that."""
        _check(_is_int(max_epoch) and max_epoch > 0, f"max_epoch must be a positive integer, got {max_epoch!r}")
        names = self._epoch_stages()
        _check(len(names) <= max_epoch,
               f"distill.stages {self.stages!r} takes {len(names)} epochs but the run has max_epoch={max_epoch}")
        names = names + names[-1:] * (max_epoch - len(names))
        return [STAGES[name] for name in names]

    def combine(self, parts: Mapping[str, torch.Tensor], task: torch.Tensor | None = None,
                stage: str | Stage = "distill") -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one step of `stage`: the task loss and/or Σ_k w_k L_k, as the stage says.

        Parameters
        ----------
        parts : Mapping[str, torch.Tensor]
            Distillation terms by name (a subset of `PARTS`: each task has its own); ignored in a stage that
            does not distil.
        task : torch.Tensor, optional
            The supervised loss of the step; ignored in a stage that does not train on it ("align").
        stage : str or Stage
            The current stage (see `schedule`).

        Returns
        -------
        tuple
            The total [task] + [Σ_k w_k L_k] (a scalar tensor to backpropagate) and, for logging, the
            float value of each unweighted part, of "task", of "distill" (the weighted sum) and of "loss".
        """
        stage = _stage(stage)
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown distillation parts {unknown}; known: {', '.join(PARTS)}")
        logged: dict[str, float] = {}
        terms: list[torch.Tensor] = []
        if stage.task_loss:
            if task is None:
                raise ValueError(f"stage {stage.name!r} trains on the task loss: pass task=")
            terms.append(task)
            logged["task"] = float(task.detach())
        if stage.distillation:
            if not parts:
                raise ValueError(f"stage {stage.name!r} distils: pass the distillation parts")
            weights = self.weights()
            distilled = sum(weights[name] * value for name, value in parts.items())
            terms.append(distilled)
            logged.update({name: float(value.detach()) for name, value in parts.items()})
            logged["distill"] = float(distilled.detach())
        total = sum(terms)
        logged["loss"] = float(total.detach())
        return total, logged

    def _epoch_stages(self) -> list[str]:
        """One stage name per listed epoch, checking `stages` on the way."""
        stages = self.stages
        _check(isinstance(stages, list) and bool(stages),
               f"distill.stages must be a non-empty list of epoch counts or stage names, got {stages!r}")
        order = list(STAGES)
        if all(_is_int(entry) for entry in stages):
            _check(len(stages) == len(order) and all(entry >= 0 for entry in stages) and sum(stages) > 0,
                   f"distill.stages as epoch counts must be {len(order)} integers ≥ 0 ({', '.join(order)}) with "
                   f"at least one > 0, got {stages!r}")
            return [name for name, count in zip(order, stages) for _ in range(count)]
        for entry in stages:
            if not (isinstance(entry, str) and entry in STAGES):
                close = difflib.get_close_matches(str(entry), order, 1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(order)}"
                raise AuroraConfigError(f"distill.stages has unknown stage {entry!r}{hint} (a list of stage "
                                        f"names, or {len(order)} epoch counts), got {stages!r}")
        ranks = [order.index(entry) for entry in stages]
        _check(ranks == sorted(ranks),
               f"distill.stages must follow the scheme's order {' → '.join(order)}, got {stages!r}")
        return list(stages)


def _stage(stage: str | Stage) -> Stage:
    if isinstance(stage, Stage):
        return stage
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    return STAGES[stage]

