"""A generated shapes world written in the file formats LAVIS's Flickr30k, COCO and VQAv2 recipes read.

Why: nothing can be downloaded here, yet the recipes must run LAVIS's own builders, datasets and
evaluators. Images are drawn with PIL; captions, questions and answers come from templates over a small
fixed vocabulary (``vocabulary()``), so a tiny tokenizer covers every word.

Two domains share that vocabulary and differ in what they show:

- ``source``: light background, 1-2 shapes, half of the colour/shape pairs, "a red circle on the left";
- ``shifted``: dark noisy background, 2-3 shapes, the other half of the pairs, "there is a red circle at
  the left".

Every colour and every shape occurs in both domains; only their pairings, the background, the counts and
the phrasing move. A model pre-trained on ``source`` knows the words but not the compositions, so the
shift can be learned by adaptation and is not solved by the source model.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from itertools import product
from math import cos, radians, sin
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (145, 60, 185),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# centre of each position as a fraction of the image side; far enough apart that shapes never touch
POSITIONS = {"left": (1 / 6, 1 / 2), "right": (5 / 6, 1 / 2), "top": (1 / 2, 1 / 6),
             "bottom": (1 / 2, 5 / 6), "center": (1 / 2, 1 / 2)}
SIZES = {"small": 0.09, "large": 0.14}  # radius as a fraction of the image side
JITTER = 0.015
MAX_REPEATS = 5_000  # consecutive repeated scenes before a split is declared too large
CAPTIONS_PER_IMAGE = 5
ANSWERS_PER_QUESTION = 10  # VQAv2 accuracy is min(1, matches / 3) over leave-one-out subsets of 10


@dataclass(frozen=True)
class Domain:
    """What one part of the world looks like and how it is described."""

    parity: int  # colour/shape pairs with (colour index + shape index) % 2 == parity
    counts: tuple[int, ...]
    background: tuple[int, int, int]
    noise: int
    phrases: tuple[str, ...]  # one object: {color} {shape} {position} {size}
    sentences: tuple[str, ...]  # a caption around the joined objects: {objs}
    id_base: int


DOMAINS = {
    "source": Domain(
        parity=0, counts=(1, 2), background=(242, 240, 235), noise=0,
        phrases=("a {color} {shape} on the {position}", "a {size} {color} {shape} on the {position}"),
        sentences=("{objs}", "a picture of {objs}", "an image of {objs}"), id_base=100_000),
    "shifted": Domain(
        parity=1, counts=(2, 3), background=(40, 40, 52), noise=24,
        phrases=("a {color} {shape} at the {position}", "a {size} {color} {shape} at the {position}"),
        sentences=("there is {objs}", "{objs} on a dark background", "a dark picture with {objs}"),
        id_base=200_000),
}

# kind -> (question template, VQA question_type, VQA answer_type)
QUESTIONS = {
    "color": ("what color is the {shape}?", "what color is the", "other"),
    "shape": ("what shape is on the {position}?", "what shape is", "other"),
    "where": ("where is the {color} {shape}?", "where is the", "other"),
    "count": ("how many shapes are there?", "how many", "number"),
    "exists": ("is there a {color} {shape}?", "is there a", "yes/no"),
}
COUNT_ANSWERS = ("1", "2", "3")  # digits: VQAEval maps "two" in predictions to "2"
ANSWER_LIST = [*COLORS, *SHAPES, *POSITIONS, "yes", "no", *COUNT_ANSWERS]
SPLITS = ("train", "val", "test")
TASK_ID_OFFSET = {"retrieval": 0, "vqa": 50_000}  # so one coco/images folder can hold both


class Obj(NamedTuple):
    color: str
    shape: str
    position: str
    size: str
    dx: float
    dy: float


def vocabulary() -> list[str]:
    """Every token (words, digits, "?") of captions, questions and answers, sorted: a tiny tokenizer's
    vocabulary covers all generated text (split as BERT's basic tokenizer splits it)."""
    templates = [t for d in DOMAINS.values() for t in d.phrases + d.sentences]
    templates += [q for q, _, _ in QUESTIONS.values()]
    words = set(re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", " ", " ".join(templates))))
    return sorted(words | {"and"} | set(SIZES) | set(ANSWER_LIST))


def _domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; expected one of {sorted(DOMAINS)}")
    return DOMAINS[name]


def _pairs(domain: Domain) -> list[tuple[str, str]]:
    return [(c, s) for (ci, c), (si, s) in product(enumerate(COLORS), enumerate(SHAPES))
            if (ci + si) % 2 == domain.parity]


def _scene(rng: random.Random, domain: Domain, colors_of: Mapping[str, list[str]]) -> list[Obj]:
    """Distinct shapes at distinct positions, each in one of the domain's colour/shape pairs."""
    k = rng.choice(domain.counts)
    return [Obj(rng.choice(colors_of[s]), s, p, rng.choice(list(SIZES)),
                rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER))
            for s, p in zip(rng.sample(SHAPES, k), rng.sample(list(POSITIONS), k))]


def _scenes(rng: random.Random, domain: Domain, n: int) -> list[list[Obj]]:
    """n scenes whose (colour, shape, position) sets differ, so each caption fits one image of a split."""
    colors_of = {s: [c for c, s2 in _pairs(domain) if s2 == s] for s in SHAPES}
    seen, scenes, misses = set(), [], 0
    while len(scenes) < n:
        scene = _scene(rng, domain, colors_of)
        key = frozenset(o[:3] for o in scene)
        misses = misses + 1 if key in seen else 0
        if misses > MAX_REPEATS:
            raise ValueError(f"cannot draw {n} distinct scenes: this domain has about {len(seen)}")
        if not misses:
            seen.add(key)
            scenes.append(scene)
    return scenes


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def polar(radii: list[float], start: float) -> list[tuple[float, float]]:
        step = 360 / len(radii)
        return [(cx + q * cos(radians(start + i * step)), cy + q * sin(radians(start + i * step)))
                for i, q in enumerate(radii)]

    if shape == "square":
        return polar([r * 1.15] * 4, 45)
    if shape == "triangle":
        return polar([r] * 3, -90)
    if shape == "diamond":
        return polar([r] * 4, 0)
    if shape == "star":
        return polar([r, 0.45 * r] * 5, -90)
    w = 0.35 * r  # cross: a plus sign of arm half-width w
    return [(cx + x, cy + y) for x, y in ((-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
                                          (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w))]


def _draw(scene: list[Obj], domain: str, image_size: int, seed: int) -> Image.Image:
    """The image of one scene; the background texture is seeded so files are reproducible."""
    d = _domain(domain)
    noise = np.random.default_rng(seed).integers(-d.noise, d.noise + 1, (image_size, image_size, 1))
    image = Image.fromarray(np.clip(np.array(d.background) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for o in scene:
        fx, fy = POSITIONS[o.position]
        cx, cy, r = (fx + o.dx) * image_size, (fy + o.dy) * image_size, SIZES[o.size] * image_size
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[o.color])
        else:
            draw.polygon(_outline(o.shape, cx, cy, r), fill=COLORS[o.color])
    return image


def _captions(rng: random.Random, domain: Domain, scene: list[Obj]) -> list[str]:
    """Distinct template pairs per caption, objects in a fresh random order each time."""
    captions = []
    for sentence, phrase in rng.sample(list(product(domain.sentences, domain.phrases)), CAPTIONS_PER_IMAGE):
        objs = " and ".join(phrase.format(**o._asdict()) for o in rng.sample(scene, len(scene)))
        captions.append(_english(sentence.format(objs=objs)))
    return captions


def _english(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _question(rng: random.Random, domain: Domain, scene: list[Obj], kind: str) -> tuple[str, str]:
    """One question about the scene; half of the "is there" questions ask about an absent pair."""
    o = rng.choice(scene)
    if kind == "exists" and rng.random() < 0.5:
        present = {(x.color, x.shape) for x in scene}
        color, shape = rng.choice([p for p in _pairs(domain) if p not in present])
        return _english(QUESTIONS[kind][0].format(color=color, shape=shape)), "no"
    answers = {"color": o.color, "shape": o.shape, "where": o.position, "count": str(len(scene)),
               "exists": "yes"}
    return _english(QUESTIONS[kind][0].format(**o._asdict())), answers[kind]


def _write_json(path: Path, obj: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


# image sub-folders of the real datasets, by layout and split
SUBSETS = {"coco": {"train": "train2014", "val": "val2014", "test": "val2014"},
           "vqa": {"train": "train2014", "val": "val2014", "test": "test2015"}}


def _image_name(layout: str, split: str, image_id: int) -> str:
    if layout == "flickr30k":
        return f"flickr30k-images/{image_id}.jpg"
    sub = SUBSETS[layout][split]
    return f"{sub}/COCO_{sub}_{image_id:012d}.jpg"


def _draw_splits(images: Path, layout: str, domain: str, sizes: tuple[int, int, int], image_size: int,
                 seed: int) -> Iterator[tuple[str, random.Random, list[tuple[int, str, list[Obj]]]]]:
    """Per split: its rng and its saved images as (image id, path relative to ``images``, scene).

    Each split has its own rng, so one split's size leaves the others' content unchanged; image ids
    never repeat across splits, domains or tasks.
    """
    task = "retrieval" if layout in ("flickr30k", "coco") else layout
    first = _domain(domain).id_base + TASK_ID_OFFSET[task]
    for split, n in zip(SPLITS, sizes):
        rng, drawn = random.Random(f"{seed}/{task}/{domain}/{split}"), []
        for image_id, scene in enumerate(_scenes(rng, _domain(domain), n), start=first):
            rel = _image_name(layout, split, image_id)
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            image = _draw(scene, domain, image_size, rng.getrandbits(32))
            image.save(images / rel, "JPEG", quality=95, subsampling=0)
            drawn.append((image_id, rel, scene))
        yield split, rng, drawn
        first += n


def write_retrieval_dataset(root: str | Path, *, style: str = "flickr30k", domain: str = "source",
                            n_train: int = 64, n_val: int = 16, n_test: int = 16, image_size: int = 64,
                            seed: int = 0) -> dict[str, Any]:
    """Write a Flickr30k- or COCO-Karpathy-style retrieval set under ``root`` (LAVIS's cache layout).

    Returns ``{"builder", "images", "annotations": {split: [absolute json paths]}}`` for
    ``lavis_datasets_config``. Train files hold one entry per caption, val/test one entry per image
    with its ``CAPTIONS_PER_IMAGE`` captions, as LAVIS's RetrievalDataset/RetrievalEvalDataset read them.
    """
    if style not in ("flickr30k", "coco"):
        raise ValueError(f"unknown style {style!r}; expected 'flickr30k' or 'coco'")
    d, base = _domain(domain), Path(root).absolute() / style
    annotations = {}
    sizes = (n_train, n_val, n_test)
    for split, rng, drawn in _draw_splits(base / "images", style, domain, sizes, image_size, seed):
        if split == "train":
            image_id = str if style == "flickr30k" else "coco_{}".format
            entries = [{"image": rel, "caption": c, "image_id": image_id(i)}
                       for i, rel, scene in drawn for c in _captions(rng, d, scene)]
        else:
            entries = [{"image": rel, "caption": _captions(rng, d, scene)} for _, rel, scene in drawn]
        name = f"{split}.json" if style == "flickr30k" else f"coco_karpathy_{split}.json"
        annotations[split] = [_write_json(base / "annotations" / name, entries)]
    builder = "flickr30k" if style == "flickr30k" else "coco_retrieval"
    return {"builder": builder, "images": str(base / "images"), "annotations": annotations}


def _official_vqa(split: str, records: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The question and annotation files the official VQA evaluation reads (lavis.common.vqa_tools)."""
    header = {"info": {"description": "aurora-pet synthetic shapes"}, "license": {"name": "BSD-3-Clause"},
              "data_type": "mscoco", "data_subtype": split}
    questions = {**header, "task_type": "Open-Ended",
                 "questions": [{k: r[k] for k in ("image_id", "question", "question_id")} for r in records]}
    annotations = {**header, "annotations": [
        {"question_id": r["question_id"], "image_id": r["image_id"], "question_type": r["question_type"],
         "answer_type": r["answer_type"], "multiple_choice_answer": r["answer"],
         "answers": [{"answer": r["answer"], "answer_confidence": "yes", "answer_id": j + 1}
                     for j in range(ANSWERS_PER_QUESTION)]} for r in records]}
    return questions, annotations


def write_vqa_dataset(root: str | Path, *, domain: str = "source", n_train: int = 64, n_val: int = 16,
                      n_test: int = 16, image_size: int = 64, questions_per_image: int = 3,
                      seed: int = 0) -> dict[str, Any]:
    """Write a VQAv2-style set (LAVIS ``coco_vqa``) under ``root``; ``n_*`` count images.

    Val and test also get official-format question/annotation files so LAVIS's VQA evaluator scores
    both (the real test split has no answers; here it does). Returns the same shape of dict as
    ``write_retrieval_dataset``; eval splits list their files in the order LAVIS's COCOVQAEvalDataset
    indexes them: eval json, answer list, questions, annotations.
    """
    if not 1 <= questions_per_image <= len(QUESTIONS):
        raise ValueError(f"questions_per_image must be in 1..{len(QUESTIONS)}")
    d, base = _domain(domain), Path(root).absolute() / "coco"
    answer_list = _write_json(base / "annotations" / "answer_list.json", ANSWER_LIST)
    annotations = {}
    sizes = (n_train, n_val, n_test)
    for split, rng, drawn in _draw_splits(base / "images", "vqa", domain, sizes, image_size, seed):
        records = []
        for image_id, rel, scene in drawn:
            for j, kind in enumerate(rng.sample(list(QUESTIONS), questions_per_image)):
                question, answer = _question(rng, d, scene, kind)
                records.append({"question_id": image_id * 10 + j, "image_id": image_id, "image": rel,
                                "question": question, "answer": answer,
                                "question_type": QUESTIONS[kind][1], "answer_type": QUESTIONS[kind][2]})
        annotations[split] = _write_vqa_split(base / "annotations", split, records, answer_list)
    return {"builder": "coco_vqa", "images": str(base / "images"), "annotations": annotations}


def _write_vqa_split(ann_dir: Path, split: str, records: list[dict[str, Any]],
                     answer_list: str) -> list[str]:
    entries = [{"question_id": r["question_id"], "question": r["question"],
                "answer": [r["answer"]] * ANSWERS_PER_QUESTION, "image": r["image"], "dataset": "vqa"}
               for r in records]
    if split == "train":
        return [_write_json(ann_dir / "vqa_train.json", entries)]
    if split == "test":  # like the real vqa_test.json: no answers
        entries = [{k: v for k, v in e.items() if k != "answer"} for e in entries]
    sub = SUBSETS["vqa"][split]
    questions, official = _official_vqa(sub, records)
    return [_write_json(ann_dir / ("vqa_val_eval.json" if split == "val" else "vqa_test.json"), entries),
            answer_list,
            _write_json(ann_dir / f"v2_OpenEnded_mscoco_{sub}_questions.json", questions),
            _write_json(ann_dir / f"v2_mscoco_{sub}_annotations.json", official)]


def lavis_datasets_config(written: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's ``datasets:`` entry that points LAVIS's builder at the written files.

    All paths are absolute (LAVIS joins relative ones onto ``cache_root``) and ``url`` repeats
    ``storage``: LAVIS requires a ``url`` per file, copies it when it is a local file and would
    otherwise try to download the yaml's default URL.
    """
    anns = {split: {"url": list(paths), "storage": list(paths)}
            for split, paths in written["annotations"].items()}
    build_info = {"annotations": anns, "images": {"storage": written["images"]}}
    return {written["builder"]: {"data_type": "images", "build_info": build_info}}


def validate_datasets_config(datasets: Mapping[str, Any], cache_root: str | Path = ".") -> None:
    """Fail before training, naming the file, where LAVIS fails late or unclearly.

    LAVIS 1.0.2 reports a malformed annotation file as a bare JSONDecodeError (no file name), a missing
    one as "unknown url type" (after trying to download it), and a missing image only when a batch
    first reaches it. ``datasets`` is a recipe's ``datasets:`` section; relative paths are resolved
    against ``cache_root`` as LAVIS does.
    """
    for name, cfg in datasets.items():
        info = cfg["build_info"]
        images = Path(cache_root, info["images"]["storage"])
        for split, ann in info["annotations"].items():
            storage = [ann["storage"]] if isinstance(ann["storage"], str) else list(ann["storage"])
            urls = [ann.get("url")] if isinstance(ann.get("url"), str) else list(ann.get("url") or [])
            if len(urls) != len(storage):
                raise ValueError(f"datasets.{name}.build_info.annotations.{split}: needs one url per "
                                 f"storage path (got {len(urls)} for {len(storage)})")
            for path in (Path(cache_root, p) for p in storage):
                _check_annotation_file(path, images)


def _check_annotation_file(path: Path, images: Path) -> None:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read annotation file {path}: {e}") from e
    records = entries if isinstance(entries, list) else []  # the answer list and VQA files hold no images
    listed = {e["image"] for e in records if isinstance(e, dict) and "image" in e}
    missing = sorted(p for p in listed if not (images / p).is_file())
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {path} do not exist, e.g. {images / missing[0]}")
