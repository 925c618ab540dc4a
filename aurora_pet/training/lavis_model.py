"""The recipe's model: built offline by ``build_blip``, loaded from ``model.pretrained`` (or
``model.finetuned``) with a key report, and wrapped by ``wrap_blip`` as the ``aurora:`` section says.

This replaces LAVIS's ``task.build_model`` (``from_config``), which downloads the BERT tokenizer and a
checkpoint and loads the latter with ``strict=False`` without saying what failed to load.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .recipe import MODEL_KEYS, Recipe, RecipeError

log = logging.getLogger(__name__)


def checkpoint_path(model_cfg) -> str | None:
    """The checkpoint LAVIS's ``load_checkpoint_from_config`` would load: ``finetuned`` when
    ``load_finetuned`` (LAVIS's default), else ``pretrained`` unless ``load_pretrained`` is false."""
    if model_cfg.get("load_finetuned", True):
        path = model_cfg.get("finetuned")
        if not path:
            raise RecipeError("model.load_finetuned is true but model.finetuned is not set")
        return str(path)
    if not model_cfg.get("load_pretrained", True):
        return None
    path = model_cfg.get("pretrained")
    return str(path) if path else None


def build_model(recipe: Recipe) -> tuple[nn.Module, Any, Any]:
    """(the model to hand to the runner, the LAVIS model inside it, the checkpoint ``LoadReport`` or None).

    With an ``aurora:`` section the first is the ``AuroraModel`` (base frozen, adapter trainable);
    without one it is the LAVIS model itself, trained in full (every parameter LAVIS leaves trainable).
    """
    from ..families.lavis.build import build_blip, load_checkpoint
    from ..families.lavis.video import VIDEO_ARCHITECTURES, build_blip_video
    from ..families.lavis.wrap import wrap_blip

    model_cfg = recipe.cfg.model_cfg
    settings = recipe.model_settings
    overrides = {k: v for k, v in settings.items() if k not in MODEL_KEYS}
    path = checkpoint_path(model_cfg)
    try:  # before the checkpoint downloads: a missing vocabulary stops the run first
        build = build_blip_video if model_cfg.arch in VIDEO_ARCHITECTURES else build_blip
        model = build(str(model_cfg.arch), str(model_cfg.model_type), size=settings.get("size", "base"),
                           vocab_file=settings.get("vocab_file"), allow_download=settings.get("allow_download", False),
                           pretrained_weights=path is not None, **overrides)
    except (ValueError, FileNotFoundError) as error:
        raise RecipeError(f"model: {error}") from None
    report = None
    if path is None:
        log.warning("model: no checkpoint (model.pretrained is null): the base model keeps random weights")
    else:
        from lavis.common.utils import is_url

        if is_url(path):  # as LAVIS: download once into its cache (never in tests, which pass local files)
            from lavis.common.dist_utils import download_cached_file

            path = download_cached_file(path, check_hash=False, progress=True)
        report = load_checkpoint(model, path, strict=False)
        log.info("model: loaded %s: %s", path, report.summary())
        print(f"checkpoint {path}: {report.summary()}")
        if hasattr(model, "reset_queue_ptr"):
            model.reset_queue_ptr()  # as LAVIS's from_config: fine-tuning starts a fresh queue
    if recipe.aurora is None:
        return model, model, report
    return wrap_blip(model, recipe.aurora), model, report
