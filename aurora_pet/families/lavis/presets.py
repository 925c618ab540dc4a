"""Presets for LAVIS BLIP (`blip_retrieval`, `blip_vqa`): regexes over LAVIS's module names (data only)."""

from __future__ import annotations

from ..base import Preset
from ..blip_presets import blip_presets

_VIT = r"visual_encoder\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        blip_presets("blip_retrieval", r"text_encoder\.encoder", _VIT, ("itm_head", "vision_proj", "text_proj"))
        + blip_presets("blip_vqa", r"(text_encoder\.encoder|text_decoder\.bert\.encoder)", _VIT, ())
    )
}
