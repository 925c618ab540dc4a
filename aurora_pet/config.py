"""`AuroraConfig`: everything that defines an adapter, validated on construction, JSON round trip."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AuroraConfigError

CORES = ("cp", "tucker")
FORWARD_MODES = ("auto", "factored", "materialised")
DROPOUT_POSITIONS = ("input", "rank")


@dataclass
class AuroraConfig:
    """Configuration of a mode-approximation adapter.

    rank:            R, the CP rank shared by every slice (1 ≤ R ≤ d).
    target_modules:  which `nn.Linear` modules to adapt: a regex (full match on qualified names), a list
                     of name suffixes, or a preset name, full ("blip_retrieval/cross-attention") or short
                     ("cross-attention", the model's architecture's); None: the model family's default
                     preset (by the model's class, and `config.model_type` for transformers models).
    core:            "cp" (diag(λ), the method) or "tucker" (a dense R×R×R core, for comparison).
    scale:           s, the fixed multiplier of every update.
    dropout:         dropout probability of the adapter branch.
    dropout_position: "rank" (the default) drops entries of z = x·V (R wide instead of d: fewer random
                     numbers, and targets that read the same x share z); "input" drops entries of x before
                     x·V (LoRA's place, each target its own mask). See docs/method.md, "Dropout".
    ice, gqt:        Informative Context Enhancement / Gated Query Transformation at each fusion site.
    fusion_modules:  regex of the cross-attention modules that host ICE/GQT; None: the preset's sites
                     (the family's default preset's when the targets are a regex).
    modules_to_save: modules trained in full alongside the adapter (task heads), by name suffix; a string
                     is one name; None: the preset's heads when the targets come from a preset, else none.
    slice_size:      d; None infers it as the smallest dimension among the targets.
    forward_mode:    "auto" picks the cheaper of factored and materialised per call.
    init_seed:       seed of the factors' initialisation, independent of the global RNG.
    """

    rank: int = 64
    target_modules: str | list[str] | None = None
    core: str = "cp"
    scale: float = 1.0
    dropout: float = 0.1
    dropout_position: str = "rank"
    ice: bool = False
    gqt: bool = False
    fusion_modules: str | None = None
    modules_to_save: list[str] | None = None
    slice_size: int | None = None
    forward_mode: str = "auto"
    init_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, str):  # one name, not a list of its characters
            self.modules_to_save = [self.modules_to_save]
        elif isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range; the message names the field and the value."""
        _check(_is_int(self.rank) and self.rank > 0, f"rank must be a positive integer, got {self.rank!r}")
        _check(isinstance(self.core, str) and self.core in CORES, f"core must be one of {CORES}, got {self.core!r}")
        _check(_is_number(self.scale) and math.isfinite(self.scale),
               f"scale must be a finite number, got {self.scale!r}")
        _check(_is_number(self.dropout) and 0.0 <= self.dropout < 1.0,
               f"dropout must be a number in [0, 1), got {self.dropout!r}")
        _check(isinstance(self.dropout_position, str) and self.dropout_position in DROPOUT_POSITIONS,
               f"dropout_position must be one of {DROPOUT_POSITIONS}, got {self.dropout_position!r}")
        for name in ("ice", "gqt"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        _check(isinstance(self.forward_mode, str) and self.forward_mode in FORWARD_MODES,
               f"forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")
        _check(self.slice_size is None or (_is_int(self.slice_size) and self.slice_size > 0),
               f"slice_size must be a positive integer or None, got {self.slice_size!r}")
        _check(_is_int(self.init_seed), f"init_seed must be an integer, got {self.init_seed!r}")
        targets = self.target_modules
        if targets is None:
            pass
        elif isinstance(targets, str):
            _check(bool(targets), "target_modules must not be empty")
            _compile(targets, "target_modules")
        else:
            _check(isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets),
                   f"target_modules must be a regex, a preset name or a non-empty list of names, got {targets!r}")
        if self.fusion_modules is not None:
            _check(isinstance(self.fusion_modules, str) and bool(self.fusion_modules),
                   f"fusion_modules must be a regex or None, got {self.fusion_modules!r}")
            _compile(self.fusion_modules, "fusion_modules")
        _check(self.modules_to_save is None or (isinstance(self.modules_to_save, list)
                                                and all(isinstance(m, str) and m for m in self.modules_to_save)),
               f"modules_to_save must be a module name or a list of them, got {self.modules_to_save!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AuroraConfig":
        """A config from a preset, with any field overridden.

        A full name ("blip_retrieval/reference", see `aurora_pet.families.all_presets()`) sets the
        preset's targets, fusion sites, heads and ICE/GQT; a short name ("reference") is resolved against
        the model's architecture when the model is wrapped (ICE/GQT on, as in every BLIP preset)."""
        from .families import all_presets, get_preset

        if "/" in name:
            fields = get_preset(name).config_fields()
        else:
            kinds = sorted({preset.kind for preset in all_presets().values()})
            if name not in kinds:
                close = difflib.get_close_matches(name, kinds, 3)
                raise AuroraConfigError(f"unknown preset {name!r}" + (f" (did you mean {close}?)" if close else "")
                                        + f"; short preset names: {', '.join(kinds)}")
            fields = {"target_modules": name, "ice": True, "gqt": True}
        return cls(**{**fields, **overrides})

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AuroraConfigError(message)


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise AuroraConfigError(f"{what} is not a valid regex: {pattern!r} ({error})") from None
