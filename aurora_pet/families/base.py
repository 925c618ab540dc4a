"""What a model family supplies to the core: presets, how fusion sites read their inputs, momentum
pairs, and patches of third-party behaviour (each with its undo).

Everything here is plain data or plain Python: importing it never imports LAVIS or transformers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import AuroraConfigError, TargetError

if TYPE_CHECKING:  # pragma: no cover
    from ..model import AuroraModel

ArgsReader = Callable[[tuple[Any, ...], dict[str, Any]], Any]
Undo = Callable[[], None]


@dataclass(frozen=True)
class Preset:
    """A named choice of targets, fusion sites and heads for one architecture of one family.

    `name` is "<architecture>/<kind>"; a model's family also accepts the short "<kind>"."""

    name: str
    architecture: str
    target_modules: str
    fusion_modules: str | None
    modules_to_save: tuple[str, ...] = ()
    description: str = ""
    ice: bool = True
    gqt: bool = True

    @property
    def kind(self) -> str:
        return self.name.split("/", 1)[1]

    def config_fields(self) -> dict[str, Any]:
        """The `AuroraConfig` fields this preset sets."""
        return {"target_modules": self.name, "fusion_modules": self.fusion_modules,
                "modules_to_save": list(self.modules_to_save), "ice": self.ice, "gqt": self.gqt}


def hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The first input of an attention call, positional or by keyword (BERT's `hidden_states`)."""
    return args[0] if args else kwargs["hidden_states"]


def attention_mask(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The second input of a BERT-style attention or layer call, positional or by keyword."""
    return args[1] if len(args) > 1 else kwargs.get("attention_mask")


@dataclass(frozen=True)
class FusionInputs:
    """Where a fusion site finds the text features T and the text (self-attention) mask A.

    T is read from the site's own call. A is read from the call of `mask_module` (a module name; the
    site itself when it receives the text mask, its enclosing layer when it receives another mask),
    which runs before the site's output is produced."""

    mask_module: str
    read_mask: ArgsReader = attention_mask
    read_text: ArgsReader = hidden_states


class Family:
    """The family-specific half of wrapping a model. Subclasses override what differs.

    `presets` holds every preset of the family by full name; `architecture(model)` names the model's
    architecture (a key of the presets' `architecture`), or raises `TargetError`."""

    name: str = ""
    title: str = ""  # how messages name the family
    presets: Mapping[str, Preset] = {}
    default_kind: str = "cross-attention"
    # whether `build` works under `torch.device("meta")` (shapes only, no memory): what counting needs
    builds_on_meta: bool = False

    def architecture(self, model: nn.Module) -> str:
        raise NotImplementedError

    @property
    def architectures(self) -> list[str]:
        return sorted({preset.architecture for preset in self.presets.values()})

    def build(self, architecture: str, size: str = "base") -> nn.Module:
        """A model of `architecture` ("tiny" or "base" size) from its config, random weights, offline."""
        raise NotImplementedError

    def width(self, architecture: str, size: str = "base") -> int:
        """d, the slice size of the architecture's presets (checks the rank before anything is built)."""
        raise NotImplementedError

    def preset(self, model: nn.Module, name: str | None = None) -> Preset:
        """The preset `name` (full or short) for this model; its default preset when `name` is None."""
        arch = self.architecture(model)
        full = f"{arch}/{name or self.default_kind}" if name is None or "/" not in name else name
        if full not in self.presets:
            own = [n for n, p in self.presets.items() if p.architecture == arch]
            close = difflib.get_close_matches(full, own, 3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise AuroraConfigError(f"unknown preset {full!r}{hint}; presets for {self.title} {arch} models: "
                                    f"{', '.join(own)}")
        preset = self.presets[full]
        if preset.architecture != arch:
            raise TargetError(f"preset {full!r} is for {self.title} {preset.architecture} models, but this model "
                              f"is a {self.title} {arch} ({type(model).__name__}); use {arch}/{preset.kind}")
        return preset

    def fusion_inputs(self, model: nn.Module, site: str) -> FusionInputs:
        """Default: a BERT-style cross-attention that receives the text mask itself (LAVIS's med.py)."""
        return FusionInputs(mask_module=site)

    def momentum_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """(online, momentum) module-name prefixes whose momentum copy follows an EMA; none by default."""
        return []

    def momentum(self, model: nn.Module) -> float:
        return 0.995

    def patch(self, model: nn.Module, aurora: "AuroraModel") -> list[Undo]:
        """Changes to third-party behaviour the adapter needs, each returned as its undo; none by default."""
        return []


def set_attribute(obj: Any, name: str, value: Any) -> Undo:
    """Set `obj.name = value` and return the function that puts the original back exactly (an instance
    attribute that was absent is deleted again, so a class attribute shows through as before)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if had:
            setattr(obj, name, old)
        elif name in vars(obj):
            delattr(obj, name)

    return undo
