"""The dense task modules: training steps, every parameter trained, metrics on hand-made cases,
the backbone adapter and loading a classification checkpoint at another input size."""

import math

import pytest
import torch
from torchvision.models.detection import RetinaNet

from lavit.dense.backbone import DenseBackbone
from lavit.dense.detection import RetinaNetModule
from lavit.dense.segmentation import SemanticFPNModule, sliding_windows
from lavit.errors import CheckpointError
from lavit.models import LaViT

# A lavit_tiny-shaped LaViT small enough for CPU tests; LA layers in every stage (Ψ/Θ present).
TINY_BACKBONE = {
    "embed_dims": [16, 32, 32, 64],
    "depths": [2, 2, 2, 2],
    "num_heads": [1, 2, 2, 4],
    "mlp_ratios": [2, 2, 2, 2],
    "sr_ratios": [4, 2, 1, 1],
    "num_va_layers": [1, 1, 1, 1],
}
SIZE = (64, 96)  # not square: rows and columns must not be mixed up


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _detector(**overrides) -> RetinaNetModule:
    torch.manual_seed(0)
    kwargs = dict(
        num_classes=3,
        backbone="lavit_tiny",
        backbone_kwargs=TINY_BACKBONE,
        img_size=SIZE,
        fpn_channels=32,
        anchor_sizes=(8, 16, 32, 64, 128),
        drop_path_rate=0.0,
    )
    return RetinaNetModule(**{**kwargs, **overrides})


def _segmenter(**overrides) -> SemanticFPNModule:
    torch.manual_seed(0)
    kwargs = dict(
        num_classes=4,
        backbone="lavit_tiny",
        backbone_kwargs=TINY_BACKBONE,
        img_size=SIZE,
        pyramid_channels=32,
        segmentation_channels=32,
        drop_path_rate=0.0,
        dropout=0.0,
    )
    return SemanticFPNModule(**{**kwargs, **overrides})


def _assert_every_parameter_trained(module: torch.nn.Module) -> None:
    """Every parameter has a finite gradient, not zero everywhere."""
    dead = []
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        if p.grad.abs().max() == 0:
            dead.append(name)
    assert not dead, f"zero gradients: {dead}"


def test_retinanet_is_torchvisions_with_our_backbone_and_trains_every_parameter():
    module = _detector()
    assert isinstance(module.detector, RetinaNet)
    assert module.backbone.out_strides == (8, 16, 32)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, *SIZE, generator=g), torch.rand(3, 48, 80, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0]]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
    ]  # fmt: skip
    loss = module.training_step((images, targets), 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    _assert_every_parameter_trained(module)


def test_semantic_fpn_trains_every_parameter_and_predicts_at_input_size():
    module = _segmenter()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, *SIZE, generator=g)
    masks = torch.randint(0, 4, (2, *SIZE), generator=g)
    masks[0, :8] = 255  # ignored pixels
    assert module(images).shape == (2, 4, *SIZE)
    loss = module.training_step((images, masks), 0)
    assert torch.isfinite(loss)
    loss.backward()
    _assert_every_parameter_trained(module)


def _detections(module: RetinaNetModule, outputs: list[dict]) -> None:
    """Make the detector return ``outputs`` (the metric wiring is what is tested)."""
    module.detector.forward = lambda images, targets=None: outputs


