"""One named adapter of an `AuroraModel`: its config, its factor set (and their momentum copy), its ICE/GQT
sites, and the bookkeeping of what it adapts.

Adapters on one base are independent (PEFT's convention): each has its own targets, d, factors and fusion
sites, and only the active one acts in forward. Their parameters live here, under
`aurora_adapters.<name>.{factors,factors_m,fusion}`, never inside base modules. The task heads it trains
(`modules_to_save`) are base modules; while the adapter is inactive their weights wait in `head_state`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import AuroraConfig
from .factors import ModeFactors
from .fusion import FusionSite
from .targets import site_key

if TYPE_CHECKING:  # pragma: no cover
    from .layer import AuroraLinear


class Adapter(nn.Module):
    """The parameters of one adapter (`factors`, `factors_m`, `fusion`, `dropout`) and what it adapts."""

    def __init__(self, name: str, config: AuroraConfig, slice_size: int, layers: dict[str, "AuroraLinear"],
                 factors: ModeFactors, fusion_sites: list[str], heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.adapter_name = name
        self.config = config
        self.slice_size = slice_size
        self.factors = factors
        self.factors_m: ModeFactors | None = None
        self.fusion = nn.ModuleDict({site_key(site): FusionSite(slice_size, config.ice, config.gqt)
                                     for site in fusion_sites})
        self.dropout = nn.Dropout(config.dropout)
        # plain containers: the layers are bookkeeping, the heads belong to the base model
        self.layers = layers
        self.momentum_layers: dict[str, AuroraLinear] = {}
        self.fusion_sites = list(fusion_sites)
        self.heads = heads
        self.head_state: dict[str, torch.Tensor] | None = None  # the heads' weights while inactive

    def add_momentum_factors(self) -> None:
        """The EMA copy of the factors that the momentum copies of the targets use (never trained)."""
        self.factors_m = copy.deepcopy(self.factors).requires_grad_(False)

    def all_layers(self) -> list["AuroraLinear"]:
        """Online targets, then their momentum copies."""
        return list(self.layers.values()) + list(self.momentum_layers.values())

    def set_trainable(self, trainable: bool) -> None:
        """Factors and ICE/GQT train (or not); the momentum factors never do."""
        self.factors.requires_grad_(trainable)
        self.fusion.requires_grad_(trainable)

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The heads' state keyed `<head>.<tensor>`: the live modules' while active, else the waiting copy."""
        if self.head_state is not None:
            return self.head_state
        return {f"{head}.{key}": value for head, module in self.heads.items()
                for key, value in module.state_dict().items()}

    def state(self) -> dict[str, torch.Tensor]:
        """What training changed, keyed as in the adapter file: factors, factors_m, fusion, heads."""
        state = {f"factors.{k}": v for k, v in self.factors.state_dict().items()}
        if self.factors_m is not None:
            state.update({f"factors_m.{k}": v for k, v in self.factors_m.state_dict().items()})
        state.update({f"fusion.{k}": v for k, v in self.fusion.state_dict().items()})
        state.update({f"heads.{k}": v for k, v in self.head_tensors().items()})
        return state

    def layout(self) -> dict:
        """What an adapter file must agree with: d, the targets and their slices, the fusion sites."""
        return {"slice_size": self.slice_size,
                "targets": [[n, l.module.out_features, l.module.in_features, l.first_slice]
                            for n, l in self.layers.items()],
                "fusion_sites": list(self.fusion_sites)}

    def extra_repr(self) -> str:
        return f"name={self.adapter_name!r}, targets={len(self.layers)}, fusion_sites={len(self.fusion_sites)}"
