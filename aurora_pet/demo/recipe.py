"""The demo's settings, its generated data and the recipe that trains on them.

A recipe here is the dict ``aurora_pet.training.write_recipe`` writes and ``aurora_pet.training.train``
runs: the demo goes through exactly the code path of the real recipes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import write_retrieval_dataset, write_vqa_dataset
from ..training.data import BUILDER_ARCH, generated_recipe

if TYPE_CHECKING:
    from .pretrained import PretrainedTiny

ARCH = "blip_retrieval"
VQA_ARCH = "blip_vqa"
IMAGE_SIZE = 32
# The tiny model's settings on top of build_blip(size="tiny"): what the recipe's model section says.
TINY_MODEL: dict[str, Any] = {"size": "tiny", "image_size": IMAGE_SIZE, "queue_size": 64, "vit_grad_ckpt": False}
# BlipVQA has no momentum encoders and no queue: the same tiny model without ``queue_size``.
VQA_TINY_MODEL: dict[str, Any] = {k: v for k, v in TINY_MODEL.items() if k != "queue_size"}
TINY_MODELS: dict[str, dict[str, Any]] = {ARCH: TINY_MODEL, VQA_ARCH: VQA_TINY_MODEL}
# Shifted-domain adaptation with Aurora (tuned for a clear gain in about a minute and a half on 2 cores).
ADAPT_DATA: dict[str, Any] = {"n_train": 256, "n_val": 32, "n_test": 64, "seed": 1}
ADAPT_RUN: dict[str, Any] = {"init_lr": 4e-3, "max_epoch": 12, "batch_size_train": 16, "batch_size_eval": 64,
                             "k_test": 32, "valid_splits": ["val"], "test_splits": ["test"], "seed": 42,
                             "log_freq": 1000}
# The tiny model is 64 wide: rank 64 = d (the method's R=64 on BLIP-base is R = d/12).
DEMO_AURORA: dict[str, Any] = {"preset": "cross-attention", "rank": 64, "core": "cp", "ice": True, "gqt": True,
                               "modules_to_save": ["itm_head", "vision_proj", "text_proj"], "scale": 1.0,
                               "dropout": 0.0}


def write_demo_data(root: str | Path, domain: str = "shifted", *, n_train: int = 128, n_val: int = 32,
                    n_test: int = 32, seed: int = 0, image_size: int = IMAGE_SIZE, arch: str = ARCH,
                    questions_per_image: int = 3) -> dict[str, Any]:
    """Generated data of one domain under ``root/<domain>`` for ``arch``: Flickr30k-format retrieval data
    (``write_retrieval_dataset``) for ``blip_retrieval``, VQAv2-format questions (``write_vqa_dataset``,
    ``questions_per_image`` per image, val and test both scored) for ``blip_vqa``."""
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size, "seed": seed}
    if arch == VQA_ARCH:
        return write_vqa_dataset(Path(root) / domain, domain=domain, questions_per_image=questions_per_image, **sizes)
    if arch != ARCH:
        raise ValueError(f"the demo's data is for {ARCH!r} or {VQA_ARCH!r}, got {arch!r}")
    return write_retrieval_dataset(Path(root) / domain, style="flickr30k", domain=domain, **sizes)


def demo_recipe(written: Mapping[str, Any], output_dir: str | Path, *, pretrained: PretrainedTiny | None,
                aurora: Mapping[str, Any] | None = DEMO_AURORA, run: Mapping[str, Any] | None = None,
                model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe (dict) the demo trains: the tiny BLIP of ``written``'s task (retrieval or VQA) on it, CPU,
    one process, loading ``pretrained`` (None: random weights). Write it with
    ``aurora_pet.training.write_recipe``."""
    settings = {**TINY_MODELS[BUILDER_ARCH[written["builder"]]], **(pretrained.model if pretrained else {}),
                **(model or {})}
    settings["pretrained"] = str(pretrained.checkpoint) if pretrained else settings.get("pretrained")
    return generated_recipe(written, output_dir=output_dir, image_size=int(settings["image_size"]),
                            model=settings, run={**ADAPT_RUN, **(run or {})},
                            aurora=dict(aurora) if aurora is not None else None)
