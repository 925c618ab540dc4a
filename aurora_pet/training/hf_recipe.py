"""Recipes of the transformers family (``family: hf``): the LAVIS recipes' sections and keys, read without LAVIS.

A recipe names the task (``run.task``: retrieval or vqa), the transformers BLIP checkpoint to start from
(``model.pretrained``: a directory written by ``save_pretrained``), the data in the same ``datasets:`` form as
the LAVIS recipes (Flickr30k, COCO Karpathy, VQAv2 annotation files; ``build_info`` is required, since there
are no LAVIS defaults to fall back on), the ``aurora:`` adapter and, optionally, ``distill:`` (a teacher and
the distillation losses and stages, ``aurora_pet.distill.DistillConfig``). Every key is checked as the LAVIS
recipes' are: a typo stops the run with the closest valid name (``recipe.unknown_key``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import AuroraConfig
from ..distill import DistillConfig
from ..errors import AuroraConfigError
from .data import ENTRY_SCHEMAS
from .recipe import SECTIONS as LAVIS_SECTIONS
from .recipe import (FAMILY_KEY, RecipeError, aurora_key_problems, aurora_section, check_run_values,
                     dataset_key_problems, parsed_family, read_recipe, unknown_key, unknown_name)

DISTILL_KEY = "distill"  # optional section: the teacher and the distillation losses (DistillConfig's fields)
SECTIONS = tuple(dict.fromkeys((*LAVIS_SECTIONS, DISTILL_KEY)))
DISTILL_KEYS = tuple(f.name for f in dataclasses.fields(DistillConfig))
TASKS = {"retrieval": ("BlipForImageTextRetrieval", ("flickr30k", "coco_retrieval")),
         "vqa": ("BlipForQuestionAnswering", ("coco_vqa",))}  # task: (transformers class, dataset builders)
ARCHITECTURES = {"retrieval": "hf_blip_retrieval", "vqa": "hf_blip_vqa"}  # the family's preset architectures
# `model:` keys: where the weights come from, and the task's settings (BLIP's and LAVIS's values by default)
MODEL_DEFAULTS: dict[str, Any] = {
    "pretrained": None,  # required: a save_pretrained directory (config.json, weights, processor files)
    "max_txt_len": 35,  # tokens per caption / question, as LAVIS's BLIP
    "temperature": 0.07,  # retrieval: initial learnable ITC temperature
    "enc_token": None,  # first token of texts read with the image (retrieval's ITM, VQA's questions): BLIP's and
    # LAVIS's "[ENC]"; None keeps transformers' [CLS]
    "alpha": 0.0,  # retrieval: momentum distillation's weight of the soft ITC targets (LAVIS: 0.4; 0: off)
    "momentum": 0.995,  # retrieval: EMA of the momentum model (with alpha > 0)
    "negative_all_rank": False,  # retrieval: ITC keys and ITM hard negatives from every process (LAVIS's option)
}
SOURCE_KEYS = ("pretrained",)  # where the model comes from, not what it is: a resumed run may change them
REQUIRED_RUN_KEYS = ("task", "output_dir", "init_lr", "max_epoch", "batch_size_train")
RUN_DEFAULTS: dict[str, Any] = {
    "lr_sched": "linear_warmup_cosine_lr", "min_lr": 0.0, "warmup_lr": -1, "warmup_steps": 0,
    "weight_decay": 0.05, "beta2": 0.999, "batch_size_eval": 64, "num_workers": 0,
    "train_splits": ["train"], "valid_splits": [], "test_splits": ["test"],
    "device": "cuda", "mixed_precision": "no", "find_unused_parameters": False, "seed": 42,
    "data_root": ".", "resume_ckpt_path": None, "evaluate": False, "progress": True, "plot": True,
    "k_test": 256,  # retrieval
    "inference_method": "rank", "num_ans_candidates": 128, "max_len": 10, "min_len": 1, "num_beams": 3,  # vqa
}
CHOICES = {"lr_sched": ("linear_warmup_cosine_lr",), "mixed_precision": ("no", "fp16", "bf16"),
           "inference_method": ("rank", "generate"), "device": ("cpu", "cuda")}
PROCESSORS = {"vis_processor": ("blip_image_train", "blip_image_eval"), "text_processor": ("blip_caption",
                                                                                          "blip_question")}
PROCESSOR_KEYS = {"vis_processor": {"name", "image_size", "min_scale", "max_scale"},
                  "text_processor": {"name", "max_words", "prompt"}}


@dataclass
class HFRecipe:
    """A loaded, checked recipe of the transformers family."""

    path: Path
    options: list[str]
    model: dict[str, Any]  # `model:` with defaults
    datasets: dict[str, Any]  # `datasets:`, each annotation file's `url` set to its `storage` (nothing downloads)
    run_cfg: DictConfig  # `run:` with defaults (read with .get, as LAVIS's run_cfg)
    aurora: AuroraConfig | None  # None: no `aurora:` section, every weight trains (full fine-tuning)
    adapter: str | None = None  # an adapter directory to load before training or evaluation
    raw: dict[str, Any] = field(default_factory=dict)
    distill: DistillConfig | None = None  # the `distill:` section; None: no distillation

    @property
    def task(self) -> str:
        return str(self.run_cfg.task)

    @property
    def arch(self) -> str:
        return ARCHITECTURES[self.task]

    @property
    def model_class(self) -> str:
        return TASKS[self.task][0]

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: the adapter and the model it adapts."""
        fingerprint = {"aurora": self.aurora.to_dict() if self.aurora else None,
                       "model": {"family": "hf", "class": self.model_class,
                                 **{k: v for k, v in self.model.items() if k not in SOURCE_KEYS}}}
        if self.distill is not None:  # the losses and stages; the teacher's path, like model.pretrained, may move
            fingerprint["distill"] = {k: v for k, v in dataclasses.asdict(self.distill).items() if k != "teacher"}
        return fingerprint


