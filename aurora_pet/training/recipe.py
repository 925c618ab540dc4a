"""Recipe files: LAVIS project yaml (``model`` / ``datasets`` / ``run``) plus an ``aurora:`` section.

A recipe is loaded twice on purpose. LAVIS's own ``Config`` builds the configuration the runner, tasks
and dataset builders see (its defaults, merging and ``--options`` handling, unchanged). Before that,
every key the recipe or an option sets is checked against what LAVIS and aurora-pet actually read, so a
typo (``init_lrr``, ``aurora.rnak``) stops the run with the closest valid name instead of being
silently ignored, as LAVIS would.

A top-level ``family:`` says which model family's runner trains the recipe (``recipe_family``): absent or
``lavis`` for these LAVIS recipes, ``hf`` for transformers BLIP (``hf_recipe``, which reuses the readers and
checks here).

An optional top-level ``distill:`` section distils a teacher into the student (``DistillConfig``'s keys, plus,
for a LAVIS teacher wider or deeper than the student, ``teacher_model:`` overrides of the ``model:`` build
settings); ``distill_config`` parses it for either family, ``distill_section`` adds the LAVIS checks.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import AuroraConfig
from ..distill import DistillConfig
from ..errors import AuroraConfigError

SECTIONS = ("model", "datasets", "run", "aurora")
FAMILY_KEY = "family"  # top level: which model family's runner trains the recipe (see recipe_family)
FAMILIES = ("lavis", "hf")
DISTILL_KEY = "distill"  # top level, optional: the teacher and the distillation losses (see distill_config)
TEACHER_MODEL_KEY = "teacher_model"  # distill.teacher_model: the LAVIS teacher's build settings that differ

# Keys of `run:` read by LAVIS 1.0.2 (RunnerBase, the tasks, the LR schedulers, train.py) and by aurora-pet.
RUN_KEYS = {
    # LAVIS
    "task", "runner", "lr_sched", "init_lr", "min_lr", "warmup_lr", "warmup_steps", "lr_decay_rate",
    "weight_decay", "beta2", "max_epoch", "max_iters", "iters_per_inner_epoch", "batch_size_train",
    "batch_size_eval", "num_workers", "train_splits", "valid_splits", "test_splits", "train_dataset_ratios",
    "device", "world_size", "dist_url", "distributed", "gpu", "rank", "dist_backend", "use_dist_eval_sampler",
    "k_test", "seed", "output_dir", "amp", "resume_ckpt_path", "evaluate", "max_len", "min_len", "num_beams",
    "num_ans_candidates", "inference_method", "prompt", "report_metric", "log_freq", "accum_grad_iters",
    # aurora-pet
    "find_unused_parameters", "progress", "save_resume_state", "plot",
}
# Keys of `model:` that are not build settings of `build_blip` (those are listed by the integration).
MODEL_KEYS = {"arch", "model_type", "load_finetuned", "load_pretrained", "finetuned", "pretrained",
              "vit_type", "med_config_path", "size", "vocab_file", "allow_download"}
# Keys that say where the model comes from, not what it is: a resumed run may change them.
SOURCE_KEYS = ("arch", "model_type", "pretrained", "finetuned", "vocab_file", "allow_download")
# `run:` values LAVIS divides by, loops over or takes the top-k of: a 0 fails late, or trains nothing.
POSITIVE_RUN_INTS = ("batch_size_train", "batch_size_eval", "max_epoch", "k_test")
LEARNING_RATES = {"init_lr": "a number > 0", "min_lr": "a number >= 0", "warmup_lr": "a finite number"}
DATASET_KEYS = {"data_type", "build_info", "vis_processor", "text_processor", "type"}
BUILD_INFO_KEYS = {"annotations", "images", "videos", "features"}
SPLIT_KEYS = {"url", "storage", "md5"}
# `aurora:` = AuroraConfig fields + `preset` (a preset of the model's architecture) + `adapter` (load one).
AURORA_EXTRA_KEYS = {"preset", "adapter"}
SUPPORTED_ARCHS = ("blip_retrieval", "blip_vqa", "blip_video_retrieval", "blip_video_qa")


class RecipeError(AuroraConfigError):
    """A recipe or option that is missing, malformed, or sets a key nothing reads."""


@dataclass
class Recipe:
    """A loaded, checked recipe: LAVIS's merged ``Config`` plus what aurora-pet reads beside it."""

    path: Path
    options: list[str]
    cfg: Any  # lavis.common.config.Config
    model_settings: dict[str, Any]  # the model keys the recipe and options set (not LAVIS's defaults)
    aurora: AuroraConfig | None  # None: no `aurora:` section, every base weight trains (full fine-tuning)
    adapter: str | None = None  # an adapter directory to load before training or evaluation
    raw: dict[str, Any] = field(default_factory=dict)
    distill: DistillConfig | None = None  # the `distill:` section; None: no teacher
    teacher_model: dict[str, Any] = field(default_factory=dict)  # distill.teacher_model: teacher build overrides

    @property
    def run_cfg(self):
        return self.cfg.run_cfg

    @property
    def arch(self) -> str:
        return str(self.cfg.model_cfg.arch)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: the adapter and the model it adapts."""
        return {"aurora": self.aurora.to_dict() if self.aurora else None,
                "model": {"arch": self.arch, "model_type": str(self.cfg.model_cfg.model_type),
                          **{k: v for k, v in self.model_settings.items() if k not in SOURCE_KEYS}}}


def split_options(options: Sequence[str] | None) -> list[str]:
    """``--options`` as LAVIS reads them: ``k=v`` items, or alternating ``k v`` pairs."""
    options = list(options or [])
    if not options or "=" in options[0]:
        bad = [o for o in options if "=" not in o]
        if bad:
            raise RecipeError(f"--options expects key=value items; got {bad[0]!r}")
        return options
    if len(options) % 2:
        raise RecipeError(f"--options: key {options[-1]!r} has no value")
    return [f"{k}={v}" for k, v in zip(options[0::2], options[1::2])]


def read_recipe(cfg_path: str | Path, options: Sequence[str] | None = None) -> tuple[Path, list[str], DictConfig,
                                                                                  DictConfig]:
    """The recipe file and the options, parsed (neither checked nor merged): (path, options as ``k=v`` items,
    the file, the options). Both families' loaders start here."""
    path = Path(cfg_path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    raw = _read_yaml(path)
    options = split_options(options)
    try:
        user = OmegaConf.from_dotlist(options)
    except OmegaConfBaseException as error:
        raise RecipeError(f"--options: cannot parse {options} ({error})") from None
    return path, options, raw, user


def recipe_family(cfg_path: str | Path, options: Sequence[str] | None = None) -> str:
    """The model family a recipe is for: its top-level ``family:`` (an option may set it), ``"lavis"`` without
    one (the recipes of LAVIS BLIP predate the key). ``aurora-pet train`` picks the family's runner by it."""
    path, _, raw, user = read_recipe(cfg_path, options)
    return parsed_family(path, raw, user)


def parsed_family(path: Path, raw: DictConfig, user: DictConfig) -> str:
    """``recipe_family`` of a recipe already read (``read_recipe``)."""
    family = user.get(FAMILY_KEY, raw.get(FAMILY_KEY, "lavis"))
    if family not in FAMILIES:
        raise RecipeError(f"{path}: " + unknown_name(FAMILY_KEY, family, FAMILIES, what="model family"))
    return str(family)


def load_recipe(cfg_path: str | Path, options: Sequence[str] | None = None) -> Recipe:
    """Check the recipe's keys and values, then build LAVIS's ``Config`` from it."""
    from .lavis_env import import_lavis_registry

    registry = import_lavis_registry()
    from lavis.common.config import Config

    path, options, raw, user = read_recipe(cfg_path, options)
    family = parsed_family(path, raw, user)
    if family != "lavis":
        raise RecipeError(f"{path} is a recipe of the {family!r} family, not LAVIS's; run it with `aurora-pet train` "
                          "(or aurora_pet.training.hf_train.train)")
    check_keys(raw, str(path), registry)
    check_keys(user, "--options", registry)
    merged = OmegaConf.merge(raw, user)
    for section in ("model", "datasets", "run"):
        if section not in merged or not isinstance(merged[section], DictConfig):
            raise RecipeError(f"{path}: missing the {section!r} section")
    arch = merged.model.get("arch")
    if arch not in SUPPORTED_ARCHS:
        raise RecipeError(f"model.arch is {arch!r}; aurora-pet recipes support {list(SUPPORTED_ARCHS)}")
    check_model_keys(merged.model, arch)
    for key in ("task", "output_dir"):
        if merged.run.get(key) is None:
            raise RecipeError(f"{path}: run.{key} is required")
    check_run_values(merged.run, str(path))
    if registry.get_task_class(merged.run.task) is None:
        raise RecipeError(unknown_name("run.task", merged.run.task, registry.mapping["task_name_mapping"]))
    lr_sched = merged.run.get("lr_sched", "linear_warmup_cosine_lr")
    if registry.get_lr_scheduler_class(lr_sched) is None:
        raise RecipeError(unknown_name("run.lr_sched", lr_sched, registry.mapping["lr_scheduler_name_mapping"]))

    aurora, adapter = aurora_section(merged, arch)
    distill, teacher_model = distill_section(merged, path, arch, aurora)

    cfg = Config(SimpleNamespace(cfg_path=str(path), options=options))
    OmegaConf.set_struct(cfg.config, False)
    cfg.config.aurora = OmegaConf.create(aurora.to_dict() if aurora else None)
    if distill is not None:
        import dataclasses

        cfg.config.distill = OmegaConf.create({**dataclasses.asdict(distill), TEACHER_MODEL_KEY: teacher_model})
    settings = OmegaConf.to_container(merged.model, resolve=True)
    return Recipe(path=path, options=options, cfg=cfg, model_settings=settings, aurora=aurora,
                  adapter=adapter, raw=OmegaConf.to_container(merged, resolve=True), distill=distill,
                  teacher_model=teacher_model)


def _read_yaml(path: Path) -> DictConfig:
    """The recipe file as OmegaConf reads it; a syntax error names the file, line and column."""
    try:
        raw = OmegaConf.load(path)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {error.problem or error.context}") from None
    except (yaml.YAMLError, OmegaConfBaseException, ValueError, OSError) as error:  # not UTF-8 is a ValueError
        raise RecipeError(f"{path}: not a valid yaml file ({error})") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    return raw


def check_run_values(run: DictConfig, source: str) -> None:
    """Counts and learning rates LAVIS would only fail on (or silently train nothing with) mid-run."""
    problems = [f"run.{key} must be a positive integer, got {run[key]!r}" for key in POSITIVE_RUN_INTS
                if run.get(key) is not None and not (_is_int(run[key]) and run[key] > 0)]
    problems += [f"run.{key} must be {what}, got {run[key]!r}" for key, what in LEARNING_RATES.items()
                 if run.get(key) is not None and not _learning_rate_ok(key, _number(run[key]))]
    if problems:
        raise RecipeError(f"{source}: " + "; ".join(problems))


def _learning_rate_ok(key: str, number: float | None) -> bool:
    if number is None or not math.isfinite(number):
        return False
    if key == "init_lr":
        return number > 0  # 0 trains nothing
    return number >= 0 or key == "warmup_lr"  # LAVIS reads a negative warmup_lr as "no warmup"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    """A yaml number (PyYAML reads ``1e-4`` as a string), or None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def aurora_section(merged: DictConfig, arch: str) -> tuple[AuroraConfig | None, str | None]:
    """The merged recipe's adapter settings and the adapter directory to load (``aurora.adapter``); (None, None)
    without an ``aurora:`` section (full fine-tuning)."""
    section = merged.get("aurora")
    if section is None:
        return None, None
    fields = OmegaConf.to_container(section, resolve=True)
    adapter = fields.pop("adapter", None)
    return aurora_config(fields, arch), adapter


def aurora_config(fields: Mapping[str, Any], arch: str) -> AuroraConfig:
    """The ``aurora:`` section as an ``AuroraConfig``: ``preset`` names a preset of ``arch``."""
    fields = dict(fields)
    preset = fields.pop("preset", None)
    try:
        if preset is not None:
            from ..families.lavis.video_names import image_architecture

            name = preset if "/" in str(preset) else f"{image_architecture(arch)}/{preset}"
            return AuroraConfig.from_preset(name, **_known_aurora_fields(fields))
        return AuroraConfig.from_dict(fields)
    except AuroraConfigError as error:
        raise RecipeError(f"aurora: {error}") from None


def _known_aurora_fields(fields: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    known = {f.name for f in dataclasses.fields(AuroraConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise RecipeError("; ".join(unknown_key(f"aurora.{k}", k, known | AURORA_EXTRA_KEYS) for k in unknown))
    return fields


def check_keys(node: DictConfig, source: str, registry) -> None:
    """Every key `node` sets must be one LAVIS or aurora-pet reads; the error names the closest one."""
    problems = []
    for section in node:
        if section not in (*SECTIONS, FAMILY_KEY, DISTILL_KEY):
            problems.append(unknown_key(str(section), section, (*SECTIONS, DISTILL_KEY)))
    run = node.get("run")
    if isinstance(run, DictConfig):
        problems += [unknown_key(f"run.{k}", k, RUN_KEYS) for k in run if k not in RUN_KEYS]
    problems += aurora_key_problems(node)
    datasets = node.get("datasets")
    if isinstance(datasets, DictConfig):
        problems += dataset_key_problems(datasets, registry.mapping["builder_name_mapping"])
    if problems:
        raise RecipeError(f"{source}: " + "; ".join(problems))


def distill_config(section: Any, source: str, extra_keys: Iterable[str] = ()) -> tuple[DistillConfig | None,
                                                                                       dict[str, Any]]:
    """A recipe's ``distill:`` section as a ``DistillConfig`` and its ``extra_keys`` (a family's own keys, e.g.
    ``teacher_model``); (None, {}) for ``distill: null`` (no distillation: ``--options distill=null`` turns off a
    recipe's section). Every error names ``source`` (the recipe file) and the key.

    Parameters
    ----------
    section : Any
        The merged recipe's ``distill`` value (a ``DictConfig``, a mapping or None).
    source : str
        The recipe file, for the messages.
    extra_keys : iterable of str
        Keys the family reads beside ``DistillConfig``'s fields; returned apart.

    Returns
    -------
    tuple
        (the config or None, the extra keys that are set).
    """
    import dataclasses

    if section is None:
        return None, {}
    data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else section
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: distill: expected a mapping of settings (teacher, weights, stages), "
                          f"got {data!r}")
    known = {f.name for f in dataclasses.fields(DistillConfig)} | set(extra_keys)
    unknown = [unknown_key(f"distill.{key}", key, known) for key in data if key not in known]
    if unknown:
        raise RecipeError(f"{source}: " + "; ".join(unknown))
    extra = {key: data.pop(key) for key in list(data) if key in set(extra_keys)}
    try:
        return DistillConfig.from_mapping(data), extra
    except (AuroraConfigError, TypeError) as error:
        raise RecipeError(f"{source}: {error}") from None


def distill_section(merged: DictConfig, path: Path, arch: str,
                    aurora: AuroraConfig | None) -> tuple[DistillConfig | None, dict[str, Any]]:
    """The LAVIS recipe's ``distill:`` section, checked against the rest of the recipe before anything runs:
    a distillable architecture, a teacher checkpoint file that exists, stages that fit ``run.max_epoch``, heads
    for an ``align`` stage to train, a weight > 0 on a term of the task, and ``teacher_model`` build keys.

    Parameters
    ----------
    merged : DictConfig
        The recipe merged with its options.
    path : Path
        The recipe file, for the messages.
    arch : str
        ``model.arch``.
    aurora : AuroraConfig or None
        The ``aurora:`` section (None: full fine-tuning).

    Returns
    -------
    tuple
        (the ``DistillConfig`` or None, the teacher's build overrides ``distill.teacher_model``).
    """
    from ..families.lavis.distill import DISTILL_ARCHITECTURES, TASK_PARTS

    config, extra = distill_config(merged.get(DISTILL_KEY), str(path), (TEACHER_MODEL_KEY,))
    if config is None:
        return None, {}
    where = f"{path}: distill"
    if arch not in DISTILL_ARCHITECTURES:
        raise RecipeError(f"{where}: distillation supports model.arch {' and '.join(DISTILL_ARCHITECTURES)}, "
                          f"not {arch!r}")
    if config.teacher is None:
        raise RecipeError(f"{where}.teacher is required: the .pth or .safetensors checkpoint of the teacher (a "
                          f"{arch} model fine-tuned in full, or a larger one with distill.teacher_model settings)")
    teacher = Path(config.teacher).expanduser()
    if not teacher.is_file():
        what = "is a directory" if teacher.is_dir() else "not found"
        raise RecipeError(f"{where}.teacher={config.teacher}: checkpoint {what} (expected a local .pth or "
                          f".safetensors file of a fully fine-tuned {arch} model)")
    try:
        stages = config.schedule(int(merged.run.get("max_epoch", 1)))
    except AuroraConfigError as error:
        raise RecipeError(f"{path}: {error}") from None
    if any(not stage.trains_adapter for stage in stages) and not (aurora and aurora.modules_to_save):
        reason = ("aurora.modules_to_save is empty" if aurora else
                  "there is no aurora: section (full fine-tuning has no separate heads)")
        raise RecipeError(f"{where}.stages {config.stages!r} has an align stage, which trains the heads "
                          f"(aurora.modules_to_save) only, but {reason}; drop the align stage or name the heads")
    parts = TASK_PARTS[arch]
    if not any(config.weights()[part] > 0 for part in parts):
        raise RecipeError(f"{where}: every weight of a {arch} term is 0 "
                          f"({', '.join(f'{part}_weight' for part in parts)}), so nothing would be distilled")
    overrides = extra.get(TEACHER_MODEL_KEY) or {}
    if not isinstance(overrides, Mapping):
        raise RecipeError(f"{where}.{TEACHER_MODEL_KEY}: expected a mapping of model build settings "
                          f"(e.g. vision_width, num_hidden_layers), got {overrides!r}")
    known = build_settings(arch) | {"size"}
    problems = [unknown_key(f"distill.{TEACHER_MODEL_KEY}.{k}", k, known) for k in overrides if k not in known]
    if overrides.get("size", "base") not in ("base", "tiny"):
        problems.append(f"distill.{TEACHER_MODEL_KEY}.size must be 'base' or 'tiny', got {overrides['size']!r}")
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems) + " (teacher_model sets build settings of the "
                          "teacher that differ from model:; its arch and model_type are the student's)")
    return config, dict(overrides)


def aurora_key_problems(node: DictConfig) -> list[str]:
    """An ``aurora:`` section that is empty (it would silently train every weight), not a mapping, or sets a key
    ``AuroraConfig`` does not have."""
    import dataclasses

    aurora = node.get("aurora")
    if "aurora" in node and (aurora is None or isinstance(aurora, DictConfig) and not aurora):
        return ["the aurora: section is empty; give the adapter settings (e.g. preset: cross-attention, "
                "rank: 64) or leave the section out for full fine-tuning"]
    if isinstance(aurora, DictConfig):
        known = {f.name for f in dataclasses.fields(AuroraConfig)} | AURORA_EXTRA_KEYS
        return [unknown_key(f"aurora.{k}", k, known) for k in aurora if k not in known]
    if aurora is not None:
        return [f"aurora: expected a mapping of adapter settings, got {aurora!r}"]
    return []


def dataset_key_problems(datasets: DictConfig, builders: Iterable[str]) -> list[str]:
    """A ``datasets:`` section's unknown builders and keys, each with the closest valid name."""
    problems = []
    for name, ds in datasets.items():
        if name not in builders:
            problems.append(unknown_name(f"datasets.{name}", name, builders, what="dataset builder"))
            continue
        if not isinstance(ds, DictConfig):
            continue
        problems += [unknown_key(f"datasets.{name}.{k}", k, DATASET_KEYS) for k in ds if k not in DATASET_KEYS]
        info = ds.get("build_info")
        if isinstance(info, DictConfig):
            problems += [unknown_key(f"datasets.{name}.build_info.{k}", k, BUILD_INFO_KEYS)
                         for k in info if k not in BUILD_INFO_KEYS]
            anns = info.get("annotations")
            if isinstance(anns, DictConfig):
                for split, ann in anns.items():
                    if isinstance(ann, DictConfig):
                        problems += [unknown_key(f"datasets.{name}.build_info.annotations.{split}.{k}", k,
                                                 SPLIT_KEYS) for k in ann if k not in SPLIT_KEYS]
    return problems


def check_model_keys(model: DictConfig, arch: str) -> None:
    known = MODEL_KEYS | build_settings(arch)
    problems = [unknown_key(f"model.{k}", k, known) for k in model if k not in known]
    if problems:
        raise RecipeError("; ".join(problems))
    if model.get("vit_type", "base") != "base":
        raise RecipeError(f"model.vit_type {model.vit_type!r} is not supported: the offline builder builds "
                          "LAVIS's ViT 'base' (use size/vision_width/vision_depth to change it)")
    if model.get("size", "base") not in ("base", "tiny"):
        raise RecipeError(f"model.size must be 'base' or 'tiny', got {model.size!r}")
    if not isinstance(model.get("allow_download", False), bool):
        raise RecipeError(f"model.allow_download must be true or false, got {model.allow_download!r}")


def build_settings(arch: str) -> set[str]:
    """Model keys `build_blip` accepts as overrides for `arch` (LAVIS yaml, ViT and med_config keys)."""
    from ..families.lavis.build import ARCHITECTURES, _resolve_spec
    from ..families.lavis.video_names import VIDEO_ARCHITECTURES, image_architecture

    image_arch = image_architecture(arch)
    spec = _resolve_spec(image_arch, ARCHITECTURES[image_arch][0], "base", None, {})
    keys = {k for part in spec.values() for k in part} - {"encoder_width", "model_type"}
    return keys | ({"num_frames"} if arch in VIDEO_ARCHITECTURES else set())


def unknown_key(label: str, key: Any, known: Iterable[str]) -> str:
    """``unknown key 'run.init_lrr' (did you mean 'init_lr'?)``."""
    close = difflib.get_close_matches(str(key), sorted(known), 1)
    return f"unknown key {label!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def unknown_name(label: str, value: Any, known: Iterable[str], what: str = "name") -> str:
    """``run.task: unknown name 'retreival' (did you mean 'retrieval'?)``, else the known names."""
    known = sorted(known)
    close = difflib.get_close_matches(str(value), known, 1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"{label}: unknown {what} {value!r} ({hint})"


def recipe_yaml(data: dict[str, Any]) -> str:
    """The recipe as a run writes it next to its output (``recipe.yaml``), options applied."""
    return OmegaConf.to_yaml(OmegaConf.create(data))
