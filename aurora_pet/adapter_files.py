"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, written atomically, read with checks.

The safetensors header carries, beside the tensors:
- `sha256`: a SHA-256 of the tensors, so flipped bytes are caught as well as a truncated file;
- `layout`: the model layout (d, targets, slice offsets, fusion sites), so an adapter loaded into a
  different model is refused with the differences named, before any weight is touched;
- `config` and `config_sha256` (format version 2): the canonical JSON of the config the adapter was saved
  with and its SHA-256, so an `adapter_config.json` edited after saving (a changed `scale` changes every
  update) or taken from another save is refused, with the fields that differ named.

Versions read: 2 (written now) and 1 (written before the config was covered). A version-1 file still
loads, with its tensors checked by their SHA-256 as before, but its `adapter_config.json` cannot be
checked (there is nothing to check it against): loading warns, and saving it again writes version 2.
A file of any other version is refused, naming the file and both versions.

Adapters saved through PEFT (`AuroraPeftConfig`, see `aurora_pet.integrations.peft`) are read too: PEFT's
`adapter_config.json` (with `"peft_type": "AURORA"`) and its keys (`base_model.aurora_adapters.<key>` for the
factors and ICE/GQT, `base_model.model.<head>.<tensor>` for the heads). PEFT writes no checksum and no
layout, so such a file is checked by its keys and shapes only, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_files
from .config import AuroraConfig
from .errors import AdapterFileError, AuroraConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", FORMAT_VERSION)
PEFT_TYPE = "AURORA"  # `peft_type` in the adapter_config.json of an adapter saved through PEFT
PEFT_ADAPTER_PREFIX = "base_model.aurora_adapters."  # PEFT's keys of the factors and ICE/GQT
PEFT_HEAD_PREFIX = "base_model.model."  # PEFT's keys of the heads (modules_to_save)


class SavedAdapter(NamedTuple):
    """An adapter read from disk and checked on its own (format, config, checksum); `check_fits` then
    checks it against a model. `file` is the weights file, named in errors."""

    config: AuroraConfig
    tensors: dict[str, torch.Tensor]
    layout: dict[str, Any] | None  # None: saved through PEFT, which records no layout
    file: Path
    momentum_omitted: bool = False  # an inference export: the momentum factors restart as a copy


def save_adapter(path: str | Path, config: AuroraConfig, tensors: dict[str, torch.Tensor],
                 layout: dict[str, Any], *, momentum_omitted: bool = False) -> Path:
    """Write both files; both are written before either replaces its predecessor (see `atomic_files`).
    `momentum_omitted` marks an export without the momentum factors (they restart as a copy on load)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    canonical = _canonical_config(config)
    metadata = {"format": "aurora-pet", "format_version": FORMAT_VERSION, "layout": json.dumps(layout),
                "sha256": _digest(cpu), "config": canonical, "config_sha256": _text_digest(canonical),
                "momentum_factors": "omitted" if momentum_omitted else "saved"}
    with atomic_files([path / WEIGHTS_NAME, path / CONFIG_NAME]) as (weights, config_file):
        save_file(cpu, str(weights), metadata=metadata)
        config_file.write_text(config.to_json() + "\n", encoding="utf-8")
    return path


def load_adapter_config(path: str | Path) -> AuroraConfig:
    """The config file alone, parsed and validated (`read_adapter` also checks it against the weights)."""
    file = _existing(Path(path) / CONFIG_NAME)
    try:
        return AuroraConfig.from_json_file(file)
    except AuroraConfigError as error:
        raise AdapterFileError(f"{file}: {error}") from None


def read_adapter(path: str | Path) -> SavedAdapter:
    """Both files, read and checked without a model: the format version, the config against the copy saved
    with the weights, and the tensors' checksum."""
    if _saved_through_peft(path):
        return _read_peft_saved(path)
    config = load_adapter_config(path)
    file = _existing(Path(path) / WEIGHTS_NAME)
    tensors, metadata = _read_weights(file)
    version = _check_version(file, metadata)
    if version == "1":
        warnings.warn(f"{file}: format version 1 (written before adapter configs were checksummed); "
                      f"{CONFIG_NAME} is loaded unchecked. Save the adapter again to write version "
                      f"{FORMAT_VERSION}", UserWarning, stacklevel=3)
    else:
        _check_config(file, metadata, config)
    if metadata.get("sha256") != _digest(tensors):
        raise AdapterFileError(f"{file}: checksum mismatch, the adapter weights are corrupted")
    return SavedAdapter(config, tensors, json.loads(metadata["layout"]), file,
                        momentum_omitted=metadata.get("momentum_factors") == "omitted")