def load_hf_recipe(cfg_path: str | Path, options: Sequence[str] | None = None) -> HFRecipe:
    """Read and check a ``family: hf`` recipe and its ``--options`` (keys, values, sections); nothing is loaded."""
    path, options, raw, user = read_recipe(cfg_path, options)
    if parsed_family(path, raw, user) != "hf":
        raise RecipeError(f"{path} is not a recipe of the hf family (it has no `family: hf`); run it with "
                          "`aurora-pet train`, which picks its family's runner")
    _check_keys(raw, str(path))
    _check_keys(user, "--options")
    merged = OmegaConf.merge(raw, user)
    for section in ("model", "datasets", "run"):
        if not isinstance(merged.get(section), DictConfig):
            raise RecipeError(f"{path}: missing the {section!r} section")
    run = OmegaConf.merge(OmegaConf.create(RUN_DEFAULTS), merged.run)
    _check_run(run, str(path))
    model = {**MODEL_DEFAULTS, **OmegaConf.to_container(merged.model, resolve=True)}
    if not model["pretrained"]:
        raise RecipeError(f"{path}: model.pretrained is required: the directory of a transformers "
                          f"{TASKS[run.task][0]} written by save_pretrained (see recipes/README.md)")
    datasets = _datasets(merged.datasets, str(run.task), str(path))
    aurora, adapter = aurora_section(merged, ARCHITECTURES[run.task])
    distill = _distill(merged, run, str(path))
    return HFRecipe(path=path, options=options, model=model, datasets=datasets, run_cfg=run, aurora=aurora,
                    adapter=adapter, raw=OmegaConf.to_container(merged, resolve=True), distill=distill)


def _distill(merged: DictConfig, run: DictConfig, source: str) -> DistillConfig | None:
    """The ``distill:`` section as a checked ``DistillConfig`` (its stages fitting ``run.max_epoch``), or None."""
    if DISTILL_KEY not in merged:
        return None
    section = merged.get(DISTILL_KEY)
    if not isinstance(section, DictConfig) or not section:
        raise RecipeError(f"{source}: the distill: section must be a mapping with at least distill.teacher (the "
                          f"directory of the teacher model), got {section!r}; leave it out to train without a "
                          "teacher")
    try:
        config = DistillConfig.from_mapping(OmegaConf.to_container(section, resolve=True))
        config.schedule(int(run.max_epoch))
    except AuroraConfigError as error:
        raise RecipeError(f"{source}: {error}") from None
    return config


