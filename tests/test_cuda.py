"""CUDA checks (marker ``cuda``), run on a GPU machine by ``scripts/gpu_check.sh``.

CPU CI has no GPU: there every test here is skipped with one reason. ``LAVIT_REQUIRE_CUDA=1``
(set by ``scripts/gpu_check.sh``) turns a missing GPU into a failure, so that a CPU-only torch on
a GPU machine cannot pass the check by skipping. ``LAVIT_CUDA_TEST_DEVICE=cpu`` runs the test code
on the CPU, a dry run of the code only: CPU against CPU says nothing about CUDA.

Tolerances, stated once (TF32 off unless a test turns it on):

* CPU against CUDA, fp32: both are compared with a float64 CPU reference; the CUDA result's error
  may be at most ``ACCURACY_RATIO`` times the CPU fp32 result's error, plus a floor of
  ``ERROR_FLOOR`` (relative norm), for the logits, the DP loss and every parameter's gradient.
* identity-initialised LA layers: with TF32 off their attention equals the VA attention they are
  handed exactly (as on the CPU); with TF32 on, within the rounding of the two TF32 GEMMs that
  apply Ψ and Θ: ``|ΔP| ≤ 2 · |ΔS| ≤ 2⁻⁸ · max|S|``.
* fused SDPA against explicit attention (residual-downsampling bias as the float mask): relative
  norm error ``FUSED_FP32_TOL`` in fp32 and ``FUSED_BF16_TOL`` under bf16 autocast, and the bias
  must move the output by more than ten times that tolerance (so the check can see a lost bias).

Measured errors are recorded as test properties (``--junitxml``), so that a GPU run reports the
margins and not only pass/fail.

Two groups run only once their feature exists (they skip, naming the issue, until then):
``dynamic_img_size`` (issue 12) and the dense backbone's ``la_mixing`` forms (issue 14).
"""

from __future__ import annotations

import inspect
import os
import typing

import pytest
import timm
import torch
import torch.nn.functional as F

import lavit  # noqa: F401  (registers the models)
from lavit.models import LaViT, LessAttention, VanillaAttention

pytestmark = pytest.mark.cuda

DEVICE = torch.device(os.environ.get("LAVIT_CUDA_TEST_DEVICE", "cuda"))
REQUIRE_CUDA = os.environ.get("LAVIT_REQUIRE_CUDA") == "1"
NO_GPU_REASON = (
    "needs a CUDA GPU (CPU CI has none): scripts/gpu_check.sh runs these on a GPU machine"
)

VARIANTS = {"lavit_tiny": 224, "lavit_small": 224, "lavit_base": 224, "lavit_cifar": 32}
ACCURACY_RATIO = 10.0
ERROR_FLOOR = 1e-5  # fp32 results that differ by less than this agree, whatever the ratio
FUSED_FP32_TOL = 1e-5
FUSED_BF16_TOL = 3e-2
TF32_UNIT = 2.0**-10  # TF32 keeps 10 mantissa bits; truncation errs by up to one unit


@pytest.fixture(autouse=True)
def cuda_device():
    """Skip (fail under LAVIT_REQUIRE_CUDA=1) without a GPU; TF32 off, restored afterwards."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        if REQUIRE_CUDA:
            pytest.fail(
                f"LAVIT_REQUIRE_CUDA=1 but torch {torch.__version__} (CUDA build "
                f"{torch.version.cuda}) sees no GPU: torch.cuda.is_available() is False"
            )
        pytest.skip(NO_GPU_REASON)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    set_tf32(False)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def set_tf32(enabled: bool) -> None:
    # Only the legacy flags: torch refuses to read them once the newer API set them differently.
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def rel_err(got: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """‖got − ref‖ / max(‖ref‖, floor), in float64 on the CPU."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / max(ref.norm().item(), floor, 1e-30)).item()


