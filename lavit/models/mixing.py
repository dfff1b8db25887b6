"""Token mixings for Less-Attention's Ψ (query axis) and Θ (key axis), at any resolution.

The paper's Ψ and Θ are N×N matrices over the tokens of one grid ("dense"); at dense-prediction
sizes they explode (N = 4,200 in LaViT-T's stage 3 at 800×1344: 17.6 M parameters and N²·N′
multiply-adds per head). ``la_mixing`` chooses the form:

* ``"dense"``: the literal N×N matrix, built for the model's grid; at another grid it is resized
  identity-preservingly (the deviation from the identity is interpolated, not the identity).
  Cost N²·K per head, parameters N².
* ``"separable"``: a Kronecker product ``W = W_h ⊗ W_w`` (h×h rows, w×w columns of the grid),
  stored at the model's grid and resized as 1-D maps at another one. Cost N·(h+w)·K, parameters
  h² + w², neither growing with the input size (the stored factors stay at the model's grid).
  From a dense checkpoint: the nearest Kronecker product (Van Loan–Pitsianis: the best rank-1
  approximation of W rearranged as an (h·h)×(w·w) matrix), exact for Kronecker matrices such as
  the identity.
* ``"pooled"``: a P×P matrix on a fixed pooled grid (the model's grid by default), applied as a
  residual ``x + Up((W − I)·Pool(x))``: the identity stays exact at every size, and at the model's
  grid Pool and Up are identities so ``pooled`` is exactly ``dense`` there. Cost P²·K plus the
  pooling, parameters P², both fixed. From a dense checkpoint: W itself.

Every form's ``forward(x, grid, dim)`` mixes ``x`` (B, H, N, K) along ``dim = -2`` (queries:
``out = W x``) or ``dim = -1`` (keys: ``out = x Wᵀ``), for the ``grid`` (h, w) of that axis.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LA_MIXINGS",
    "DenseMixing",
    "LAMixing",
    "PooledMixing",
    "SeparableMixing",
    "TokenMixing",
    "make_mixing",
    "nearest_kronecker",
    "deviation_1d",
    "deviation_2d",
    "resize_mixing_1d",
    "resize_mixing_2d",
]

Grid = tuple[int, int]
LAMixing = Literal["dense", "separable", "pooled"]
LA_MIXINGS: tuple[str, ...] = ("dense", "separable", "pooled")


# ------------------------------------------------------------------------- identity-preserving
def _resize_image(x: torch.Tensor, size: Grid) -> torch.Tensor:
    """Bilinear resize of (C, h, w) maps, antialiased when shrinking."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(
        x[None], size=size, mode="bilinear", align_corners=False, antialias=shrink
    )[0]


def _eye_like(weight: torch.Tensor, n: int | None = None) -> torch.Tensor:
    return torch.eye(n or weight.shape[0], dtype=weight.dtype, device=weight.device)


def deviation_1d(weight: torch.Tensor, size: int) -> torch.Tensor:
    """``W − I`` of an n×n mixing over a line of tokens, for ``size`` tokens:
    ``(n/size)·resize(W − I)`` (the deviation is resampled as an image, its column axis scaled
    so that mixing a constant line keeps, to first order, its value). Zero stays zero."""
    n = weight.shape[0]
    delta = weight - _eye_like(weight)
    if n == size:
        return delta
    return _resize_image(delta[None].float(), (size, size))[0].to(weight.dtype) * (n / size)


def resize_mixing_1d(weight: torch.Tensor, size: int) -> torch.Tensor:
    """An n×n mixing over a line of tokens, for ``size`` tokens: ``I + deviation_1d``."""
    return (
        weight if weight.shape[0] == size else _eye_like(weight, size) + deviation_1d(weight, size)
    )


