"""The model library: the maths of each layer, the loss, the switches and the timm API."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from small_lavit import SMALL, small_model
from timm.layers import to_2tuple
from timm.optim import param_groups_layer_decay
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor

import lavit  # noqa: F401  (registers the models)
from lavit.models import LaViT, LessAttention, VanillaAttention, diagonality_preserving_loss
from lavit.models.attention import AttentionDownsample
from lavit.models.lavit import checkpoint_filter_fn, take_indices
from lavit.models.losses import attention_dp_loss, region_attention
from lavit.models.resize import interpolation_matrix, resize_token_mixing, resize_token_vector
from lavit.models.token_mixing import DenseTokenMixing


def make_less_attention(dim, num_heads, grid, sr_ratio=1, init="identity") -> LessAttention:
    key_grid = (grid[0] // sr_ratio, grid[1] // sr_ratio)
    return LessAttention(dim, num_heads, DenseTokenMixing(grid, key_grid, init), sr_ratio)


def is_la(block) -> bool:
    return block.kind == "la"


# --- Less-Attention ------------------------------------------------------------------------------


def test_identity_less_attention_reproduces_given_attention_exactly():
    la = make_less_attention(dim=12, num_heads=3, grid=(4, 4), sr_ratio=2, init="identity")
    scores = torch.randn(2, 3, 16, 4) * 5
    transformed = la.token_mixing(scores, (4, 4), (2, 2))
    assert torch.equal(transformed, scores)
    _, out_scores, probs = la(torch.randn(2, 16, 12), (4, 4), scores)
    assert torch.equal(probs, scores.softmax(-1))
    assert torch.equal(out_scores, scores)


def test_random_less_attention_matches_plain_recomputation():
    torch.manual_seed(1)
    la = make_less_attention(dim=8, num_heads=2, grid=(3, 3), init="random")
    scores = torch.randn(3, 2, 9, 9)
    got = la.token_mixing(scores, (3, 3), (3, 3))
    mixing = la.token_mixing
    psi, theta, b_theta = mixing.psi.detach(), mixing.theta.detach(), mixing.theta_bias.detach()
    for b in range(3):
        for h in range(2):
            # Ψ(Θ(S)ᵀ)ᵀ with nn.Linear semantics y = x Wᵀ + b, written out literally.
            theta_out = scores[b, h] @ theta.T + b_theta  # Θ on the key axis
            expected = (theta_out.T @ psi.T).T  # Ψ on the query axis (no bias)
            torch.testing.assert_close(got[b, h], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                got[b, h], psi @ scores[b, h] @ theta.T + torch.outer(psi.sum(1), b_theta)
            )


def test_identity_la_layers_in_a_model_reuse_the_va_attention():
    model = small_model().eval()
    with torch.no_grad():
        records = model.forward_with_aux(torch.randn(2, 3, 32, 32), collect_attn=True).attentions
    by_stage: dict[int, list] = {}
    for r in records:
        by_stage.setdefault(r.stage, []).append(r)
    for stage, recs in by_stage.items():
        va = recs[0]
        assert va.kind == "va"
        for la in recs[1:]:
            assert la.kind == "la"
            assert torch.equal(la.probs, va.probs), f"stage {stage} layer {la.layer}"


def test_attn_state_probs_hands_softmax_to_first_la_layer():
    model = small_model(attn_state="probs").eval()
    with torch.no_grad():
        records = model.forward_with_aux(torch.randn(1, 3, 32, 32), collect_attn=True).attentions
    va, la = records[0], records[1]
    assert (va.kind, la.kind) == ("va", "la")
    # identity Ψ/Θ: the LA layer's scores are the VA probabilities, so its probs are softmax(probs)
    torch.testing.assert_close(la.probs, va.probs.softmax(-1))


def test_vanilla_attention_scores_match_fused_path():
    torch.manual_seed(2)
    attn = VanillaAttention(dim=16, num_heads=2, sr_ratio=2).eval()
    x = torch.randn(2, 16, 16)
    bias = torch.randn(2, 2, 16, 4)
    explicit, scores, probs = attn(x, (4, 4), bias, explicit=True)
    fused, none_scores, _ = attn(x, (4, 4), bias, explicit=False)
    assert none_scores is None
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, scores.softmax(-1))
    assert scores.shape == (2, 2, 16, 4)  # (B, H, N, N')


# --- residual attention downsampling -------------------------------------------------------------


def test_attention_downsample_starts_as_2x2_average_and_head_average():
    down = AttentionDownsample(in_heads=2, out_heads=3, in_sr_ratio=2, out_sr_ratio=1, gamma_init=1)
    scores = torch.randn(1, 2, 16, 4)  # 4×4 query grid, 2×2 key grid
    out = down(scores, (2, 2))  # onto a 2×2 grid whose 2×2 keys are not reduced
    assert out.shape == (1, 3, 4, 4)
    grid = scores.reshape(1, 2, 4, 4, 4)  # (B, H, h, w, N')
    pooled = grid.reshape(1, 2, 2, 2, 2, 2, 4).mean(dim=(3, 5)).reshape(1, 2, 4, 4)
    expected = pooled.mean(dim=1, keepdim=True).expand(1, 3, 4, 4)
    torch.testing.assert_close(out, expected)


def test_residual_downsampling_changes_next_stage_attention():
    torch.manual_seed(0)
    on = small_model(residual_attn_downsample=True, residual_attn_init=1.0).eval()
    off = small_model(residual_attn_downsample=False).eval()
    off.load_state_dict(on.state_dict(), strict=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        rec_on = on.forward_with_aux(x, collect_attn=True).attentions
        rec_off = off.forward_with_aux(x, collect_attn=True).attentions
    assert torch.equal(rec_on[0].probs, rec_off[0].probs)  # stage 1 has no residual
    first_stage2 = next(i for i, r in enumerate(rec_on) if r.stage == 1)
    assert not torch.allclose(rec_on[first_stage2].probs, rec_off[first_stage2].probs)


def test_residual_attn_init_zero_starts_on_and_off_arms_as_the_same_function():
    on = small_model(residual_attn_downsample=True, residual_attn_init=0.0).eval()
    off = small_model(residual_attn_downsample=False).eval()
    off.load_state_dict(on.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(on(x), off(x), rtol=0, atol=0)
    gammas = [s.attn_downsample.gamma for s in on.stages if s.attn_downsample is not None]
    assert gammas and all(g.item() == 0.0 for g in gammas)
    # γ itself learns from the first step: the residual is not dead, only switched off at start
    torch.nn.functional.cross_entropy(on.train()(x), torch.tensor([0, 1])).backward()
    assert all(g.grad.abs() > 0 for g in gammas)


# --- DP loss -------------------------------------------------------------------------------------

A2 = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
A3 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.0, 0.5, 0.5]])


def test_dp_loss_hand_computed_2x2():
    # asymmetry Σ|A_ij − A_ji| = 2·|0.5 − 0.2| = 0.6
    # paper diagonal term Σ_i (A_ii − Σ_{j≠i} A_ij) = (0.5 − 0.5) + (0.8 − 0.2) = 0.6 → (0.6 + 0.6) / 2
    assert diagonality_preserving_loss(A2, "paper").item() == pytest.approx(0.6)
    # corrected diagonal term Σ_i (Σ_{j≠i} A_ij − A_ii + 1) / 2 = 0.5 + 0.2 = 0.7 → (0.6 + 0.7) / 2
    assert diagonality_preserving_loss(A2, "corrected").item() == pytest.approx(0.65)


def test_dp_loss_hand_computed_3x3():
    # asymmetry: pairs (0,1) 0.1, (0,2) 0.1, (1,2) 0.4, each counted twice → 1.2
    # paper: Σ_i (2·A_ii − off_i) = (1.2 − 0.4) + (1.4 − 0.3) + (1.0 − 0.5) = 2.4 → (1.2 + 2.4) / 3 = 1.2
    assert diagonality_preserving_loss(A3, "paper").item() == pytest.approx(1.2)
    # corrected: Σ_i (off_i − 2·A_ii + 2) / 3 = (0.4 − 1.2 + 2 + 0.3 − 1.4 + 2 + 0.5 − 1.0 + 2) / 3 = 1.2
    # → (1.2 + 1.2) / 3 = 0.8
    assert diagonality_preserving_loss(A3, "corrected").item() == pytest.approx(0.8)


def test_dp_loss_averages_over_leading_dims():
    stacked = torch.stack([A2, torch.eye(2)])
    assert diagonality_preserving_loss(stacked, "corrected").item() == pytest.approx(0.65 / 2)


def test_corrected_dp_loss_zero_on_identity_and_grows_off_diagonal():
    n = 6
    eye = torch.eye(n)
    assert diagonality_preserving_loss(eye, "corrected").item() == 0.0
    shift = torch.roll(eye, 1, dims=1)  # all mass on the next token: asymmetric and off-diagonal
    uniform = torch.full((n, n), 1.0 / n)  # symmetric, off-diagonal
    for target in (shift, uniform):
        values = [
            diagonality_preserving_loss((1 - t) * eye + t * target, "corrected").item()
            for t in (0.0, 0.25, 0.5, 0.75, 1.0)
        ]
        assert all(b > a for a, b in zip(values, values[1:], strict=False)), values


def test_corrected_dp_loss_bounded_on_row_stochastic_input():
    torch.manual_seed(0)
    for n in (2, 7, 49, 196):
        probs = (torch.randn(8, n, n) * 10).softmax(-1)
        loss = diagonality_preserving_loss(probs, "corrected").item()
        assert 0.0 <= loss < 3.0  # [0, 3]; 3 only on permutations like a cyclic shift
    # the printed form is not: it rewards a larger diagonal with a larger loss
    assert diagonality_preserving_loss(torch.eye(4), "paper") > diagonality_preserving_loss(
        torch.full((4, 4), 0.25), "paper"
    )


def test_corrected_dp_loss_reaches_its_bound_of_3_on_a_cyclic_shift():
    for n in (3, 5, 49):
        shift = torch.roll(torch.eye(n), 1, dims=1)  # token i attends only to token i + 1
        assert diagonality_preserving_loss(shift, "corrected").item() == pytest.approx(3.0)


def test_on_row_stochastic_attention_the_printed_diagonal_term_is_n_trace_minus_n():
    torch.manual_seed(0)
    for n in (2, 7, 49):
        probs = (torch.randn(n, n) * 3).softmax(-1)
        asymmetry = (probs - probs.T).abs().sum()
        trace = probs.diagonal().sum()
        paper = diagonality_preserving_loss(probs, "paper") * n - asymmetry
        torch.testing.assert_close(paper, n * trace - n)
        corrected = diagonality_preserving_loss(probs, "corrected")
        torch.testing.assert_close(corrected, asymmetry / n + 1 - trace / n)


def test_corrected_dp_loss_pulls_attention_towards_the_identity_and_paper_pushes_away():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    for variant, sign in (("corrected", -1), ("paper", 1)):
        sharpness = torch.zeros((), requires_grad=True)  # scores + t·I: larger t, larger trace
        probs = (logits + sharpness * torch.eye(6)).softmax(-1)
        diagonality_preserving_loss(probs, variant).backward()
        # gradient descent moves t by −grad: up (towards I) for corrected, down for paper
        assert torch.sign(sharpness.grad).item() == sign, variant


def test_region_attention_pools_queries_and_stays_row_stochastic():
    probs = torch.rand(2, 3, 16, 4).softmax(-1)  # 4×4 queries, 2×2 keys
    region = region_attention(probs, (4, 4), (2, 2))
    assert region.shape == (2, 3, 4, 4)
    torch.testing.assert_close(region.sum(-1), torch.ones(2, 3, 4))
    top_left = probs[:, :, [0, 1, 4, 5]].mean(2)  # queries of the top-left 2×2 region
    torch.testing.assert_close(region[:, :, 0], top_left)
    assert attention_dp_loss(probs, (4, 4), (2, 2)).ndim == 0


def test_unknown_dp_variant_raises():
    with pytest.raises(ValueError, match="dp_loss_variant"):
        diagonality_preserving_loss(A2, "nope")


# --- gradients and switches ----------------------------------------------------------------------


@pytest.mark.parametrize("la_init", ["random", "identity"])
@pytest.mark.parametrize("dp_loss_layers", ["la", "all"])
def test_every_parameter_receives_a_gradient_with_all_components_on(dp_loss_layers, la_init):
    model = small_model(
        la_init=la_init,
        residual_attn_downsample=True,
        residual_attn_init=1.0,  # γ = 0 would (rightly) stop the downsampling weights' gradient
        dp_loss_weight=0.1,
        dp_loss_layers=dp_loss_layers,
        drop_path_rate=0.1,
    )
    model.train()
    out = model.forward_with_aux(torch.randn(2, 3, 32, 32))
    assert out.dp_loss is not None and out.dp_loss.requires_grad
    (torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 2])) + out.dp_loss).backward()
    # Relative to the parameter's scale (0.02, the init std, for zero-initialised ones): the
    # smallest live gradient here is ~1e-5 of it; the AttentionDownsample biases that cancelled
    # in the softmax (removed) had ~3e-7 at identity Ψ/Θ, float noise that `!= 0` let through.
    weak = {}
    for n, p in model.named_parameters():
        scale = max(p.detach().abs().mean().item(), 0.02)
        grad = 0.0 if p.grad is None else p.grad.abs().mean().item()
        if grad < 1e-6 * scale:
            weak[n] = grad / scale
    assert weak == {}


def test_switching_components_off_removes_their_parameters():
    names = lambda m: {n for n, _ in m.named_parameters()}  # noqa: E731
    full = names(small_model())
    assert any(".attn_downsample." in n for n in full)
    assert any(n.endswith(".psi") for n in full)
    no_residual = names(small_model(residual_attn_downsample=False))
    assert not any(".attn_downsample." in n for n in no_residual)
    all_va = small_model(num_va_layers=SMALL["depths"])
    assert not any(n.endswith((".psi", ".theta", ".theta_bias")) for n in names(all_va))
    assert not any(is_la(b) for s in all_va.stages for b in s.blocks)
    # with λ = 0 the DP loss is not computed at all
    assert small_model().forward_with_aux(torch.randn(1, 3, 32, 32)).dp_loss is None


def test_num_va_layers_sets_la_blocks_per_stage():
    model = small_model(num_va_layers=(2, 1, 2, 1))
    la_per_stage = [sum(is_la(b) for b in s.blocks) for s in model.stages]
    assert la_per_stage == [0, 1, 1, 1]


def test_la_init_switch():
    eye = small_model(la_init="identity")
    rnd = small_model(la_init="random")
    la_eye = next(m for m in eye.modules() if isinstance(m, LessAttention))
    la_rnd = next(m for m in rnd.modules() if isinstance(m, LessAttention))
    psi_eye, psi_rnd = la_eye.token_mixing.psi, la_rnd.token_mixing.psi
    assert torch.equal(psi_eye, torch.eye(psi_eye.shape[0]))
    assert not torch.equal(psi_rnd, torch.eye(psi_rnd.shape[0]))


def test_no_weight_decay_lists_pos_embed_and_transforms():
    nwd = small_model().no_weight_decay()
    assert "stages.0.pos_embed" in nwd
    assert any(n.endswith(".psi") for n in nwd) and any(n.endswith(".theta") for n in nwd)


# --- shapes, timm API, resizing ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size, strides",
    [
        ("lavit_tiny", 224, (4, 8, 16, 32)),
        ("lavit_small", 224, (4, 8, 16, 32)),
        ("lavit_base", 224, (4, 8, 16, 32)),
        ("lavit_cifar", 32, (2, 4, 8, 16)),
    ],
)
def test_variant_output_and_intermediate_shapes(name, size, strides):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        final, feats = model.forward_intermediates(x)
    assert logits.shape == (1, 10)
    assert [f.shape[1] for f in feats] == [info["num_chs"] for info in model.feature_info]
    assert [size // f.shape[-1] for f in feats] == list(strides)
    assert [info["reduction"] for info in model.feature_info] == list(strides)
    assert final.shape == feats[-1].shape
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (
        1,
        model.num_features,
    )


def test_features_only_and_intermediate_selection():
    model = timm.create_model("lavit_cifar", features_only=True, out_indices=(1, 3))
    feats = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 8), (2, 256, 2, 2)]
    full = timm.create_model("lavit_cifar")
    only = full.forward_intermediates(
        torch.randn(1, 3, 32, 32), indices=[0], intermediates_only=True, stop_early=True
    )
    assert len(only) == 1 and only[0].shape == (1, 32, 16, 16)


def test_cifar_variant_keeps_la_layers_on_more_than_one_token():
    model = timm.create_model("lavit_cifar")
    for stage in model.stages[2:]:
        las = [b for b in stage.blocks if is_la(b)]
        assert las, f"stage {stage.stage_index + 1} has no LA layer"
        assert all(b.attn.token_mixing.psi.shape[0] > 1 for b in las)


def test_forward_at_second_size_after_set_input_size():
    model = small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    model.set_input_size(64)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == before.shape and torch.isfinite(out).all()
    la = next(m for m in model.modules() if isinstance(m, LessAttention))
    assert la.token_mixing.psi.shape == (32 * 32, 32 * 32)  # stage 1 at 64², stride-2 stem
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 32, 32))


def test_checkpoint_at_another_size_loads_with_resizing():
    small = small_model()
    big = LaViT(**{**SMALL, "img_size": 64})
    state = checkpoint_filter_fn(small.state_dict(), big)
    big.load_state_dict(state)  # strict: every shape now matches
    torch.testing.assert_close(
        big.stages[3].blocks[0].attn.q.weight, small.stages[3].blocks[0].attn.q.weight
    )
    assert torch.isfinite(big(torch.randn(1, 3, 64, 64))).all()


def test_resized_token_mixing_keeps_row_sums():
    psi = torch.rand(16, 16)
    resized = resize_token_mixing(psi, (4, 4), (8, 8))
    assert resized.shape == (64, 64)
    # mixing a constant map gives (about) the same constants after resizing
    torch.testing.assert_close(resized.sum(1).mean(), psi.sum(1).mean(), rtol=0.05, atol=0.05)


# --- published size -------------------------------------------------------------------------------

PUBLISHED = {
    "lavit_tiny": (10.9e6, 1.6e9),
    "lavit_small": (22.4e6, 3.3e9),
    "lavit_base": (39.6e6, 6.1e9),
}


def count_params_and_macs(name: str) -> tuple[int, float]:
    """Parameters and MACs at 224², 1000 classes; MACs = FLOPs / 2 of every matmul and conv."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000).eval()
        with (
            torch.no_grad(),
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
        ):
            model(torch.empty(1, 3, 224, 224))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_params_and_macs_match_the_paper(name):
    params, macs = count_params_and_macs(name)
    want_params, want_macs = PUBLISHED[name]
    assert abs(params / want_params - 1) <= 0.03, f"{name}: {params / 1e6:.2f} M params"
    assert abs(macs / want_macs - 1) <= 0.05, f"{name}: {macs / 1e9:.3f} G MACs"