def _check_keys(node: DictConfig, source: str) -> None:
    """Every key `node` sets must be one this family reads; the error names the closest one."""
    problems = [unknown_key(str(k), k, SECTIONS) for k in node if k not in (*SECTIONS, FAMILY_KEY)]
    for section, known in (("model", set(MODEL_DEFAULTS)), ("run", {*RUN_DEFAULTS, *REQUIRED_RUN_KEYS})):
        value = node.get(section)
        if isinstance(value, DictConfig):
            problems += [unknown_key(f"{section}.{k}", k, known) for k in value if k not in known]
    problems += aurora_key_problems(node)
    distill = node.get(DISTILL_KEY)
    if isinstance(distill, DictConfig):
        problems += [unknown_key(f"{DISTILL_KEY}.{k}", k, DISTILL_KEYS) for k in distill if k not in DISTILL_KEYS]
    datasets = node.get("datasets")
    if isinstance(datasets, DictConfig):
        problems += dataset_key_problems(datasets, ENTRY_SCHEMAS)
        problems += _processor_key_problems(datasets)
    if problems:
        raise RecipeError(f"{source}: " + "; ".join(problems))


def _processor_key_problems(datasets: DictConfig) -> list[str]:
    problems = []
    for name, ds in datasets.items():
        for kind, known in PROCESSOR_KEYS.items():
            section = ds.get(kind) if isinstance(ds, DictConfig) else None
            for split, cfg in (section.items() if isinstance(section, DictConfig) else ()):
                if split not in ("train", "eval"):
                    problems.append(unknown_key(f"datasets.{name}.{kind}.{split}", split, ("train", "eval")))
                elif isinstance(cfg, DictConfig):
                    problems += [unknown_key(f"datasets.{name}.{kind}.{split}.{k}", k, known)
                                 for k in cfg if k not in known]
                    if cfg.get("name") is not None and cfg.name not in PROCESSORS[kind]:
                        problems.append(unknown_name(f"datasets.{name}.{kind}.{split}.name", cfg.name,
                                                     PROCESSORS[kind], what="processor"))
    return problems


def _check_run(run: DictConfig, source: str) -> None:
    missing = [f"run.{k}" for k in REQUIRED_RUN_KEYS if run.get(k) is None]
    if missing:
        raise RecipeError(f"{source}: {', '.join(missing)} required")
    if run.task not in TASKS:
        raise RecipeError(f"{source}: " + unknown_name("run.task", run.task, TASKS, what="task"))
    for key, choices in CHOICES.items():
        if run[key] not in choices:
            raise RecipeError(f"{source}: " + unknown_name(f"run.{key}", run[key], choices, what="value"))
    check_run_values(run, source)
    for key in ("train_splits", "valid_splits", "test_splits"):
        if not isinstance(run[key], ListConfig):
            raise RecipeError(f"{source}: run.{key} must be a list of split names, got {run[key]!r}")


def _datasets(datasets: DictConfig, task: str, source: str) -> dict[str, Any]:
    """The ``datasets:`` section as ``read_datasets`` takes it: every builder fits the task, every split names
    its files; a missing ``url`` is its ``storage`` (this family never downloads)."""
    builders = TASKS[task][1]
    out = {}
    for name, ds in OmegaConf.to_container(datasets, resolve=True).items():
        if name not in builders:
            raise RecipeError(f"{source}: datasets.{name} is not a dataset of run.task={task} "
                              f"(its datasets: {', '.join(builders)})")
        info = (ds or {}).get("build_info") or {}
        if not info.get("annotations") or not (info.get("images") or {}).get("storage"):
            raise RecipeError(f"{source}: datasets.{name}.build_info must give annotations.<split>.storage and "
                              "images.storage (the hf family has no default locations; see recipes/README.md)")
        for split, ann in info["annotations"].items():
            if not isinstance(ann, Mapping) or not ann.get("storage"):
                raise RecipeError(f"{source}: datasets.{name}.build_info.annotations.{split}.storage is required")
            ann.setdefault("url", ann["storage"])
        out[name] = ds
    if len(out) != 1:
        raise RecipeError(f"{source}: an hf recipe trains on one dataset; its datasets section names "
                          f"{', '.join(out) or 'none'}")
    return out
