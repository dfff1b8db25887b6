"""The la_mixing forms of Ψ/Θ: identity is exact reuse at every size, a dense (224²-trained)
checkpoint converts into each, equivalence with the dense form where it must hold."""

import pytest
import torch
from small_lavit import SMALL

from lavit.dense.backbone import DenseBackbone
from lavit.models import LaViT
from lavit.models.lavit import checkpoint_filter_fn
from lavit.models.token_mixing import (
    DenseTokenMixing,
    PooledTokenMixing,
    SeparableTokenMixing,
    make_token_mixing,
    nearest_kronecker,
)

FORMS = ["dense", "separable", "pooled"]
QUERY, KEY = (6, 4), (3, 2)  # native grids (non-square: rows and columns must not be mixed up)
GRIDS = [((6, 4), (3, 2)), ((12, 10), (6, 5)), ((4, 2), (2, 1)), ((10, 14), (5, 7))]


def _scores(query_grid, key_grid, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, k = query_grid[0] * query_grid[1], key_grid[0] * key_grid[1]
    return torch.randn(2, 3, n, k, generator=g)


@pytest.mark.parametrize("form", FORMS)
def test_identity_is_exact_reuse_at_every_size(form):
    mixing = make_token_mixing(form, QUERY, KEY, "identity")
    for query_grid, key_grid in GRIDS:
        scores = _scores(query_grid, key_grid)
        assert torch.equal(mixing(scores, query_grid, key_grid), scores), (query_grid, key_grid)


def test_separable_and_pooled_are_the_dense_form_on_the_native_grid():
    torch.manual_seed(0)
    separable = SeparableTokenMixing(QUERY, KEY, "random")
    dense = DenseTokenMixing(QUERY, KEY)
    with torch.no_grad():
        dense.psi.copy_(torch.kron(separable.psi_h, separable.psi_w))
        dense.theta.copy_(torch.kron(separable.theta_h, separable.theta_w))
        dense.theta_bias.copy_(separable.theta_bias)
    scores = _scores(QUERY, KEY)
    torch.testing.assert_close(separable(scores, QUERY, KEY), dense(scores, QUERY, KEY))
    pooled = PooledTokenMixing(QUERY, KEY)
    pooled.load_state_dict(dense.state_dict())  # the same parameter names and shapes
    torch.testing.assert_close(pooled(scores, QUERY, KEY), dense(scores, QUERY, KEY))


def test_nearest_kronecker_is_exact_for_kronecker_matrices_and_best_otherwise():
    torch.manual_seed(0)
    a, b = torch.randn(6, 6, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    got_a, got_b = nearest_kronecker(torch.kron(a, b), QUERY)
    torch.testing.assert_close(torch.kron(got_a, got_b), torch.kron(a, b))
    eye_a, eye_b = nearest_kronecker(torch.eye(24), QUERY)
    torch.testing.assert_close(eye_a, torch.eye(6)) and torch.testing.assert_close(
        eye_b, torch.eye(4)
    )
    general = torch.eye(24, dtype=torch.float64) + 0.1 * torch.randn(24, 24, dtype=torch.float64)
    best = (general - torch.kron(*nearest_kronecker(general, QUERY))).norm()
    for other in (torch.eye(24, dtype=torch.float64), torch.kron(a, b)):
        assert best <= (general - other).norm()


def _trained_dense(img_size=32, seed=0) -> LaViT:
    """A LaViT with trained-looking (random, non-identity) dense Ψ/Θ at its native size."""
    torch.manual_seed(seed)
    return LaViT(**{**SMALL, "img_size": img_size, "la_init": "random"}).eval()


@pytest.mark.parametrize("form", ["separable", "pooled"])
def test_a_dense_checkpoint_loads_into_each_form_and_runs_at_any_size(form):
    trained = _trained_dense()
    model = LaViT(**{**SMALL, "la_mixing": form, "dynamic_img_size": True}).eval()
    state = checkpoint_filter_fn(trained.state_dict(), model)
    model.load_state_dict(state)  # strict: every key of the form present, nothing left over
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if form == "pooled":  # the same function as the dense checkpoint at its native size
            torch.testing.assert_close(model(x), trained(x))
        else:
            assert torch.isfinite(model(x)).all()
        for size in [(64, 48), (16, 32)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 7)


def test_separable_loads_a_kronecker_dense_checkpoint_exactly():
    trained = _trained_dense()
    with torch.no_grad():  # make every dense Ψ/Θ a Kronecker product (e.g. a separable model's)
        for stage in trained.stages:
            for block in stage.blocks:
                if block.kind == "la":
                    mixing = block.attn.token_mixing
                    (qh, qw), (kh, kw) = stage.grid, stage.key_grid
                    mixing.psi.copy_(torch.kron(torch.randn(qh, qh), torch.randn(qw, qw)) * 0.3)
                    mixing.theta.copy_(torch.kron(torch.randn(kh, kh), torch.randn(kw, kw)) * 0.3)
    model = LaViT(**{**SMALL, "la_mixing": "separable"}).eval()
    model.load_state_dict(checkpoint_filter_fn(trained.state_dict(), model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_identity_forms_are_one_function_and_la_repeats_va_at_another_size(form):
    torch.manual_seed(0)
    reference = LaViT(**{**SMALL, "dynamic_img_size": True}).eval()
    model = LaViT(**{**SMALL, "la_mixing": form, "dynamic_img_size": True}).eval()
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model))
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        records = model.forward_with_aux(x, collect_attn=True).attentions
    first_la = next(r for r in records if r.kind == "la")
    before = next(r for r in records if r.stage == first_la.stage and r.layer == first_la.layer - 1)
    assert torch.equal(first_la.probs, before.probs)


def test_parameters_do_not_grow_with_the_input_size_and_the_backbone_loads_224(tmp_path):
    torch.manual_seed(0)
    kwargs = {
        "depths": (1, 1, 2, 2),
        "embed_dims": (16, 32, 32, 64),
        "num_heads": (1, 2, 2, 4),
        "mlp_ratios": (2, 2, 2, 2),
        "num_va_layers": (1, 1, 1, 1),
    }
    trained = LaViT(img_size=224, num_classes=5, la_init="random", **kwargs)
    path = tmp_path / "cls.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, path)
    for form in ("separable", "pooled"):
        backbone = DenseBackbone(
            "lavit_tiny",
            (8, 16, 32),
            None,
            0.0,
            {**kwargs, "la_mixing": form, "dynamic_img_size": True},
        )
        count = sum(p.numel() for p in backbone.parameters())
        assert backbone.load_checkpoint(str(path)) > 0
        with torch.no_grad():
            for size in [(224, 224), (320, 480)]:
                maps = list(backbone.eval()(torch.randn(1, 3, *size)).values())
                assert maps[-1].shape[-2:] == (size[0] // 32, size[1] // 32)
        assert sum(p.numel() for p in backbone.parameters()) == count  # nothing added per size
    dense_psi = 14 * 14 * 14 * 14  # stage 3 at 224²
    separable = LaViT(la_mixing="separable", num_classes=0, **kwargs)
    psi = next(
        m
        for m in separable.modules()
        if isinstance(m, SeparableTokenMixing) and m.query_grid == (14, 14)
    )
    assert psi.psi_h.numel() + psi.psi_w.numel() == 2 * 14 * 14 < dense_psi


def test_unknown_form_is_named():
    with pytest.raises(ValueError, match="la_mixing must be one of"):
        LaViT(**{**SMALL, "la_mixing": "kron"})
