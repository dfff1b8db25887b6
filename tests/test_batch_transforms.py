"""Tests of in-memory data with batch-level crop, flip and normalisation (``--data.in_memory``).

Offline, on the embedded CIFAR-10 subset and on image folders made here.
"""

from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lavit.errors import DataError, OptionError
from lavit.training.batch_transforms import BatchAugment
from lavit.training.data import ImageDataModule
from lavit.training.module import LaViTModule

CIFAR = dict(
    source="embedded",
    val_split="test",
    img_size=32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    crop_pct=1.0,
    scale=(0.5, 1.0),
    color_jitter=None,
    auto_augment=None,
    re_prob=0.0,
    batch_size=64,
    num_workers=0,
)


def augment(**overrides) -> BatchAugment:
    settings = dict(
        img_size=16,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip=0.5,
        vflip=0.0,
        interpolation="bilinear",
    )
    return BatchAugment(**{**settings, **overrides})


def boxes_of(theta: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(top, left, h, w, flipped) of each image's crop, read back from its affine map."""
    sx, cx, sy, cy = theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2]
    w, h = sx.abs() * W, sy.abs() * H
    left, top = (cx + 1) * W / 2 - w / 2, (cy + 1) * H / 2 - h / 2
    return torch.stack([top, left, h, w, (sx < 0).float()], dim=1)


def test_validation_batches_equal_the_per_image_path_exactly():
    in_memory = ImageDataModule(**CIFAR, in_memory=True)
    per_image = ImageDataModule(**CIFAR)
    in_memory.setup("fit")
    per_image.setup("fit")
    images, labels = next(iter(in_memory.val_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (64, 3, 32, 32)
    expected_images, expected_labels = next(iter(per_image.val_dataloader()))
    assert torch.equal(in_memory.batch_augment(images, train=False), expected_images)
    assert torch.equal(labels, expected_labels)
    assert len(in_memory.train_dataset) == len(per_image.train_dataset) == 4000


def test_full_crop_without_flip_is_the_image_itself():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    identity = augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, interpolation="bicubic")
    out = identity(images, train=True)
    torch.testing.assert_close(out, images.float() / 255, atol=1e-5, rtol=0)
    flipped = augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(images, train=True)
    torch.testing.assert_close(flipped, images.flip(-1).float() / 255, atol=1e-5, rtol=0)


def test_each_crop_is_torchvisions_resized_crop_of_its_box():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 24, 20), dtype=torch.uint8)
    transform = augment(img_size=28, scale=(0.2, 0.6), hflip=0.5)
    state = torch.get_rng_state()
    theta = transform.crop_transforms(16, 24, 20, images.device)
    torch.set_rng_state(state)  # the same draws inside forward
    out = transform(images, train=True)
    for image, box, result in zip(images, boxes_of(theta, 24, 20), out, strict=True):
        top, left, h, w, flipped = box.round().int().tolist()
        crop = TF.resized_crop(
            image.float() / 255,
            top,
            left,
            h,
            w,
            [28, 28],
            interpolation=InterpolationMode.BILINEAR,
            antialias=False,
        )  # the crop is enlarged (≤ 24 pixels to 28), where antialiasing does nothing
        expected = crop.flip(-1) if flipped else crop
        torch.testing.assert_close(result, expected.clamp(0, 1), atol=2e-5, rtol=0)


def test_crops_follow_the_random_resized_crop_distribution():
    torch.manual_seed(1)
    H, W, n = 32, 32, 4000
    scale, ratio = (0.25, 0.9), (3 / 4, 4 / 3)
    boxes = boxes_of(augment(scale=scale, ratio=ratio).crop_transforms(n, H, W, "cpu"), H, W)
    top, left, h, w, flipped = boxes.unbind(1)
    assert torch.all((top > -1e-4) & (left > -1e-4))
    assert torch.all((top + h < H + 1e-4) & (left + w < W + 1e-4))
    # Integer boxes (rounded sides), areas within the range up to that rounding.
    torch.testing.assert_close(h, h.round(), atol=1e-4, rtol=0)
    area = h * w / (H * W)
    assert area.min() > scale[0] * 0.8 and area.max() < scale[1] * 1.2
    assert area.std() > 0.1  # really random, spread over the range
    aspect = w / h
    assert aspect.min() > ratio[0] * 0.85 and aspect.max() < ratio[1] * 1.15
    assert 0.45 < flipped.mean() < 0.55


def test_impossible_crops_fall_back_to_the_centre_crop_as_torchvision():
    # A 40×10 (W×H) image with aspect ratios near 1 and areas the image cannot hold.
    theta = augment(scale=(0.99, 1.0), ratio=(1.0, 1.0), hflip=0.0).crop_transforms(
        4, 10, 40, "cpu"
    )
    top, left, h, w, _ = boxes_of(theta, 10, 40).unbind(1)
    torch.testing.assert_close(h, torch.full((4,), 10.0))
    torch.testing.assert_close(w, torch.full((4,), 10.0))
    torch.testing.assert_close(left, torch.full((4,), 15.0))


@pytest.mark.parametrize(
    "option, value",
    [("auto_augment", "rand-m9-mstd0.5"), ("color_jitter", 0.4), ("re_prob", 0.25)],
)
def test_per_image_augmentations_are_refused_with_the_fix(option, value):
    with pytest.raises(OptionError, match=rf"{option}: invalid value .*in_memory=false"):
        ImageDataModule(**{**CIFAR, option: value}, in_memory=True)


def test_images_of_different_sizes_are_refused_naming_one(tmp_path: Path):
    for index, size in enumerate([(8, 8), (8, 8), (9, 8)]):
        folder = tmp_path / "data" / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(folder / f"{index}.png")
    data = ImageDataModule(
        **{**CIFAR, "source": str(tmp_path / "data"), "val_split": None, "val_fraction": 0.5},
        in_memory=True,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(DataError, match=r"share one size.*9×8.*in_memory=false"):
        data.setup("fit")


def test_a_model_trains_on_in_memory_batches(tmp_path: Path):
    data = ImageDataModule(**{**CIFAR, "batch_size": 16}, in_memory=True)
    module = LaViTModule(arch="lavit_cifar", num_classes=10, img_size=32, warmup_epochs=0)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0])

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args):
            seen.append(batch[0])

    trainer = L.Trainer(
        max_steps=3,
        val_check_interval=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    assert len(seen) == 3 + 2
    assert all(batch.dtype == torch.float32 and batch.shape == (16, 3, 32, 32) for batch in seen)
    assert torch.isfinite(trainer.callback_metrics["val/top1"])
