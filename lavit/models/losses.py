"""The Diagonality-Preserving (DP) loss of LaViT (docs/spec.md §3.4).

On row-stochastic attention P (N×N), both variants divided by N:

* ``"paper"``, the printed equation: ``(1/N) Σ_ij |P_ij − P_ji| + tr(P) − 1``. Minimising it
  *lowers* the trace, pushing attention away from the identity; it lies in [−1, N + 1].
* ``"corrected"`` (default), the diagonal term's sign flipped and shifted so that the identity
  scores 0: ``(1/N) Σ_ij |P_ij − P_ji| + 1 − tr(P)/N``, in [0, 3] (a cyclic shift reaches 3).

With ``"corrected"`` the loss is O(1) per layer and its optimum is every token attending to
itself only, so keep λ (``dp_loss_weight``) small enough not to dominate the cross-entropy
(``sweeps/dp_loss.yaml`` tries 1e-3 … 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .validation import check_choice

DPLossVariant = Literal["corrected", "paper"]


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
    check_choice("dp_loss_variant", variant, DPLossVariant)
    if variant == "paper":
        diag_term = ((n - 1) * diag - off_diag).sum(dim=-1)
    else:
        diag_term = ((off_diag - (n - 1) * diag + (n - 1)) / n).sum(dim=-1)
    return ((asymmetry + diag_term) / n).mean()


def region_attention(
    probs: torch.Tensor, query_grid: tuple[int, int], key_grid: tuple[int, int]
) -> torch.Tensor:
    """Pool attention (B, H, N, N') over its query grid to the square region-to-region
    (B, H, N', N'); row-stochastic input stays so (each pooled row is a mean of rows)."""
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
