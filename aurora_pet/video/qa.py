"""Video question answering as BLIP does it, for any model family: the answer list that ranking chooses from,
and accuracy by exact match.

MSRVTT-QA and MSVD-QA (as LAVIS distributes them) give one answer per question and a ``qa_ans2label.json``
that maps each of the most frequent training answers to a class label (ALPRO classifies over it). BLIP
answers with its decoder instead: it ranks the answer list's strings (or generates), so the list is the
answers ordered by label, and a prediction is right when it is the ground-truth string.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..training.data import DataError


def read_answer_list(path: str | Path) -> list[str]:
    """The candidate answers of a ``qa_ans2label.json``, ordered by label.

    Parameters
    ----------
    path : str or Path
        A JSON object mapping each answer to its label; the labels must be ``0 .. K-1``, each once.

    Returns
    -------
    list of str
        ``answers[label]``.

    Raises
    ------
    DataError
        Naming the file: missing, not JSON, not such a mapping, or labels that are not ``0 .. K-1``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"answer list not found: {path}")
    try:
        ans2label = json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: cannot read the answer list ({error})") from None
    if not isinstance(ans2label, dict) or not ans2label:
        raise DataError(f"{path}: expected a non-empty JSON object mapping answers to labels")
    bad = [(a, lab) for a, lab in ans2label.items() if not isinstance(lab, int) or isinstance(lab, bool)]
    if bad:
        raise DataError(f"{path}: the label of answer {bad[0][0]!r} is {bad[0][1]!r}, not an integer")
    labels = sorted(ans2label.values())
    if labels != list(range(len(labels))):
        missing = sorted(set(range(len(labels))) - set(labels))
        raise DataError(f"{path}: labels must be 0..{len(labels) - 1}, each once"
                        + (f"; label {missing[0]} is missing" if missing else ""))
    return sorted(ans2label, key=ans2label.__getitem__)


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """The share of predictions equal to their ground-truth answer (both stripped), in percent.

    Parameters
    ----------
    predictions : sequence of str
        The model's answers.
    answers : sequence of str
        The ground truth, one per prediction.

    Returns
    -------
    float
        Accuracy in percent (0 for no question).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    right = sum(p.strip() == a.strip() for p, a in zip(predictions, answers))
    return 100.0 * right / len(answers)
