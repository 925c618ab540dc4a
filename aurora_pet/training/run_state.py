"""Run checkpoints: one directory per epoch plus ``best``, each committed atomically, and ``latest.json``.

Layout under the run's output directory::

    checkpoints/
      epoch_0/  adapter_config.json  adapter_model.safetensors   (AuroraModel.save_pretrained)
                training_state.pt        optimizer, scaler, epoch, every rank's RNG, best metric, history,
                                         the configuration fingerprint (small)
                resume_state.safetensors what else training changes and resuming needs to be exact:
                                         BLIP's momentum encoders and feature queues (latest epoch only)
      best/     the adapter with the best validation metric, and its metrics
      latest.json  {"epoch": 1, "dir": "epoch_1"}

A checkpoint directory is written under a temporary name and renamed into place; ``latest.json`` is
replaced (temporary file + rename) only after that, so a crash at any point leaves ``latest`` naming a
complete checkpoint. Without an ``aurora:`` section (full fine-tuning) ``model.safetensors`` holds the
trainable weights instead of the adapter files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter_files import CONFIG_NAME, WEIGHTS_NAME, load_adapter_config
from ..atomic import atomic_directory, atomic_text, remove_temporaries
from ..errors import AuroraError
from ..model import AuroraModel

STATE_NAME = "training_state.pt"
RESUME_NAME = "resume_state.safetensors"
FULL_WEIGHTS_NAME = "model.safetensors"
LATEST = "latest.json"
STATE_FORMAT = "aurora-pet-training-state"
STATE_VERSION = 1


class ResumeError(AuroraError, ValueError):
    """A checkpoint that cannot be resumed: missing, damaged, or made with another configuration."""


class CheckpointStore:
    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir) / "checkpoints"

    # -- paths -----------------------------------------------------------------------------------
    def epoch_dir(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch}"

    @property
    def best_dir(self) -> Path:
        return self.root / "best"

    def latest(self) -> Path | None:
        """The directory ``latest.json`` names, or None when there is no committed checkpoint."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        try:
            info = json.loads(pointer.read_text())
            directory = self.root / info["dir"]
        except (ValueError, KeyError, TypeError) as error:
            raise ResumeError(f"{pointer} is damaged ({error}); remove it to start over") from None
        if not directory.is_dir():
            raise ResumeError(f"{pointer} names {directory}, which does not exist")
        return directory

    # -- writing ---------------------------------------------------------------------------------
    def commit(self, name: str, write: Callable[[Path], None]) -> Path:
        """Run ``write(tmp_dir)`` and rename the directory to ``name``, replacing any previous one."""
        return atomic_directory(self.root / name, write)

    def set_latest(self, directory: Path, epoch: int) -> None:
        atomic_text(self.root / LATEST, json.dumps({"epoch": epoch, "dir": directory.name}))

    def prune_resume_states(self, keep: Path) -> None:
        """Drop the (large) resume state from every epoch directory but ``keep``."""
        for directory in self.root.glob("epoch_*"):
            if directory != keep:
                (directory / RESUME_NAME).unlink(missing_ok=True)

    def clean_temporaries(self) -> None:
        """Remove what an interrupted commit left behind (never a committed checkpoint)."""
        remove_temporaries(self.root)


# -- weights ---------------------------------------------------------------------------------------

def save_weights(model: nn.Module, directory: Path) -> None:
    """The adapter (``save_pretrained``) or, for full fine-tuning, every trainable weight."""
    if isinstance(model, AuroraModel):
        model.save_pretrained(directory)
    else:
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(directory / FULL_WEIGHTS_NAME))


def load_weights(model: nn.Module, directory: Path) -> None:
    if isinstance(model, AuroraModel):
        model.load_adapter(directory)
        return
    file = directory / FULL_WEIGHTS_NAME
    if not file.is_file():
        raise ResumeError(f"{directory} holds no {FULL_WEIGHTS_NAME} (was it written by an Aurora run? "
                          "this recipe has no aurora: section)")
    tensors = load_file(str(file))
    own = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(tensors) & set(own) if tensors[k].shape != own[k].shape)
    if unknown or wrong:
        raise ResumeError(f"{file} does not fit this model: unknown {unknown[:5]}, other shapes {wrong[:5]}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


def resume_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model state training changes besides the trained weights: buffers (BLIP's feature queues)
    and the momentum encoders, which follow the online ones by an EMA (the model family's momentum pairs).
    The live tensors: copying into them restores the state."""
    from ..families import family_of

    base = model.base_model if isinstance(model, AuroraModel) else model
    family = family_of(base)
    tracking = [m for _, m in family.momentum_pairs(base)] if family else []
    state = {f"buffer.{n}": b for n, b in base.named_buffers()}
    state.update({f"momentum.{n}": p.data for n, p in base.named_parameters()
                  if any(n.startswith(prefix + ".") for prefix in tracking)})
    return state


def load_resume_tensors(model: nn.Module, directory: Path) -> bool:
    file = directory / RESUME_NAME
    if not file.is_file():
        return False
    saved = load_file(str(file))
    own = resume_tensors(model)
    missing = sorted(set(own) - set(saved))
    if missing or any(saved[k].shape != own[k].shape for k in own):
        raise ResumeError(f"{file} does not fit this model (missing {missing[:5]})")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(saved[key])
    return True


def save_resume_tensors(model: nn.Module, directory: Path) -> None:
    tensors = {k: v.detach().cpu().clone() for k, v in resume_tensors(model).items()}
    if tensors:
        save_file(tensors, str(directory / RESUME_NAME))


# -- training state --------------------------------------------------------------------------------

def save_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, directory / STATE_NAME)


def load_state(directory: Path) -> dict[str, Any]:
    file = directory / STATE_NAME
    if not file.is_file():
        raise ResumeError(f"{file} not found: {directory} is not a complete training checkpoint")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise ResumeError(f"cannot read {file}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{file} is not an aurora-pet training state")
    return state


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: checkpoint X vs recipe Y`` for every leaf that differs between two nested dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            label = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append(f"{label}: not in the checkpoint vs recipe {current[key]!r}")
            elif key not in current:
                out.append(f"{label}: checkpoint {saved[key]!r} vs not in the recipe")
            else:
                out += config_differences(saved[key], current[key], label)
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r} vs recipe {current!r}"]


def check_fingerprint(directory: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    differences = config_differences(saved, current)
    if differences:
        raise ResumeError(f"the checkpoint {directory} was made with another configuration; refusing to resume "
                          f"it with this recipe. Differences: " + "; ".join(differences)
                          + ". Use the original settings, or another run.output_dir to start a new run")


def check_adapter_config(directory: Path, current: dict[str, Any] | None) -> None:
    """An adapter directory (``aurora.adapter``) must have been saved with the recipe's aurora settings."""
    if current is None:
        raise ResumeError(f"aurora.adapter is {directory} but the recipe has no aurora: section")
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise ResumeError(f"{directory} is not an adapter directory ({CONFIG_NAME} + {WEIGHTS_NAME})")
    saved = load_adapter_config(directory).to_dict()
    differences = config_differences({"aurora": saved}, {"aurora": current})
    if differences:
        raise ResumeError(f"the adapter {directory} was saved with other aurora settings: " + "; ".join(differences))
