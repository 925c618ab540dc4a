"""Generated videos of moving shapes as real mp4 files, in the layouts and annotation formats LAVIS's
MSRVTT and DiDeMo retrieval and MSRVTT-QA and MSVD-QA builders read.

Why: no video can be downloaded here, yet the video recipes must run LAVIS's own builders and datasets
and decode real files; and a model that looks at one frame must not be able to solve the task. Every
clip shows one event that no single frame shows, beside a shape that stays still in a corner:

- ``move``: a shape crosses the frame to the left, right, up or down, passing at the middle frame a point
  drawn independently of the direction. The middle frame (what uniform sampling of one frame takes) says
  nothing about the direction, and N uniformly sampled frames (N < num_frames, dividing it) taken as a
  set say nothing either: the reversed motion shows the same frames in reverse order;
- ``appear``: a shape appears part-way through, in another corner: a later frame shows two shapes, not
  which one is new;
- ``turn``: a shape changes colour part-way through, at one of the frames around the middle, chosen
  symmetrically: one frame shows the first colour as often as the second, and uniformly sampled frames
  as a set show as many of each colour as for the opposite change.

So one frame answers none of them; N frames seen as a set (BLIP's concatenated frame tokens without a
frame embedding, see ``aurora_pet.video.encode``) answer ``appear`` (the new shape is missing from some
frames) but not ``move`` or ``turn``, which need the order of the frames.

Captions and questions come from templates over a small vocabulary (``vocabulary()``); within a split no
two clips share an event (kind, colour, shape, direction or new colour), so every caption fits one video.
Files are written with OpenCV (MPEG-4 Part 2 in mp4, which decord reads); both are in the LAVIS
environment. Everything is deterministic from ``seed``, the mp4 bytes included.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import COLORS, SHAPES, _english, _outline, _write_json

KINDS = ("move", "appear", "turn")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# corner centres as fractions of the side; a moving shape stays within 0.05 of the middle line, so the
# still shape in a corner never touches it
CORNERS = {"top left": (0.2, 0.2), "top right": (0.8, 0.2), "bottom left": (0.2, 0.8), "bottom right": (0.8, 0.8)}
RADIUS = 0.1  # shape radius as a fraction of the side
TRAVEL = 0.5  # a moving shape crosses this fraction of the side from the first frame to the last
JITTER = 0.05  # of a moving or turning shape's position at the middle frame
BACKGROUND = (242, 240, 235)
FPS = 8
MIN_FRAMES = 4
MAX_REPEATS = 5_000  # consecutive repeated events before a split is declared too large

CAPTIONS = {
    "move": ("a {color} {shape} moves {detail}", "a {color} {shape} moving {detail}",
             "the {color} {shape} goes {detail}"),
    "appear": ("a {color} {shape} appears", "a {color} {shape} shows up", "suddenly there is a {color} {shape}"),
    "turn": ("a {shape} turns from {color} to {detail}", "a {color} {shape} turns {detail}",
             "the {shape} changes from {color} to {detail}"),
}
STILL_PHRASES = ("", " next to a {still_color} {still_shape}", " while a {still_color} {still_shape} stays still")
STILL_SENTENCE = "a {still_color} {still_shape} stays at the {still_corner}"  # DiDeMo's second moment
# kind -> ((question template, the Clip field that answers it), ...)
QUESTIONS = {
    "move": (("which way does the {color} {shape} move?", "detail"), ("where does the {color} {shape} go?", "detail")),
    "appear": (("what shape appears?", "shape"), ("what color is the shape that appears?", "color")),
    "turn": (("what color does the {shape} turn?", "detail"), ("what color is the {shape} at first?", "color")),
}
ANSWER_LIST = [*DIRECTIONS, *COLORS, *SHAPES]
SPLITS = ("train", "val", "test")
# builder -> (dataset folder, task); annotation names are those of LAVIS's default yaml for the builder
BUILDERS = {"msrvtt_retrieval": ("msrvtt", "retrieval"), "didemo_retrieval": ("didemo", "retrieval"),
            "msrvtt_qa": ("msrvtt", "qa"), "msvd_qa": ("msvd", "qa")}
TASK_ID_OFFSET = {"retrieval": 0, "qa": 50_000}  # so one msrvtt/videos folder can hold both tasks' clips


class Clip(NamedTuple):
    """One generated video: its event and the shape that stays still."""

    kind: str  # "move", "appear" or "turn"
    color: str  # the subject's colour (its first colour when it turns)
    shape: str
    detail: str  # move: the direction; turn: the colour it turns to; appear: ""
    place: tuple[float, float]  # where the subject is at frame `onset` (fractions of the side)
    onset: int  # move: the middle frame; appear/turn: the first frame of the new state
    still_color: str
    still_shape: str
    still_corner: str

    @property
    def event(self) -> tuple[str, str, str, str]:
        """What captions say about the clip; unique within a split."""
        return self.kind, self.color, self.shape, self.detail


def vocabulary() -> list[str]:
    """Every token of the generated captions, questions and answers, sorted (split as BERT's basic
    tokenizer splits text), so a tiny tokenizer's vocabulary can cover them."""
    templates = [t for group in CAPTIONS.values() for t in group] + [q for qs in QUESTIONS.values() for q, _ in qs]
    templates += [*STILL_PHRASES, STILL_SENTENCE, *CORNERS]
    words = set(re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", " ", " ".join(templates))))
    return sorted(words | set(ANSWER_LIST) | {"an", "."})  # "an" before a vowel; "." ends DiDeMo sentences


def write_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: int = FPS) -> str:
    """Write RGB frames as an MPEG-4 Part 2 mp4 file (what OpenCV's wheels can encode and decord reads).

    Parameters
    ----------
    path : str or Path
        The file to write; its folder is created.
    frames : sequence of numpy.ndarray
        uint8 RGB frames of one shape ``(H, W, 3)``; H and W even (the encoder's 4:2:0 chroma halves them).
    fps : int
        Frames per second.

    Returns
    -------
    str
        The path written.
    """
    try:
        import cv2
    except ImportError as error:
        raise ImportError("writing mp4 files needs OpenCV (opencv-python-headless, in the LAVIS "
                          "environment)") from error
    height, width = frames[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"frame sides must be even for the mp4 encoder, got {height}x{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot open an mp4 writer for {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return str(path)


def render(clip: Clip, num_frames: int, image_size: int) -> list[np.ndarray]:
    """The clip's frames as uint8 RGB arrays ``(image_size, image_size, 3)``.

    Parameters
    ----------
    clip : Clip
        What to draw.
    num_frames : int
        Frames in the clip.
    image_size : int
        Side of each frame in pixels.

    Returns
    -------
    list of numpy.ndarray
        The frames in time order.
    """
    frames = []
    for t in range(num_frames):
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        _draw_shape(draw, clip.still_shape, clip.still_color, CORNERS[clip.still_corner], image_size)
        x, y = clip.place
        color = clip.color
        if clip.kind == "move":
            dx, dy = DIRECTIONS[clip.detail]
            step = TRAVEL / (num_frames - 1) * (t - clip.onset)
            x, y = x + dx * step, y + dy * step
        elif clip.kind == "turn" and t >= clip.onset:
            color = clip.detail
        if clip.kind != "appear" or t >= clip.onset:
            _draw_shape(draw, clip.shape, color, (x, y), image_size)
        frames.append(np.asarray(image))
    return frames


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, centre: tuple[float, float], size: int) -> None:
    cx, cy, r = centre[0] * size, centre[1] * size, RADIUS * size
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[color])
    else:
        draw.polygon(_outline(shape, cx, cy, r), fill=COLORS[color])


