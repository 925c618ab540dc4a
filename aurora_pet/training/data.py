"""The one reader of the recipes' annotation formats, its checks before anything trains, and recipes
generated for local/generated data.

LAVIS reads annotation files with a bare ``json.load`` (an error names neither file nor entry) and
finds a missing or damaged image or a malformed entry only when a batch first reaches it, possibly hours
into a run (or, in the evaluation, after the epoch's training). ``read_datasets`` reads every annotation
file and opens every image up front and names the file, the line and the missing key or image instead;
``check_split_sizes`` compares the splits with the batch size and ``k_test``. Both families read their
data through it: LAVIS's recipes check it (``check_datasets``, then LAVIS's own datasets load it), the
transformers family's datasets (``hf_data``) index the entries it returns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from PIL import Image, ImageFile
from tqdm.auto import tqdm

from ..errors import AuroraError

# (required keys, type of "caption"/"answer") per builder and split kind, as LAVIS's datasets read them
_RETRIEVAL_TRAIN = {"image": str, "caption": str, "image_id": (str, int)}
_RETRIEVAL_EVAL = {"image": str, "caption": list}
_VQA_TRAIN = {"image": str, "question": str, "answer": (list, str)}
_VQA_EVAL = {"image": str, "question": str, "question_id": int}
ENTRY_SCHEMAS = {
    "flickr30k": (_RETRIEVAL_TRAIN, _RETRIEVAL_EVAL),
    "coco_retrieval": (_RETRIEVAL_TRAIN, _RETRIEVAL_EVAL),
    "coco_vqa": (_VQA_TRAIN, _VQA_EVAL),
}
BUILDER_ARCH = {"flickr30k": "blip_retrieval", "coco_retrieval": "blip_retrieval", "coco_vqa": "blip_vqa"}
ARCH_MODEL_TYPE = {"flickr30k": "flickr", "coco_retrieval": "coco", "coco_vqa": "vqav2"}
PROGRESS_FROM = 1000  # images: fewer are checked too fast for a progress bar to help
IMAGE_CHECK_THREADS = min(32, 4 * (os.cpu_count() or 1))  # the check waits on the disk more than on the CPU
JPEG_END = b"\xff\xd9"  # a JPEG's end-of-image marker


class DataError(AuroraError, ValueError):
    """A dataset file that is missing or malformed, or an image that an annotation lists but is absent."""


@dataclass(frozen=True)
class SplitSize:
    """One split of one dataset as LAVIS's dataset class indexes it."""

    file: Path  # its annotation file (for VQA's lists, the one with the entries)
    entries: int  # dataset items: captions (retrieval train), images (retrieval eval), questions (VQA)
    images: int  # distinct images; by image_id where entries have one (retrieval draws hard negatives by it)
    texts: int  # captions (retrieval eval: every caption of every image)


@dataclass(frozen=True)
class SplitData:
    """One split of one dataset, read and checked: what the datasets of both families index.

    ``files`` are the split's annotation files in the recipe's order. A VQA evaluation split lists them as
    LAVIS's ``COCOVQAEvalDataset`` reads them, by position: the entries, the answer list, and (where the split
    is scored) the official question and annotation files; ``entries`` are the first file's."""

    builder: str
    split: str
    files: tuple[Path, ...]
    entries: list[dict[str, Any]]
    images: Path  # the root that each entry's "image" is relative to

    @property
    def size(self) -> SplitSize:
        captions = [entry["caption"] for entry in self.entries if "caption" in entry]
        return SplitSize(file=self.files[0], entries=len(self.entries),
                         images=len({entry.get("image_id", entry["image"]) for entry in self.entries}),
                         texts=sum(len(c) if isinstance(c, list) else 1 for c in captions))

    @property
    def answer_list(self) -> Path | None:
        """VQA evaluation: the file of candidate answers that ranking chooses from."""
        return self.files[1] if self.builder == "coco_vqa" and self.split != "train" and len(self.files) > 1 else None

    @property
    def official_files(self) -> tuple[Path, Path] | None:
        """VQA evaluation: the official (questions, annotations) files that score the split, if it has them."""
        scored = self.builder == "coco_vqa" and self.split != "train" and len(self.files) > 3
        return (self.files[2], self.files[3]) if scored else None


