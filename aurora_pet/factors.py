"""The shared factors of the mode-approximation tensor ΔW ∈ R^{d×d×M}.

One factor set serves every adapted slice of every layer, which is what makes the method
parameter-efficient: the count is (2d + M + 1)·R for CP whatever the number of layers.

Conventions (the same as TensorLy's): mode 1 is the output side of a weight (rows, factor U),
mode 2 the input side (columns, factor V), mode 3 indexes slices (factor P).

    CP:      ΔW[:, :, m] = U · diag(λ ⊙ P[m]) · Vᵀ           = cp_to_tensor((λ, [U, V, P]))
    Tucker:  ΔW[:, :, m] = U · (Σ_k P[m, k] G[:, :, k]) · Vᵀ  = tucker_to_tensor((G, [U, V, P]))

Both are written below as ΔW_m = L_m · Vᵀ with a per-slice *left map* L_m = U · C_m (d×R), where C_m is
the slice's R×R core (diagonal for CP). The forward pass and materialisation only need L_m and V.

Initialisation makes ΔW = 0 exactly while every factor still learns: V = 0 and everything else is
non-zero (U, P small Gaussian; λ = 1; Tucker's G the superdiagonal identity, so Tucker starts as CP).
The first step moves only V (∂L/∂V ≠ 0 because U, P, λ ≠ 0; the other gradients all carry a factor V);
from the second step on V ≠ 0 and U, P, λ (and G) receive gradients too.
"""

from __future__ import annotations

import math
from typing import Literal

import tensorly as tl
import torch
from torch import nn

Core = Literal["cp", "tucker"]


class ModeFactors(nn.Module):
    """U (d×R), V (d×R), P (M×R) and the core: λ (R) for CP or G (R×R×R) for Tucker."""

    def __init__(self, d: int, num_slices: int, rank: int, core: Core = "cp", seed: int = 0) -> None:
        super().__init__()
        self.d, self.num_slices, self.rank, self.core = d, num_slices, rank, core
        generator = torch.Generator().manual_seed(seed)
        self.U = nn.Parameter(torch.randn(d, rank, generator=generator) / math.sqrt(d))
        self.V = nn.Parameter(torch.zeros(d, rank))
        self.P = nn.Parameter(torch.randn(num_slices, rank, generator=generator))
        if core == "cp":
            self.lam = nn.Parameter(torch.ones(rank))
        elif core == "tucker":
            self.G = nn.Parameter(superdiagonal(rank))
        else:
            raise ValueError(f"core must be 'cp' or 'tucker', got {core!r}")

    def slice_cores(self, slices: slice | torch.Tensor) -> torch.Tensor:
        """C_m for the given slices, shape (n, R, R); diagonal for CP."""
        coefficients = self.P[slices]
        if self.core == "cp":
            return torch.diag_embed(coefficients * self.lam)
        return torch.einsum("mk,pqk->mpq", coefficients, self.G)

    def left_maps(self, slices: slice | torch.Tensor) -> torch.Tensor:
        """L_m = U · C_m for the given slices, shape (n, d, R); ΔW_m = L_m · Vᵀ."""
        if self.core == "cp":
            return self.U * (self.P[slices] * self.lam).unsqueeze(1)
        return torch.einsum("ap,mpq->maq", self.U, self.slice_cores(slices))

    def slices(self, slices: slice | torch.Tensor) -> torch.Tensor:
        """Materialised frontal slices ΔW_m, shape (n, d, d) (our fast path; equals `to_tensor`)."""
        return self.left_maps(slices) @ self.V.T

    def to_tensor(self, slices: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The (d, d, n) tensor of the chosen slices, reconstructed by TensorLy (the reference)."""
        with tl.backend_context("pytorch"):
            if self.core == "cp":
                return tl.cp_to_tensor((self.lam, [self.U, self.V, self.P[slices]]))
            return tl.tucker_to_tensor((self.G, [self.U, self.V, self.P[slices]]))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"core={self.core}, d={self.d}, slices={self.num_slices}, rank={self.rank}"


def superdiagonal(rank: int) -> torch.Tensor:
    """The R×R×R tensor with ones on its superdiagonal: Tucker with this core is CP with λ = 1."""
    core = torch.zeros(rank, rank, rank)
    index = torch.arange(rank)
    core[index, index, index] = 1.0
    return core


def num_factor_parameters(d: int, num_slices: int, rank: int, core: Core = "cp") -> int:
    """(2d + M + 1)·R for CP, (2d + M)·R + R³ for Tucker."""
    if core == "cp":
        return (2 * d + num_slices + 1) * rank
    return (2 * d + num_slices) * rank + rank**3


def compress_delta(
    delta: torch.Tensor, rank: int, core: Core = "cp", *, n_iter_max: int = 200, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Fit factors to a dense (d, d, M) update (a full fine-tune's or LoRA's ΔW, slice by slice).

    CP uses TensorLy's `parafac`, Tucker its `tucker`; the returned tensors are keyed like
    `ModeFactors`' parameters (U, V, P and lam or G) so they can be copied straight in.
    """
    if delta.dim() != 3 or delta.shape[0] != delta.shape[1]:
        raise ValueError(f"delta must have shape (d, d, M), got {tuple(delta.shape)}")
    from tensorly.decomposition import parafac, tucker

    with tl.backend_context("pytorch"):
        data = delta.detach().to(torch.float64)
        if core == "cp":
            weights, (U, V, P) = parafac(
                data, rank, n_iter_max=n_iter_max, init="svd" if rank <= min(data.shape) else "random",
                random_state=seed, normalize_factors=True,
            )
            result = {"lam": weights, "U": U, "V": V, "P": P}
        elif core == "tucker":
            G, (U, V, P) = tucker(data, [rank, rank, min(rank, data.shape[2])], n_iter_max=n_iter_max,
                                  random_state=seed)
            if P.shape[1] < rank:  # fewer slices than the rank: pad the mode-3 factor and core
                P = torch.nn.functional.pad(P, (0, rank - P.shape[1]))
                G = torch.nn.functional.pad(G, (0, rank - G.shape[2]))
            result = {"G": G, "U": U, "V": V, "P": P}
        else:
            raise ValueError(f"core must be 'cp' or 'tucker', got {core!r}")
    return {name: tensor.to(delta.dtype) for name, tensor in result.items()}