def _clip(rng: random.Random, kinds: Sequence[str], num_frames: int) -> Clip:
    kind, shape = rng.choice(kinds), rng.choice(SHAPES)
    color, other = rng.sample(list(COLORS), 2)
    still_color = rng.choice([c for c in COLORS if c not in (color, other)])
    still_shape = rng.choice([s for s in SHAPES if s != shape])
    still_corner, corner = rng.sample(list(CORNERS), 2)
    middle, half = num_frames // 2, max(1, num_frames // 8)
    if kind == "move":
        detail, onset = rng.choice(list(DIRECTIONS)), middle
        along = 0.5 + rng.uniform(-JITTER, JITTER)
        across = 0.5 + rng.uniform(-JITTER, JITTER)
        place = (along, across) if DIRECTIONS[detail][0] else (across, along)
    else:  # the new state begins in [middle - half + 1, middle + half]: at or before `middle` half the time
        detail = other if kind == "turn" else ""
        onset = middle + rng.randint(1 - half, half)
        place = CORNERS[corner] if kind == "appear" else tuple(0.5 + rng.uniform(-JITTER, JITTER) for _ in "xy")
    return Clip(kind, color, shape, detail, place, onset, still_color, still_shape, still_corner)


def _clips(rng: random.Random, kinds: Sequence[str], n: int, num_frames: int) -> list[Clip]:
    """n clips whose events differ, so each caption fits one video of a split."""
    seen, clips, misses = set(), [], 0
    while len(clips) < n:
        clip = _clip(rng, kinds, num_frames)
        misses = misses + 1 if clip.event in seen else 0
        if misses > MAX_REPEATS:
            raise ValueError(f"cannot draw {n} clips with distinct events of kinds {list(kinds)}: "
                             f"there are about {len(seen)}")
        if not misses:
            seen.add(clip.event)
            clips.append(clip)
    return clips


