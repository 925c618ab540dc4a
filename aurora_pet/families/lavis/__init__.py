"""The LAVIS family: Salesforce LAVIS 1.0.2 BLIP (`BlipRetrieval`, `BlipVQA`), the method's own stack.

This module is light (no LAVIS import): presets, how fusion sites read their inputs, momentum pairs and
the patches wrapping needs, each undone by `AuroraModel.unload()`. Building models offline and loading
checkpoints live in `build` (imports LAVIS); `wrap_blip` / `load_blip_adapter` in `wrap`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.utils.checkpoint
from torch import nn

from ...errors import TargetError
from ..base import Family, Undo, set_attribute
from .presets import PRESETS

if TYPE_CHECKING:  # pragma: no cover
    from ...model import AuroraModel

# LAVIS class name -> architecture (the first part of a preset's name)
_ARCHITECTURES = {"BlipRetrieval": "blip_retrieval", "BlipVQA": "blip_vqa"}


class LavisFamily(Family):
    name = "lavis"
    title = "LAVIS"
    presets = PRESETS

    def architecture(self, model: nn.Module) -> str:
        for cls in type(model).__mro__:
            if cls.__module__.startswith("lavis.") and cls.__name__ in _ARCHITECTURES:
                return _ARCHITECTURES[cls.__name__]
        raise TargetError(f"expected a LAVIS BlipRetrieval or BlipVQA model, got {type(model).__name__}; "
                          "for another LAVIS model set target_modules (and fusion_modules for ICE/GQT)")

    def build(self, architecture: str, size: str = "base") -> nn.Module:
        from .build import ARCHITECTURES, build_blip
        from .video_names import VIDEO_ARCHITECTURES

        if architecture in VIDEO_ARCHITECTURES:
            from .video import build_blip_video

            return build_blip_video(architecture, size=size)
        return build_blip(architecture, ARCHITECTURES[architecture][0], size=size)

    def width(self, architecture: str, size: str = "base") -> int:
        return 64 if size == "tiny" else 768

    def momentum_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        """(online, momentum) module names whose parameters LAVIS's `_momentum_update` zips by position
        (`model_pairs`), named relative to `model`; [] for models without momentum encoders."""
        owner = next((module for module in model.modules() if hasattr(module, "model_pairs")), None)
        if owner is None:
            return []
        names = {id(module): name for name, module in model.named_modules()}
        return [(names[id(online)], names[id(momentum)]) for online, momentum in owner.model_pairs]

    def momentum(self, model: nn.Module) -> float:
        return float(getattr(model, "momentum", 0.995))

    def patch(self, model: nn.Module, aurora: "AuroraModel") -> list[Undo]:
        """- the EMA of the factors runs right after LAVIS's own `_momentum_update` (which keeps zipping
          base parameters by position: none of ours live inside base modules);
        - the VQA answer decoder's key/value cache is off under ICE: ICE attends over all earlier text
          tokens of the layer, which an incremental decoding step does not see, so generation recomputes
          the (short) prefix to stay identical to training;
        - LAVIS's ViT activation checkpointing (fairscale) becomes PyTorch's non-reentrant form
          (see `checkpoint_without_reentry`)."""
        undo: list[Undo] = []
        if any(a.momentum_layers for a in aurora.aurora_adapters.values()) and hasattr(model, "_momentum_update"):
            lavis_update = model._momentum_update

            def momentum_update() -> None:
                lavis_update()
                aurora.momentum_update()

            undo.append(set_attribute(model, "_momentum_update", momentum_update))
        decoder = getattr(model, "text_decoder", None)
        if aurora.ice_sites() and decoder is not None:
            undo.append(set_attribute(decoder.config, "use_cache", False))
            if getattr(decoder, "generation_config", None) is not None:
                undo.append(set_attribute(decoder.generation_config, "use_cache", False))
        return undo + checkpoint_without_reentry(model)


def checkpoint_without_reentry(model: nn.Module) -> list[Undo]:
    """Re-wrap every fairscale-checkpointed module with PyTorch's non-reentrant checkpoint, bound to itself.

    LAVIS checkpoints ViT ``attn``/``mlp`` modules with fairscale's reentrant ``checkpoint_wrapper``
    (retrieval's yaml: the last ``vit_ckpt_layer`` blocks). Under an adapter that breaks three ways:
    - the wrapper detaches a module's output unless the module's own parameters or its input require
      grad; with the base frozen neither does, so targets inside got no gradient at all;
    - were the input made to require grad, each module would run its own nested backward and mark the
      shared factors ready several times per step, which DDP without ``static_graph`` rejects;
    - the wrapper holds a weak reference to its module, which ``deepcopy`` does not copy, so in the
      momentum encoder (``visual_encoder_m = deepcopy(visual_encoder)``) these modules ran the online
      module: the online factors instead of their EMA (frozen base weights agree up to rounding).
    The non-reentrant checkpoint saves the same activations and has none of these problems; the module
    is held strongly (as `AuroraLinear` holds its module), so a deepcopy is bound to its own copy."""
    try:
        from fairscale.nn.checkpoint.checkpoint_activations import _checkpointed_forward
    except ImportError:  # no fairscale, no fairscale checkpointing to replace
        return []
    undo = []
    for module in model.modules():
        forward = vars(module).get("forward")
        if isinstance(forward, functools.partial) and forward.func is _checkpointed_forward:
            undo.append(set_attribute(module, "forward",
                                      functools.partial(_non_reentrant_forward, forward.args[0], module)))
    return undo


def _non_reentrant_forward(original: Any, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return original(module, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(original, module, *args, use_reentrant=False, **kwargs)


FAMILY = LavisFamily()
