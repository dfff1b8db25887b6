"""The Diagonality-Preserving (DP) loss of LaViT (docs/spec.md §3.4).

Printed in the paper, for an N×N attention matrix A::

    L_DP = Σ_i Σ_j |A_ij − A_ji|  +  Σ_i ( (N−1)·A_ii − Σ_{j≠i} A_ij )

Minimising the second term as printed *lowers* the diagonal, the opposite of its name, and is
unbounded below on scores. Variants (both divided by N so they do not grow with resolution):

* ``"paper"``: the printed equation, literally.
* ``"corrected"`` (default): the diagonal term with its sign flipped and shifted by the constant
  (N−1) so that its minimum, on the identity, is 0, then averaged over rows::

      L = (1/N) Σ_ij |A_ij − A_ji|  +  (1/N) Σ_i ( Σ_{j≠i} A_ij − (N−1)·A_ii + (N−1) ) / N

  On a row-stochastic A the second term is the mean off-diagonal mass, (1/N) Σ_i (1 − A_ii),
  so the loss lies in [0, 3) and grows as mass leaves the diagonal.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPLossVariant = Literal["corrected", "paper"]
DP_LOSS_VARIANTS: tuple[str, ...] = ("corrected", "paper")


def diagonality_preserving_loss(
    attn: torch.Tensor, variant: DPLossVariant = "corrected"
) -> torch.Tensor:
    """DP loss of square attention matrices ``attn`` of shape (..., N, N), averaged over ``...``."""
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"the DP loss needs square matrices, got shape {tuple(attn.shape)}")
    n = attn.shape[-1]
    asymmetry = (attn - attn.transpose(-2, -1)).abs().sum(dim=(-2, -1))  # (...)
    diag = attn.diagonal(dim1=-2, dim2=-1)  # (..., N)
    off_diag = attn.sum(dim=-1) - diag  # (..., N): Σ_{j≠i} A_ij
    if variant == "paper":
        diag_term = ((n - 1) * diag - off_diag).sum(dim=-1)
    elif variant == "corrected":
        diag_term = ((off_diag - (n - 1) * diag + (n - 1)) / n).sum(dim=-1)
    else:
        raise ValueError(f"dp_loss_variant must be one of {DP_LOSS_VARIANTS}, got {variant!r}")
    return ((asymmetry + diag_term) / n).mean()


def region_attention(
    probs: torch.Tensor, query_grid: tuple[int, int], key_grid: tuple[int, int]
) -> torch.Tensor:
    """Pool an N×N' attention over its query grid to the square N'×N' region-to-region matrix.

    Row-stochastic input stays row-stochastic (each pooled row is a mean of rows).
    ``probs``: (B, H, N, N') with N = h·w and N' = h'·w'. Returns (B, H, N', N').
    """
    B, H, N, K = probs.shape
    if N == K:
        return probs
    x = probs.transpose(2, 3).reshape(B * H * K, 1, *query_grid)  # query axis as an image
    x = F.adaptive_avg_pool2d(x, key_grid)  # (B·H·N', 1, h', w')
    return x.reshape(B, H, K, K).transpose(2, 3)  # (B, H, N', N')


def attention_dp_loss(
    probs: torch.Tensor,
    query_grid: tuple[int, int],
    key_grid: tuple[int, int],
    variant: DPLossVariant = "corrected",
) -> torch.Tensor:
    """DP loss of one layer's attention (B, H, N, N'), pooled to N'×N', averaged over B and H."""
    region = region_attention(probs, query_grid, key_grid)  # (B, H, N', N')
    return diagonality_preserving_loss(region, variant)
