"""`AuroraConfig`: everything that defines an adapter, validated on construction, JSON round trip."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AuroraConfigError

CORES = ("cp", "tucker")
FORWARD_MODES = ("auto", "factored", "materialised")


@dataclass
class AuroraConfig:
    """Configuration of a mode-approximation adapter.

    rank:            R, the CP rank shared by every slice (1 ≤ R ≤ d).
    target_modules:  which `nn.Linear` modules to adapt: a regex (full match on qualified names), a list
                     of name suffixes, or a preset name such as "blip_retrieval/cross-attention".
    core:            "cp" (diag(λ), the method) or "tucker" (a dense R×R×R core, for comparison).
    scale:           s, the fixed multiplier of every update.
    dropout:         dropout on the adapter branch's input.
    ice, gqt:        Informative Context Enhancement / Gated Query Transformation at each fusion site.
    fusion_modules:  regex of the cross-attention modules that host ICE/GQT; None means every module
                     whose name ends in "crossattention".
    modules_to_save: modules trained in full alongside the adapter (task heads), by name suffix.
    slice_size:      d; None infers it as the smallest dimension among the targets.
    forward_mode:    "auto" picks the cheaper of factored and materialised per call.
    init_seed:       seed of the factors' initialisation, independent of the global RNG.
    """

    rank: int = 64
    target_modules: str | list[str] = "blip_retrieval/cross-attention"
    core: str = "cp"
    scale: float = 1.0
    dropout: float = 0.1
    ice: bool = False
    gqt: bool = False
    fusion_modules: str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    slice_size: int | None = None
    forward_mode: str = "auto"
    init_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
               f"rank must be a positive integer, got {self.rank!r}")
        _check(self.core in CORES, f"core must be one of {CORES}, got {self.core!r}")
        _check(isinstance(self.scale, (int, float)) and math.isfinite(self.scale),
               f"scale must be a finite number, got {self.scale!r}")
        _check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
               f"dropout must be in [0, 1), got {self.dropout!r}")
        _check(self.forward_mode in FORWARD_MODES,
               f"forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")
        _check(self.slice_size is None or (isinstance(self.slice_size, int) and self.slice_size > 0),
               f"slice_size must be a positive integer or None, got {self.slice_size!r}")
        _check(isinstance(self.init_seed, int), f"init_seed must be an integer, got {self.init_seed!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            _check(bool(targets), "target_modules must not be empty")
            _compile(targets, "target_modules")
        else:
            _check(isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets),
                   f"target_modules must be a regex, a preset name or a non-empty list of names, got {targets!r}")
        if self.fusion_modules is not None:
            _compile(self.fusion_modules, "fusion_modules")
        _check(all(isinstance(m, str) and m for m in self.modules_to_save),
               f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AuroraConfig":
        """A config from a named preset (see `aurora_pet.presets`), with any field overridden."""
        from .presets import get_preset

        return cls(**{**get_preset(name).config_fields(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuroraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = [f"{key!r} (did you mean {difflib.get_close_matches(key, known, 1)[0]!r}?)"
                     if difflib.get_close_matches(key, known, 1) else repr(key) for key in unknown]
            raise AuroraConfigError(f"unknown AuroraConfig keys: {', '.join(hints)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "AuroraConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise AuroraConfigError(f"{source}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise AuroraConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "AuroraConfig":
        path = Path(path)
        if not path.is_file():
            raise AuroraConfigError(f"adapter config not found: {path}")
        return cls.from_json(path.read_text(), source=str(path))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AuroraConfigError(message)


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise AuroraConfigError(f"{what} is not a valid regex: {pattern!r} ({error})") from None
