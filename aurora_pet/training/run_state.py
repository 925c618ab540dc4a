"""Run checkpoints: one directory per epoch plus ``best``, each committed atomically, and ``latest.json``.

Layout under the run's output directory::

    run.lock    held (flock) by the run writing here: pid, host and start time of the holder
    checkpoints/
      epoch_0/  adapter_config.json  adapter_model.safetensors   (AuroraModel.save_pretrained)
                training_state.pt        optimizer, scaler, epoch, every rank's RNG, best metric, history,
                                         the configuration fingerprint (small); written when the epoch's
                                         training ends, before it is evaluated
                evaluated_state.pt       added once the epoch is evaluated: best metric, history with the
                                         epoch's metrics, every rank's RNG after the evaluation
                resume_state.safetensors what else training changes and resuming needs to be exact:
                                         BLIP's momentum encoders and feature queues (latest epoch only)
                checksums.json           SHA-256 of every file above, checked before a file is read back
      best/     the adapter with the best validation metric, and its metrics
      latest.json  {"epoch": 1, "dir": "epoch_1"}

A checkpoint directory is written under a temporary name and renamed into place; ``latest.json`` is
replaced (temporary file + rename) only after that, so a crash at any point leaves ``latest`` naming a
complete checkpoint. ``evaluated_state.pt`` counts only once ``checksums.json`` lists it: a run resumed
from an epoch that was trained but not (completely) evaluated evaluates it first. Without an ``aurora:``
section (full fine-tuning) ``model.safetensors`` holds the trainable weights instead of the adapter files.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter_files import CONFIG_NAME, WEIGHTS_NAME, load_adapter_config
from ..atomic import atomic_directory, atomic_file, atomic_text, remove_temporaries
from ..errors import AuroraError
from ..model import AuroraModel
from .recipe import RecipeError

log = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
EVALUATED_NAME = "evaluated_state.pt"
RESUME_NAME = "resume_state.safetensors"
CHECKSUMS_NAME = "checksums.json"
TRAINING_FILES = (STATE_NAME, EVALUATED_NAME, RESUME_NAME, CHECKSUMS_NAME)  # not part of the trained weights
FULL_WEIGHTS_NAME = "model.safetensors"
LATEST = "latest.json"
LOCK_NAME = "run.lock"
STATE_FORMAT = "aurora-pet-training-state"
STATE_VERSION = 2  # 2: checksums, and the state written before the epoch's evaluation


class ResumeError(AuroraError, ValueError):
    """A checkpoint that cannot be resumed: missing, damaged, or made with another configuration."""


class CheckpointStore:
    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"

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
        """Run ``write(tmp_dir)``, record the checksums of what it wrote, and rename the directory to ``name``,
        replacing any previous one."""
        def write_with_checksums(directory: Path) -> None:
            write(directory)
            _write_checksums(directory, {f.name: file_sha256(f) for f in sorted(directory.iterdir()) if f.is_file()})

        return atomic_directory(self.root / name, write_with_checksums)

    def set_latest(self, directory: Path, epoch: int) -> None:
        atomic_text(self.root / LATEST, json.dumps({"epoch": epoch, "dir": directory.name}))

    def prune_resume_states(self, keep: Path) -> None:
        """Drop the (large) resume state from every epoch directory but ``keep``."""
        for directory in self.root.glob("epoch_*"):
            if directory != keep:
                (directory / RESUME_NAME).unlink(missing_ok=True)

    def export(self, source: Path, destination: Path) -> Path:
        """The trained weights of checkpoint ``source`` (not its training files) as a directory of their own,
        written atomically: what a finished run leaves as its result (``<output_dir>/adapter``)."""
        def copy_weights(tmp: Path) -> None:
            for file in source.iterdir():
                if file.name not in TRAINING_FILES:
                    shutil.copy2(file, tmp / file.name)

        return atomic_directory(destination, copy_weights)

    def clean_temporaries(self) -> list[Path]:
        """Remove what interrupted atomic writes left in the output directory, the checkpoints and each
        checkpoint (never a committed file); only safe while this run holds the output directory's lock."""
        directories = [self.output_dir, self.root, *(d for d in sorted(self.root.glob("*")) if d.is_dir())]
        leftovers = [p for directory in directories for p in remove_temporaries(directory)]
        if leftovers:
            log.info("removed %d leftover(s) of interrupted writes: %s", len(leftovers), ", ".join(map(str, leftovers)))
        return leftovers