def _captions(rng: random.Random, clip: Clip, n: int, paragraph: bool) -> list[str]:
    """n distinct captions; a DiDeMo ``paragraph`` joins the event and the still shape as two sentences."""
    fields = clip._asdict()
    if paragraph:
        sentences = rng.sample(CAPTIONS[clip.kind], n)
        return [_english(f"{s.format(**fields)}. {STILL_SENTENCE.format(**fields)}.") for s in sentences]
    pairs = rng.sample([(s, p) for s in CAPTIONS[clip.kind] for p in STILL_PHRASES], n)
    return [_english((s + p).format(**fields)) for s, p in pairs]


def _video_name(rng: random.Random, folder: str, number: int) -> str:
    """A file name shaped like the real dataset's (unique through ``number``)."""
    if folder == "msrvtt":
        return f"video{number}.mp4"
    if folder == "didemo":  # Flickr ids: <user>@N0<k>_<photo>_<secret>
        user, secret = f"{rng.randrange(10**7, 10**8)}@N0{rng.randrange(10)}", f"{rng.getrandbits(40):010x}"
        return f"{user}_{5_000_000_000 + number}_{secret}.mp4"
    youtube = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(11))
    return f"{youtube}_{number}_{number + rng.randrange(4, 20)}.mp4"  # MSVD: <YouTube id>_<start s>_<end s>