def read_datasets(datasets: Mapping[str, Any], cache_root: str | Path, *,
                  progress: bool = False) -> dict[str, dict[str, SplitData]]:
    """Every split of every dataset: each annotation file parses, every entry has the keys its dataset reads,
    every image exists and opens (``check_images``). The one reader of the Flickr30k, COCO Karpathy and VQAv2
    annotation formats: LAVIS's recipes check their data with it (``check_datasets``), the transformers
    family's datasets index what it returns.

    ``datasets`` is the merged ``datasets`` section; relative paths resolve against ``cache_root``.
    Builders other than those of ``ENTRY_SCHEMAS`` get only ``validate_datasets_config``.
    """
    from ..data.synthetic import validate_datasets_config
    from ..video.checks import VIDEO_BUILDERS

    datasets = {name: cfg for name, cfg in datasets.items() if name not in VIDEO_BUILDERS}  # check_datasets checks them
    read: dict[str, dict[str, SplitData]] = {}
    images: set[Path] = set()
    for name, cfg in datasets.items():
        schemas = ENTRY_SCHEMAS.get(name)
        if schemas is None:
            continue
        root = Path(cache_root, cfg["build_info"]["images"]["storage"])
        for split, ann in cfg["build_info"]["annotations"].items():
            storage = [ann["storage"]] if isinstance(ann["storage"], str) else list(ann["storage"])
            files = tuple(Path(cache_root, p) for p in storage)
            schema = schemas[0] if split == "train" else schemas[1]
            # VQA eval splits: only the first file holds entries (see SplitData)
            with_entries = files if split == "train" or name != "coco_vqa" else files[:1]
            entries = [entry for path in with_entries for entry in check_annotation_file(path, schema)]
            read.setdefault(name, {})[split] = SplitData(name, split, files, entries, root)
            images.update(root / entry["image"] for entry in entries)
    try:
        validate_datasets_config(datasets, cache_root)
    except (ValueError, FileNotFoundError) as error:
        raise DataError(str(error)) from None
    check_images(sorted(images), progress=progress)
    return read


def check_datasets(datasets: Mapping[str, Any], cache_root: str | Path, *,
                   progress: bool = False) -> dict[str, dict[str, SplitSize]]:
    """``read_datasets``, reduced to each split's size (for ``check_split_sizes``); video datasets by
    ``aurora_pet.video.checks.check_video_datasets``."""
    from ..video.checks import check_video_datasets

    sizes = {name: {split: data.size for split, data in splits.items()}
             for name, splits in read_datasets(datasets, cache_root, progress=progress).items()}
    return {**sizes, **check_video_datasets(datasets, cache_root, progress=progress)}


def check_split_sizes(sizes: Mapping[str, Mapping[str, SplitSize]], run_cfg: Mapping[str, Any],
                      world_size: int) -> None:
    """Splits too small for the run's settings, which LAVIS finds only mid-run: a training split smaller than
    one global batch (its loader drops the incomplete batch: an epoch of no step, then a division by zero),
    retrieval training on one image (no image to draw a hard negative from), and ``k_test`` larger than an
    evaluation split (the ITM re-ranking takes the top ``k_test`` images and captions)."""
    retrieval = run_cfg.get("task") == "retrieval"
    problems = [] if run_cfg.get("evaluate", False) else _training_problems(sizes, run_cfg, world_size, retrieval)
    if retrieval and run_cfg.get("k_test"):
        problems += _k_test_problems(sizes, run_cfg)
    if problems:
        raise DataError("; ".join(problems))


def _splits(sizes: Mapping[str, Mapping[str, SplitSize]], names: Sequence[str]) -> list[tuple[str, SplitSize]]:
    """The named splits of every dataset."""
    return [(name, size) for splits in sizes.values() for name, size in splits.items() if name in names]