def deviation_2d(weight: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """``W − I`` of an N×N mixing over an h×w grid, for another grid (the deviation as a 4-D
    (h, w, h, w) kernel resized, column axis scaled by N_old/N_new). Zero stays zero."""
    delta = weight - _eye_like(weight)
    if tuple(old) == tuple(new):
        return delta
    n_old, n_new = old[0] * old[1], new[0] * new[1]
    delta = _resize_image(delta.float().reshape(n_old, *old), new).reshape(n_old, n_new)  # cols
    delta = _resize_image(delta.t().reshape(n_new, *old), new).reshape(n_new, n_new).t()  # rows
    return delta.to(weight.dtype) * (n_old / n_new)


def resize_mixing_2d(weight: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """An N×N mixing over an h×w grid, for another grid: ``I + deviation_2d``."""
    if tuple(old) == tuple(new):
        return weight
    return _eye_like(weight, new[0] * new[1]) + deviation_2d(weight, old, new)


def resize_token_map(vector: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """A per-token vector (N,) on grid ``old`` resampled to grid ``new`` (bilinear)."""
    if tuple(old) == tuple(new):
        return vector
    return _resize_image(vector.float().reshape(1, *old), new).flatten().to(vector.dtype)


def nearest_kronecker(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` minimising ‖W − A ⊗ B‖_F for an N×N W over an h×w grid (A: h×h, B: w×w).

    Van Loan–Pitsianis: rearrange W to R[(i, i'), (j, j')] = W[(i, j), (i', j')] and take its
    best rank-1 approximation σ·u·vᵀ. The product fixes A and B up to a factor c ↔ 1/c: A is
    scaled to a mean diagonal of 1 (so the identity gives I_h and I_w, as an identity
    initialisation does), or the scale split evenly when A's trace is ~0. Exact when W is a
    Kronecker product.
    """
    h, w = grid
    r = weight.double().reshape(h, w, h, w).permute(0, 2, 1, 3).reshape(h * h, w * w)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    a, b = u[:, 0].reshape(h, h), vh[0].reshape(w, w) * s[0]
    trace = torch.trace(a)
    scale = h / trace if trace.abs() > 1e-6 * a.abs().sum() else s[0].sqrt()
    return (a * scale).to(weight.dtype), (b / scale).to(weight.dtype)


# ------------------------------------------------------------------------------------ forms
# Every form computes ``x + (W − I)·x``: the same products as ``W·x``, but an identity (zero
# deviation) reproduces ``x`` exactly in any matmul precision (TF32 and bf16 round the inputs of
# a GEMM, so ``I·x`` would not be exact there).
def _add_mixed(x: torch.Tensor, delta: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == -2:
        return x + torch.einsum("qn,bhnk->bhqk", delta, x)  # one (N, N) × (N, B·H·K) GEMM
    return x + torch.einsum("bhnk,pk->bhnp", x, delta)  # one (B·H·N, K) × (K, K) GEMM


class TokenMixing(nn.Module):
    """A learned linear map over the tokens of a grid (stored at ``grid``, usable at any)."""

    form: str

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = tuple(grid)

    def reset_parameters(self, init: Literal["identity", "random"] = "identity") -> None:
        raise NotImplementedError

    def load_dense(self, weight: torch.Tensor, grid: Grid) -> None:
        """Take a dense N×N matrix trained on ``grid`` (a checkpoint of the literal form)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, grid: Grid, dim: int) -> torch.Tensor:
        raise NotImplementedError


def _random_(weight: torch.Tensor) -> None:
    bound = 1.0 / math.sqrt(weight.shape[1])  # nn.Linear's own initialisation
    nn.init.uniform_(weight, -bound, bound)


class DenseMixing(TokenMixing):
    """The literal N×N matrix (resized identity-preservingly at another grid)."""

    form = "dense"

    def __init__(self, grid: Grid, init: str = "identity") -> None:
        super().__init__(grid)
        n = grid[0] * grid[1]
        self.weight = nn.Parameter(torch.empty(n, n))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity") -> None:
        nn.init.eye_(self.weight) if init == "identity" else _random_(self.weight)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, grid: Grid) -> None:
        self.weight.copy_(resize_mixing_2d(weight.to(self.weight), grid, self.grid))

    def forward(self, x: torch.Tensor, grid: Grid, dim: int) -> torch.Tensor:
        return _add_mixed(x, deviation_2d(self.weight, self.grid, grid), dim)


class SeparableMixing(TokenMixing):
    """``W = W_h ⊗ W_w``: rows of the grid mixed by W_h (h×h), columns by W_w (w×w)."""

    form = "separable"

    def __init__(self, grid: Grid, init: str = "identity") -> None:
        super().__init__(grid)
        self.weight_h = nn.Parameter(torch.empty(grid[0], grid[0]))
        self.weight_w = nn.Parameter(torch.empty(grid[1], grid[1]))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity") -> None:
        for weight in (self.weight_h, self.weight_w):
            nn.init.eye_(weight) if init == "identity" else _random_(weight)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, grid: Grid) -> None:
        a, b = nearest_kronecker(weight, grid)
        self.weight_h.copy_(resize_mixing_1d(a, self.grid[0]))
        self.weight_w.copy_(resize_mixing_1d(b, self.grid[1]))

    def dense(self, grid: Grid | None = None) -> torch.Tensor:
        """The N×N matrix this form stands for at ``grid`` (for tests and analysis)."""
        grid = grid or self.grid
        a, b = resize_mixing_1d(self.weight_h, grid[0]), resize_mixing_1d(self.weight_w, grid[1])
        return torch.kron(a, b)

    def forward(self, x: torch.Tensor, grid: Grid, dim: int) -> torch.Tensor:
        h, w = grid
        da, db = deviation_1d(self.weight_h, h), deviation_1d(self.weight_w, w)
        B, H, N, K = x.shape
        if dim == -2:
            x = x.reshape(B, H, h, w, K)  # (B, H, h, w, K): the query axis as its grid
            x = x + torch.einsum("ai,bhiwk->bhawk", da, x)  # W_h on the rows
            x = x + torch.einsum("cj,bhajk->bhack", db, x)  # W_w on the columns
            return x.reshape(B, H, N, K)
        x = x.reshape(B, H, N, h, w)  # (B, H, N, h', w'): the key axis as its grid
        x = x + torch.einsum("bhnij,ai->bhnaj", x, da)
        x = x + torch.einsum("bhnaj,cj->bhnac", x, db)
        return x.reshape(B, H, N, K)


class PooledMixing(TokenMixing):
    """``x + Up((W − I)·Pool(x))`` with W (P×P) on a fixed pooled grid (exact ``W x`` on it)."""

    form = "pooled"

    def __init__(self, grid: Grid, init: str = "identity", pool_grid: Grid | None = None) -> None:
        super().__init__(grid)
        self.pool_grid = tuple(pool_grid or grid)
        p = self.pool_grid[0] * self.pool_grid[1]
        self.weight = nn.Parameter(torch.empty(p, p))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity") -> None:
        nn.init.eye_(self.weight) if init == "identity" else _random_(self.weight)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, grid: Grid) -> None:
        self.weight.copy_(resize_mixing_2d(weight.to(self.weight), grid, self.pool_grid))

    def forward(self, x: torch.Tensor, grid: Grid, dim: int) -> torch.Tensor:
        delta = self.weight - _eye_like(self.weight)
        if tuple(grid) == self.pool_grid:  # Pool and Up are identities: exactly W·x
            return _add_mixed(x, delta, dim)
        B, H, N, K = x.shape
        h, w = grid
        ph, pw = self.pool_grid
        if dim == -2:
            maps = x.permute(0, 1, 3, 2).reshape(B * H, K, h, w)  # (B·H, K, h, w)
        else:
            maps = x.reshape(B * H, N, h, w)  # (B·H, N, h', w')
        pooled = F.adaptive_avg_pool2d(maps, (ph, pw)).flatten(2)  # (B·H, C, P)
        mixed = pooled @ delta.t()  # (B·H, C, P): (W − I) on the pooled grid
        up = F.interpolate(
            mixed.reshape(B * H, -1, ph, pw), size=(h, w), mode="bilinear", align_corners=False
        ).flatten(2)  # (B·H, C, N)
        if dim == -2:
            return x + up.reshape(B, H, K, N).transpose(-1, -2)
        return x + up.reshape(B, H, N, K)


def make_mixing(form: str, grid: Grid, init: str = "identity") -> TokenMixing:
    """The ``la_mixing`` form for a grid (the model's grid at construction)."""
    if form == "dense":
        return DenseMixing(grid, init)
    if form == "separable":
        return SeparableMixing(grid, init)
    if form == "pooled":
        return PooledMixing(grid, init)
    raise ValueError(f"la_mixing must be one of {LA_MIXINGS}, got {form!r}")