def _write_videos(builder: str, root: Path, sizes: Sequence[int], kinds: Sequence[str], num_frames: int,
                  image_size: int, seed: int) -> Iterator[tuple[str, random.Random, list[tuple[str, Clip]]]]:
    """Per split: its rng and its clips as (file name relative to the videos folder, clip), all written."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown or no event kinds {unknown or list(kinds)}; choose from {list(KINDS)}")
    if num_frames < MIN_FRAMES:
        raise ValueError(f"num_frames must be at least {MIN_FRAMES}, got {num_frames}")
    folder, task = BUILDERS[builder]
    number = TASK_ID_OFFSET[task]
    for split, n in zip(SPLITS, sizes):
        rng, written = random.Random(f"{seed}/{builder}/{split}"), []
        for clip in _clips(rng, kinds, n, num_frames):
            name = _video_name(rng, folder, number)
            write_mp4(root / folder / "videos" / name, render(clip, num_frames, image_size))
            written.append((name, clip))
            number += 1
        yield split, rng, written


def write_video_retrieval_dataset(root: str | Path, *, builder: str = "msrvtt_retrieval", n_train: int = 32,
                                  n_val: int = 8, n_test: int = 8, num_frames: int = 16, image_size: int = 64,
                                  captions_per_video: int | None = None, kinds: Sequence[str] = KINDS,
                                  seed: int = 0) -> dict[str, Any]:
    """Write an MSRVTT- or DiDeMo-style video retrieval set under ``root`` (LAVIS's cache layout).

    Train files hold one entry ``{"video", "caption"}`` per caption, val/test one entry per video with its
    list of captions, as LAVIS's ``VideoRetrievalDataset`` / ``VideoRetrievalEvalDataset`` read them.

    Parameters
    ----------
    root : str or Path
        Folder to write ``<dataset>/videos`` and ``<dataset>/annotations`` under.
    builder : str
        ``"msrvtt_retrieval"`` (one sentence per caption) or ``"didemo_retrieval"`` (paragraphs: the event's
        and the still shape's sentences joined, as DiDeMo joins a video's moment descriptions).
    n_train, n_val, n_test : int
        Videos per split.
    num_frames : int
        Frames per video (at ``FPS``).
    image_size : int
        Side of the square frames in pixels (even).
    captions_per_video : int, optional
        Default 3 for MSRVTT, 1 for DiDeMo.
    kinds : sequence of str
        Event kinds to draw from (``KINDS``).
    seed : int
        Seed of everything; each split has its own stream, so one split's size leaves the others unchanged.

    Returns
    -------
    dict
        ``{"builder", "videos", "annotations": {split: [json path]}, "num_frames"}`` with absolute paths,
        for ``lavis_video_datasets_config``.
    """
    if builder not in ("msrvtt_retrieval", "didemo_retrieval"):
        raise ValueError(f"unknown retrieval builder {builder!r}; expected 'msrvtt_retrieval' or 'didemo_retrieval'")
    didemo = builder == "didemo_retrieval"
    count = captions_per_video or (1 if didemo else 3)
    most = len(CAPTIONS["move"]) * (1 if didemo else len(STILL_PHRASES))
    if not 1 <= count <= most:
        raise ValueError(f"captions_per_video must be in 1..{most} for {builder}, got {count}")
    root, folder = Path(root).absolute(), BUILDERS[builder][0]
    annotations = {}
    for split, rng, written in _write_videos(builder, root, (n_train, n_val, n_test), kinds, num_frames,
                                             image_size, seed):
        captions = [(name, _captions(rng, clip, count, didemo)) for name, clip in written]
        entries = ([{"video": name, "caption": c} for name, cs in captions for c in cs] if split == "train"
                   else [{"video": name, "caption": cs} for name, cs in captions])
        annotations[split] = [_write_json(root / folder / "annotations" / f"retrieval_{split}.json", entries)]
    return {"builder": builder, "videos": str(root / folder / "videos"), "annotations": annotations,
            "num_frames": num_frames}


def write_video_qa_dataset(root: str | Path, *, builder: str = "msrvtt_qa", n_train: int = 32, n_val: int = 8,
                           n_test: int = 8, num_frames: int = 16, image_size: int = 64, questions_per_video: int = 2,
                           kinds: Sequence[str] = KINDS, seed: int = 0) -> dict[str, Any]:
    """Write an MSRVTT-QA- or MSVD-QA-style video QA set under ``root`` (LAVIS's cache layout).

    Every split holds entries ``{"video", "question", "answer", "question_id"}`` (test too, as in the real
    sets), which LAVIS's ``VideoQADataset`` reads; ``qa_ans2label.json`` maps each answer of
    ``ANSWER_LIST`` to its class label (the answer list, ordered by label).

    Parameters
    ----------
    root : str or Path
        Folder to write ``<dataset>/videos`` and ``<dataset>/annotations`` under.
    builder : str
        ``"msrvtt_qa"`` or ``"msvd_qa"``.
    n_train, n_val, n_test : int
        Videos per split.
    num_frames : int
        Frames per video (at ``FPS``).
    image_size : int
        Side of the square frames in pixels (even).
    questions_per_video : int
        1 or 2 (the templates of the clip's kind, in random order).
    kinds : sequence of str
        Event kinds to draw from; ``("move",)`` makes every answer a direction.
    seed : int
        Seed of everything.

    Returns
    -------
    dict
        ``{"builder", "videos", "annotations": {split: [json path]}, "ans2label", "num_frames"}`` with
        absolute paths, for ``lavis_video_datasets_config``.
    """
    if builder not in ("msrvtt_qa", "msvd_qa"):
        raise ValueError(f"unknown video QA builder {builder!r}; expected 'msrvtt_qa' or 'msvd_qa'")
    if not 1 <= questions_per_video <= 2:
        raise ValueError(f"questions_per_video must be 1 or 2, got {questions_per_video}")
    root, folder = Path(root).absolute(), BUILDERS[builder][0]
    ann_dir = root / folder / "annotations"
    ans2label = _write_json(ann_dir / "qa_ans2label.json", {a: i for i, a in enumerate(ANSWER_LIST)})
    annotations, question_id = {}, 0
    for split, rng, written in _write_videos(builder, root, (n_train, n_val, n_test), kinds, num_frames,
                                             image_size, seed):
        entries = []
        for name, clip in written:
            for template, field in rng.sample(QUESTIONS[clip.kind], questions_per_video):
                entries.append({"video": name, "question": _english(template.format(**clip._asdict())),
                                "answer": getattr(clip, field), "question_id": question_id})
                question_id += 1
        annotations[split] = [_write_json(ann_dir / f"qa_{split}.json", entries)]
    return {"builder": builder, "videos": str(root / folder / "videos"), "annotations": annotations,
            "ans2label": ans2label, "num_frames": num_frames}


def lavis_video_datasets_config(written: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's ``datasets:`` entry that points LAVIS's video builder at the written files.

    Paths are absolute and ``url`` repeats ``storage`` (LAVIS copies a local ``url`` instead of
    downloading the yaml's default). ``ans2label`` is a single path: LAVIS's ``VideoQABuilder`` reads it
    as one file.

    Parameters
    ----------
    written : mapping
        What ``write_video_retrieval_dataset`` or ``write_video_qa_dataset`` returned.

    Returns
    -------
    dict
        ``{builder: {"data_type": "videos", "build_info": {"annotations": ..., "videos": ...}}}``.
    """
    anns: dict[str, Any] = {split: {"url": list(paths), "storage": list(paths)}
                            for split, paths in written["annotations"].items()}
    if "ans2label" in written:
        anns["ans2label"] = {"url": written["ans2label"], "storage": written["ans2label"]}
    build_info = {"annotations": anns, "videos": {"storage": written["videos"]}}
    return {written["builder"]: {"data_type": "videos", "build_info": build_info}}