def build(name: str, **kwargs) -> LaViT:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def has_model_keyword(name: str) -> bool:
    return name in inspect.signature(LaViT.__init__).parameters


# --- CPU against CUDA ----------------------------------------------------------------------------


def forward_backward(model: LaViT, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits, DP loss and the gradient of CE + 0.1·DP of every parameter."""
    model.zero_grad(set_to_none=True)
    out = model.forward_with_aux(x, dp_loss=True)
    (F.cross_entropy(out.logits, y) + 0.1 * out.dp_loss).backward()
    result = {"logits": out.logits.detach(), "dp_loss": out.dp_loss.detach()}
    for name, param in model.named_parameters():
        if param.grad is not None:
            result[f"grad.{name}"] = param.grad.detach().clone()
    return result


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cpu_and_cuda_forward_backward_agree(name, record_property):
    size = VARIANTS[name]
    model = build(name)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, model.num_classes, (2,))

    reference = forward_backward(model.double(), x.double(), y)  # float64, CPU
    cpu = forward_backward(model.float(), x, y)
    cuda = forward_backward(model.to(DEVICE), x.to(DEVICE), y.to(DEVICE))
    assert set(cuda) == set(cpu) == set(reference)

    # A gradient far below the typical entry (e.g. a bias that cancels in the softmax) is
    # compared in absolute terms at a thousandth of that entry.
    grads = [v for k, v in reference.items() if k.startswith("grad.")]
    rms = torch.cat([g.flatten() for g in grads]).norm() / sum(g.numel() for g in grads) ** 0.5
    worst_ratio, worst = 0.0, ""
    for key, ref in reference.items():
        floor = 1e-3 * rms.item() * ref.numel() ** 0.5 if key.startswith("grad.") else 0.0
        err_cpu, err_cuda = rel_err(cpu[key], ref, floor), rel_err(cuda[key], ref, floor)
        bound = ACCURACY_RATIO * err_cpu + ERROR_FLOOR
        assert err_cuda <= bound, (
            f"{name} {key}: CUDA error {err_cuda:.2e} against float64, CPU fp32 error "
            f"{err_cpu:.2e} (bound {bound:.2e}); CPU↔CUDA {rel_err(cuda[key], cpu[key], floor):.2e}"
        )
        if err_cuda / bound > worst_ratio:
            worst_ratio, worst = err_cuda / bound, key
    record_property("logits_err_cpu", rel_err(cpu["logits"], reference["logits"]))
    record_property("logits_err_cuda", rel_err(cuda["logits"], reference["logits"]))
    record_property("logits_cpu_vs_cuda", rel_err(cuda["logits"], cpu["logits"]))
    record_property("worst_share_of_bound", f"{worst_ratio:.3f} ({worst})")


# --- identity-initialised LA layers --------------------------------------------------------------


def la_and_va_attention(
    model: LaViT, x: torch.Tensor
) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """Per LA layer: (where, its probs, the VA probs of its stage, max |scores handed to it|)."""
    handed: list[float] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: handed.append(args[2].abs().max().item()))
        for m in model.modules()
        if isinstance(m, LessAttention)
    ]
    try:
        with torch.no_grad():
            records = model.forward_with_aux(x, collect_attn=True).attentions
    finally:
        for hook in hooks:
            hook.remove()
    va_probs = {}
    pairs = []
    for r in records:
        if r.kind == "va":
            va_probs[r.stage] = r.probs
        else:
            pairs.append((f"stage {r.stage + 1} layer {r.layer}", r.probs, va_probs[r.stage]))
    # LA layers run in order, so the hook's values line up with the records' LA entries.
    assert len(handed) == len(pairs)
    return [(*pair, s) for pair, s in zip(pairs, handed, strict=True)]


@pytest.mark.parametrize("tf32", [False, True], ids=["tf32_off", "tf32_on"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_identity_la_reproduces_the_handed_attention(name, tf32, record_property):
    size = VARIANTS[name]
    model = build(name).to(DEVICE)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size, device=DEVICE)
    set_tf32(tf32)
    worst = 0.0
    for where, la, va, max_score in la_and_va_attention(model, x):
        diff = (la - va).abs().max().item()
        worst = max(worst, diff)
        if tf32:
            bound = 2 * 2 * TF32_UNIT * max_score  # |ΔP| ≤ 2|ΔS|, |ΔS| ≤ 2 roundings of |S|
            assert diff <= bound, f"{name} {where}: |ΔP| {diff:.2e} > {bound:.2e} with TF32"
        else:
            assert torch.equal(la, va), f"{name} {where}: not exact reuse ({diff:.2e})"
    record_property("max_abs_prob_diff", worst)


# --- fused SDPA against explicit attention, with the residual-downsampling bias --------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_attention_with_bias_matches_explicit(dtype, record_property):
    """lavit_tiny's stage 2 shapes: 28×28 queries, 7×7 keys (sr 4), 2 heads of 64."""
    torch.manual_seed(0)
    attn = VanillaAttention(dim=128, num_heads=2, sr_ratio=4).to(DEVICE)
    x = torch.randn(4, 28 * 28, 128, device=DEVICE)
    bias = torch.randn(4, 2, 28 * 28, 49, device=DEVICE)
    tol = FUSED_FP32_TOL if dtype == "fp32" else FUSED_BF16_TOL

    def run(return_scores: bool, with_bias: bool = True) -> dict[str, torch.Tensor]:
        attn.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        bi = bias.clone().requires_grad_()
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=dtype == "bf16"):
            out, _, _ = attn(xi, (28, 28), bi if with_bias else None, return_scores)
        out.float().square().mean().backward()
        grads = {"grad_x": xi.grad, "grad_q": attn.q.weight.grad, "grad_kv": attn.kv.weight.grad}
        if with_bias:
            grads["grad_bias"] = bi.grad
        return {"out": out.detach().float(), **grads}

    explicit, fused = run(return_scores=True), run(return_scores=False)
    for key in explicit:
        err = rel_err(fused[key], explicit[key])
        record_property(f"{key}_err", err)
        assert err <= tol, f"{dtype} {key}: fused vs explicit {err:.2e} > {tol:.0e}"
    no_bias = run(return_scores=False, with_bias=False)
    assert rel_err(no_bias["out"], explicit["out"]) > 10 * tol, "the bias barely moves the output"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_model_path_matches_explicit_with_residual_downsampling(dtype, record_property):
    """``model(x)`` (fused VA layers) against ``forward_with_aux(collect_attn=True)`` (explicit)."""
    model = build("lavit_tiny").to(DEVICE)
    assert model.residual_attn_downsample
    torch.manual_seed(1)
    x = torch.randn(4, 3, 224, 224, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16, enabled=dtype == "bf16"):
        fused = model(x).float()
        explicit = model.forward_with_aux(x, collect_attn=True).logits.float()
    err = rel_err(fused, explicit)
    record_property("logits_err", err)
    tol = FUSED_FP32_TOL * 10 if dtype == "fp32" else FUSED_BF16_TOL  # 10 layers deep
    assert err <= tol, f"{dtype}: fused vs explicit logits {err:.2e} > {tol:.0e}"


