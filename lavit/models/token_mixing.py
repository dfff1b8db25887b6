"""How a Less-Attention layer transforms the attention it is handed (docs/spec.md §3.2, §3.5).

A ``TokenMixing`` maps scores ``S`` (B, H, N, N') on an h×w query grid and an h'×w' key grid to
``S'`` of the same shape, and owns the size-dependent parameters of an LA layer: ``forward``
takes any grid, ``resize_`` moves its native grids, ``resize_state`` adapts a checkpoint. Every
form computes ``S + (W − I)·S``, so identity is exact reuse at every size and precision.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn

from .resize import (
    Grid,
    infer_grid,
    resize_token_mixing,
    resize_token_vector,
    token_mixing_deviation,
)

LessAttentionInit = Literal["identity", "random"]
LAMixing = Literal["dense", "separable", "pooled"]
LA_MIXINGS: tuple[str, ...] = get_args(LAMixing)


def _separable_mix(
    x: torch.Tensor, d_rows: torch.Tensor, d_cols: torch.Tensor, grid: Grid, dim: int
) -> torch.Tensor:
    """``(I + D_rows) ⊗ (I + D_cols)`` applied to ``x`` (B, H, N, K) along ``dim`` (-2 or -1)."""
    B, H, N, K = x.shape
    h, w = grid
    if dim == -2:
        x = x.reshape(B, H, h, w, K)  # (B, H, h, w, K): the query axis as its grid
        x = x + torch.einsum("cj,bhijk->bhick", d_cols, x)  # the columns' factor
        x = x + torch.einsum("ai,bhijk->bhajk", d_rows, x)  # the rows' factor
        return x.reshape(B, H, N, K)
    x = x.reshape(B, H, N, h, w)  # (B, H, N, h', w'): the key axis as its grid
    x = x + torch.einsum("bhnij,cj->bhnic", x, d_cols)
    x = x + torch.einsum("bhnij,ai->bhnaj", x, d_rows)
    return x.reshape(B, H, N, K)


def _pooled_mix(x: torch.Tensor, deviation: torch.Tensor, native: Grid, grid: Grid, dim: int):
    """``x + Up((W − I)·Pool(x))`` along ``dim``; exactly ``x + (W − I)·x`` on the native grid."""
    B, H, N, K = x.shape
    if grid[0] == native[0] and grid[1] == native[1]:
        if dim == -2:
            return x + torch.einsum("qn,bhnk->bhqk", deviation, x)  # (B, H, N, K)
        return x + torch.einsum("bhnk,pk->bhnp", x, deviation)  # (B, H, N, K)
    if dim == -2:
        maps = x.permute(0, 1, 3, 2).reshape(B * H, K, *grid)  # (B·H, K, h, w)
    else:
        maps = x.reshape(B * H, N, *grid)  # (B·H, N, h', w')
    pooled = F.adaptive_avg_pool2d(maps, native).flatten(2)  # (B·H, C, P)
    mixed = (pooled @ deviation.t()).reshape(B * H, -1, *native)  # (B·H, C, ph, pw)
    up = F.interpolate(mixed, size=grid, mode="bilinear", align_corners=False).flatten(2)
    if dim == -2:
        return x + up.reshape(B, H, K, N).transpose(-1, -2)  # (B, H, N, K)
    return x + up.reshape(B, H, N, K)


# Shape logic runs as opaque calls under torch.fx (plain symbolic_trace and timm's tracer alike),
# so a traced model adapts Ψ/Θ to whatever grid it is given.
for _fn in (token_mixing_deviation, resize_token_vector, _separable_mix, _pooled_mix):
    register_notrace_function(_fn)
    torch.fx.wrap(_fn.__name__)


def nearest_kronecker(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` minimising ‖W − A ⊗ B‖_F for an N×N W over an h×w grid (A: h×h, B: w×w).

    Van Loan–Pitsianis: rearrange W to R[(i, i'), (j, j')] = W[(i, j), (i', j')] and take its
    best rank-1 approximation σ·u·vᵀ. The product fixes A and B up to c ↔ 1/c: A gets a mean
    diagonal of 1 (the identity gives I_h and I_w), or an even split when its trace is ~0.
    """
    h, w = grid
    r = weight.double().reshape(h, w, h, w).permute(0, 2, 1, 3).reshape(h * h, w * w)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    a, b = u[:, 0].reshape(h, h), vh[0].reshape(w, w) * s[0]
    trace = torch.trace(a)
    scale = h / trace if trace.abs() > 1e-6 * a.abs().sum() else s[0].sqrt()
    return (a * scale).to(weight.dtype), (b / scale).to(weight.dtype)