def test_flop_counter_counts_the_psi_theta_transforms():
    la = make_less_attention(dim=8, num_heads=2, grid=(4, 4), sr_ratio=2)
    scores = torch.randn(3, 2, 16, 4)  # (B, H, N, N')
    with FlopCounterMode(display=False) as counter:
        la.token_mixing(scores, (4, 4), (2, 2))
    # Θ: B·H·N·N'·N' MACs, Ψ: B·H·N·N·N' MACs, 2 FLOPs each
    assert counter.get_total_flops() == 2 * 3 * 2 * (16 * 4 * 4 + 16 * 16 * 4)


# --- invalid arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, argument",
    [
        (dict(num_va_layers=(3, 1, 1, 1)), "num_va_layers"),
        (dict(num_va_layers=(0, 1, 1, 1)), "num_va_layers"),
        (dict(num_va_layers=(1, 1, 1)), "num_va_layers"),
        (dict(dp_loss_weight=-0.1), "dp_loss_weight"),
        (dict(dp_loss_weight=float("nan")), "dp_loss_weight"),
        (dict(img_size=36), "img_size"),
        (dict(img_size=48, sr_ratios=(4, 2, 4, 1)), "img_size"),
        (dict(la_init="zeros"), "la_init"),
        (dict(attn_state="logits"), "attn_state"),
        (dict(dp_loss_variant="flipped"), "dp_loss_variant"),
        (dict(dp_loss_layers="va"), "dp_loss_layers"),
        (dict(embed_dims=(16, 32, 48, 65)), "embed_dims"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(mlp_ratios=(2, 0, 2, 2)), "mlp_ratios"),
        (dict(sr_ratios=(0, 2, 1, 1)), "sr_ratios"),
        (dict(depths=(2, 0, 3, 2)), "depths"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        LaViT(**{**SMALL, **overrides})


# --- identity-preserving resizing (resize.py) -----------------------------------------------------

GRID_PAIRS = [
    ((14, 14), (28, 28)),  # 224 → 448
    ((14, 14), (16, 16)),  # 224 → 256
    ((14, 14), (7, 7)),  # 224 → 112: shrinking, antialiased
    ((4, 6), (8, 3)),  # non-square, one side up and one down
    ((7, 7), (3, 5)),
]


@pytest.mark.parametrize("old, new", GRID_PAIRS)
def test_resizing_keeps_the_identity_exactly(old, new):
    n_old, n_new = old[0] * old[1], new[0] * new[1]
    assert torch.equal(resize_token_mixing(torch.eye(n_old), old, new), torch.eye(n_new))
    assert torch.equal(resize_token_vector(torch.zeros(n_old), old, new), torch.zeros(n_new))


@pytest.mark.parametrize("old, new", GRID_PAIRS)
def test_resizing_a_near_identity_stays_within_order_epsilon(old, new):
    n_old, n_new = old[0] * old[1], new[0] * new[1]
    delta = torch.randn(n_old, n_old, generator=torch.Generator().manual_seed(0)) / n_old**0.5
    relative_delta = (delta.norm() / torch.eye(n_old).norm()).item()  # ‖Δ‖ / ‖I‖ = 1
    deviations = []
    for eps in (1e-2, 1e-3):
        resized = resize_token_mixing(torch.eye(n_old) + eps * delta, old, new)
        deviations.append(((resized - torch.eye(n_new)).norm() / n_new**0.5).item())
        assert deviations[-1] <= eps * relative_delta  # no larger, relative to I, than before
    assert deviations[0] / deviations[1] == pytest.approx(10.0, rel=1e-3)  # linear in ε


@pytest.mark.parametrize("old, new", GRID_PAIRS)
def test_resized_trained_looking_mixing_keeps_its_row_sums(old, new):
    n_old = old[0] * old[1]
    weight = torch.rand(n_old, n_old, generator=torch.Generator().manual_seed(1))
    weight = 3.0 * weight / weight.sum(1, keepdim=True)  # random, far from I, every row sums to 3
    row_sums = resize_token_mixing(weight, old, new).sum(1)
    assert row_sums.mean().item() == pytest.approx(3.0, rel=0.02)
    torch.testing.assert_close(row_sums, torch.full_like(row_sums, 3.0), rtol=0.1, atol=0)


@pytest.mark.parametrize("old, new", GRID_PAIRS)
def test_interpolation_matrix_is_bicubic_resampling_antialiased_when_shrinking(old, new):
    images = torch.randn(3, 1, *old)
    expected = images
    for axis, (o, n) in enumerate(zip(old, new, strict=True)):
        size = list(expected.shape[-2:])
        size[axis] = n
        expected = F.interpolate(expected, size=size, mode="bicubic", antialias=n < o)
    r = interpolation_matrix(old, new)  # (N_new, N_old)
    got = (images.reshape(3, -1) @ r.t()).reshape(3, 1, *new)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


NUM_LA = sum(SMALL["depths"]) - sum(SMALL["num_va_layers"])  # LA layers of the small model


def la_equals_va(model: LaViT, x: torch.Tensor) -> int:
    """Asserts each LA layer's attention equals its stage's VA attention; returns how many."""
    with torch.no_grad():
        records = model.forward_with_aux(x, collect_attn=True).attentions
    checked = 0
    for stage in {r.stage for r in records}:
        va, *las = [r for r in records if r.stage == stage]
        for la in las:
            torch.testing.assert_close(la.probs, va.probs, rtol=0, atol=1e-6)
            checked += 1
    return checked


def test_identity_model_keeps_la_equal_to_va_after_set_input_size():
    model = small_model().eval()
    for size in (64, 48, (32, 64)):
        model.set_input_size(size)
        assert la_equals_va(model, torch.randn(2, 3, *to_2tuple(size))) == NUM_LA


def test_identity_model_keeps_la_equal_to_va_under_dynamic_img_size():
    model = small_model(dynamic_img_size=True).eval()
    for size in ((32, 32), (64, 64), (48, 32), (16, 80)):
        assert la_equals_va(model, torch.randn(2, 3, *size)) == NUM_LA


def test_dynamic_img_size_matches_the_fixed_model_at_native_size_and_after_set_input_size():
    fixed = small_model(la_init="random", residual_attn_init=0.5).eval()
    dynamic = small_model(la_init="random", residual_attn_init=0.5, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))  # the native size runs the same maths
        y = torch.randn(2, 3, 48, 64)
        at_other_size = dynamic(y)
        fixed.set_input_size((48, 64))
        torch.testing.assert_close(at_other_size, fixed(y), rtol=1e-5, atol=1e-6)
    assert dynamic.stages[0].grid == (16, 16)  # nothing stored: the native grids are unchanged


def test_sizes_a_model_cannot_take_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        small_model(dynamic_img_size=True)(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"takes 32×32 inputs \(its img_size\).*dynamic_img_size"):
        small_model()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="img_size"):
        small_model().set_input_size(40)


