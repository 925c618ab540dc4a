"""`AuroraLinear`: one adapted `nn.Linear`, cut into slices of the shared tensor.

A weight W (d_out×d_in) is a grid of n_out×n_in blocks of size a×b; block (i, j) is slice
m = first_slice + i·n_in + j (row-major). A side that is a multiple of d is cut into d-wide blocks (a fused
qkv, 2304×768, is 3 slices; an MLP fc2, 768×3072, is 4); a side of another width w is one block of
width w (its own width class, see `factors`). The update is y += s · dropout(x) · ΔWᵀ (or, with
`dropout_position="rank"`, s · dropout(x·V)·B: the mask on the rank-wide projection z, see `up_projection`), added without
touching the module's parameters: the module keeps its class and its parameter names (LAVIS loads
checkpoints by name, with strict=False, so a rename would silently drop pretrained weights). We only shadow
its `forward` with an instance attribute, which `remove()` deletes again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

# inputs whose projection is kept for reuse: enough for the image features to survive a layer's other
# targets (query, output) between one cross-attention and the next
SHARED_PROJECTIONS = 4

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter
    from .factors import ModeFactors
    from .model import AuroraModel


class AuroraLinear:
    """Slice bookkeeping and the forward pass of one target of one adapter; the factors live in the adapter,
    what all adapters share (on/off, merged, the projection cache) in the model."""

    def __init__(self, name: str, module: nn.Linear, first_slice: int, d: int, adapter: "Adapter",
                 model: "AuroraModel", momentum: bool = False) -> None:
        self.name, self.module, self.d, self.adapter, self.model = name, module, d, adapter, model
        self.momentum = momentum  # a momentum copy: reads the EMA factors
        self.block_out, self.block_in = block_width(module.out_features, d), block_width(module.in_features, d)
        self.n_out, self.n_in = module.out_features // self.block_out, module.in_features // self.block_in
        self.first_slice = first_slice
        self.slice_range = slice(first_slice, first_slice + self.num_slices)
        self._plain_linear = type(module).forward is nn.Linear.forward

    @property
    def factors(self) -> "ModeFactors":
        if self.momentum:
            return self.adapter.factors_m
        swapped = self.model._factors_in_use.get(self.adapter.adapter_name)  # `AuroraModel.use_factors`
        return self.adapter.factors if swapped is None else swapped

    @property
    def scale(self) -> float:
        return self.adapter.config.scale

    @property
    def num_slices(self) -> int:
        return self.n_out * self.n_in

    def assemble(self, slices: torch.Tensor) -> torch.Tensor:
        """(n, a, b) slices → the (d_out, d_in) block matrix of this target."""
        a, b = self.block_out, self.block_in
        return slices.reshape(self.n_out, self.n_in, a, b).permute(0, 2, 1, 3).reshape(self.n_out * a, self.n_in * b)

    def delta_weight(self) -> torch.Tensor:
        """s·ΔW of this target, shape (d_out, d_in), differentiable (our einsum path)."""
        slices = self.factors.slices(self.slice_range, self.block_out, self.block_in)
        return self.scale * self.assemble(slices)

    def reference_delta_weight(self) -> torch.Tensor:
        """s·ΔW built from TensorLy's reconstruction: what merge and export use."""
        tensor = self.factors.to_tensor(self.slice_range, self.block_out, self.block_in)  # (a, b, n)
        return self.scale * self.assemble(tensor.permute(2, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if not self.model.adapter_active:
            return type(module).forward(module, x)
        # dropout follows the adapted module's own mode, so base_model.eval() also turns it off
        p = self.adapter.dropout.p
        dropout_active = module.training and p > 0
        on_rank = self.adapter.config.dropout_position == "rank"

        def input_dropout(t: torch.Tensor) -> torch.Tensor:
            return F.dropout(t, p, training=dropout_active and not on_rank)

        def rank_dropout(z: torch.Tensor) -> torch.Tensor:
            return F.dropout(z, p, training=dropout_active and on_rank)

        if not self._plain_linear:
            inputs = input_dropout(x).reshape(-1, module.in_features)
            delta = rank_dropout(self.input_projection(inputs)) @ self.up_projection(x.dtype)
            return type(module).forward(module, x) + delta.reshape(*x.shape[:-1], module.out_features)
        if not dropout_active and self._prefers_materialised(x):
            return F.linear(x, self.adapted_weight(), module.bias)
        # base and update in one output buffer: x·Wᵀ + b, then z·B accumulated into it in place
        # (the same sum as base + delta, without two more (tokens × d_out) tensors and an add)
        inputs = x.reshape(-1, module.in_features)
        weight = module.weight
        out = inputs @ weight.T if module.bias is None else torch.addmm(module.bias, inputs, weight.T)
        if dropout_active and not on_rank:  # each target its own mask on x: nothing to share
            z = self.input_projection(input_dropout(inputs))
        else:  # z = x·V shared by the targets reading x; a rank-wide mask per target on it
            z = rank_dropout(self.shared_input_projection(x, inputs))
        out.addmm_(z, self.up_projection(out.dtype))
        return out.view(*x.shape[:-1], module.out_features)

    def adapted_weight(self) -> torch.Tensor:
        """W + s·ΔW, built as one fused multiply-add W + (s·L)·Vᵀ when the target has a single input block
        (every target but an MLP fc2); equal to `weight + delta_weight()`."""
        weight = self.module.weight
        if self.n_in != 1:
            return weight + self.delta_weight().to(weight.dtype)
        factors = self.factors
        left = factors.left_maps(self.slice_range, self.block_out).reshape(self.module.out_features, factors.rank)
        return torch.addmm(weight, left.to(weight.dtype), factors.v(self.block_in).T.to(weight.dtype),
                           alpha=self.scale)

    def input_projection(self, x: torch.Tensor) -> torch.Tensor:
        """z = x_j·V_b for every input block j, shape (tokens, n_in·R)."""
        rank = self.factors.rank
        v = self.factors.v(self.block_in).to(x.dtype)
        return (x.reshape(-1, self.n_in, self.block_in) @ v).reshape(-1, self.n_in * rank)

    def shared_input_projection(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """z = x·V_b, computed once for every target of this factor set that reads the very same tensor `x`
        (the keys and values of every cross-attention layer all read the image features): the first such
        target computes it, the others reuse it, forward and backward (autograd sums the uses). Reused only
        while neither `x` nor V_b has changed in place and the grad mode is the same; without dropout only,
        since each target draws its own dropout mask."""
        model = self.model
        if not model.share_input_projections:
            return self.input_projection(inputs)
        v = self.factors.v(self.block_in)
        cache = model._input_projections
        key = (id(self.factors), self.block_in, id(x))
        state = (x._version, v._version, torch.is_grad_enabled(), tuple(x.shape), x.dtype)
        cached = cache.get(key)
        if cached is not None and cached[0] is x and cached[1] == state:
            cache.move_to_end(key)
            return cached[2]
        z = self.input_projection(inputs)
        cache[key] = (x, state, z)
        if len(cache) > SHARED_PROJECTIONS:  # the least recently used input: not read again soon
            cache.popitem(last=False)
        return z

    def up_projection(self, dtype: torch.dtype) -> torch.Tensor:
        """B with B[(j, r), (i, a)] = s·L_ij[a, r], shape (n_in·R, d_out): x·ΔWᵀ = z·B."""
        left = self.factors.left_maps(self.slice_range, self.block_out)
        if self.n_in == 1:  # (n_out, a, R) → (R, d_out) as a view; scale the small factor, not the product
            up = left.reshape(self.module.out_features, -1).T
        else:
            rank = self.factors.rank
            up = left.reshape(self.n_out, self.n_in, self.block_out, rank).permute(1, 3, 0, 2).reshape(
                self.n_in * rank, self.module.out_features)
        scale = self.scale
        return (up if scale == 1 else scale * up).to(dtype)

    def _prefers_materialised(self, x: torch.Tensor) -> bool:
        """Multiply-add counts of the two ways to apply the update to this input.

        factored:     N·(d_in + d_out)·R              (x·V, then z·B)
        materialised: d_out·d_in·R to build ΔW, plus N·d_out·d_in for ∂L/∂ΔW when training; the product
                      x·(W + ΔW)ᵀ itself replaces the base matmul, so it costs nothing extra.
        """
        mode = self.adapter.config.forward_mode
        if mode != "auto":
            return mode == "materialised"
        factors = self.factors
        tokens = x.numel() // x.shape[-1]
        size = self.module.out_features * self.module.in_features
        factored = tokens * (self.module.in_features + self.module.out_features) * factors.rank
        materialised = size * factors.rank
        if torch.is_grad_enabled() and factors.V.requires_grad:
            materialised += tokens * size
        return materialised < factored


class TargetDispatch:
    """The forward installed on an adapted module: the active adapter's `AuroraLinear` where that adapter
    adapts the module, else the module's own forward (named adapters may adapt different modules)."""

    def __init__(self, name: str, module: nn.Linear, model: "AuroraModel") -> None:
        self.name, self.module, self.model = name, module, model
        self.layers: dict[str, AuroraLinear] = {}  # adapter name → its layer for this module

    def install(self) -> None:
        if "forward" in vars(self.module):
            raise RuntimeError(f"module {self.name!r} already has an adapter (or a patched forward)")
        self.module.forward = self.forward

    def remove(self) -> None:
        """Delete the forward `install` set, and only that one: undoing a failed wrapping must not take
        away another adapter's (or the user's) patched forward."""
        if vars(self.module).get("forward") == self.forward:
            del self.module.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers.get(self.model.active_adapter)
        if layer is None:
            return type(self.module).forward(self.module, x)
        return layer.forward(x)


def block_width(width: int, d: int) -> int:
    """The block size of a weight side: d where d divides it, else the side's own width (its width class)."""
    return d if width % d == 0 else width