# -- the output directory's lock -------------------------------------------------------------------

@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``<output_dir>/run.lock`` while a run writes there: a second run stops, naming the holder, instead
    of overwriting the first one's checkpoints. The kernel drops an ``flock`` when its process ends, however it
    ends, so the lock of a killed run is simply taken over; the file's content only names the holder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    file = output_dir / LOCK_NAME
    with open(file, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                log.warning("cannot lock %s (%s): nothing stops a second run in this directory", file, error)
                yield
                return
            handle.seek(0)
            raise RecipeError(f"run.output_dir {output_dir} is in use by another run ({_holder(handle.read())}, "
                              f"lock {file}); wait for it to end, or set run.output_dir to another directory") from None
        handle.truncate(0)
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)  # released: no holder to name (closing the file drops the lock)


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


# -- checksums -------------------------------------------------------------------------------------

def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(directory: Path, checksums: dict[str, str]) -> None:
    atomic_text(directory / CHECKSUMS_NAME, json.dumps(checksums, indent=2, sort_keys=True) + "\n")


def read_checksums(directory: Path) -> dict[str, str]:
    file = directory / CHECKSUMS_NAME
    if not file.is_file():
        raise ResumeError(f"{file} not found: {directory} is incomplete, or was written by an aurora-pet without "
                          "checksums; resume it with that version or start a new run")
    try:
        checksums = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise ResumeError(f"{file} is damaged ({error})") from None
    if not isinstance(checksums, dict):
        raise ResumeError(f"{file} is damaged (expected a JSON object of file names and SHA-256 digests)")
    return checksums


def verified(file: Path, checksums: dict[str, str]) -> Path:
    """``file``, once its SHA-256 is the one recorded when it was written (a flipped or lost byte is named)."""
    expected = checksums.get(file.name)
    if expected is None:
        raise ResumeError(f"{file}: {file.parent / CHECKSUMS_NAME} holds no checksum for it")
    actual = file_sha256(file)
    if actual != expected:
        raise ResumeError(f"{file} is damaged: its SHA-256 is {actual}, not {expected} as written (the file was "
                          "truncated or changed since); resume from an earlier checkpoint with "
                          "run.resume_ckpt_path=<output_dir>/checkpoints/epoch_N, or start a new run")
    return file


# -- weights ---------------------------------------------------------------------------------------

def save_weights(model: nn.Module, directory: Path) -> None:
    """The adapter (``save_pretrained``) or, for full fine-tuning, every trainable weight."""
    if isinstance(model, AuroraModel):
        model.save_pretrained(directory)
    else:
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(directory / FULL_WEIGHTS_NAME))


def load_weights(model: nn.Module, directory: Path) -> None:
    """A checkpoint's weights; an adapter file checks its own digest, ``model.safetensors`` is checked here."""
    if isinstance(model, AuroraModel):
        model.load_adapter(directory)
        return
    file = directory / FULL_WEIGHTS_NAME
    if not file.is_file():
        raise ResumeError(f"{directory} holds no {FULL_WEIGHTS_NAME} (was it written by an Aurora run? "
                          "this recipe has no aurora: section)")
    tensors = _read_safetensors(verified(file, read_checksums(directory)))
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
    saved = _read_safetensors(verified(file, read_checksums(directory)))
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


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ResumeError(f"cannot read {file}: {error}") from None


# -- training state --------------------------------------------------------------------------------

def save_state(directory: Path, state: dict[str, Any]) -> None:
    _write_state(directory / STATE_NAME, state)


def _write_state(file: Path, state: dict[str, Any]) -> None:
    torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, file)


