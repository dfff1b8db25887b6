"""How a Less-Attention layer re-parameterises the attention it is handed (docs/spec.md §3.2).

A ``TokenMixing`` maps scores ``S`` (B, H, N, N') on an h×w query grid and an h'×w' key grid to
transformed scores ``S'`` of the same shape. It owns the size-dependent parameters of an LA
layer, so it also knows how to follow the input size: ``forward`` takes any grid (the
``dynamic_img_size`` path), ``resize_`` moves its native grids (``set_input_size``) and
``resize_state`` adapts a checkpoint's tensors (``checkpoint_filter_fn``).

``DenseTokenMixing`` is the paper's form, ``S' = Ψ(Θ(S)ᵀ)ᵀ`` with a dense Ψ (N×N) and Θ (N'×N').
Other forms (pooled or separable Ψ/Θ for high-resolution grids) subclass ``TokenMixing``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.fx
from timm.layers import register_notrace_function
from torch import nn

from .resize import (
    Grid,
    infer_grid,
    resize_token_mixing,
    resize_token_vector,
    token_mixing_deviation,
)

__all__ = ["DenseTokenMixing", "LessAttentionInit", "TokenMixing"]

LessAttentionInit = Literal["identity", "random"]

# Shape logic runs as opaque calls under torch.fx (plain symbolic_trace and timm's tracer alike),
# so a traced model adapts Ψ/Θ to whatever grid it is given.
for _fn in (token_mixing_deviation, resize_token_vector):
    register_notrace_function(_fn)
torch.fx.wrap("token_mixing_deviation")
torch.fx.wrap("resize_token_vector")


class TokenMixing(nn.Module):
    """Base of the LA token-mixing forms: ``forward(scores, query_grid, key_grid) → S'``.

    ``query_grid`` / ``key_grid`` are the native grids the parameters were made for.
    """

    def __init__(self, query_grid: Grid, key_grid: Grid) -> None:
        super().__init__()
        self.query_grid = (int(query_grid[0]), int(query_grid[1]))
        self.key_grid = (int(key_grid[0]), int(key_grid[1]))

    def forward(self, scores: torch.Tensor, query_grid: Grid, key_grid: Grid) -> torch.Tensor:
        raise NotImplementedError

    def resize_(self, query_grid: Grid, key_grid: Grid) -> None:
        """Resample the parameters in place to new native grids."""
        raise NotImplementedError

    def resize_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Resample this module's entries of a checkpoint (``prefix`` + name) to the native grids."""
        raise NotImplementedError


class DenseTokenMixing(TokenMixing):
    """``S' = W_Ψ · S · W_Θᵀ + (W_Ψ 1) b_Θᵀ``: Ψ mixes the query axis, Θ the key axis.

    One pair per LA layer, shared across heads (the paper's ``R^{N×N}`` linear layers, applied
    as ``Ψ(Θ(S)ᵀ)ᵀ``). Computed as deviations from the identity, ``T = S + S (Θ−I)ᵀ + 1 b_Θᵀ``,
    ``S' = T + (Ψ−I) T``: the same products, but with ``init="identity"`` the layer reproduces
    the attention it is given exactly in any matmul precision (TF32 and bf16 included), since a
    zero deviation contributes an exact zero.

    Ψ has no bias. Its ``b_Ψ 1ᵀ`` is constant along keys, so it cancels in this layer's
    softmax; it would act only through the scores handed to a following LA layer, as
    ``(W_Ψ' b_Ψ)(W_Θ' 1)ᵀ``, which is again constant along keys while Θ' keeps equal row sums
    (at identity init: exactly), so it would start without gradient and could only ever add a
    rank-one term. Θ's bias ``(W_Ψ 1) b_Θᵀ`` varies along keys and is kept.

    With ``init="identity"`` the layer starts as exact reuse; ``"random"`` is ``nn.Linear``'s
    initialisation (uniform ±1/√fan_in).
    """

    def __init__(self, query_grid: Grid, key_grid: Grid, init: LessAttentionInit = "identity"):
        super().__init__(query_grid, key_grid)
        num_queries = self.query_grid[0] * self.query_grid[1]
        num_keys = self.key_grid[0] * self.key_grid[1]
        self.psi = nn.Parameter(torch.empty(num_queries, num_queries))  # W_Ψ, query axis
        self.theta = nn.Parameter(torch.empty(num_keys, num_keys))  # W_Θ, key axis
        self.theta_bias = nn.Parameter(torch.empty(num_keys))  # b_Θ
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: LessAttentionInit = "identity") -> None:
        if init == "identity":
            nn.init.eye_(self.psi)
            nn.init.eye_(self.theta)
            nn.init.zeros_(self.theta_bias)
        elif init == "random":
            for weight in (self.psi, self.theta):
                bound = 1.0 / math.sqrt(weight.shape[1])
                nn.init.uniform_(weight, -bound, bound)
            bound = 1.0 / math.sqrt(self.theta.shape[1])
            nn.init.uniform_(self.theta_bias, -bound, bound)
        else:
            raise ValueError(f"la_init must be 'identity' or 'random', got {init!r}")

    def forward(self, scores: torch.Tensor, query_grid: Grid, key_grid: Grid) -> torch.Tensor:
        # Ψ − I and Θ − I at this grid (resampled from the native grids when they differ).
        d_psi = token_mixing_deviation(self.psi, self.query_grid, query_grid)  # (N, N)
        d_theta = token_mixing_deviation(self.theta, self.key_grid, key_grid)  # (N', N')
        bias = resize_token_vector(self.theta_bias, self.key_grid, key_grid)  # (N',)
        B, H, N, K = scores.shape
        s = scores.reshape(B * H * N, K)  # (B·H·N, N'): Θ on the key axis is one GEMM
        t = torch.addmm(s + bias, s, d_theta.t()).reshape(B, H, N, K)  # S Θᵀ + 1 b_Θᵀ
        # Ψ on the query axis: one (N, N) × (N, B·H·N') GEMM.
        return t + torch.einsum("qn,bhnk->bhqk", d_psi, t)  # (B, H, N, N'): Ψ T

    @torch.no_grad()
    def resize_(self, query_grid: Grid, key_grid: Grid) -> None:
        query_grid, key_grid = tuple(query_grid), tuple(key_grid)
        self.psi = nn.Parameter(resize_token_mixing(self.psi, self.query_grid, query_grid))
        self.theta = nn.Parameter(resize_token_mixing(self.theta, self.key_grid, key_grid))
        self.theta_bias = nn.Parameter(
            resize_token_vector(self.theta_bias, self.key_grid, key_grid).clone()
        )
        self.query_grid, self.key_grid = query_grid, key_grid

    def resize_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        for name, grid, resize in (
            ("psi", self.query_grid, resize_token_mixing),
            ("theta", self.key_grid, resize_token_mixing),
            ("theta_bias", self.key_grid, resize_token_vector),
        ):
            value = state.get(prefix + name)
            if value is not None and value.shape[0] != grid[0] * grid[1]:
                state[prefix + name] = resize(value, infer_grid(value.shape[0], grid), grid)
