"""Named target presets for LAVIS BLIP models: which linears to adapt, where ICE/GQT sit, which heads train.

A preset is plain data (regexes over LAVIS module names), so using one does not import LAVIS. Names are
"<architecture>/<preset>", e.g. "blip_retrieval/cross-attention". Each preset lists modules its
architecture must have, so a preset applied to the wrong model fails with a clear error instead of
silently adapting a different set of layers.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import AuroraConfigError, TargetError

_Q_K_V = r"self\.(query|key|value)"
_Q_K_V_O = r"(self\.(query|key|value)|output\.dense)"
_VIT = r"visual_encoder\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str
    target_modules: str
    fusion_modules: str
    required_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=lambda: {"ice": True, "gqt": True})

    def config_fields(self) -> dict[str, Any]:
        return {"target_modules": self.name, "fusion_modules": self.fusion_modules,
                "modules_to_save": list(self.modules_to_save), **self.defaults}

    def check_architecture(self, model: nn.Module) -> None:
        names = {name for name, _ in model.named_children()}
        missing = [m for m in self.required_modules if m not in names]
        if missing:
            raise TargetError(
                f"preset {self.name!r} is for LAVIS {self.architecture} models, but this model has no "
                f"{', '.join(repr(m) for m in missing)} (top-level modules: {', '.join(sorted(names))})")


def _text_layers(stacks: str, parts: str, attention: str) -> str:
    return rf"{stacks}\.layer\.\d+\.{attention}\.{parts}"


def _blip_presets(architecture: str, stacks: str, required: tuple[str, ...], heads: tuple[str, ...]) -> list[Preset]:
    fusion = rf"{stacks}\.layer\.\d+\.crossattention"
    common = dict(architecture=architecture, fusion_modules=fusion, required_modules=required, modules_to_save=heads)
    return [
        Preset(name=f"{architecture}/cross-attention",
               target_modules=_text_layers(stacks, _Q_K_V_O, "crossattention"),
               description="q, k, v, o of every text cross-attention (the default)", **common),
        Preset(name=f"{architecture}/text-attention",
               target_modules=_text_layers(stacks, _Q_K_V_O, "(attention|crossattention)"),
               description="q, k, v, o of every text self- and cross-attention", **common),
        Preset(name=f"{architecture}/reference",
               target_modules=rf"{_VIT}|{_text_layers(stacks, _Q_K_V, '(attention|crossattention)')}",
               description="what the method's public code adapts: ViT qkv/proj/fc1/fc2 + text q, k, v",
               **common),
    ]


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _blip_presets("blip_retrieval", r"text_encoder\.encoder", ("visual_encoder", "text_encoder", "itm_head"),
                      ("itm_head", "vision_proj", "text_proj"))
        + _blip_presets("blip_vqa", r"(text_encoder\.encoder|text_decoder\.bert\.encoder)",
                        ("visual_encoder", "text_encoder", "text_decoder"), ())
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, 3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise AuroraConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
