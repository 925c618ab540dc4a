"""The model of an hf recipe: a transformers BLIP of the task's class from a ``save_pretrained`` directory, its
processor (tokenizer, image statistics), and the Aurora adapter around it. Nothing is downloaded."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hf_recipe import HFRecipe
from .recipe import RecipeError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What the loop needs of the model: the model to train (an ``AuroraModel``, or the base model itself
    without an ``aurora:`` section), the base model, and how its inputs are made."""

    model: nn.Module
    base: nn.Module
    tokenizer: Any
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    enc_token_id: int | None  # BLIP's [ENC] (``model.enc_token``), or None: transformers' [CLS]
    bos_token_id: int  # the answer decoder's first token ([DEC])


def load_model(recipe: HFRecipe) -> LoadedModel:
    """Load ``model.pretrained`` (its class checked against the task first), its processor, and wrap it."""
    directory = Path(str(recipe.model["pretrained"])).expanduser()
    base = _load_weights(directory, recipe.model_class)
    tokenizer, mean, std = _load_processor(directory)
    image_size = int(base.config.vision_config.image_size)
    for name, cfg in recipe.datasets.items():
        for split, processor in (cfg.get("vis_processor") or {}).items():
            size = (processor or {}).get("image_size", image_size)
            if size != image_size:
                raise RecipeError(f"datasets.{name}.vis_processor.{split}.image_size={size}, but the model in "
                                  f"{directory} takes {image_size}-pixel images (vision_config.image_size)")
    enc = recipe.model.get("enc_token")
    enc_id = None
    if enc is not None:
        enc_id = tokenizer.convert_tokens_to_ids(enc)
        if enc_id is None or enc_id == tokenizer.unk_token_id:
            raise RecipeError(f"model.enc_token={enc!r} is not a token of the tokenizer in {directory}; set it to "
                              "null to keep transformers' [CLS]")
    model = base
    if recipe.aurora is not None:
        from ..model import get_aurora_model

        model = get_aurora_model(base, recipe.aurora)
    return LoadedModel(model, base, tokenizer, image_size, list(mean), list(std), enc_id,
                       int(base.config.text_config.bos_token_id))


def _load_weights(directory: Path, class_name: str) -> nn.Module:
    from ..families.hf import build  # noqa: F401  (an ImportError naming the environment below transformers 5)
    import transformers

    config_file = directory / "config.json"
    if not directory.is_dir():
        raise RecipeError(f"model.pretrained={directory}: directory not found; expected a transformers {class_name} "
                          "written by save_pretrained (config.json, model.safetensors) with its processor")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as error:
        raise RecipeError(f"model.pretrained={directory}: cannot read {config_file.name} ({error}); expected a "
                          f"directory written by save_pretrained of a transformers {class_name}") from None
    if class_name not in architectures:
        found = ", ".join(architectures) or "model of no named class"
        raise RecipeError(f"model.pretrained={directory}: {config_file} is a {found}, this recipe's task needs a "
                          f"{class_name} (load the checkpoint as that class and save_pretrained it)")
    model, info = getattr(transformers, class_name).from_pretrained(
        directory, local_files_only=True, output_loading_info=True, dtype=torch.float32)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RecipeError(f"model.pretrained={directory}: the checkpoint lacks weights of {class_name}: missing "
                          f"{sorted(info['missing_keys'])[:5]}, other shapes {sorted(info['mismatched_keys'])[:5]}")
    if info["unexpected_keys"]:
        log.warning("model: %s holds %d weight(s) %s has no place for, e.g. %s", directory,
                    len(info["unexpected_keys"]), class_name, sorted(info["unexpected_keys"])[:3])
    return model


def _load_processor(directory: Path) -> tuple[Any, list[float], list[float]]:
    from transformers import BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise RecipeError(f"model.pretrained={directory}: cannot load its processor ({error}); save the model's "
                          "BlipProcessor there too (processor.save_pretrained(directory))") from None
    images = processor.image_processor
    return processor.tokenizer, images.image_mean, images.image_std
