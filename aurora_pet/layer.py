"""`AuroraLinear`: one adapted `nn.Linear`, cut into d×d slices of the shared tensor.

A weight W (d_out×d_in) is a grid of n_out×n_in blocks of size d×d; block (i, j) is slice
m = first_slice + i·n_in + j (row-major), so a fused qkv (2304×768) is 3 slices and an MLP fc2
(768×3072) is 4. The update is y += s · dropout(x) · ΔWᵀ, added without touching the module's
parameters: the module keeps its class and its parameter names (LAVIS loads checkpoints by name, with
strict=False, so a rename would silently drop pretrained weights). We only shadow its `forward` with an
instance attribute, which `remove()` deletes again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .factors import ModeFactors
    from .model import AuroraModel


class AuroraLinear:
    """Slice bookkeeping and the forward pass of one target; the factors live in the owning model."""

    def __init__(self, name: str, module: nn.Linear, first_slice: int, d: int, owner: "AuroraModel",
                 factors_name: str = "aurora_factors") -> None:
        self.name, self.module, self.d, self.owner = name, module, d, owner
        self.factors_name = factors_name  # "aurora_factors_m" for a momentum copy
        self.n_out, self.n_in = module.out_features // d, module.in_features // d
        self.first_slice = first_slice
        self.slice_range = slice(first_slice, first_slice + self.num_slices)
        self._plain_linear = type(module).forward is nn.Linear.forward

    @property
    def factors(self) -> "ModeFactors":
        return getattr(self.owner, self.factors_name)

    @property
    def num_slices(self) -> int:
        return self.n_out * self.n_in

    def install(self) -> None:
        if "forward" in vars(self.module):
            raise RuntimeError(f"module {self.name!r} already has an adapter (or a patched forward)")
        self.module.forward = self.forward

    def remove(self) -> None:
        if "forward" in vars(self.module):
            del self.module.forward

    def assemble(self, slices: torch.Tensor) -> torch.Tensor:
        """(n, d, d) slices → the (d_out, d_in) block matrix of this target."""
        d = self.d
        return slices.reshape(self.n_out, self.n_in, d, d).permute(0, 2, 1, 3).reshape(self.n_out * d, self.n_in * d)

    def delta_weight(self) -> torch.Tensor:
        """s·ΔW of this target, shape (d_out, d_in), differentiable (our einsum path)."""
        return self.owner.config.scale * self.assemble(self.factors.slices(self.slice_range))

    def reference_delta_weight(self) -> torch.Tensor:
        """s·ΔW built from TensorLy's reconstruction: what merge and export use."""
        tensor = self.factors.to_tensor(self.slice_range)  # (d, d, n)
        return self.owner.config.scale * self.assemble(tensor.permute(2, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if not self.owner.adapter_active:
            return type(module).forward(module, x)
        dropout = self.owner.aurora_dropout
        dropout_active = dropout.training and dropout.p > 0
        if self._plain_linear and not dropout_active and self._prefers_materialised(x):
            weight = module.weight + self.delta_weight().to(module.weight.dtype)
            return F.linear(x, weight, module.bias)
        return type(module).forward(module, x) + self.factored_delta(dropout(x))

    def factored_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·x·ΔWᵀ as two thin matmuls: z = x_j·V once per input block (shared by all output blocks),
        then z·B with B[(j, r), (i, a)] = s·L_ij[a, r]."""
        factors, d = self.factors, self.d
        rank = factors.rank
        z = (x.reshape(-1, self.n_in, d) @ factors.V.to(x.dtype)).reshape(-1, self.n_in * rank)
        left = factors.left_maps(self.slice_range).reshape(self.n_out, self.n_in, d, rank)
        up = left.permute(1, 3, 0, 2).reshape(self.n_in * rank, self.n_out * d)
        return (z @ (self.owner.config.scale * up).to(x.dtype)).reshape(*x.shape[:-1], self.n_out * d)

    def _prefers_materialised(self, x: torch.Tensor) -> bool:
        """Multiply-add counts of the two ways to apply the update to this input.

        factored:     N·(n_in + n_out)·d·R           (x·V, then z·B)
        materialised: n·d²·R to build ΔW, plus N·d_out·d_in for ∂L/∂ΔW when training; the product
                      x·(W + ΔW)ᵀ itself replaces the base matmul, so it costs nothing extra.
        """
        mode = self.owner.config.forward_mode
        if mode != "auto":
            return mode == "materialised"
        factors = self.factors
        tokens = x.numel() // x.shape[-1]
        d, rank = self.d, factors.rank
        factored = tokens * (self.n_in + self.n_out) * d * rank
        materialised = self.num_slices * d * d * rank
        if torch.is_grad_enabled() and factors.V.requires_grad:
            materialised += tokens * self.num_slices * d * d
        return materialised < factored
