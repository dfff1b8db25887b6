"""The three attention operators of LaViT (docs/spec.md §3.1–§3.3).

VA and LA share one call, ``attn(x, grid, handed, explicit) → (out, scores, probs)``, so a block
holds either. Shapes: B batch, H heads, N query tokens (h×w grid), N' key tokens (the spatially
reduced h'×w' grid), C channels, d = C / H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resize import Grid
from .token_mixing import TokenMixing

__all__ = ["AttentionDownsample", "LessAttention", "SpatialReduction", "VanillaAttention"]


class SpatialReduction(nn.Module):
    """Keys/values on a coarser grid: conv k=s=sr_ratio + LayerNorm (PVT's SRA); 1: identity."""

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
        x = x.transpose(1, 2).reshape(B, C, grid[0], grid[1])  # (B, C, h, w)
        x = self.conv(x).flatten(2).transpose(1, 2)  # (B, N', C)
        return self.norm(x)


class VanillaAttention(nn.Module):
    """Spatial-reduction MHSA, ``A_h = Softmax(Q_h K_hᵀ / √d + residual)``.

    ``explicit=True`` returns the pre-softmax scores and the probabilities; otherwise the fused
    ``scaled_dot_product_attention`` runs and both come back as ``None``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True) -> None:
        super().__init__()
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
        residual: torch.Tensor | None = None,
        explicit: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``x`` (B, N, C), ``residual`` (B, H, N, N') added to the scores → output (B, N, C)."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        kv_tokens = self.reduce(x, grid)  # (B, N', C)
        kv = self.kv(kv_tokens).reshape(B, -1, 2, self.num_heads, self.head_dim)  # (B, N', 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N', d)

        scores = probs = None
        # ONNX has no fused attention kernel anyway, and torch 2.14's ONNX exporter mis-strides
        # the decomposed fused kernel's output (a view error): export the explicit product.
        if explicit or torch.onnx.is_in_onnx_export():
            # Scale the N' keys, not the N queries (N' ≤ N): the same product, less work.
            scores = q @ (k.transpose(-2, -1) * self.scale)  # (B, H, N, N')
            if residual is not None:
                scores = scores + residual
            probs = scores.softmax(dim=-1)
            out = probs @ v  # (B, H, N, d)
        else:
            # The fused kernel adds a float mask to the scaled scores: the residual fits it.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=residual)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(out), scores, probs


class LessAttention(nn.Module):
    """Less-Attention: ``S' = TokenMixing(S)``, ``Z = Softmax(S') V`` with its own V projection.

    Values come from the same spatially reduced tokens a VA layer would use. ``S'`` (the next
    LA layer's input) is always materialised, so ``explicit`` changes nothing.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        token_mixing: TokenMixing,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.token_mixing = token_mixing
        self.reduce = SpatialReduction(dim, sr_ratio)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, grid: Grid, attn: torch.Tensor, explicit: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, N, C), the handed ``attn`` (B, H, N, N') → (output, S', Softmax(S'))."""
        B, N, C = x.shape
        key_grid = (grid[0] // self.sr_ratio, grid[1] // self.sr_ratio)
        scores = self.token_mixing(attn, grid, key_grid)  # (B, H, N, N')
        probs = scores.softmax(dim=-1)
        v = self.v(self.reduce(x, grid))  # (B, N', C) from the reduced tokens
        v = v.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N', d)
        out = (probs @ v).transpose(1, 2).reshape(B, N, C)  # (B, H, N, d) → (B, N, C)
        return self.proj(out), scores, probs


class AttentionDownsample(nn.Module):
    """Residual attention downsampling (spec §3.3): ``γ · HeadMix(KeyResize(Pool2×2(S_{m−1})))``.

    The key axis is resized (bilinear) only when the SR ratios make the key grids differ
    (``in_sr_ratio != 2·out_sr_ratio``). Initialised as 2×2 averaging and head averaging.
    The convolutions are written out (strided sums, a head GEMM): as one-channel or 1×1 convs
    they are an order of magnitude slower on CPU. No biases: one value per head cancels in the
    softmax. ``gamma_init`` is γ's starting value.
    """

    def __init__(
        self,
        in_heads: int,
        out_heads: int,
        in_sr_ratio: int,
        out_sr_ratio: int,
        gamma_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_sr_ratio, self.out_sr_ratio = in_sr_ratio, out_sr_ratio
        self.resize_keys = in_sr_ratio != 2 * out_sr_ratio
        self.gamma_init = float(gamma_init)
        self.pool_weight = nn.Parameter(torch.empty(2, 2))  # the k=2, s=2 query-pooling conv
        self.head_mix_weight = nn.Parameter(torch.empty(out_heads, in_heads))  # 1×1 conv
        self.gamma = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.pool_weight.fill_(0.25)
        self.head_mix_weight.fill_(1.0 / self.head_mix_weight.shape[1])
        self.gamma.fill_(self.gamma_init)

    def forward(self, scores: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Scores (B, H_{m−1}, 2h·2w, N'_{m−1}) of stage m−1 → (B, H_m, h·w, N'_m) for grid h×w."""
        B, H, _, K = scores.shape
        h, w = grid
        cells = scores.reshape(B, H, h, 2, w, 2, K)  # (B, H, h, 2, w, 2, N'_{m−1}): 2×2 cells
        x = sum(
            self.pool_weight[i, j] * cells[:, :, :, i, :, j] for i in range(2) for j in range(2)
        )  # (B, H, h, w, N'_{m−1})
        x = x.reshape(B, H, h * w, K)  # (B, H, N_m, N'_{m−1})
        if self.resize_keys:
            in_keys = (2 * h // self.in_sr_ratio, 2 * w // self.in_sr_ratio)
            out_keys = (h // self.out_sr_ratio, w // self.out_sr_ratio)
            x = x.reshape(B * H * h * w, 1, in_keys[0], in_keys[1])  # the key axis as an image
            x = F.interpolate(x, size=out_keys, mode="bilinear", align_corners=False)
            x = x.reshape(B, H, h * w, -1)  # (B, H, N_m, N'_m)
        x = torch.einsum("oh,bhnk->bonk", self.head_mix_weight, x)  # (B, H_m, N_m, N'_m)
        return self.gamma * x
