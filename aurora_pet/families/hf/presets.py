"""Presets for Hugging Face transformers BLIP and BLIP-2: regexes over transformers' module names (data only).

BLIP's text side has LAVIS's names (`text_encoder.encoder.layer.{i}.crossattention.self.query`, ...); its
vision side differs (`vision_model.encoder.layers.{i}.self_attn.qkv|projection`, `mlp.fc1|fc2`).
BLIP-2's Q-Former names its attentions `attention.attention.{query,key,value}` and `attention.output.dense`;
its cross-attention keys and values read the 1408-wide vision features (a width class of their own, see
`aurora_pet.factors`). ICE and GQT are off in the BLIP-2
presets: the Q-Former's cross-attention is entered by 32 learned queries, not by text, so the method's
fusion modules have no text features there.
"""

from __future__ import annotations

from ..base import Preset
from ..blip_presets import blip_presets

_VIT = r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(qkv|projection)|mlp\.(fc1|fc2))"

_QFORMER = r"qformer\.encoder\.layer\.\d+"
_QFORMER_PARTS = r"(attention\.(query|key|value)|output\.dense)"


def blip2_presets(architecture: str) -> list[Preset]:
    common = dict(architecture=architecture, fusion_modules=None, ice=False, gqt=False)
    return [
        Preset(name=f"{architecture}/cross-attention",
               target_modules=rf"{_QFORMER}\.crossattention\.{_QFORMER_PARTS}",
               description="q, k, v, o of every Q-Former cross-attention (k, v read 1408-wide features)", **common),
        Preset(name=f"{architecture}/qformer",
               target_modules=rf"{_QFORMER}\.(attention|crossattention)\.{_QFORMER_PARTS}",
               description="q, k, v, o of every Q-Former self- and cross-attention", **common),
        Preset(name=f"{architecture}/qformer+lm",
               target_modules=rf"{_QFORMER}\.(attention|crossattention)\.{_QFORMER_PARTS}"
                              r"|language_model\..*\.(q_proj|v_proj)",
               description="the Q-Former's attentions + the language model's q and v projections", **common),
    ]


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        blip_presets("hf_blip_retrieval", r"text_encoder\.encoder", _VIT, ("itm_head", "vision_proj", "text_proj"))
        + blip_presets("hf_blip_vqa", r"(text_encoder\.encoder|text_decoder\.bert\.encoder)", _VIT, ())
        + blip_presets("hf_blip_captioning", r"text_decoder\.bert\.encoder", _VIT, ())
        + blip2_presets("hf_blip2")
    )
}