@torch.no_grad()
def init_mixing_(init: LessAttentionInit, *weights: nn.Parameter) -> None:
    """``"identity"``: matrices I, vectors (Θ's bias) 0; ``"random"``: ``nn.Linear``'s uniform
    ±1/√fan_in."""
    for weight in weights:
        if init == "random":
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
        elif weight.ndim == 2:
            nn.init.eye_(weight)
        else:
            nn.init.zeros_(weight)


class TokenMixing(nn.Module):
    """Base of the forms: ``forward(scores, query_grid, key_grid) → S'``.

    ``query_grid`` / ``key_grid`` are the native grids the parameters were made for. Every form
    has Θ's bias ``b_Θ`` (one value per key token), and loads the paper's dense Ψ/Θ.
    """

    def __init__(self, query_grid: Grid, key_grid: Grid) -> None:
        super().__init__()
        self.query_grid = (int(query_grid[0]), int(query_grid[1]))
        self.key_grid = (int(key_grid[0]), int(key_grid[1]))

    def resize_(self, query_grid: Grid, key_grid: Grid) -> None:
        """Resample the parameters in place to new native grids (nothing to do for the forms
        whose parameters do not depend on the input size)."""

    def resize_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Resample a checkpoint's dense-form entries (``prefix`` + name) to the native grids."""
        for name, grid, resize in (
            ("psi", self.query_grid, resize_token_mixing),
            ("theta", self.key_grid, resize_token_mixing),
            ("theta_bias", self.key_grid, resize_token_vector),
        ):
            value = state.get(prefix + name)
            if value is not None and value.shape[0] != grid[0] * grid[1]:
                state[prefix + name] = resize(value, infer_grid(value.shape[0], grid), grid)


class DenseTokenMixing(TokenMixing):
    """The paper's form, ``S' = W_Ψ · S · W_Θᵀ + (W_Ψ 1) b_Θᵀ``: N×N Ψ on the query axis, Θ on
    the key axis, one pair per LA layer shared across heads; its cost grows as N²·N' per head.

    Ψ has no bias: ``b_Ψ 1ᵀ`` is constant along keys, so it cancels in the softmax (and reaches
    a following LA layer only as a rank-one term without gradient at identity init).
    """

    def __init__(self, query_grid: Grid, key_grid: Grid, init: LessAttentionInit = "identity"):
        super().__init__(query_grid, key_grid)
        num_queries = self.query_grid[0] * self.query_grid[1]
        num_keys = self.key_grid[0] * self.key_grid[1]
        self.psi = nn.Parameter(torch.empty(num_queries, num_queries))  # W_Ψ, query axis
        self.theta = nn.Parameter(torch.empty(num_keys, num_keys))  # W_Θ, key axis
        self.theta_bias = nn.Parameter(torch.empty(num_keys))  # b_Θ
        init_mixing_(init, self.psi, self.theta, self.theta_bias)

    def forward(self, scores: torch.Tensor, query_grid: Grid, key_grid: Grid) -> torch.Tensor:
        # Ψ − I and Θ − I at this grid (resampled from the native grids when they differ).
        d_psi = token_mixing_deviation(self.psi, self.query_grid, query_grid)  # (N, N)
        d_theta = token_mixing_deviation(self.theta, self.key_grid, key_grid)  # (N', N')
        bias = resize_token_vector(self.theta_bias, self.key_grid, key_grid)  # (N',)
        B, H, N, K = scores.shape
        s = scores.reshape(B * H * N, K)  # (B·H·N, N'): Θ on the key axis is one GEMM
        # The adds go in place into fresh GEMM outputs (autograd keeps a GEMM's inputs, not its
        # output): one pass over the scores less each than ``t + GEMM``.
        t = torch.addmm(bias, s, d_theta.t()).add_(s)  # T = S Θᵀ + 1 b_Θᵀ, as S + S (Θ − I)ᵀ + …
        t = t.reshape(B, H, N, K)  # (B, H, N, N')
        # Ψ on the query axis: matmul folds (N, N) × (B, H, N, N') into one GEMM over B·H·N'.
        return torch.matmul(d_psi, t).add_(t)  # (B, H, N, N'): S' = Ψ T = T + (Ψ − I) T

    @torch.no_grad()
    def resize_(self, query_grid: Grid, key_grid: Grid) -> None:
        query_grid, key_grid = tuple(query_grid), tuple(key_grid)
        self.psi = nn.Parameter(resize_token_mixing(self.psi, self.query_grid, query_grid))
        self.theta = nn.Parameter(resize_token_mixing(self.theta, self.key_grid, key_grid))
        bias = resize_token_vector(self.theta_bias, self.key_grid, key_grid)
        self.theta_bias = nn.Parameter(bias.clone())
        self.query_grid, self.key_grid = query_grid, key_grid


