"""The model of an hf recipe: a transformers BLIP of the task's class from a ``save_pretrained`` directory, its
processor (tokenizer, image statistics), and the Aurora adapter around it; and the teacher of a ``distill:``
section, loaded with the same checks plus those that let it read the student's batches. Nothing is
downloaded."""

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


def load_teacher(recipe: HFRecipe, loaded: LoadedModel) -> nn.Module:
    """The teacher of the recipe's ``distill:`` section: frozen, in eval mode, on the CPU (the caller places it).

    ``distill.teacher`` is a ``save_pretrained`` directory of the task's class with its processor, checked as
    ``model.pretrained`` is. It may be wider or deeper than the student (the distillation terms compare
    distributions and L×L token relations, not features), but it reads the student's batches, so it must
    tokenize the same way (the same vocabulary, token for token) and take the same images (size and
    normalisation). Every mismatch is a ``RecipeError`` naming the key, the directory and the difference.

    Parameters
    ----------
    recipe : HFRecipe
        A recipe with a ``distill:`` section whose ``teacher`` is set.
    loaded : LoadedModel
        The student, as ``load_model`` returned it.

    Returns
    -------
    nn.Module
        The teacher (the base transformers model, no adapter), ``requires_grad`` off everywhere.
    """
    if recipe.distill is None or not recipe.distill.teacher:
        raise RecipeError(f"{recipe.path}: distill.teacher is required: the directory of the teacher "
                          f"{recipe.model_class} written by save_pretrained, with its processor")
    key = "distill.teacher"
    directory = Path(str(recipe.distill.teacher)).expanduser()
    teacher = _load_weights(directory, recipe.model_class, key)
    tokenizer, mean, std = _load_processor(directory, key)
    problems = []
    mine, theirs = loaded.tokenizer.get_vocab(), tokenizer.get_vocab()
    if theirs != mine:
        by_id = [{index: token for token, index in vocab.items()} for vocab in (theirs, mine)]
        first = min(i for i in set(by_id[0]) | set(by_id[1]) if by_id[0].get(i) != by_id[1].get(i))
        problems.append(f"its tokenizer has another vocabulary ({len(theirs)} tokens, the student's {len(mine)}; "
                        f"token id {first} is {by_id[0].get(first)!r} for the teacher, {by_id[1].get(first)!r} for "
                        "the student)")
    sizes = (int(teacher.config.text_config.vocab_size), int(loaded.base.config.text_config.vocab_size))
    if sizes[0] != sizes[1]:
        problems.append(f"its text_config.vocab_size is {sizes[0]}, the student's {sizes[1]}")
    image_size = int(teacher.config.vision_config.image_size)
    if image_size != loaded.image_size:
        problems.append(f"it takes {image_size}-pixel images, the student {loaded.image_size}-pixel ones")
    if [float(v) for v in mean] != [float(v) for v in loaded.image_mean] or \
            [float(v) for v in std] != [float(v) for v in loaded.image_std]:
        problems.append(f"its processor normalises images with mean {list(mean)}, std {list(std)}; the student's "
                        f"with mean {loaded.image_mean}, std {loaded.image_std}")
    if problems:
        raise RecipeError(f"{key}={directory}: the teacher must read the student's batches (the same tokenizer and "
                          f"image processing as model.pretrained={recipe.model['pretrained']}), but "
                          + "; ".join(problems))
    teacher.requires_grad_(False)
    return teacher.eval()


def check_source(directory: str | Path, class_name: str, key: str = "model.pretrained") -> None:
    """What can be checked of a model directory without loading it: it exists, and its ``config.json`` names
    ``class_name``; a ``RecipeError`` names ``key``, the directory and what is wrong.

    Parameters
    ----------
    directory : str or Path
        A ``save_pretrained`` directory.
    class_name : str
        The transformers class the recipe's task needs.
    key : str
        The recipe key the directory comes from, for the message.
    """
    directory = Path(str(directory)).expanduser()
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise RecipeError(f"{key}={directory}: directory not found; expected a transformers {class_name} "
                          "written by save_pretrained (config.json, model.safetensors) with its processor")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as error:
        raise RecipeError(f"{key}={directory}: cannot read {config_file.name} ({error}); expected a "
                          f"directory written by save_pretrained of a transformers {class_name}") from None
    if class_name not in architectures:
        found = ", ".join(architectures) or "model of no named class"
        raise RecipeError(f"{key}={directory}: {config_file} is a {found}, this recipe's task needs a "
                          f"{class_name} (load the checkpoint as that class and save_pretrained it)")


def _load_weights(directory: Path, class_name: str, key: str = "model.pretrained") -> nn.Module:
    from ..families.hf import build  # noqa: F401  (an ImportError naming the environment below transformers 5)
    import transformers

    check_source(directory, class_name, key)
    model, info = getattr(transformers, class_name).from_pretrained(
        directory, local_files_only=True, output_loading_info=True, dtype=torch.float32)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RecipeError(f"{key}={directory}: the checkpoint lacks weights of {class_name}: missing "
                          f"{sorted(info['missing_keys'])[:5]}, other shapes {sorted(info['mismatched_keys'])[:5]}")
    if info["unexpected_keys"]:
        log.warning("%s: %s holds %d weight(s) %s has no place for, e.g. %s", key, directory,
                    len(info["unexpected_keys"]), class_name, sorted(info["unexpected_keys"])[:3])
    return model


def _load_processor(directory: Path, key: str = "model.pretrained") -> tuple[Any, list[float], list[float]]:
    from transformers import BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise RecipeError(f"{key}={directory}: cannot load its processor ({error}); save the model's "
                          "BlipProcessor there too (processor.save_pretrained(directory))") from None
    images = processor.image_processor
    return processor.tokenizer, images.image_mean, images.image_std