# --- bf16-mixed training step --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_mixed_training_step_is_finite(name):
    size = VARIANTS[name]
    model = build(name, dp_loss_weight=0.1).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.manual_seed(1)
    x = torch.randn(8, 3, size, size, device=DEVICE)
    y = torch.randint(0, model.num_classes, (8,), device=DEVICE)
    with torch.autocast(DEVICE.type, torch.bfloat16):
        out = model.forward_with_aux(x)
        loss = F.cross_entropy(out.logits, y) + model.dp_loss_weight * out.dp_loss
    assert out.logits.dtype == torch.bfloat16  # autocast reached the head
    assert torch.isfinite(loss), f"{name}: loss {loss.item()}"
    loss.backward()
    bad = [
        k for k, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
    ]
    assert not bad, f"{name}: non-finite gradients in {bad[:5]}"
    optimizer.step()
    assert all(p.isfinite().all() for p in model.parameters()), f"{name}: non-finite weights"
    moved = sum(not torch.equal(before[k], p) for k, p in model.named_parameters())
    assert moved > len(before) // 2, f"{name}: only {moved} of {len(before)} tensors changed"


# --- features still being built: these run once they exist --------------------------------------


@pytest.mark.skipif(
    not has_model_keyword("dynamic_img_size"),
    reason="LaViT has no dynamic_img_size yet (issue 12); this test runs once it has",
)
@pytest.mark.parametrize("size", [(224, 224), (256, 320)])
def test_dynamic_img_size_on_cuda(size, record_property):
    model = build("lavit_tiny", dynamic_img_size=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        cpu = model(x)
        model.to(DEVICE)
        cuda = model(x.to(DEVICE))
    err = rel_err(cuda, cpu)
    record_property("cpu_vs_cuda", err)
    assert err <= 1e-4, f"{size}: CPU vs CUDA logits {err:.2e}"
    for where, la, va, _ in la_and_va_attention(model, x.to(DEVICE)):
        assert (la - va).abs().max().item() <= 1e-6, f"{size} {where}: identity lost"
    out = model(x.to(DEVICE))
    out.float().mean().backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def la_mixing_forms() -> list[str]:
    """The values of LaViT's ``la_mixing`` keyword (a ``Literal``), or its default alone."""
    parameter = inspect.signature(LaViT.__init__).parameters["la_mixing"]
    try:
        forms = typing.get_args(typing.get_type_hints(LaViT.__init__)["la_mixing"])
    except (NameError, KeyError, TypeError):
        forms = ()
    return [f for f in forms if isinstance(f, str)] or [parameter.default]


@pytest.mark.skipif(
    not has_model_keyword("la_mixing"),
    reason="LaViT has no la_mixing yet (the dense backbone, issue 14); this test runs once it has",
)
def test_dense_backbone_on_cuda(record_property):
    """Every ``la_mixing`` form: CPU = CUDA at 256×384, identity kept, bf16 800×1344 maps finite."""
    for form in la_mixing_forms():
        model = build("lavit_tiny", img_size=(256, 384), la_mixing=form, num_classes=0)
        torch.manual_seed(1)
        x = torch.randn(1, 3, 256, 384)
        with torch.no_grad():
            cpu = model.forward_intermediates(x, intermediates_only=True)
            model.to(DEVICE)
            cuda = model.forward_intermediates(x.to(DEVICE), intermediates_only=True)
        for m, (a, b) in enumerate(zip(cuda, cpu, strict=True)):
            err = rel_err(a, b)
            record_property(f"{form}_stage{m + 1}_cpu_vs_cuda", err)
            assert err <= 1e-4, f"{form} stage {m + 1}: CPU vs CUDA {err:.2e}"
        for where, la, va, _ in la_and_va_attention(model, x.to(DEVICE)):
            assert (la - va).abs().max().item() <= 1e-6, f"{form} {where}: identity lost"

        model = build("lavit_tiny", img_size=(800, 1344), la_mixing=form, num_classes=0)
        model.to(DEVICE).train()
        x = torch.randn(1, 3, 800, 1344, device=DEVICE)
        with torch.autocast(DEVICE.type, torch.bfloat16):
            maps = model.forward_intermediates(x, intermediates_only=True)
        assert [tuple(f.shape[-2:]) for f in maps] == [
            (800 // s, 1344 // s) for s in (4, 8, 16, 32)
        ]
        sum(f.float().mean() for f in maps).backward()
        assert all(f.isfinite().all() for f in maps), f"{form}: non-finite maps at 800×1344"
        assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
