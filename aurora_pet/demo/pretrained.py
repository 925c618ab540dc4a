"""The demo's source-domain model: a tiny BLIP pre-trained in full, shipped, cached or trained now.

One machinery for both families, keyed by the architecture: ``blip_retrieval`` and ``blip_vqa`` (LAVIS
``BlipRetrieval`` and ``BlipVQA``, pre-trained with LAVIS's runner on source-domain captions and questions)
and ``hf_blip_retrieval`` (transformers' ``BlipForImageTextRetrieval``, pre-trained with the hf recipe
runner). Entries are a ``<name>.safetensors`` (the full state dict) and a
``<name>.json`` (settings, metrics), named ``tiny-<arch>-<hash of every setting>``, so other settings never
load a stale model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import AuroraModel
from ..training.data import write_recipe
from .hf import HF_ARCH, HF_PRETRAIN, HF_TINY_MODEL, hf_demo_recipe
from .recipe import ARCH, TINY_MODEL, VQA_ARCH, VQA_TINY_MODEL, demo_recipe, write_demo_data

# Source-domain pre-training (full fine-tuning from a random initialisation).
PRETRAIN: dict[str, Any] = {
    "data": {"n_train": 256, "n_val": 32, "n_test": 32, "seed": 0},
    "run": {"init_lr": 5e-4, "max_epoch": 48, "batch_size_train": 32, "batch_size_eval": 64, "k_test": 8,
            "valid_splits": [], "test_splits": ["test"], "seed": 42, "log_freq": 1000},
    "init_std": 0.2,  # ViT linear weights; see _initial_checkpoint
    "version": 1,
}
# Source-domain VQA pre-training of the tiny BlipVQA (shipped, 1.5 MB; about 4 minutes on one core). As real
# BLIP's VQA model is fine-tuned from pre-trained BLIP, it starts from the source-domain retrieval model's vision
# and text encoders (``init_from``; the answer decoder is random) and keeps the vision encoder frozen: trained
# in full from scratch, or with the ViT trainable, the answer decoder first learns the answer priors and
# the gradient then flattens the image features until every image gives the same answer (measured: 31-35 %
# source accuracy, the priors, and the ViT's patch features nearly equal across images).
VQA_PRETRAIN: dict[str, Any] = {
    "data": {"n_train": 512, "n_val": 32, "n_test": 64, "questions_per_image": 5, "seed": 0},
    "run": {"init_lr": 1e-3, "max_epoch": 30, "batch_size_train": 32, "batch_size_eval": 64,
            "valid_splits": [], "test_splits": ["test"], "seed": 42, "log_freq": 1000},
    "init_from": {"arch": ARCH, "modules": ["visual_encoder", "text_encoder"]},
    "frozen": ["visual_encoder"],
    "version": 1,
}
ASSETS = Path(__file__).parent.parent / "assets"


def default_cache_dir() -> Path:
    """Where pre-trained entries are cached: ``$AURORA_PET_CACHE``, else ``~/.cache/aurora-pet``.

    Returns
    -------
    Path
        The cache directory (not created here).
    """
    return Path(os.environ.get("AURORA_PET_CACHE", Path.home() / ".cache" / "aurora-pet"))


@dataclass
class PretrainedTiny:
    """A tiny BLIP pre-trained on the source domain: ``checkpoint`` (full state dict, safetensors) and the
    ``model`` settings that rebuild its ``arch`` (LAVIS: the recipe's ``model:`` section; hf:
    ``families.hf.build.build_blip``'s arguments); ``metrics`` are its source-domain test results; ``source``
    says where it came from: "shipped" (package data), "cache" or "trained" (just now)."""

    arch: str
    checkpoint: Path
    model: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = "cache"

    @property
    def family(self) -> str:
        """The model family of ``arch``: "lavis" or "hf"."""
        return _family(self.arch).name

    def build(self) -> nn.Module:
        """The model with these weights (strict loading): LAVIS's ``BlipRetrieval`` or ``BlipVQA``, or
        transformers' ``BlipForImageTextRetrieval``, by ``arch``. The random initialisation the checkpoint
        replaces draws from a forked RNG: the caller's global RNG is left as it was.

        Returns
        -------
        nn.Module
            The model in its family's class, every weight from ``checkpoint``.
        """
        if self.family == "hf":
            from safetensors.torch import load_model

            from ..families.hf.build import build_blip as build_hf_blip

            model = build_hf_blip("retrieval", **self.model)
            load_model(model, str(self.checkpoint), strict=True)
            return model
        from ..families.lavis.build import ARCHITECTURES, build_blip

        settings = {k: v for k, v in self.model.items() if k not in ("size", "pretrained")}
        with torch.random.fork_rng(devices=[]):
            return build_blip(self.arch, ARCHITECTURES[self.arch][0], size=self.model.get("size", "tiny"),
                              checkpoint=self.checkpoint, **settings)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model as an hf recipe's ``model.pretrained`` reads it: ``save_pretrained`` of the model
        and of its ``BlipProcessor`` (the tiny tokenizer, the image size). hf family only.

        Parameters
        ----------
        directory : str or Path
            Where to write (created; files there are overwritten).

        Returns
        -------
        Path
            ``directory``.
        """
        if self.family != "hf":
            raise ValueError(f"save_pretrained writes transformers models; {self.arch!r} is a LAVIS model "
                             "(its recipes load the checkpoint file itself)")
        return _save_hf_directory(self.build(), Path(directory))


@dataclass(frozen=True)
class _Family:
    """What differs between the families' pre-trained entries: the tiny model's settings, the pre-training
    settings (both hashed into the entry's name) and the function that pre-trains (work dir, settings,
    quiet) -> (trained model, source-domain test metrics)."""

    name: str
    model: dict[str, Any]
    pretrain: dict[str, Any]
    train: Callable[[str, Path, dict[str, Any], bool], tuple[nn.Module, dict[str, Any]]]


def _family(arch: str) -> _Family:
    families = {ARCH: _Family("lavis", TINY_MODEL, PRETRAIN, _pretrain_lavis),
                VQA_ARCH: _Family("lavis", VQA_TINY_MODEL, VQA_PRETRAIN, _pretrain_lavis),
                HF_ARCH: _Family("hf", HF_TINY_MODEL, HF_PRETRAIN, _pretrain_hf)}
    if arch not in families:
        raise ValueError(f"pretrained_tiny_blip supports {' and '.join(map(repr, families))}, got {arch!r}")
    return families[arch]


def pretrain_settings(epochs: int | None = None, arch: str = ARCH) -> dict[str, Any]:
    """The pre-training settings of ``arch`` with another number of epochs (a separate cache entry).

    Parameters
    ----------
    epochs : int or None
        Pre-training epochs; None keeps the default.
    arch : str
        ``blip_retrieval`` (``PRETRAIN``), ``blip_vqa`` (``VQA_PRETRAIN``) or ``hf_blip_retrieval``
        (``HF_PRETRAIN``).

    Returns
    -------
    dict
        A deep copy of the settings.
    """
    settings = json.loads(json.dumps(_family(arch).pretrain))
    if epochs is not None:
        settings["run"]["max_epoch"] = int(epochs)
    return settings


def pretrained_tiny_blip(arch: str = ARCH, cache_dir: str | Path | None = None, *, force: bool = False,
                         epochs: int | None = None, quiet: bool = True) -> PretrainedTiny:
    """The source-domain tiny BLIP of a family, for the demo and benchmarks.

    Looked up, in order: ``cache_dir``, then the weights shipped with the package (``aurora_pet/assets``,
    made by this function with the default settings); otherwise pre-trained in full from a random
    initialisation through the family's recipe runner (``aurora_pet.training.train`` for LAVIS,
    ``aurora_pet.training.hf_train.train`` for transformers; a few minutes on one CPU core) and cached.
    Entries are keyed by a hash of every setting (``tiny-<arch>-<hash>``): other settings never load a
    stale model.

    Parameters
    ----------
    arch : str
        ``blip_retrieval`` (LAVIS, the default), ``blip_vqa`` (LAVIS) or
        ``hf_blip_retrieval`` (transformers 5).
    cache_dir : str, Path or None
        The cache (default: ``default_cache_dir()``).
    force : bool
        Pre-train again even if an entry exists.
    epochs : int or None
        Pre-training epochs instead of the default (another entry).
    quiet : bool
        Passed to the runner's ``train`` (no parameter table or summary).

    Returns
    -------
    PretrainedTiny
        The entry; ``source`` says whether it was shipped, cached or trained now.
    """
    family = _family(arch)
    pretrain = pretrain_settings(epochs, arch)
    name = f"tiny-{arch}-{_settings_hash(arch, family.model, pretrain)}"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force:
        found = _load_entry(arch, cache, name, "cache") or _load_entry(arch, ASSETS, name, "shipped")
        if found is not None:
            return found
    start = time.time()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=cache))
    try:
        model, metrics = family.train(arch, work, pretrain, quiet)
        seconds = time.time() - start
        _save_full(model, work / f"{name}.safetensors")
        (work / f"{name}.json").write_text(json.dumps(
            {"arch": arch, "model": family.model, "pretrain": pretrain, "metrics": metrics, "seconds": seconds},
            indent=2) + "\n")
        for suffix in (".safetensors", ".json"):  # weights first: an entry counts once its .json exists
            os.replace(work / f"{name}{suffix}", cache / f"{name}{suffix}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PretrainedTiny(arch, cache / f"{name}.safetensors", dict(family.model), metrics, seconds, "trained")


def _pretrain_lavis(arch: str, work: Path, pretrain: Mapping[str, Any], quiet: bool) -> tuple[nn.Module, dict]:
    """LAVIS ``BlipRetrieval`` (captions) or ``BlipVQA`` (questions) trained on the source domain with LAVIS's
    runner: in full, but for the modules that ``pretrain["frozen"]`` names."""
    from ..training.trainer import train

    written = write_demo_data(work / "data", "source", arch=arch, **pretrain["data"])
    init = _initial_checkpoint(arch, work / "init.safetensors", pretrain)
    recipe = demo_recipe(written, work / "run", pretrained=PretrainedTiny(arch, init, dict(_family(arch).model)),
                         aurora=None, run=pretrain["run"])
    frozen = list(pretrain.get("frozen", []))

    def freeze(model: nn.Module) -> None:
        for name in frozen:
            model.get_submodule(name).requires_grad_(False)

    result = train(write_recipe(work / "pretrain.yaml", recipe), quiet=quiet,
                   prepare_model=freeze if frozen else None)
    return result.model, {k: v for k, v in (result.final or {}).items() if k != "epoch"}


def _pretrain_hf(arch: str, work: Path, pretrain: Mapping[str, Any], quiet: bool) -> tuple[nn.Module, dict]:
    """transformers' ``BlipForImageTextRetrieval`` trained in full on the source domain with the hf recipe
    runner (a ``family: hf`` recipe without ``aurora:``), from ``build_blip`` drawn with the entry's seed."""
    from ..families.hf.build import build_blip
    from ..training.hf_train import train

    written = write_demo_data(work / "data", "source", **pretrain["data"])
    init = _save_hf_directory(build_blip("retrieval", seed=int(pretrain["init_seed"]), **HF_TINY_MODEL),
                              work / "init")
    recipe = hf_demo_recipe(written, work / "run", pretrained_dir=init, aurora=None, run=pretrain["run"],
                            model=pretrain["recipe_model"])
    result = train(write_recipe(work / "pretrain.yaml", recipe), quiet=quiet)
    return result.model, {k: v for k, v in (result.final or {}).items() if k not in ("epoch", "best_epoch")}


def _save_hf_directory(model: nn.Module, directory: Path) -> Path:
    """``model`` and its tiny ``BlipProcessor`` written by ``save_pretrained`` (what ``model.pretrained`` is)."""
    from ..families.hf.build import blip_processor

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    blip_processor(int(model.config.vision_config.image_size)).save_pretrained(directory)
    return directory


def ship(pretrained: PretrainedTiny, assets: Path = ASSETS) -> Path:
    """Copy a pre-trained entry into the package's assets (what the maintainers ship).

    Parameters
    ----------
    pretrained : PretrainedTiny
        An entry made by ``pretrained_tiny_blip`` (its ``.safetensors`` and ``.json``).
    assets : Path
        The destination (default: ``aurora_pet/assets``).

    Returns
    -------
    Path
        The shipped ``.safetensors`` file.
    """
    assets.mkdir(parents=True, exist_ok=True)
    stem = pretrained.checkpoint.stem
    shutil.copy2(pretrained.checkpoint, assets / f"{stem}.safetensors")
    shutil.copy2(pretrained.checkpoint.with_suffix(".json"), assets / f"{stem}.json")
    return assets / f"{stem}.safetensors"


def _settings_hash(arch: str, model: Mapping[str, Any], pretrain: Mapping[str, Any]) -> str:
    """The entry's key. The payload's form is what names the shipped LAVIS asset: keep it."""
    payload = json.dumps({"arch": arch, "model": model, "pretrain": pretrain}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _load_entry(arch: str, directory: Path, name: str, source: str) -> PretrainedTiny | None:
    meta_file, weights = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not (meta_file.is_file() and weights.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    return PretrainedTiny(arch, weights, meta["model"], meta["metrics"], meta.get("seconds", 0.0), source)


def _initial_checkpoint(arch: str, path: Path, pretrain: Mapping[str, Any]) -> Path:
    """The initialisation pre-training starts from, as a checkpoint file: random, drawn from a forked RNG
    seeded with the run's seed, so it is reproducible and the caller's global RNG is left as it was; then the
    modules of ``pretrain["init_from"]`` (if any) copied from that architecture's pre-trained entry.

    LAVIS initialises ViT linears with std 0.02, which for a from-scratch 64-wide ViT leaves the class
    token almost independent of the image; contrastive training then collapses to a constant embedding.
    A larger std (``PRETRAIN["init_std"]``) lets the class token see the image from the first step. (VQA's
    pre-training copies its vision encoder from the retrieval model instead: ``VQA_PRETRAIN["init_from"]``.)
    """
    from lavis.models.base_model import MomentumDistilationMixin

    from ..families.lavis.build import ARCHITECTURES, build_blip

    settings = {k: v for k, v in _family(arch).model.items() if k != "size"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(pretrain["run"]["seed"]))
        model = build_blip(arch, ARCHITECTURES[arch][0], size="tiny", **settings)
    if "init_std" in pretrain:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in model.visual_encoder.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, pretrain["init_std"], generator=generator)
    if "init_from" in pretrain:
        source = pretrained_tiny_blip(pretrain["init_from"]["arch"]).build()
        _copy_from(model, source, pretrain["init_from"]["modules"])
    if isinstance(model, MomentumDistilationMixin):  # retrieval: momentum encoders start as online copies
        model.copy_params()
    _save_full(model, path)
    return path


def _copy_from(model: nn.Module, source: nn.Module, modules: list[str]) -> None:
    """Every tensor of `model`'s `modules` from the same names in `source` (shapes must agree)."""
    theirs = source.state_dict()
    state = {name: theirs[name] for name in model.state_dict() if name.split(".")[0] in modules}
    if not state or any(theirs[name].shape != model.state_dict()[name].shape for name in state):
        raise ValueError(f"{type(source).__name__} has no tensors of {modules} that fit {type(model).__name__}")
    model.load_state_dict(state, strict=False)


def _save_full(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    base = model.base_model if isinstance(model, AuroraModel) else model
    save_model(base, str(path))
