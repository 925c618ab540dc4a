"""The shared factors of the mode-approximation tensor ΔW ∈ R^{d×d×M}.

One factor set serves every adapted slice of every layer, which is what makes the method
parameter-efficient: the count is (2d + M + 1)·R for CP whatever the number of layers.

Conventions (the same as TensorLy's): mode 1 is the output side of a weight (rows, factor U),
mode 2 the input side (columns, factor V), mode 3 indexes slices (factor P).

    CP:      ΔW[:, :, m] = U · diag(λ ⊙ P[m]) · Vᵀ           = cp_to_tensor((λ, [U, V, P]))
    Tucker:  ΔW[:, :, m] = U · (Σ_k P[m, k] G[:, :, k]) · Vᵀ  = tucker_to_tensor((G, [U, V, P]))

Both are written below as ΔW_m = L_m · Vᵀ with a per-slice *left map* L_m = U · C_m (d×R), where C_m is
the slice's R×R core (diagonal for CP). The forward pass and materialisation only need L_m and V.

Mixed widths: a target side that is not a multiple of d (a 1408-wide vision input, a 172-wide MLP) is one
block of its own width w, with a factor of that width shared by every target side of the same width:
U_w (w×R) on the output side, V_w (w×R) on the input side. A slice whose output/input sides have width
classes a/b is then ΔW_m = U_a · C_m · V_bᵀ — the same P row and core per slice, the same λ or G; the
tensor of all slices of one width pair is cp_to_tensor((λ, [U_a, V_b, P[those slices]])).

Initialisation makes ΔW = 0 exactly while every factor still learns: V = 0 and everything else is
non-zero (U, P small Gaussian; λ = 1; Tucker's G the superdiagonal identity, so Tucker starts as CP).
The first step moves only V (∂L/∂V ≠ 0 because U, P, λ ≠ 0; the other gradients all carry a factor V);
from the second step on V ≠ 0 and U, P, λ (and G) receive gradients too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import tensorly as tl
import torch
from torch import nn

Core = Literal["cp", "tucker"]


class ModeFactors(nn.Module):
    """U (d×R), V (d×R), P (M×R) and the core: λ (R) for CP or G (R×R×R) for Tucker; plus U_w (w×R) for
    each other output width w in `out_widths` and V_w for each other input width in `in_widths`."""

    def __init__(self, d: int, num_slices: int, rank: int, core: Core = "cp", seed: int = 0,
                 out_widths: Sequence[int] = (), in_widths: Sequence[int] = ()) -> None:
        super().__init__()
        self.d, self.num_slices, self.rank, self.core = d, num_slices, rank, core
        self.out_widths = tuple(sorted(set(out_widths) - {d}))
        self.in_widths = tuple(sorted(set(in_widths) - {d}))
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
        for width in self.out_widths:  # drawn after the d-wide factors: single-width draws stay as they were
            self.register_parameter(f"U_{width}", nn.Parameter(
                torch.randn(width, rank, generator=generator) / math.sqrt(width)))
        for width in self.in_widths:
            self.register_parameter(f"V_{width}", nn.Parameter(torch.zeros(width, rank)))

    def u(self, width: int | None = None) -> torch.Tensor:
        """The output-side factor of a width class (U for d)."""
        return self.U if width is None or width == self.d else getattr(self, f"U_{width}")

    def v(self, width: int | None = None) -> torch.Tensor:
        """The input-side factor of a width class (V for d)."""
        return self.V if width is None or width == self.d else getattr(self, f"V_{width}")

    def slice_cores(self, slices: slice | torch.Tensor) -> torch.Tensor:
        """C_m for the given slices, shape (n, R, R); diagonal for CP."""
        coefficients = self.P[slices]
        if self.core == "cp":
            return torch.diag_embed(coefficients * self.lam)
        return torch.einsum("mk,pqk->mpq", coefficients, self.G)

    def left_maps(self, slices: slice | torch.Tensor, out_width: int | None = None) -> torch.Tensor:
        """L_m = U_a · C_m for the given slices, shape (n, a, R); ΔW_m = L_m · V_bᵀ."""
        u = self.u(out_width)
        if self.core == "cp":
            return u * (self.P[slices] * self.lam).unsqueeze(1)
        return torch.einsum("ap,mpq->maq", u, self.slice_cores(slices))

    def slices(self, slices: slice | torch.Tensor, out_width: int | None = None,
               in_width: int | None = None) -> torch.Tensor:
        """Materialised frontal slices ΔW_m, shape (n, a, b) (our fast path; equals `to_tensor`)."""
        return self.left_maps(slices, out_width) @ self.v(in_width).T

    def to_tensor(self, slices: slice | torch.Tensor = slice(None), out_width: int | None = None,
                  in_width: int | None = None) -> torch.Tensor:
        """The (a, b, n) tensor of the chosen slices of one width pair (d, d by default), reconstructed
        by TensorLy (the reference)."""
        factors = [self.u(out_width), self.v(in_width), self.P[slices]]
        with tl.backend_context("pytorch"):
            if self.core == "cp":
                return tl.cp_to_tensor((self.lam, factors))
            return tl.tucker_to_tensor((self.G, factors))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        widths = "".join(f", {side} widths={list(w)}" for side, w in (("out", self.out_widths), ("in", self.in_widths))
                         if w)
        return f"core={self.core}, d={self.d}, slices={self.num_slices}, rank={self.rank}{widths}"


def superdiagonal(rank: int) -> torch.Tensor:
    """The R×R×R tensor with ones on its superdiagonal: Tucker with this core is CP with λ = 1."""
    core = torch.zeros(rank, rank, rank)
    index = torch.arange(rank)
    core[index, index, index] = 1.0
    return core


def num_factor_parameters(d: int, num_slices: int, rank: int, core: Core = "cp", out_widths: Sequence[int] = (),
                          in_widths: Sequence[int] = ()) -> int:
    """(2d + Σa + Σb + M + 1)·R for CP, (2d + Σa + Σb + M)·R + R³ for Tucker, with a and b the other
    output and input width classes (none: (2d + M + 1)·R, the paper's count)."""
    widths = sum(set(out_widths) - {d}) + sum(set(in_widths) - {d})
    if core == "cp":
        return (2 * d + widths + num_slices + 1) * rank
    return (2 * d + widths + num_slices) * rank + rank**3


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