def test_map_perfect_half_and_wrong_class_on_hand_made_boxes():
    module = _detector().eval()
    truth = {
        "boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0]]),
        "labels": torch.tensor([0, 1]),
        "iscrowd": torch.tensor([0, 0]),
        "orig_size": SIZE,
        "size": SIZE,
    }
    cases = {
        "perfect": (truth["boxes"], torch.tensor([0, 1])),
        "one of two found": (truth["boxes"][:1], torch.tensor([0])),
        "wrong classes": (truth["boxes"], torch.tensor([1, 0])),
    }
    results = {}
    for name, (boxes, labels) in cases.items():
        _detections(module, [{"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels}])
        module._evaluate(([torch.zeros(3, *SIZE)], [truth]), module.val_metrics)
        results[name] = module.val_metrics.compute()
        module.val_metrics.reset()
    assert results["perfect"]["map"] == pytest.approx(1.0)
    assert results["perfect"]["map_50"] == pytest.approx(1.0)
    # COCO's 101-point interpolation: class 0 found (AP 1), class 1 missed (AP 0) → mean 0.5
    assert results["one of two found"]["map"] == pytest.approx(0.5)
    assert results["wrong classes"]["map"] == pytest.approx(0.0)


def test_map_is_measured_in_original_image_coordinates():
    """A 64×64 box in an image shown at half size is 'medium' (32²–96²) in COCO, not 'small'."""
    module = _detector().eval()
    truth = {
        "boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]),  # in the resized (half-size) image
        "labels": torch.tensor([2]),
        "iscrowd": torch.tensor([0]),
        "orig_size": (128, 192),
        "size": SIZE,
    }
    _detections(
        module, [{"boxes": truth["boxes"], "scores": torch.ones(1), "labels": truth["labels"]}]
    )
    module._evaluate(([torch.zeros(3, *SIZE)], [truth]), module.val_metrics)
    result = module.val_metrics.compute()
    assert result["map"] == pytest.approx(1.0)
    assert result["map_medium"] == pytest.approx(1.0)
    assert result["map_small"] == -1  # no small object at the original size


def test_miou_ignores_the_ignore_index_and_classes_absent_everywhere():
    module = _segmenter().eval()
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]])
    prediction = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 0, 3], [2, 2, 1, 1]])
    # class 0: 3 right, 0 false positives (pixels under 255 are not counted) → IoU 3/4;
    # class 1: 4 right + 1 false positive → 4/5; class 2: 4/4; class 3: never true, never
    # predicted where scored → left out of the mean.
    expected = (3 / 4 + 4 / 5 + 1.0) / 3
    logits = torch.nn.functional.one_hot(prediction, 4).permute(2, 0, 1).float()
    module.predict_logits = lambda image, out_size: logits
    module._evaluate(([torch.zeros(3, 4, 4)], [mask]), module.val_metrics)
    result = module.val_metrics.compute()
    assert result["val/mIoU"] == pytest.approx(expected)
    assert result["val/aAcc"] == pytest.approx(11 / 12)


def test_sliding_windows_cover_the_image_and_match_one_window():
    assert sliding_windows(64, 64, 42) == [0]
    assert sliding_windows(100, 64, 42) == [0, 36]
    assert sliding_windows(200, 64, 42) == [0, 42, 84, 126, 136]
    module = _segmenter().eval()
    image = torch.rand(3, *SIZE)
    with torch.no_grad():
        assert torch.allclose(module._slide(image), module(image[None])[0], atol=1e-6)
        big = torch.rand(3, 100, 130)
        assert module.predict_logits(big, (50, 65)).shape == (4, 50, 65)


def test_step_and_poly_schedules():
    from types import SimpleNamespace

    def lrs(module, steps):  # timm's schedule over 120 updates of 10 an epoch, lr 1
        module.trainer = SimpleNamespace(estimated_stepping_batches=120, num_training_batches=10,
                                         accumulate_grad_batches=1, max_epochs=12)  # fmt: skip
        config = module.configure_optimizers()
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        assert {g["name"] for g in optimizer.param_groups} == {"decay", "no_decay"}
        return [scheduler.step_update(s) or optimizer.param_groups[0]["lr"] for s in steps]

    step = dict(
        lr=1.0, lr_schedule="step", warmup_iters=10, warmup_ratio=0.001, lr_milestones=(8, 11)
    )
    assert lrs(_segmenter(**step), [0, 10, 80, 119]) == pytest.approx([0.001, 1.0, 0.1, 0.01])
    poly = dict(lr=1.0, lr_schedule="poly", warmup_iters=0, poly_power=0.9)
    assert lrs(_segmenter(**poly), [0, 60, 120]) == pytest.approx([1.0, 0.5**0.9, 0.0])


# ------------------------------------------------------------------------------------ backbone
def _classifier(img_size=224, seed=0) -> LaViT:
    """A classification LaViT with trained-looking (non-identity) Ψ/Θ."""
    torch.manual_seed(seed)
    model = LaViT(img_size=img_size, num_classes=5, la_init="random", **TINY_BACKBONE)
    return model.eval()


def test_backbone_gives_the_classifiers_stage_maps():
    backbone = DenseBackbone("lavit_tiny", (4, 8, 16, 32), 224, 0.0, TINY_BACKBONE)
    classifier = _classifier()
    backbone.body.load_state_dict(
        {k: v for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    )
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        maps = list(backbone.eval()(x).values())
        expected = classifier.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[1] for m in maps] == backbone.out_channels == [16, 32, 32, 64]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", ["lightning", "lightning+ema", "plain"])