class SeparableTokenMixing(TokenMixing):
    """``S' = (Ψ_h ⊗ Ψ_w) · (S (Θ_h ⊗ Θ_w)ᵀ + 1 b_Θᵀ)``, each factor resampled per grid.

    Parameters h² + w² per matrix at any input size, cost N·(h+w) per key and head. A dense
    checkpoint loads as its nearest Kronecker factors (exact for the identity).
    """

    def __init__(self, query_grid: Grid, key_grid: Grid, init: LessAttentionInit = "identity"):
        super().__init__(query_grid, key_grid)
        (qh, qw), (kh, kw) = self.query_grid, self.key_grid
        self.theta_bias = nn.Parameter(torch.empty(kh * kw))  # b_Θ
        self.psi_h = nn.Parameter(torch.empty(qh, qh))
        self.psi_w = nn.Parameter(torch.empty(qw, qw))
        self.theta_h = nn.Parameter(torch.empty(kh, kh))
        self.theta_w = nn.Parameter(torch.empty(kw, kw))
        init_mixing_(init, self.psi_h, self.psi_w, self.theta_h, self.theta_w, self.theta_bias)

    def forward(self, scores: torch.Tensor, query_grid: Grid, key_grid: Grid) -> torch.Tensor:
        bias = resize_token_vector(self.theta_bias, self.key_grid, key_grid)  # (N',)
        (qh, qw), (kh, kw) = self.query_grid, self.key_grid
        # Each factor's W − I at this grid: a mixing over a line of tokens, as an (n, 1) grid.
        d_th = token_mixing_deviation(self.theta_h, (kh, 1), (key_grid[0], 1))
        d_tw = token_mixing_deviation(self.theta_w, (kw, 1), (key_grid[1], 1))
        t = _separable_mix(scores, d_th, d_tw, key_grid, -1) + bias  # S Θᵀ + 1 b_Θᵀ
        d_ph = token_mixing_deviation(self.psi_h, (qh, 1), (query_grid[0], 1))
        d_pw = token_mixing_deviation(self.psi_w, (qw, 1), (query_grid[1], 1))
        return _separable_mix(t, d_ph, d_pw, query_grid, -2)  # (B, H, N, N'): Ψ T

    def resize_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """A dense-form checkpoint's Ψ/Θ become their nearest Kronecker factors."""
        super().resize_state(state, prefix)
        for name, grid in (("psi", self.query_grid), ("theta", self.key_grid)):
            value = state.pop(prefix + name, None)
            if value is not None:
                state[f"{prefix}{name}_h"], state[f"{prefix}{name}_w"] = nearest_kronecker(
                    value, grid
                )


class PooledTokenMixing(TokenMixing):
    """``S' = Ψ̃(Θ̃(S) + 1 b_Θᵀ)`` with ``Ψ̃(x) = x + Up((Ψ − I)·Pool(x))`` (Θ̃ likewise).

    Ψ/Θ stay on the native grids: there it is exactly the dense form (a dense checkpoint loads
    as is); at another grid the deviation acts on scores average-pooled to the native grid.
    """

    def __init__(self, query_grid: Grid, key_grid: Grid, init: LessAttentionInit = "identity"):
        super().__init__(query_grid, key_grid)
        n, k = self.query_grid[0] * self.query_grid[1], self.key_grid[0] * self.key_grid[1]
        self.theta_bias = nn.Parameter(torch.empty(k))  # b_Θ
        self.psi = nn.Parameter(torch.empty(n, n))  # on the native (pooled) query grid
        self.theta = nn.Parameter(torch.empty(k, k))  # on the native (pooled) key grid
        init_mixing_(init, self.psi, self.theta, self.theta_bias)

    def forward(self, scores: torch.Tensor, query_grid: Grid, key_grid: Grid) -> torch.Tensor:
        bias = resize_token_vector(self.theta_bias, self.key_grid, key_grid)  # (N',)
        d_theta = token_mixing_deviation(self.theta, self.key_grid, self.key_grid)  # Θ − I
        t = _pooled_mix(scores, d_theta, self.key_grid, key_grid, -1) + bias
        d_psi = token_mixing_deviation(self.psi, self.query_grid, self.query_grid)  # Ψ − I
        return _pooled_mix(t, d_psi, self.query_grid, query_grid, -2)  # (B, H, N, N')


def make_token_mixing(
    form: LAMixing, query_grid: Grid, key_grid: Grid, init: LessAttentionInit = "identity"
) -> TokenMixing:
    """The ``la_mixing`` form of an LA layer, made for its native grids."""
    forms = dict(dense=DenseTokenMixing, separable=SeparableTokenMixing, pooled=PooledTokenMixing)
    return forms[form](query_grid, key_grid, init)
