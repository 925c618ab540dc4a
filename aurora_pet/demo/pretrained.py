"""The demo's source-domain model: a tiny BLIP pre-trained in full, shipped, cached or trained now.

Entries are a ``<name>.safetensors`` (the full state dict) and a ``<name>.json`` (settings, metrics),
named by a hash of every setting, so other settings never load a stale model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import AuroraModel
from ..training.data import write_recipe
from .recipe import ARCH, TINY_MODEL, demo_recipe, write_demo_data

# Source-domain pre-training (full fine-tuning from a random initialisation).
PRETRAIN: dict[str, Any] = {
    "data": {"n_train": 256, "n_val": 32, "n_test": 32, "seed": 0},
    "run": {"init_lr": 5e-4, "max_epoch": 48, "batch_size_train": 32, "batch_size_eval": 64, "k_test": 8,
            "valid_splits": [], "test_splits": ["test"], "seed": 42, "log_freq": 1000},
    "init_std": 0.2,  # ViT linear weights; see _initial_checkpoint
    "version": 1,
}
ASSETS = Path(__file__).parent.parent / "assets"


def default_cache_dir() -> Path:
    return Path(os.environ.get("AURORA_PET_CACHE", Path.home() / ".cache" / "aurora-pet"))


@dataclass
class PretrainedTiny:
    """A tiny BLIP pre-trained on the source domain: ``checkpoint`` (full state dict, safetensors) and the
    recipe ``model`` settings that rebuild its architecture; ``metrics`` are its source-domain test results;
    ``source`` says where it came from: "shipped" (package data), "cache" or "trained" (just now)."""

    arch: str
    checkpoint: Path
    model: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = "cache"

    def build(self) -> nn.Module:
        """The LAVIS model with these weights (strict loading). The random initialisation the checkpoint
        replaces draws from a forked RNG: the caller's global RNG is left as it was."""
        from ..families.lavis.build import ARCHITECTURES, build_blip

        settings = {k: v for k, v in self.model.items() if k not in ("size", "pretrained")}
        with torch.random.fork_rng(devices=[]):
            return build_blip(self.arch, ARCHITECTURES[self.arch][0], size=self.model.get("size", "tiny"),
                              checkpoint=self.checkpoint, **settings)


def pretrain_settings(epochs: int | None = None) -> dict[str, Any]:
    """``PRETRAIN`` with another number of epochs (a separate cache entry)."""
    settings = json.loads(json.dumps(PRETRAIN))
    if epochs is not None:
        settings["run"]["max_epoch"] = int(epochs)
    return settings


def pretrained_tiny_blip(arch: str = ARCH, cache_dir: str | Path | None = None, *, force: bool = False,
                         epochs: int | None = None, quiet: bool = True) -> PretrainedTiny:
    """The source-domain tiny BLIP for the demo and benchmarks.

    Looked up, in order: ``cache_dir`` (default ``$AURORA_PET_CACHE`` or ``~/.cache/aurora-pet``), then
    the weights shipped with the package (``aurora_pet/assets``, made by this function with the default
    settings); otherwise pre-trained from scratch (a few minutes on 2 CPU cores) with
    ``aurora_pet.training.train`` (``quiet`` as there) and cached. ``force`` pre-trains again; ``epochs``
    overrides the number of pre-training epochs (another cache entry). Entries are keyed by a hash of every
    setting."""
    if arch != ARCH:
        raise ValueError(f"pretrained_tiny_blip supports {ARCH!r} only, got {arch!r}")
    pretrain = pretrain_settings(epochs)
    name = f"tiny-{arch}-{_settings_hash(arch, pretrain)}"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force:
        found = _load_entry(arch, cache, name, "cache") or _load_entry(arch, ASSETS, name, "shipped")
        if found is not None:
            return found
    from ..training.trainer import train

    start = time.time()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=cache))
    try:
        written = write_demo_data(work / "data", "source", **pretrain["data"])
        init = _initial_checkpoint(arch, work / "init.safetensors", pretrain)
        recipe = demo_recipe(written, work / "run", pretrained=PretrainedTiny(arch, init, dict(TINY_MODEL)),
                             aurora=None, run=pretrain["run"])
        result = train(write_recipe(work / "pretrain.yaml", recipe), quiet=quiet)
        metrics = {k: v for k, v in (result.final or {}).items() if k != "epoch"}
        seconds = time.time() - start
        _save_full(result.model, work / f"{name}.safetensors")
        (work / f"{name}.json").write_text(json.dumps(
            {"arch": arch, "model": TINY_MODEL, "pretrain": pretrain, "metrics": metrics, "seconds": seconds},
            indent=2) + "\n")
        for suffix in (".safetensors", ".json"):  # weights first: an entry counts once its .json exists
            os.replace(work / f"{name}{suffix}", cache / f"{name}{suffix}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PretrainedTiny(arch, cache / f"{name}.safetensors", dict(TINY_MODEL), metrics, seconds, "trained")


def ship(pretrained: PretrainedTiny, assets: Path = ASSETS) -> Path:
    """Copy a pre-trained entry into the package's assets (what the maintainers ship)."""
    assets.mkdir(parents=True, exist_ok=True)
    stem = pretrained.checkpoint.stem
    shutil.copy2(pretrained.checkpoint, assets / f"{stem}.safetensors")
    shutil.copy2(pretrained.checkpoint.with_suffix(".json"), assets / f"{stem}.json")
    return assets / f"{stem}.safetensors"


def _settings_hash(arch: str, pretrain: Mapping[str, Any]) -> str:
    payload = json.dumps({"arch": arch, "model": TINY_MODEL, "pretrain": pretrain}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _load_entry(arch: str, directory: Path, name: str, source: str) -> PretrainedTiny | None:
    meta_file, weights = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not (meta_file.is_file() and weights.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    return PretrainedTiny(arch, weights, meta["model"], meta["metrics"], meta.get("seconds", 0.0), source)


def _initial_checkpoint(arch: str, path: Path, pretrain: Mapping[str, Any]) -> Path:
    """The random initialisation pre-training starts from, as a checkpoint file; drawn from a forked RNG
    seeded with the run's seed, so it is reproducible and the caller's global RNG is left as it was.

    LAVIS initialises ViT linears with std 0.02, which for a from-scratch 64-wide ViT leaves the class
    token almost independent of the image; contrastive training then collapses to a constant embedding.
    A larger std (``PRETRAIN["init_std"]``) lets the class token see the image from the first step.
    """
    from ..families.lavis.build import ARCHITECTURES, build_blip

    settings = {k: v for k, v in TINY_MODEL.items() if k != "size"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(pretrain["run"]["seed"]))
        model = build_blip(arch, ARCHITECTURES[arch][0], size="tiny", **settings)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.visual_encoder.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, pretrain["init_std"], generator=generator)
    model.copy_params()  # momentum encoders start as copies of the online ones
    _save_full(model, path)
    return path


def _save_full(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    base = model.base_model if isinstance(model, AuroraModel) else model
    save_model(base, str(path))
