"""Checks of a recipe's data before anything trains, and recipes generated for local/generated data.

LAVIS reads annotation files with a bare ``json.load`` (an error names neither file nor entry) and
finds a missing image or a malformed entry only when a batch first reaches it, possibly hours into a
run. ``check_datasets`` reads every annotation file up front and names the file, the line and the
missing key or image instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


class DataError(AuroraError, ValueError):
    """A dataset file that is missing or malformed, or an image that an annotation lists but is absent."""


def check_datasets(datasets: Mapping[str, Any], cache_root: str | Path) -> None:
    """Every annotation file parses, every entry has the keys its dataset reads, every image exists.

    ``datasets`` is the merged ``datasets`` section; relative paths resolve against ``cache_root``.
    """
    from ..data.synthetic import validate_datasets_config

    for name, cfg in datasets.items():
        schemas = ENTRY_SCHEMAS.get(name)
        if schemas is None:
            continue  # other builders: only the image check below
        for split, ann in cfg["build_info"]["annotations"].items():
            storage = [ann["storage"]] if isinstance(ann["storage"], str) else list(ann["storage"])
            files = [Path(cache_root, p) for p in storage]
            schema = schemas[0] if split == "train" else schemas[1]
            # VQA eval splits list [questions, answer list, official questions, official answers]:
            # only the first holds entries (LAVIS's COCOVQAEvalDataset reads them by position).
            for path in files if split == "train" or name != "coco_vqa" else files[:1]:
                check_annotation_file(path, schema)
    try:
        validate_datasets_config(datasets, cache_root)
    except (ValueError, FileNotFoundError) as error:
        raise DataError(str(error)) from None


def check_annotation_file(path: Path, schema: Mapping[str, Any]) -> None:
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
