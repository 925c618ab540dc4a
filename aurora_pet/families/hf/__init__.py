"""The Hugging Face family: transformers 5 BLIP (`BlipForImageTextRetrieval`, `BlipForQuestionAnswering`,
`BlipForConditionalGeneration`) and BLIP-2 (every class with a Q-Former).

Light (no transformers import). The architecture comes from `model.config.model_type` and the class, as
PEFT chooses its default targets. What differs from LAVIS: transformers' BLIP calls its cross-attention
with the *image* (or question) mask as `attention_mask`, so a fusion site reads the text mask from its
enclosing layer's call instead; in a decoder that mask is causal. Builders (tiny and base configs with
random weights, nothing downloaded) live in `build`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import TargetError
from ..base import Family, FusionInputs, Undo, hidden_states, set_attribute
from .presets import PRESETS

if TYPE_CHECKING:  # pragma: no cover
    from ...model import AuroraModel

# (model_type, class name) -> architecture; a class not listed falls back to its model_type's entry
_BY_CLASS = {
    ("blip", "BlipForImageTextRetrieval"): "hf_blip_retrieval",
    ("blip", "BlipForQuestionAnswering"): "hf_blip_vqa",
    ("blip", "BlipForConditionalGeneration"): "hf_blip_captioning",
}
_BY_MODEL_TYPE = {"blip-2": "hf_blip2"}
_DECODER_PREFIX = "text_decoder."


class HFFamily(Family):
    name = "hf"
    title = "transformers"
    builds_on_meta = True
    presets = PRESETS

    def architecture(self, model: nn.Module) -> str:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        arch = _BY_CLASS.get((model_type, type(model).__name__)) or _BY_MODEL_TYPE.get(model_type)
        if arch is None:
            known = sorted({cls for _, cls in _BY_CLASS} | {f"model_type {t!r}" for t in _BY_MODEL_TYPE})
            raise TargetError(f"no Aurora presets for transformers {type(model).__name__} (model_type "
                              f"{model_type!r}); presets exist for {', '.join(known)}. Set target_modules "
                              "(a regex or module-name suffixes) to adapt this model")
        return arch

    def build(self, architecture: str, size: str = "base") -> nn.Module:
        from .build import build_blip, build_blip2

        if architecture == "hf_blip2":
            return build_blip2(size)
        return build_blip(architecture.removeprefix("hf_blip_"), size)

    def width(self, architecture: str, size: str = "base") -> int:
        if architecture == "hf_blip2":
            return 32 if size == "tiny" else 768
        return 64 if size == "tiny" else 768

    def fusion_inputs(self, model: nn.Module, site: str) -> FusionInputs:
        """T from the cross-attention's own call, the text mask from its layer's call (see module doc)."""
        layer = site.rsplit(".", 1)[0]
        return FusionInputs(mask_module=layer, read_mask=_causal_mask if site.startswith(_DECODER_PREFIX)
                            else _layer_mask)

    def patch(self, model: nn.Module, aurora: "AuroraModel") -> list[Undo]:
        """Under ICE, the answer/caption decoder generates without its key/value cache: ICE attends over
        all earlier text tokens of the layer, which a cached step does not see, so generation recomputes
        the (short) prefix and gives the same tokens as a full forward pass. An explicit
        `generate(use_cache=True)` is honoured the same way (same tokens, recomputed prefix)."""
        decoder = getattr(model, "text_decoder", None)
        if decoder is None or not any(site.startswith(_DECODER_PREFIX) for site in aurora.ice_sites()):
            return []
        undo = [set_attribute(decoder.config, "use_cache", False)]
        if getattr(decoder, "generation_config", None) is not None:
            undo.append(set_attribute(decoder.generation_config, "use_cache", False))
        generate = decoder.generate

        def generate_without_cache(*args: Any, **kwargs: Any) -> Any:
            return generate(*args, **{**kwargs, "use_cache": False})

        return undo + [set_attribute(decoder, "generate", functools.wraps(generate)(generate_without_cache))]


def _layer_mask(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """`BlipTextLayer.forward(hidden_states, encoder_hidden_states, attention_mask, ...)`."""
    return args[2] if len(args) > 2 else kwargs.get("attention_mask")


def _causal_mask(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A decoder layer's mask; transformers may pass None when causality alone masks (no padding)."""
    mask = _layer_mask(args, kwargs)
    if mask is not None:
        return mask
    length = hidden_states(args, kwargs).shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=hidden_states(args, kwargs).device).tril()
    return causal[None, None]


FAMILY = HFFamily()