def test_dynamic_img_size_features_only_takes_any_multiple_of_the_stride():
    model = timm.create_model("lavit_cifar", features_only=True, dynamic_img_size=True).eval()
    with torch.no_grad():
        for h, w in ((32, 32), (64, 48), (16, 96)):
            feats = model(torch.randn(1, 3, h, w))
            assert [f.shape[-2:] for f in feats] == [(h // s, w // s) for s in (2, 4, 8, 16)]


def test_pretrained_cfg_says_what_the_model_accepts():
    fixed = timm.create_model("lavit_tiny", img_size=256)
    assert fixed.pretrained_cfg["fixed_input_size"] is True
    assert timm.data.resolve_model_data_config(fixed)["input_size"] == (3, 256, 256)
    assert fixed.pretrained_cfg["pool_size"] == (8, 8)
    dynamic = timm.create_model("lavit_cifar", dynamic_img_size=True)
    assert dynamic.pretrained_cfg["fixed_input_size"] is False
    assert dynamic.pretrained_cfg["input_size"] == (3, 32, 32)
    default = timm.create_model("lavit_cifar")
    default.set_input_size(64)
    assert timm.data.resolve_model_data_config(default)["input_size"] == (3, 64, 64)
    assert timm.models.get_pretrained_cfg("lavit_tiny").fixed_input_size


# --- tracing and export --------------------------------------------------------------------------


def test_fx_traced_model_matches_eager_and_keeps_the_size_error():
    model = small_model(la_init="random", residual_attn_init=0.5).eval()
    traced = torch.fx.symbolic_trace(model)  # plain tracer: the shape logic is fx-wrapped
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    with pytest.raises(ValueError, match="img_size"):
        traced(torch.randn(1, 3, 64, 64))


def test_fx_feature_extractor_of_a_dynamic_model_follows_the_input_size():
    model = small_model(la_init="random", dynamic_img_size=True).eval()
    extractor = create_feature_extractor(model, return_nodes={"stages.2": "s3", "head": "logits"})
    with torch.no_grad():
        for size in ((32, 32), (48, 64)):
            x = torch.randn(1, 3, *size)
            out = extractor(x)
            assert torch.equal(out["logits"], model(x))
            assert out["s3"].shape[-2:] == (size[0] // 8, size[1] // 8)


def test_timm_fx_feature_wrapper_matches_the_forward_intermediates_one():
    for dynamic, sizes in ((False, [32]), (True, [32, 48])):
        torch.manual_seed(0)
        getter = timm.create_model("lavit_cifar", features_only=True, dynamic_img_size=dynamic)
        torch.manual_seed(0)
        fx = timm.create_model(
            "lavit_cifar", features_only=True, feature_cls="fx", dynamic_img_size=dynamic
        )
        with torch.no_grad():
            for size in sizes:
                x = torch.randn(1, 3, size, size)
                for a, b in zip(fx.eval()(x), getter.eval()(x), strict=True):
                    assert torch.equal(a, b)


def test_torch_export_of_lavit_tiny_gives_the_same_logits():
    model = timm.create_model("lavit_tiny").eval()
    x = torch.randn(2, 3, 224, 224)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_export_of_a_dynamic_model_at_another_size():
    model = small_model(la_init="random", dynamic_img_size=True).eval()
    y = torch.randn(1, 3, 48, 64)
    exported = torch.export.export(model, (y,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(y), model(y), rtol=1e-5, atol=1e-5)
        # the interpolation-matrix cache holds real tensors only (export traced around it)
        assert torch.equal(model(y), model(y))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_is_refused_with_the_alternatives():
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.script(small_model())


def test_identity_reuse_stays_exact_under_reduced_precision_float32_matmuls():
    """TF32 on Ampere+ GPUs (the CLI's "high"), bf16 on CPUs with AMX ("medium", used here).

    On such a CPU the plain product ``W_Ψ S W_Θᵀ`` with identity weights is off by ~0.06 on
    scores of scale 5; LA layers compute ``S + (W − I)…``, whose zero deviation is exact.
    """
    model = small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert la_equals_va(model, x) == NUM_LA
    finally:
        torch.set_float32_matmul_precision(previous)


# --- timm API details ------------------------------------------------------------------------------


def test_prune_intermediate_layers_keeps_a_head_of_the_right_width():
    model = small_model().eval()
    model.prune_intermediate_layers(indices=[1, 2], prune_head=False)
    assert len(model.stages) == 3 and model.num_features == SMALL["embed_dims"][2]
    assert model.head.in_features == model.num_features and model.num_classes == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.stages[-1].blocks[-1].hand_on is None  # no next stage to hand attention to
    pruned = small_model()
    taken = pruned.prune_intermediate_layers(indices=2)  # prune_head=True: a feature backbone
    assert taken == [2, 3] and isinstance(pruned.head, torch.nn.Identity)
    assert pruned.num_classes == 0 and pruned(torch.randn(1, 3, 32, 32)).ndim == 4


def test_reset_classifier_follows_the_model_device_and_dtype_and_checks_the_pool():
    model = small_model().to(torch.float64)
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64 and model.head.out_features == 5
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 5)
    with torch.device("meta"):
        on_meta = small_model()
    on_meta.reset_classifier(3)
    assert on_meta.head.weight.device.type == "meta"
    with pytest.raises(ValueError, match="global_pool must be 'avg' or ''"):
        model.reset_classifier(5, "max")
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(5, "")
    model.reset_classifier(0, "")
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 64, 2, 2)


def test_group_matcher_gives_only_the_head_the_last_layer_decay_group():
    model = small_model()
    for coarse in (False, True):
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=coarse))
        ids = sorted(groups)
        assert all(name.startswith("head.") for name in groups[ids[-1]]), groups[ids[-1]]
        layer_of = {name: i for i, names in groups.items() for name in names}
        assert layer_of["stages.0.pos_embed"] == layer_of["stages.0.downsample.proj.weight"] == 0
    groups = timm.models.group_parameters(model, model.group_matcher())
    layer_of = {name: i for i, names in groups.items() for name in names}
    # a stage's entry goes with its first block, its closing norm with its last block
    for m, stage in enumerate(model.stages):
        first = layer_of[f"stages.{m}.blocks.0.norm1.weight"]
        last = layer_of[f"stages.{m}.blocks.{len(stage.blocks) - 1}.norm1.weight"]
        assert layer_of[f"stages.{m}.norm.weight"] == last
        if m > 0:
            assert layer_of[f"stages.{m}.pos_embed"] == first
            assert layer_of[f"stages.{m}.downsample.proj.weight"] == first
            assert layer_of[f"stages.{m}.attn_downsample.gamma"] == first
    # layer-wise LR decay then gives every non-head parameter a smaller rate than the head
    decay = param_groups_layer_decay(model, layer_decay=0.5)
    head_scale = max(g["lr_scale"] for g in decay)
    for group in decay:
        if group["lr_scale"] == head_scale:
            assert all(p is model.head.weight or p is model.head.bias for p in group["params"])


