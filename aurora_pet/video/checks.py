"""The video datasets of a recipe, read and checked before anything trains.

What LAVIS would find only when a batch reaches it — a malformed annotation file or entry, a missing,
unreadable or too short video, a broken answer list — stops the run here with the file (and line) named,
every bad video in one error. The annotation formats are those LAVIS distributes (MSRVTT and DiDeMo
retrieval, MSRVTT-QA and MSVD-QA), which ``aurora_pet.data.synthetic_video`` writes too; the builders that read
them are registered by ``aurora_pet.video.lavis_data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..training.data import DataError, SplitSize, check_annotation_file
from .frames import check_videos
from .qa import read_answer_list

# builder -> the format of its annotation files
VIDEO_BUILDERS = {"msrvtt_retrieval_aurora": "retrieval", "didemo_retrieval_aurora": "retrieval",
                  "msrvtt_qa_aurora": "qa", "msvd_qa_aurora": "qa"}
# format -> (schema of training entries, schema of evaluation entries), as the datasets read them
ENTRY_SCHEMAS = {
    "retrieval": ({"video": str, "caption": str}, {"video": str, "caption": list}),
    "qa": ({"video": str, "question": str, "answer": str, "question_id": int},) * 2,
}
ANSWER_LIST_KEY = "ans2label"  # the annotation entry of a QA dataset that is its answer list, not a split


def check_video_datasets(datasets: Mapping[str, Any], cache_root: str | Path, *, all_frames: bool = False,
                         progress: bool = False) -> dict[str, dict[str, SplitSize]]:
    """Read every annotation file of the video datasets in ``datasets``, check every entry and the answer
    list, then check every video (``check_videos``) for the frames the dataset's processors read.

    Parameters
    ----------
    datasets : mapping
        A recipe's merged ``datasets`` section; builders not in ``VIDEO_BUILDERS`` are left alone. Relative
        paths resolve against ``cache_root``, as LAVIS resolves them.
    cache_root : str or Path
        LAVIS's ``cache_root``.
    all_frames : bool
        Decode every frame of every video, not only the first and the last.
    progress : bool
        Show a progress bar for many videos.

    Returns
    -------
    dict
        ``{builder: {split: SplitSize}}`` for ``aurora_pet.training.data.check_split_sizes``: entries are
        captions (retrieval training), videos (retrieval evaluation) or questions (QA); ``images`` counts
        the distinct videos.

    Raises
    ------
    DataError
        Naming the file, line and key of a malformed entry; ``VideoError`` (a ``DataError``) listing every
        video that is missing, unreadable or shorter than the frames requested.
    """
    sizes: dict[str, dict[str, SplitSize]] = {}
    videos: dict[int, set[Path]] = {}  # frames read -> the videos read with that many
    for name, cfg in datasets.items():
        kind = VIDEO_BUILDERS.get(name)
        if kind is None:
            continue
        num_frames = frames_read(name, cfg)
        info = cfg["build_info"]
        root = Path(cache_root, info["videos"]["storage"])
        listed: set[Path] = set()
        for split, ann in info["annotations"].items():
            files = [Path(cache_root, p) for p in _storage(ann)]
            if split == ANSWER_LIST_KEY:
                read_answer_list(files[0])
                continue
            schema = ENTRY_SCHEMAS[kind][0 if split == "train" else 1]
            entries = [entry for path in files for entry in check_annotation_file(path, schema)]
            sizes.setdefault(name, {})[split] = _size(files[0], entries, kind)
            listed.update(root / entry["video"] for entry in entries)
        if kind == "qa" and ANSWER_LIST_KEY not in info["annotations"]:
            raise DataError(f"datasets.{name}.build_info.annotations has no {ANSWER_LIST_KEY!r} (the answer "
                            "list, qa_ans2label.json): BLIP ranks its answers over it")
        videos.setdefault(num_frames, set()).update(listed)
    for num_frames, paths in sorted(videos.items()):
        check_videos(sorted(paths), num_frames, all_frames=all_frames, progress=progress)
    return sizes


def check_num_frames(num_frames: int, datasets: Mapping[str, Any]) -> None:
    """Every video processor reads the model's number of frames (the rows of its frame embedding), which the
    model would otherwise reject at its first batch.

    Parameters
    ----------
    num_frames : int
        The model's ``num_frames`` (``model.num_frames`` of a recipe).
    datasets : mapping
        A recipe's merged ``datasets`` section; builders not in ``VIDEO_BUILDERS`` are left alone.

    Raises
    ------
    DataError
        Naming each processor key whose ``num_frames`` differs.
    """
    problems = [f"datasets.{name}.vis_processor.{split}.num_frames={proc.get('num_frames')}"
                for name, cfg in datasets.items() if name in VIDEO_BUILDERS
                for split, proc in (cfg.get("vis_processor") or {}).items()
                if proc is not None and proc.get("num_frames") != num_frames]
    if problems:
        raise DataError(f"model.num_frames={num_frames}, but {', '.join(problems)}: the model reads exactly "
                        "num_frames frames per video; set both to the same value")


def frames_read(name: str, cfg: Mapping[str, Any]) -> int:
    """The most frames a dataset's processors read from one video (``vis_processor.{train,eval}.num_frames``).

    Parameters
    ----------
    name : str
        The builder, for the error.
    cfg : mapping
        The dataset's merged section.

    Returns
    -------
    int
        The largest ``num_frames`` of its processors.
    """
    processors = cfg.get("vis_processor") or {}
    counts = [proc.get("num_frames") for proc in processors.values() if proc is not None]
    if not counts or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
        raise DataError(f"datasets.{name}.vis_processor: every processor needs num_frames (a positive integer), "
                        f"got {counts or 'none'}")
    return max(counts)


def _storage(ann: Mapping[str, Any]) -> list[str]:
    storage = ann["storage"]
    return [storage] if isinstance(storage, str) else list(storage)


def _size(file: Path, entries: list[dict[str, Any]], kind: str) -> SplitSize:
    """texts: captions (retrieval; an evaluation entry lists its video's captions) or questions (QA)."""
    texts = sum(len(e["caption"]) if isinstance(e["caption"], list) else 1 for e in entries) \
        if kind == "retrieval" else len(entries)
    return SplitSize(file=file, entries=len(entries), images=len({entry["video"] for entry in entries}), texts=texts)
