"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, written atomically, read with checks.

The safetensors header also carries the model layout (d, targets, slice offsets, fusion sites), so an
adapter loaded into a different model is refused with the differences named, before any weight is
touched, and a SHA-256 of the tensors, so flipped bytes are caught as well as a truncated file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_files
from .config import AuroraConfig
from .errors import AdapterFileError, AuroraConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = "1"


def save_adapter(path: str | Path, config: AuroraConfig, tensors: dict[str, torch.Tensor],
                 layout: dict[str, Any]) -> Path:
    """Write both files; both are written before either replaces its predecessor (see `atomic_files`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": "aurora-pet", "format_version": FORMAT_VERSION, "layout": json.dumps(layout),
                "sha256": _digest(cpu)}
    with atomic_files([path / WEIGHTS_NAME, path / CONFIG_NAME]) as (weights, config_file):
        save_file(cpu, str(weights), metadata=metadata)
        config_file.write_text(config.to_json() + "\n", encoding="utf-8")
    return path


def load_adapter_config(path: str | Path) -> AuroraConfig:
    file = _existing(Path(path) / CONFIG_NAME)
    try:
        return AuroraConfig.from_json_file(file)
    except AuroraConfigError as error:
        raise AdapterFileError(f"{file}: {error}") from None


def load_adapter_tensors(path: str | Path, layout: dict[str, Any],
                         expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved tensors, after checking the layout, the key set and every shape against this model."""
    file = _existing(Path(path) / WEIGHTS_NAME)
    try:
        tensors = load_file(file)
        with open(file, "rb") as handle:  # the header: 8-byte length, then JSON with __metadata__
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{file}: cannot read adapter weights, the file is truncated or corrupted "
                               f"({error})") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != "aurora-pet":
        raise AdapterFileError(f"{file}: not an aurora-pet adapter file (no aurora-pet metadata)")
    if metadata.get("sha256") != _digest(tensors):
        raise AdapterFileError(f"{file}: checksum mismatch, the adapter weights are corrupted")
    _check_layout(file, json.loads(metadata["layout"]), layout)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise AdapterFileError(f"{file} does not fit this model: " + "; ".join(
            part for part in (_listing("missing keys", missing), _listing("unexpected keys", unexpected),
                              _listing("shape mismatches", wrong_shape)) if part))
    return tensors


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_layout(file: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    problems = []
    if saved["slice_size"] != current["slice_size"]:
        problems.append(f"slice size d: file {saved['slice_size']} vs model {current['slice_size']}")
    saved_targets = {t[0]: tuple(t[1:]) for t in saved["targets"]}
    current_targets = {t[0]: tuple(t[1:]) for t in current["targets"]}
    problems.append(_listing("targets only in the file", sorted(set(saved_targets) - set(current_targets))))
    problems.append(_listing("targets only in the model", sorted(set(current_targets) - set(saved_targets))))
    problems.append(_listing("targets with other shapes or slice offsets (d_out, d_in, first slice)", [
        f"{n}: file {saved_targets[n]} vs model {current_targets[n]}"
        for n in sorted(set(saved_targets) & set(current_targets)) if saved_targets[n] != current_targets[n]]))
    if saved["fusion_sites"] != current["fusion_sites"]:
        problems.append(f"fusion sites differ: file {saved['fusion_sites'][:4]}… vs model {current['fusion_sites'][:4]}…")
    problems = [p for p in problems if p]
    if problems:
        raise AdapterFileError(f"{file} was saved for a different model: " + "; ".join(problems))


def _listing(label: str, items: list[str], limit: int = 8) -> str:
    if not items:
        return ""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{label}: {', '.join(items[:limit])}{more}"


def _existing(file: Path) -> Path:
    if not file.is_file():
        raise AdapterFileError(f"adapter file not found: {file}")
    return file
