"""The la_mixing forms of Ψ/Θ: identity is exact reuse at every size, conversion from a dense
(224²-trained) matrix, equivalence with the dense form where it must hold, size-independence."""

import pytest
import torch

from lavit.models.mixing import (
    DenseMixing,
    PooledMixing,
    SeparableMixing,
    make_mixing,
    nearest_kronecker,
    resize_mixing_1d,
    resize_mixing_2d,
)

GRID = (6, 4)  # "the model's grid" (non-square, so rows and columns are not mixed up)
OTHER_GRIDS = [(6, 4), (9, 12), (3, 2), (5, 7)]


def _scores(grid, keys=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, grid[0] * grid[1], keys, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("form", ["dense", "separable", "pooled"])
@pytest.mark.parametrize("grid", OTHER_GRIDS)
def test_identity_is_exact_reuse_at_every_size(form, grid):
    mixing = make_mixing(form, GRID).double()
    x = _scores(grid)
    assert torch.equal(mixing(x, grid, dim=-2), x)
    keys = _scores((2, 3), keys=grid[0] * grid[1])  # (B, H, 6 queries, N keys)
    assert torch.equal(mixing(keys, grid, dim=-1), keys)


def test_resizing_keeps_the_identity_and_stays_near_it():
    for old, new in [((6, 4), (12, 8)), ((6, 4), (3, 2)), ((5, 5), (7, 3))]:
        eye = torch.eye(old[0] * old[1], dtype=torch.float64)
        assert torch.equal(
            resize_mixing_2d(eye, old, new), torch.eye(new[0] * new[1], dtype=torch.float64)
        )
        near = eye + 1e-3 * torch.randn_like(eye)
        assert (
            resize_mixing_2d(near, old, new) - torch.eye(new[0] * new[1], dtype=torch.float64)
        ).abs().max() < 1e-2
    assert torch.equal(resize_mixing_1d(torch.eye(5), 9), torch.eye(9))


@pytest.mark.parametrize("dim", [-2, -1])
def test_each_form_applies_the_matrix_it_stands_for(dim):
    torch.manual_seed(0)
    separable = SeparableMixing(GRID, "random").double()
    dense = DenseMixing(GRID).double()
    dense.load_dense(separable.dense(), GRID)
    pooled = PooledMixing(GRID, "random").double()
    if dim == -2:
        x = _scores(GRID)
        matrix_applied = lambda w: w @ x  # noqa: E731
    else:
        x = _scores((2, 2), keys=GRID[0] * GRID[1])
        matrix_applied = lambda w: x @ w.t()  # noqa: E731
    torch.testing.assert_close(separable(x, GRID, dim), matrix_applied(separable.dense()))
    torch.testing.assert_close(dense(x, GRID, dim), matrix_applied(separable.dense()))
    torch.testing.assert_close(
        pooled(x, GRID, dim), matrix_applied(pooled.weight)
    )  # exact on its grid


def test_a_dense_checkpoint_converts_to_each_form():
    """Pooled = dense exactly at the trained grid; separable recovers a Kronecker Ψ exactly and
    is the best Kronecker approximation otherwise; both run at any other size."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 6, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    kron = torch.kron(a, b)
    x = _scores(GRID)
    separable = SeparableMixing(GRID).double()
    separable.load_dense(kron, GRID)
    torch.testing.assert_close(separable.dense(), kron)
    torch.testing.assert_close(separable(x, GRID, -2), kron @ x)

    general = torch.eye(24, dtype=torch.float64) + 0.1 * torch.randn(24, 24, dtype=torch.float64)
    pooled = PooledMixing(GRID).double()
    pooled.load_dense(general, GRID)
    torch.testing.assert_close(pooled(x, GRID, -2), general @ x)
    separable.load_dense(general, GRID)
    best = (general - separable.dense()).norm()
    for other in (torch.kron(torch.eye(6), torch.eye(4)), torch.kron(a, b)):
        assert best <= (general - other.double()).norm() + 1e-9
    for grid in OTHER_GRIDS:
        y = _scores(grid)
        for mixing in (pooled, separable):
            assert torch.isfinite(mixing(y, grid, -2)).all()


def test_nearest_kronecker_of_the_identity_is_the_identity():
    a, b = nearest_kronecker(torch.eye(24), GRID)
    torch.testing.assert_close(a, torch.eye(6))
    torch.testing.assert_close(b, torch.eye(4))


def test_parameters_do_not_grow_with_the_input_size():
    sizes = {}
    for form in ("dense", "separable", "pooled"):
        mixing = make_mixing(form, (14, 14))
        sizes[form] = sum(p.numel() for p in mixing.parameters())
        x = _scores((50, 84), keys=3).float()
        assert mixing(x, (50, 84), -2).shape == x.shape
        assert sum(p.numel() for p in mixing.parameters()) == sizes[form]  # nothing added
    assert sizes == {"dense": 196**2, "separable": 2 * 14**2, "pooled": 196**2}


def test_every_form_is_trainable_at_another_size():
    for form in ("dense", "separable", "pooled"):
        mixing = make_mixing(form, GRID, "random")
        mixing(_scores((9, 12)).float(), (9, 12), -2).square().sum().backward()
        grads = [p.grad for p in mixing.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), form


def test_unknown_form_is_named():
    with pytest.raises(ValueError, match="la_mixing must be one of"):
        make_mixing("kron", GRID)
