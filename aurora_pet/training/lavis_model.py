"""The recipe's model: built offline by ``build_blip``, loaded from ``model.pretrained`` (or
``model.finetuned``) with a key report, and wrapped by ``wrap_blip`` as the ``aurora:`` section says.

This replaces LAVIS's ``task.build_model`` (``from_config``), which downloads the BERT tokenizer and a
checkpoint and loads the latter with ``strict=False`` without saying what failed to load.

With a ``distill:`` section, a retrieval student is made a ``DistillBlipRetrieval`` (LAVIS's loss, plus the
responses distillation needs) and ``build_teacher`` builds and strictly loads the frozen teacher.
"""

from __future__ import annotations

import logging
from pathlib import Path
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
    if recipe.distill is not None and str(model_cfg.arch) == "blip_retrieval":
        from ..families.lavis.distill import DistillBlipRetrieval

        model = DistillBlipRetrieval.from_model(model)
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


# Keys only one architecture's checkpoints hold: a teacher checkpoint of another architecture is named by them.
_ARCH_KEYS = {"blip_retrieval": "itm_head.weight", "blip_vqa": "text_decoder.cls.predictions.bias"}


def build_teacher(recipe: Recipe) -> nn.Module:
    """The recipe's teacher (``distill.teacher``): the student's architecture and model type with the recipe's
    build settings, ``distill.teacher_model`` overriding them (a larger teacher), loaded strictly from the
    checkpoint, frozen and in eval mode.

    Parameters
    ----------
    recipe : Recipe
        A recipe with a ``distill:`` section.

    Returns
    -------
    nn.Module
        A plain LAVIS ``BlipRetrieval`` or ``BlipVQA``.

    Raises
    ------
    RecipeError
        Naming ``distill.teacher`` and the file: a checkpoint of another architecture, keys or shapes that do not
        match the teacher's settings, a tokenizer of another size than the student's.
    """
    from ..families.lavis.build import CheckpointError, _read_state_dict, build_blip, load_checkpoint

    assert recipe.distill is not None and recipe.distill.teacher is not None
    model_cfg = recipe.cfg.model_cfg
    arch, path = str(model_cfg.arch), recipe.distill.teacher
    settings = {**recipe.model_settings, **recipe.teacher_model}
    overrides = {k: v for k, v in settings.items() if k not in MODEL_KEYS}
    where = f"distill.teacher={path}"
    try:
        teacher = build_blip(arch, str(model_cfg.model_type), size=settings.get("size", "base"),
                             vocab_file=settings.get("vocab_file"),
                             allow_download=settings.get("allow_download", False), pretrained_weights=True,
                             **overrides)
    except (ValueError, FileNotFoundError) as error:
        raise RecipeError(f"{where}: cannot build the teacher: {error}") from None
    try:
        load_checkpoint(teacher, path, strict=True)
    except (CheckpointError, FileNotFoundError) as error:
        hint = ""
        try:
            keys = _read_state_dict(Path(path)).keys()
            other = [name for name, key in _ARCH_KEYS.items() if key in keys and name != arch]
            if other and _ARCH_KEYS[arch] not in keys:
                hint = f" (it holds a {other[0]} model; the recipe trains {arch}, and the teacher must be a {arch})"
        except (CheckpointError, FileNotFoundError):
            pass
        raise RecipeError(f"{where}: not a teacher for this recipe{hint}: {error}"
                          + ("" if hint else "; a teacher of other widths or depths than model: needs them in "
                             "distill.teacher_model")) from None
    _drop_momentum(teacher)
    print(f"teacher {path}: all keys matched")
    return teacher.requires_grad_(False).eval()


def _drop_momentum(teacher: nn.Module) -> None:
    """Free what only training a retrieval model uses (momentum encoders, queues): a teacher only answers."""
    for online, momentum in getattr(teacher, "model_pairs", []):
        for name, module in list(teacher.named_children()):
            if module is momentum:
                delattr(teacher, name)
    if hasattr(teacher, "model_pairs"):
        teacher.model_pairs = []
    for name in ("image_queue", "text_queue", "idx_queue", "ptr_queue"):
        if name in teacher._buffers:
            delattr(teacher, name)