def _training_problems(sizes: Mapping[str, Mapping[str, SplitSize]], run_cfg: Mapping[str, Any], world_size: int,
                       retrieval: bool) -> list[str]:
    train = [size for _, size in _splits(sizes, run_cfg.get("train_splits", []))]
    entries, batch = sum(s.entries for s in train), run_cfg["batch_size_train"]
    problems = []
    if train and entries < batch * world_size:
        problems.append(f"the training split has {entries} entries ({', '.join(str(s.file) for s in train)}), "
                        f"fewer than one batch of run.batch_size_train={batch} x {world_size} process(es): the "
                        "training loader drops an incomplete batch (as LAVIS's does), so an epoch would have no "
                        "step; use more data or a smaller run.batch_size_train")
    if retrieval:
        problems += [f"{s.file}: the training split shows {s.images} image(s); BLIP's retrieval loss draws each "
                     "caption's hard negative from another image, so it needs at least two"
                     for s in train if s.images < 2]
    return problems


def _k_test_problems(sizes: Mapping[str, Mapping[str, SplitSize]], run_cfg: Mapping[str, Any]) -> list[str]:
    k_test = run_cfg["k_test"]
    evaluated = [*run_cfg.get("valid_splits", []), *run_cfg.get("test_splits", [])]
    return [f"run.k_test={k_test} is larger than the {s.entries} image(s) or {s.texts} caption(s) of the {name} "
            f"split ({s.file}): the ITM re-ranking takes the top k_test of both; set run.k_test to at most "
            f"{min(s.entries, s.texts)}" for name, s in _splits(sizes, evaluated) if k_test > min(s.entries, s.texts)]


def check_images(paths: Sequence[Path], *, progress: bool = False) -> None:
    """Every image opens and none is cut short; one error names every bad file. Run on threads, with a
    progress bar for large datasets when ``progress``. LAVIS lets PIL read a truncated image's missing part
    as grey (``LOAD_TRUNCATED_IMAGES``); the check does not."""
    with mock.patch.object(ImageFile, "LOAD_TRUNCATED_IMAGES", False), \
            ThreadPoolExecutor(max_workers=IMAGE_CHECK_THREADS) as pool:
        results = tqdm(pool.map(_image_problem, paths), total=len(paths), desc="checking images", leave=False,
                       disable=not progress or len(paths) < PROGRESS_FROM, dynamic_ncols=True)
        problems = [problem for problem in results if problem]
    if problems:
        raise DataError(f"{len(problems)} of {len(paths)} images cannot be read:\n  " + "\n  ".join(problems))


def _image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image, or None. Fast: the header and PIL's ``verify`` (which reads a
    PNG's chunks and checksums); a JPEG is decoded (at 1/8 scale) only when it does not end with its
    end-of-image marker, as a truncated one does not (data after the marker is allowed)."""
    try:
        if path.stat().st_size == 0:
            return f"{path}: empty file"
        with Image.open(path) as image:
            jpeg = image.format == "JPEG"
            image.verify()
        if jpeg and not _ends_with(path, JPEG_END):
            with Image.open(path) as image:
                image.draft("RGB", (1, 1))
                image.load()
    except Exception as error:  # noqa: BLE001  PIL raises many types for a damaged file
        return f"{path}: {error}"
    return None


def _ends_with(path: Path, marker: bytes) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-len(marker), os.SEEK_END)
        return handle.read() == marker


def check_annotation_file(path: Path, schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The file's entries, each checked against ``schema``."""
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    text = path.read_text()
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}:{error.colno}: malformed annotation file ({error.msg})") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of annotation entries, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        problem = _entry_problem(entry, schema)
        if problem:
            line = _entry_line(text, index)
            raise DataError(f"{path}:{line}: malformed annotation (entry {index}): {problem}: "
                            f"{json.dumps(entry)[:200]}")
    return entries


def _entry_problem(entry: Any, schema: Mapping[str, Any]) -> str | None:
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    missing = [k for k in schema if k not in entry]
    if missing:
        return f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
    for key, kind in schema.items():
        if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            return f"{key!r} should be {names}, got {type(entry[key]).__name__}"
    return None


