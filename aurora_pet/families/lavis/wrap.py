"""`wrap_blip` / `load_blip_adapter`: the LAVIS family's conveniences over `get_aurora_model`.

`get_aurora_model` already recognises a LAVIS model and applies what the family needs (momentum pairs,
the EMA chained to LAVIS's update, the decoder cache under ICE, non-reentrant ViT checkpointing; all
undone by `unload()`); these add preset names with overrides, as the recipes use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...adapter_files import load_adapter_config
from ...config import AuroraConfig
from ...model import AuroraModel, get_aurora_model
from . import FAMILY


def wrap_blip(model: nn.Module, config: AuroraConfig | str = "cross-attention", **overrides: Any) -> AuroraModel:
    """Wrap a LAVIS BLIP model so that it trains correctly in LAVIS's own forward passes.

    `config` is an `AuroraConfig` or a preset name ("cross-attention", "text-attention", "reference",
    or a full name such as "blip_vqa/reference") of the model's architecture, with `overrides` applied."""
    if isinstance(config, str):
        config = AuroraConfig.from_preset(FAMILY.preset(model, config).name, **overrides)
    elif overrides:
        config = AuroraConfig.from_dict({**config.to_dict(), **overrides})
    return get_aurora_model(model, config)


def load_blip_adapter(model: nn.Module, path: str | Path) -> AuroraModel:
    """The adapter saved in `path` (by `save_pretrained`, a recipe or the demo), wrapped and loaded;
    the same as `AuroraModel.from_pretrained(model, path)`."""
    return AuroraModel.from_pretrained(model, path)