def check_fits(adapter: SavedAdapter, config: AuroraConfig, layout: dict[str, Any],
               expected: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter that does not fit a model: another layout, scale, key set or shape."""
    file = adapter.file
    if adapter.layout is not None:
        _check_layout(file, adapter.layout, layout)
    if adapter.config.scale != config.scale:
        raise AdapterFileError(f"{file} was saved with scale {adapter.config.scale}, but this model's adapter "
                               f"uses scale {config.scale}: the loaded update would be scaled differently")
    tensors = adapter.tensors
    if adapter.momentum_omitted:  # restored from the online factors by the loader
        expected = {k: v for k, v in expected.items() if not k.startswith("factors_m.")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise AdapterFileError(f"{file} does not fit this model: " + "; ".join(
            part for part in (_listing("missing keys", missing), _listing("unexpected keys", unexpected),
                              _listing("shape mismatches", wrong_shape), _momentum_hint(missing, unexpected))
            if part))


def peft_key(key: str) -> str:
    """The key PEFT gives one of our adapter tensors (`factors.U`, `heads.itm_head.weight`, ...)."""
    if key.startswith("heads."):
        return PEFT_HEAD_PREFIX + key.removeprefix("heads.")
    return PEFT_ADAPTER_PREFIX + key


def key_from_peft(key: str, file: Path) -> str:
    """Ours for a key PEFT wrote (the inverse of `peft_key`)."""
    if key.startswith(PEFT_ADAPTER_PREFIX):
        return key.removeprefix(PEFT_ADAPTER_PREFIX)
    if key.startswith(PEFT_HEAD_PREFIX):
        return "heads." + key.removeprefix(PEFT_HEAD_PREFIX)
    raise AdapterFileError(f"{file}: key {key!r} is neither an Aurora tensor ({PEFT_ADAPTER_PREFIX}…) nor a "
                           f"head ({PEFT_HEAD_PREFIX}…)")


def _saved_through_peft(path: str | Path) -> bool:
    file = Path(path) / CONFIG_NAME
    try:
        return "peft_type" in json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False  # missing or unreadable: load_adapter_config names the problem


def _read_peft_saved(path: str | Path) -> SavedAdapter:
    """An adapter saved through PEFT: its config's Aurora fields, its tensors under our keys."""
    config_file = Path(path) / CONFIG_NAME
    data = json.loads(config_file.read_text(encoding="utf-8"))
    if data["peft_type"] != PEFT_TYPE:
        raise AdapterFileError(f"{config_file}: a PEFT {data['peft_type']} adapter, not an Aurora one")
    fields = {f.name for f in dataclasses.fields(AuroraConfig)}
    try:
        config = AuroraConfig.from_dict({k: v for k, v in data.items() if k in fields})
    except AuroraConfigError as error:
        raise AdapterFileError(f"{config_file}: {error}") from None
    file = _existing(Path(path) / WEIGHTS_NAME)
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{file}: cannot read adapter weights, the file is truncated or corrupted "
                               f"({error})") from None
    warnings.warn(f"{file} was saved through PEFT, which records no checksum and no layout: it is checked by its "
                  "keys and shapes only", UserWarning, stacklevel=3)
    return SavedAdapter(config, {key_from_peft(k, file): v for k, v in tensors.items()}, None, file)


def _read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header's aurora-pet metadata."""
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
    return tensors, metadata


def _check_version(file: Path, metadata: dict[str, str]) -> str:
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise AdapterFileError(f"{file}: adapter format version {version!r} is not supported; this aurora-pet "
                               f"reads versions {', '.join(READABLE_VERSIONS)} (a newer aurora-pet wrote it?)")
    return version


def _check_config(file: Path, metadata: dict[str, str], config: AuroraConfig) -> None:
    """The config file must equal the config saved in the weights' header, field by field."""
    saved_text = metadata.get("config")
    if saved_text is None or _text_digest(saved_text) != metadata.get("config_sha256"):
        raise AdapterFileError(f"{file}: the copy of the config in its header is missing or corrupted")
    try:
        saved = AuroraConfig.from_json(saved_text, source=f"{file} (config in the header)").to_dict()
    except AuroraConfigError as error:
        raise AdapterFileError(str(error)) from None
    current = config.to_dict()
    differences = [f"{key}: {current[key]!r} in {CONFIG_NAME}, {saved[key]!r} when saved"
                   for key in sorted(current) if current[key] != saved[key]]
    if differences:
        raise AdapterFileError(f"{file.parent / CONFIG_NAME} does not match the config saved with {file} ("
                               + "; ".join(differences) + "): it was edited after saving or comes from another "
                               "save; restore it, or save the adapter again from a model with the config you want")


def _momentum_hint(missing: list[str], unexpected: list[str]) -> str:
    """Momentum factors on one side only: the adapter and the model disagree about momentum encoders."""
    if any(k.startswith("factors_m.") for k in unexpected):
        return ("the file holds momentum factors (factors_m.*) but this model has no momentum copies of its "
                "targets: pass momentum_pairs=[(online, momentum), ...] as when it was saved")
    if any(k.startswith("factors_m.") for k in missing):
        return ("this model has momentum copies of its targets but the file holds no momentum factors "
                "(factors_m.*): it was saved from a model without momentum pairs")
    return ""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _canonical_config(config: AuroraConfig) -> str:
    """The config as compact JSON with sorted keys: the same text for equal configs."""
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
