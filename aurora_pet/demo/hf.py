"""The demo's settings and recipes for the transformers family (``aurora-pet demo --family hf``).

The same story as the LAVIS demo (``recipe``): the same generated source and shifted domains, a tiny BLIP
pre-trained in full on the source domain and adapted with Aurora to the shifted one, through exactly the
code path of the hf recipes (``aurora_pet.training.hf_train.train`` on a ``family: hf`` recipe written to
disk). The model is transformers' ``BlipForImageTextRetrieval`` built from a config (``families.hf.build``),
so nothing is downloaded.

Nothing here imports transformers: the LAVIS environment may import this module (e.g. for its settings)
and learn that the family needs the other environment only when a model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..training.data import dataset_section
from .recipe import ADAPT_DATA, DEMO_AURORA, IMAGE_SIZE

HF_ARCH = "hf_blip_retrieval"
# `build_blip("retrieval", **HF_TINY_MODEL)`: the family's tiny widths (64), at the demo's image size. The
# vision tower is drawn with std 0.2 instead of 0.02: at 0.02 a from-scratch 64-wide ViT's class token is
# almost independent of the image and contrastive training collapses (the LAVIS demo's ``init_std``).
HF_TINY_MODEL: dict[str, Any] = {"size": "tiny", "vision_image_size": IMAGE_SIZE, "vision_initializer_range": 0.2}
# The recipes' `model:` section besides `pretrained`: BLIP's [ENC] as the ITM token, as LAVIS trains.
HF_RECIPE_MODEL: dict[str, Any] = {"enc_token": "[ENC]", "temperature": 0.07, "max_txt_len": 35}
# Source-domain pre-training (full fine-tuning from the random initialisation above).
HF_PRETRAIN: dict[str, Any] = {
    "data": {"n_train": 256, "n_val": 32, "n_test": 32, "seed": 0},
    "run": {"init_lr": 5e-4, "max_epoch": 30, "batch_size_train": 32, "batch_size_eval": 64, "k_test": 8,
            "valid_splits": [], "test_splits": ["test"], "seed": 42},
    "recipe_model": HF_RECIPE_MODEL,
    "init_seed": 0,
    "version": 1,
}
# Shifted-domain adaptation with Aurora: the LAVIS demo's data and adapter, this family's learning rate (1e-2:
# R@1 1.7 -> 10.6 on the shifted test split, against 5.6 at 4e-3 and 11.1 at 2e-2; about 3 minutes on a core).
HF_ADAPT_DATA: dict[str, Any] = dict(ADAPT_DATA)
HF_ADAPT_RUN: dict[str, Any] = {"init_lr": 1e-2, "max_epoch": 12, "batch_size_train": 16, "batch_size_eval": 64,
                                "k_test": 32, "valid_splits": ["val"], "test_splits": ["test"], "seed": 42}
HF_DEMO_AURORA: dict[str, Any] = dict(DEMO_AURORA)  # preset "cross-attention" = hf_blip_retrieval/cross-attention
# What every hf demo run sets: one CPU process, no progress bars, no dataloader workers.
_RUN_FIXED: dict[str, Any] = {"task": "retrieval", "device": "cpu", "num_workers": 0, "progress": False,
                              "lr_sched": "linear_warmup_cosine_lr", "min_lr": 0.0, "weight_decay": 0.05}


def hf_demo_recipe(written: Mapping[str, Any], output_dir: str | Path, *, pretrained_dir: str | Path,
                   aurora: Mapping[str, Any] | None = HF_DEMO_AURORA, run: Mapping[str, Any] | None = None,
                   model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``family: hf`` retrieval recipe (dict) over generated data, for ``hf_train.train``.

    Parameters
    ----------
    written : Mapping
        What ``write_demo_data`` returned (Flickr30k-format files of one domain).
    output_dir : str or Path
        The run's ``run.output_dir``.
    pretrained_dir : str or Path
        ``model.pretrained``: a ``save_pretrained`` directory (model and processor).
    aurora : Mapping or None
        The ``aurora:`` section; None leaves it out (full fine-tuning).
    run, model : Mapping or None
        Entries that override ``HF_ADAPT_RUN`` (and the fixed CPU settings) and ``HF_RECIPE_MODEL``.

    Returns
    -------
    dict
        The recipe; write it with ``aurora_pet.training.data.write_recipe``.
    """
    recipe: dict[str, Any] = {
        "family": "hf",
        "model": {**HF_RECIPE_MODEL, **(model or {}), "pretrained": str(Path(pretrained_dir).absolute())},
        "datasets": dataset_section(written, image_size=IMAGE_SIZE),
        "run": {**_RUN_FIXED, **HF_ADAPT_RUN, **(run or {}), "output_dir": str(Path(output_dir).absolute())},
    }
    if aurora is not None:
        recipe["aurora"] = dict(aurora)
    return recipe
