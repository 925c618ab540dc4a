"""BLIP's three presets, shared by both families: the text side has the same module names in LAVIS's
`med.py` and in transformers' BLIP text model (`<stack>.layer.{i}.crossattention.self.query`, ...); only the
stacks and the vision tower's names differ, and each family passes its own (data only)."""

from __future__ import annotations

from .base import Preset

_Q_K_V = r"self\.(query|key|value)"
_Q_K_V_O = r"(self\.(query|key|value)|output\.dense)"


def _text_layers(stacks: str, parts: str, attention: str) -> str:
    return rf"{stacks}\.layer\.\d+\.{attention}\.{parts}"


def blip_presets(architecture: str, stacks: str, vit: str, heads: tuple[str, ...]) -> list[Preset]:
    """cross-attention (the default), text-attention and reference for one BLIP architecture.

    Parameters
    ----------
    architecture : str
        The family's architecture name, the first part of each preset's name.
    stacks : str
        Regex of the text stacks holding the layers (encoder, and the decoder for VQA).
    vit : str
        Regex of the vision tower's qkv, output projection and MLP modules (the `reference` preset).
    heads : tuple of str
        The task heads trained beside the adapter.

    Returns
    -------
    list of Preset
    """
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
               target_modules=rf"{vit}|{_text_layers(stacks, _Q_K_V, '(attention|crossattention)')}",
               description="what the method's public code adapts: ViT qkv/proj/fc1/fc2 + text q, k, v",
               **common),
    ]