def add_evaluation(directory: Path, state: dict[str, Any]) -> None:
    """Add an evaluated epoch's state to its committed checkpoint: the file, then the checksums that list it
    (one atomic rename each), so until both are in place the checkpoint reads as trained, not evaluated."""
    atomic_file(directory / EVALUATED_NAME, lambda tmp: _write_state(tmp, state))
    checksums = read_checksums(directory)
    checksums[EVALUATED_NAME] = file_sha256(directory / EVALUATED_NAME)
    _write_checksums(directory, checksums)


def load_state(directory: Path) -> dict[str, Any]:
    """The training state, updated by the evaluated state when the epoch's evaluation finished
    (``state["evaluated"]``); each file is checked against its checksum first."""
    file = directory / STATE_NAME
    if not file.is_file():
        raise ResumeError(f"{file} not found: {directory} is not a complete training checkpoint")
    checksums = read_checksums(directory)
    state = _read_state(verified(file, checksums))
    state["evaluated"] = EVALUATED_NAME in checksums
    if state["evaluated"]:
        state.update(_read_state(verified(directory / EVALUATED_NAME, checksums)))
    return state


def _read_state(file: Path) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise ResumeError(f"cannot read {file}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{file} is not an aurora-pet training state")
    if state.get("version") != STATE_VERSION:
        raise ResumeError(f"{file} has format version {state.get('version')}, this aurora-pet reads "
                          f"{STATE_VERSION}; resume it with the version that wrote it, or start a new run")
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
    try:
        saved = load_adapter_config(directory).to_dict()
    except UnicodeDecodeError as error:
        raise ResumeError(f"aurora.adapter: {directory / CONFIG_NAME} is not UTF-8 text ({error}); "
                          "save_pretrained writes it as UTF-8 JSON") from None
    differences = config_differences({"aurora": saved}, {"aurora": current})
    if differences:
        raise ResumeError(f"the adapter {directory} was saved with other aurora settings: " + "; ".join(differences))


# -- claiming a run's output directory ------------------------------------------------------------

def claim_output_dir(recipe: Any, output_dir: Path, resume: bool, held: contextlib.ExitStack) -> Path | None:
    """Lock the output directory for the run (released when ``held`` closes), remove what interrupted writes
    left there (safe only under the lock), and return the checkpoint to resume from (main process only).

    Parameters
    ----------
    recipe : Recipe or HFRecipe
        The run's recipe: its ``run_cfg`` (``resume_ckpt_path``, ``evaluate``) and ``fingerprint()``.
    output_dir : Path
        The run's ``run.output_dir``.
    resume : bool
        ``--resume``: continue from the latest checkpoint there.
    held : contextlib.ExitStack
        Holds the lock until the run ends.

    Returns
    -------
    Path or None
        The checkpoint directory to resume from, checked (intact, same configuration); None to start anew.
    """
    held.enter_context(output_lock(output_dir))
    CheckpointStore(output_dir).clean_temporaries()
    return resume_source(recipe, output_dir, resume)


def resume_source(recipe: Any, output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuses to start over a run that has checkpoints (nothing is lost)."""
    store = CheckpointStore(output_dir)
    explicit = recipe.run_cfg.get("resume_ckpt_path")
    if explicit:
        source = Path(str(explicit))
        if not source.is_dir():
            raise RecipeError(f"run.resume_ckpt_path={source}: expected an aurora-pet checkpoint directory "
                              "(<output_dir>/checkpoints/epoch_N); LAVIS's checkpoint_*.pth files hold no adapter")
    elif resume:
        source = store.latest()
        if source is None:
            print(f"--resume: no checkpoint in {store.root} yet; starting from the beginning")
            return None
    else:
        if store.latest() is not None and not recipe.run_cfg.get("evaluate", False):
            raise RecipeError(f"{output_dir} already holds a run (checkpoints up to {store.latest().name}); "
                              "pass --resume to continue it, or set run.output_dir to a new directory")
        return None
    state = load_state(source)  # check before anything runs: intact, same configuration
    check_fingerprint(source, state.get("fingerprint"), recipe.fingerprint())
    return source