def test_feature_take_indices_fallback_agrees_with_timm():
    from timm.models._features import feature_take_indices as timm_version

    for indices in (None, 1, 3, [0, 2], [-1], (1, -2)):
        assert take_indices(4, indices) == timm_version(4, indices)
    with pytest.raises(ValueError, match="out of range"):
        take_indices(4, [4])


def test_dynamic_size_trains_after_an_inference_mode_forward_at_that_size():
    # Lightning validates under torch.inference_mode; the per-size resampling cache it fills
    # must still serve a training step at that size afterwards.
    model = timm.create_model("lavit_cifar", dynamic_img_size=True, num_classes=10)
    x = torch.randn(2, 3, 48, 80)  # a size no other test uses, so the cache starts empty here
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dp_loss_layers", ["la", "all"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(dp_loss_layers):
    """Per-block recomputation (timm's ``checkpoint``), LA blocks, the hand-on and the DP loss
    included; stochastic depth draws the same paths in the recomputation."""
    x = torch.randn(2, 3, 32, 32)
    kw = dict(la_init="random", drop_path_rate=0.2, dp_loss_layers=dp_loss_layers)
    runs = []
    for enable in (False, True):
        model = small_model(**kw).train()
        model.set_grad_checkpointing(enable)
        block, calls = model.stages[1].blocks[1], []  # an LA block; its forward calls counted
        block.forward = lambda *args, f=block.forward, c=calls: c.append(1) or f(*args)
        torch.manual_seed(1)
        out = model.forward_with_aux(x, dp_loss=True, collect_attn=True)
        loss = F.cross_entropy(out.logits, torch.tensor([0, 1])) + out.dp_loss
        loss.backward()
        assert len(calls) == (2 if enable else 1)  # recomputed in the backward when enabled
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = runs
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, msg=name)


def test_load_checkpoint_resized_takes_the_weights_a_lightning_checkpoint_keeps():
    """``model.*`` and the EMA's ``ema.module.*`` (preferred), whole or as its state_dict."""
    from lavit.training.trained import load_checkpoint_resized

    trained, other = small_model(la_init="random"), small_model(la_init="identity")
    state = {f"ema.module.{k}": v for k, v in trained.state_dict().items()}
    state.update({f"model.{k}": v for k, v in other.state_dict().items()})
    x = torch.randn(1, 3, 32, 32)
    for given in ({"state_dict": state, "epoch": 3}, state, trained.state_dict()):
        model = small_model()
        load_checkpoint_resized(model, given)  # strict
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
    big = LaViT(**{**SMALL, "img_size": 64})
    load_checkpoint_resized(big, {"state_dict": state})  # resampled to 64²
