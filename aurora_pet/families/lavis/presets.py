"""Presets for LAVIS BLIP (`blip_retrieval`, `blip_vqa`): regexes over LAVIS's module names (data only)."""

from __future__ import annotations

from ..base import Preset

_Q_K_V = r"self\.(query|key|value)"
_Q_K_V_O = r"(self\.(query|key|value)|output\.dense)"
_VIT = r"visual_encoder\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def _text_layers(stacks: str, parts: str, attention: str) -> str:
    return rf"{stacks}\.layer\.\d+\.{attention}\.{parts}"


def blip_presets(architecture: str, stacks: str, heads: tuple[str, ...]) -> list[Preset]:
    """cross-attention (the default), text-attention and reference for one LAVIS BLIP architecture."""
    common = dict(architecture=architecture, fusion_modules=rf"{stacks}\.layer\.\d+\.crossattention",
                  modules_to_save=heads)
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
        blip_presets("blip_retrieval", r"text_encoder\.encoder", ("itm_head", "vision_proj", "text_proj"))
        + blip_presets("blip_vqa", r"(text_encoder\.encoder|text_decoder\.bert\.encoder)", ())
    )
}