def _entry_line(text: str, index: int) -> int:
    """The line on which the ``index``-th element of a JSON list starts."""
    decoder, position = json.JSONDecoder(), text.index("[") + 1
    for _ in range(index + 1):
        while text[position] in " \t\r\n,":
            position += 1
        start = position
        _, position = decoder.raw_decode(text, position)
    return text.count("\n", 0, start) + 1


# -- recipes for local or generated data -----------------------------------------------------------

def dataset_section(written: Mapping[str, Any], *, image_size: int, augment: bool = False) -> dict[str, Any]:
    """The recipe's ``datasets:`` entry for files written by ``aurora_pet.data.synthetic`` (or any dict
    of the same shape: ``builder``, ``images``, ``annotations`` per split), with BLIP's processors.

    ``augment=False`` uses the eval image transform for training too: BLIP's training transform flips
    images horizontally, which contradicts captions that say "left" and "right"."""
    from ..data.synthetic import lavis_datasets_config

    section = lavis_datasets_config(written)
    builder = written["builder"]
    text = "blip_question" if builder == "coco_vqa" else "blip_caption"
    train_vis = "blip_image_train" if augment else "blip_image_eval"
    section[builder].update({
        "vis_processor": {"train": {"name": train_vis, "image_size": image_size},
                          "eval": {"name": "blip_image_eval", "image_size": image_size}},
        "text_processor": {"train": {"name": text}, "eval": {"name": text}},
    })
    return section


def dataset_options(written: Mapping[str, Any], *, image_size: int, augment: bool = False) -> list[str]:
    """``--options`` that point a recipe's dataset at ``written`` (see ``dataset_section``)."""
    out = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            out.append(f"{prefix}=[{','.join(json.dumps(str(v)) for v in value)}]")
        else:
            out.append(f"{prefix}={json.dumps(value) if isinstance(value, str) else value}")

    section = dataset_section(written, image_size=image_size, augment=augment)
    for builder, cfg in section.items():
        walk(f"datasets.{builder}", cfg)
    return out


def generated_recipe(written: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, output_dir: str | Path,
                     model: Mapping[str, Any] | None = None, run: Mapping[str, Any] | None = None,
                     aurora: Mapping[str, Any] | None = None, image_size: int = 32) -> dict[str, Any]:
    """A complete recipe (as a dict) for a tiny BLIP on generated data, CPU, one process.

    ``model``/``run`` entries override the defaults below; ``aurora=None`` means full fine-tuning.
    Write it with ``write_recipe`` and run it with ``aurora_pet.training.train``.
    """
    items = [written] if isinstance(written, Mapping) else list(written)
    builder = items[0]["builder"]
    arch = BUILDER_ARCH[builder]
    datasets: dict[str, Any] = {}
    for item in items:
        datasets.update(dataset_section(item, image_size=image_size))
    recipe_model = {"arch": arch, "model_type": ARCH_MODEL_TYPE[builder], "load_finetuned": False,
                    "pretrained": None, "size": "tiny", "image_size": image_size}
    recipe_run = {
        "task": "retrieval" if arch == "blip_retrieval" else "vqa",
        "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.05,
        "max_epoch": 1, "batch_size_train": 8, "batch_size_eval": 16, "num_workers": 0,
        "train_splits": ["train"], "valid_splits": ["val"], "test_splits": ["test"],
        "device": "cpu", "world_size": 1, "dist_url": "env://", "distributed": False,
        "seed": 42, "output_dir": str(Path(output_dir).absolute()), "amp": False, "evaluate": False,
        "log_freq": 50,
    }
    if arch == "blip_retrieval":
        recipe_run.update({"k_test": 8, "use_dist_eval_sampler": False})
    else:
        recipe_run.update({"inference_method": "rank", "num_ans_candidates": 16, "max_len": 5, "min_len": 1,
                           "num_beams": 1})
    recipe = {"model": {**recipe_model, **(model or {})}, "datasets": datasets,
              "run": {**recipe_run, **(run or {})}}
    if aurora is not None:
        recipe["aurora"] = dict(aurora)
    return recipe


def write_recipe(path: str | Path, recipe: Mapping[str, Any]) -> Path:
    from omegaconf import OmegaConf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(dict(recipe)), path)
    return path