def test_backbone_loads_a_224_checkpoint_at_another_input_size(tmp_path, layout):
    trained = _classifier()
    raw = trained.state_dict()
    if layout == "plain":
        saved = raw
    else:
        state = {f"model.{k}": v * 0 for k, v in raw.items()} if layout.endswith("ema") else {}
        state.update(
            {
                f"{'ema.module' if layout.endswith('ema') else 'model'}.{k}": v
                for k, v in raw.items()
            }
        )
        saved = {"state_dict": state, "hyper_parameters": {"arch": "lavit_tiny"}}
    path = tmp_path / "cls.ckpt"
    torch.save(saved, path)

    backbone = DenseBackbone("lavit_tiny", (8, 16, 32), SIZE, 0.0, TINY_BACKBONE)
    assert backbone.load_checkpoint(str(path)) == len(backbone.body.state_dict())
    # The same as resizing the classifier itself to the dense size (the model's own resizing);
    # with an EMA, its weights (the module's own are zeroed above).
    trained.set_input_size(SIZE)
    x = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        maps = list(backbone.eval()(x).values())
        expected = trained.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_backbone_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.stages.0.pos_embed": torch.zeros(1, 4, 8)}}, path)
    with pytest.raises(
        CheckpointError, match=r"does not fit backbone arch='lavit_tiny'.*missing.*same arch"
    ):
        _detector(backbone_checkpoint=str(path))
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        _detector(backbone_checkpoint=str(tmp_path / "missing.ckpt"))
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"other.ckpt does not fit .*\d+ missing"):
        _detector(backbone_checkpoint=str(path))


def test_pvt_v2_backbone_takes_any_size_through_the_same_module():
    module = RetinaNetModule(
        num_classes=2, backbone="pvt_v2_b0", img_size=None, fpn_channels=32, drop_path_rate=0.0
    ).eval()
    assert module.backbone.out_channels == [64, 160, 256]
    with torch.no_grad():
        for size in [(64, 96), (96, 64)]:
            out = module([torch.rand(3, *size)])
            assert set(out[0]) == {"boxes", "scores", "labels"}
    assert math.isclose(module.hparams.lr, 1e-4)


@pytest.mark.parametrize(
    ("module", "kwargs", "message"),
    [
        (RetinaNetModule, {"num_classes": 0}, r"num_classes: invalid value 0 \(must be >= 1\)"),
        (RetinaNetModule, {"lr": 0.0}, r"lr: invalid value 0.0 \(must be > 0\)"),
        (SemanticFPNModule, {"num_classes": 1}, r"num_classes: invalid value 1 \(must be >= 2\)"),
        (SemanticFPNModule, {"weight_decay": -1.0}, r"weight_decay: invalid value -1.0"),
        (SemanticFPNModule, {"warmup_ratio": 0.0}, r"warmup_ratio: invalid value 0.0 \(must be in"),
    ],
)
def test_value_ranges_are_the_annotations(module, kwargs, message):
    with pytest.raises(ValueError, match=message):
        module(**kwargs)


@pytest.mark.parametrize("release", ["timm", "original"])
def test_pvt_v2_backbone_loads_timm_and_original_pvt_state_dicts(tmp_path, release):
    """PVTv2's own checkpoint_filter_fn renames the original release's keys (block1.0 ...)."""
    import re

    import timm

    torch.manual_seed(0)
    classifier = timm.create_model("pvt_v2_b0", num_classes=7).eval()
    state = classifier.state_dict()
    if release == "original":
        renames = [
            (r"^patch_embed\.", "patch_embed1."),
            (r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m[1]) + 1}."),
            (r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m[1]) + 1}."),
            (r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m[1]) + 1}."),
            (r"\.dwconv\.", ".dwconv.dwconv."),
        ]
        for pattern, new in renames:
            state = {re.sub(pattern, new, k): v for k, v in state.items()}
        assert "block1.0.attn.q.weight" in state
    torch.save({"model": state}, tmp_path / "pvt.pth")
    backbone = DenseBackbone("pvt_v2_b0", (8, 16, 32), None, 0.0)
    backbone.load_checkpoint(str(tmp_path / "pvt.pth"))
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        maps = list(backbone.eval()(x).values())
        expected = classifier.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)
