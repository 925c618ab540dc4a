"""VQA accuracy by the official VQAv2 evaluation (``vqaEval.py``, as LAVIS's VQA task runs it), without LAVIS.

For a question with ten human answers a_1..a_10 and a prediction p::

    acc(p) = 1/10 Σ_j min(1, #{k ≠ j : a_k = p} / 3)

after the official normalisation: p loses its punctuation, number words become digits, articles are dropped
and contractions get their apostrophe back; the human answers are only stripped of punctuation, and only
when they disagree (the official script's quirks, kept so that the numbers are the ones LAVIS reports).
Results are percentages rounded to two decimals: overall (``agg_metrics``) and per answer type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .data import DataError

__all__ = ["normalize_answer", "vqa_accuracy"]

# the official contractions table, "without:with" pairs
_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've
hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's
Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll
let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've
mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at
'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll
thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's
theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's
whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't
wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, re.UNICODE)  # sic: the flag lands in `count` (32 periods), as officially


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A prediction as the official evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_strip_punctuation(answer))


def vqa_accuracy(results: Sequence[Mapping[str, Any]], questions_file: str | Path,
                 annotations_file: str | Path) -> dict[str, float]:
    """The official accuracy of ``results`` (``{"question_id", "answer"}`` items, one per question of the split)
    against the split's official question and annotation files.

    Returns ``agg_metrics`` (overall accuracy, %) and one entry per answer type ("yes/no", "number", "other"),
    as LAVIS's VQA task reports them. Raises ``DataError`` when the results do not answer exactly the
    annotated questions (the official ``loadRes`` asserts the same).
    """
    questions = _read(questions_file, "questions")
    annotations = {a["question_id"]: a for a in _read(annotations_file, "annotations")}
    asked = {q["question_id"] for q in questions}
    answered = {r["question_id"]: r["answer"] for r in results}
    if set(answered) != set(annotations) or not asked >= set(annotations):
        raise DataError(f"the results answer {len(answered)} questions, {annotations_file} annotates "
                        f"{len(annotations)} (of the {len(asked)} in {questions_file}); they must be the same")
    overall, by_type = [], {}
    for question_id, annotation in annotations.items():
        score = _score(normalize_answer(answered[question_id]), [a["answer"] for a in annotation["answers"]])
        overall.append(score)
        by_type.setdefault(annotation["answer_type"], []).append(score)
    metrics = {"agg_metrics": _percent(overall)}
    metrics.update({kind: _percent(scores) for kind, scores in by_type.items()})
    return metrics


def _score(prediction: str, answers: list[str]) -> float:
    if len(set(answers)) > 1:
        answers = [_strip_punctuation(a) for a in answers]
    return sum(min(1.0, sum(other == prediction for k, other in enumerate(answers) if k != j) / 3)
               for j in range(len(answers))) / len(answers)


def _percent(scores: list[float]) -> float:
    return round(100 * sum(scores) / len(scores), 2)


def _read(path: str | Path, key: str) -> list[dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())[key]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not an official VQA {key} file ({error!r})") from None
