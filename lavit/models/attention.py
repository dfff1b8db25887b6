"""The three attention operators of LaViT (SPEC §3).

* ``VanillaAttention``: spatial-reduction multi-head self-attention (PVT-style) that can hand on
  its pre-softmax scores ``S = Q Kᵀ / √d (+ residual bias)`` to the layers after it.
* ``LessAttention``: computes no ``Q Kᵀ``; it re-parameterises the attention it is handed,
  ``S' = W_Ψ · S · W_Θᵀ + (W_Ψ 1) b_Θᵀ``, then ``Softmax(S') V`` with its own value projection.
* ``AttentionDownsample``: brings the last attention of stage m−1 down to stage m's shape, the
  residual that guides stage m's first attention.

Shapes: B batch, H heads, N query tokens (h×w grid), N' key tokens (the spatially reduced
h'×w' grid), C channels, d = C / H.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int]
LessAttentionInit = Literal["identity", "random"]


class SpatialReduction(nn.Module):
    """Keys/values on a coarser grid: conv k=s=sr_ratio + LayerNorm (PVT's SRA).

    With ``sr_ratio == 1`` it is the identity, so stage-4 attention is global.
    """

    def __init__(self, dim: int, sr_ratio: int) -> None:
        super().__init__()
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.conv = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if self.sr_ratio == 1:
            return x
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *grid)  # (B, C, h, w)
        x = self.conv(x).flatten(2).transpose(1, 2)  # (B, N', C)
        return self.norm(x)


class VanillaAttention(nn.Module):
    """Spatial-reduction MHSA, ``A_h = Softmax(Q_h K_hᵀ / √d + bias)``.

    ``return_scores=True`` computes the attention explicitly and returns the pre-softmax scores
    (what an LA layer or the next stage needs); otherwise it uses the fused
    ``scaled_dot_product_attention`` and returns ``None`` for them.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.reduce = SpatialReduction(dim, sr_ratio)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        grid: Grid,
        score_bias: torch.Tensor | None = None,
        return_scores: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns ``(output (B, N, C), scores (B, H, N, N') | None, probs | None)``."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        kv_tokens = self.reduce(x, grid)  # (B, N', C)
        n_keys = kv_tokens.shape[1]
        kv = self.kv(kv_tokens).reshape(B, n_keys, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N', d)

        scores = probs = None
        if return_scores:
            # Scale the N' keys, not the N queries (N' ≤ N): the same product, less work.
            scores = q @ (k.transpose(-2, -1) * self.scale)  # (B, H, N, N')
            if score_bias is not None:
                scores += score_bias  # in place: the matmul's backward does not need its output
            probs = scores.softmax(dim=-1)
            out = probs @ v  # (B, H, N, d)
        else:
            # The fused kernel adds a float mask to the scaled scores: the residual bias fits it.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=score_bias)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out), scores, probs


class LessAttention(nn.Module):
    """Less-Attention: ``S' = Ψ(Θ(S)ᵀ)ᵀ = W_Ψ · S · W_Θᵀ + (W_Ψ 1) b_Θᵀ``, ``Z = Softmax(S') V``.

    One (Ψ, Θ) pair per layer, shared across heads (the paper's ``R^{N×N}`` transforms): Ψ mixes
    the query axis (N×N), Θ the key axis (N'×N'). Ψ carries no bias: a per-row constant
    ``b_Ψ 1ᵀ`` cancels in the row-wise softmax, so it could never learn.

    With ``init="identity"`` the layer starts as exact reuse of the attention it is given.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_queries: int,
        num_keys: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        init: LessAttentionInit = "identity",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.psi = nn.Parameter(torch.empty(num_queries, num_queries))  # W_Ψ, query axis
        self.theta = nn.Parameter(torch.empty(num_keys, num_keys))  # W_Θ, key axis
        self.theta_bias = nn.Parameter(torch.empty(num_keys))  # b_Θ
        self.reduce = SpatialReduction(dim, sr_ratio)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.init = init
        self.reset_transforms(init)

    @torch.no_grad()
    def reset_transforms(self, init: LessAttentionInit) -> None:
        if init == "identity":
            nn.init.eye_(self.psi)
            nn.init.eye_(self.theta)
            nn.init.zeros_(self.theta_bias)
        elif init == "random":  # nn.Linear's own initialisation, the paper's "linear layers"
            for weight in (self.psi, self.theta):
                bound = 1.0 / math.sqrt(weight.shape[1])
                nn.init.uniform_(weight, -bound, bound)
            bound = 1.0 / math.sqrt(self.theta.shape[1])
            nn.init.uniform_(self.theta_bias, -bound, bound)
        else:
            raise ValueError(f"la_init must be 'identity' or 'random', got {init!r}")

    def transform(self, attn: torch.Tensor) -> torch.Tensor:
        """``S' = W_Ψ · S · W_Θᵀ + (W_Ψ 1) b_Θᵀ`` for every batch element and head."""
        B, H, N, K = attn.shape
        # Θ on the key axis: one (B·H·N, N') × (N', N') GEMM.
        s = torch.einsum("bhnk,pk->bhnp", attn, self.theta) + self.theta_bias  # (B, H, N, N')
        # Ψ on the query axis: one (N, N) × (N, B·H·N') GEMM.
        s = torch.einsum("qn,bhnp->bhqp", self.psi, s)  # (B, H, N, N')
        return s

    def forward(
        self, x: torch.Tensor, grid: Grid, attn: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(output (B, N, C), transformed scores S' (B, H, N, N'), probs)``."""
        B, N, C = x.shape
        scores = self.transform(attn)  # (B, H, N, N')
        probs = scores.softmax(dim=-1)
        v_tokens = self.reduce(x, grid)  # (B, N', C)
        v = (
            self.v(v_tokens).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        )  # (B, H, N', d)
        out = (probs @ v).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(out), scores, probs


class AttentionDownsample(nn.Module):
    """Residual attention downsampling: ``γ · HeadMix(KeyResize(Pool2x2(S_{m−1})))``.

    The query axis of the previous stage's scores is a 2h×2w grid; a one-channel conv k=2, s=2
    (the paper's convolution with in/out channels one) pools it to h×w. The key axis is resized
    only if the key grids differ; a 1×1 conv over heads maps H_{m−1} heads to H_m. Initialised as
    2×2 averaging and head averaging, with a learnable γ.
    """

    def __init__(self, in_heads: int, out_heads: int, gamma_init: float = 1.0) -> None:
        super().__init__()
        self.pool = nn.Conv2d(1, 1, kernel_size=2, stride=2)
        self.head_mix = nn.Conv2d(in_heads, out_heads, kernel_size=1)
        self.gamma_init = gamma_init
        self.gamma = nn.Parameter(torch.tensor(float(gamma_init)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.pool.weight.fill_(0.25)
        self.pool.bias.zero_()
        self.head_mix.weight.fill_(1.0 / self.head_mix.in_channels)
        self.head_mix.bias.zero_()
        self.gamma.fill_(self.gamma_init)

    def forward(
        self, scores: torch.Tensor, query_grid: Grid, key_grid: Grid, out_key_grid: Grid
    ) -> torch.Tensor:
        # The convs' own maths, written out as strided sums and a head GEMM: a one-channel
        # Conv2d over a (B·H·N') batch of tiny images, and a 1×1 conv over a handful of
        # channels, are an order of magnitude slower on CPU (forward and backward).
        B, H, N, K = scores.shape
        h, w = query_grid
        h2, w2 = h // 2, w // 2  # a k=2, s=2 conv drops an odd last row/column
        grid = scores.reshape(B, H, h, w, K)[:, :, : 2 * h2, : 2 * w2]
        grid = grid.reshape(B, H, h2, 2, w2, 2, K)  # (B, H, h/2, 2, w/2, 2, N'): 2×2 query cells
        weight = self.pool.weight.reshape(2, 2)
        x = self.pool.bias + sum(
            weight[i, j] * grid[:, :, :, i, :, j] for i in range(2) for j in range(2)
        )  # (B, H, h/2, w/2, N')
        x = x.reshape(B, H, h2 * w2, K)  # (B, H, N_m, N')
        if tuple(key_grid) != tuple(out_key_grid):
            x = x.reshape(B * H * h2 * w2, 1, *key_grid)  # key axis as an image
            x = F.interpolate(x, size=out_key_grid, mode="bilinear", align_corners=False)
            x = x.reshape(B, H, h2 * w2, -1)  # (B, H, N_m, N'_m)
        mix = self.head_mix.weight.reshape(self.head_mix.out_channels, H)  # (H_m, H)
        x = torch.einsum("oh,bhnk->bonk", mix, x)  # (B, H_m, N_m, N'_m)
        return self.gamma * (x + self.head_mix.bias.reshape(1, -1, 1, 1))
