"""Tests of in-memory data augmented on batches (``--data.in_memory``, kornia on the batch).

Offline, on the embedded CIFAR-10 subset and on image folders made here.
"""

import sys
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO, TINY_LAVIT
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lavit.errors import DataError, OptionError
from lavit.training.batch_transforms import BatchAugment, InMemoryImages
from lavit.training.data import ImageDataModule
from lavit.training.images import DecodedImages
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
    settings = dict(img_size=16, mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bilinear")
    return BatchAugment(**{**settings, **overrides})


def crop_boxes(params: dict) -> torch.Tensor:
    """(top, left, h, w) of each image's crop from kornia's parameters (corner pixels)."""
    src = params["src"]  # (B, 4, 2): x, y of the corners, inclusive
    left, top = src[:, 0, 0], src[:, 0, 1]
    w, h = src[:, 1, 0] - left + 1, src[:, 2, 1] - top + 1
    return torch.stack([top, left, h, w], dim=1)


def make_folder(root: Path, sizes: list[tuple[int, int]], suffix: str = ".png") -> Path:
    rng = np.random.default_rng(0)
    for index, (w, h) in enumerate(sizes):
        folder = root / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"{index}{suffix}")
    return root


def test_validation_batches_equal_the_per_image_path_exactly():
    in_memory = ImageDataModule(**CIFAR, in_memory=True)
    per_image = ImageDataModule(**CIFAR, in_memory=False)
    in_memory.setup("fit")
    per_image.setup("fit")
    assert isinstance(in_memory.val_dataset, InMemoryImages)
    assert isinstance(per_image.val_dataset, DecodedImages)
    images, labels = next(iter(in_memory.val_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (64, 3, 32, 32)
    expected_images, expected_labels = next(iter(per_image.val_dataloader()))
    assert torch.equal(in_memory.batch_augment(images, train=False), expected_images)
    assert torch.equal(labels, expected_labels)
    assert len(in_memory.train_dataset) == len(per_image.train_dataset) == 4000


def test_full_crop_without_flip_is_the_image_itself():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    identity = augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, interpolation="bicubic")
    torch.testing.assert_close(identity(images, True), images.float() / 255, atol=1e-5, rtol=0)
    flipped = augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(images, train=True)
    torch.testing.assert_close(flipped, images.flip(-1).float() / 255, atol=1e-5, rtol=0)


def test_each_crop_is_torchvisions_resized_crop_of_its_own_box():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 24, 20), dtype=torch.uint8).float() / 255
    crop = augment(img_size=28, scale=(0.2, 0.6)).geometry_and_colour[0]
    params = crop.forward_parameters(images.shape)
    out = crop(images, params=params)
    boxes = crop_boxes(params)
    assert len({tuple(b) for b in boxes.tolist()}) > 1  # one draw per image
    for image, box, result in zip(images, boxes, out, strict=True):
        top, left, h, w = box.round().int().tolist()
        expected = TF.resized_crop(
            image, top, left, h, w, [28, 28], InterpolationMode.BILINEAR, antialias=False
        )  # the crop is enlarged (≤ 24 pixels to 28), where antialiasing does nothing
        torch.testing.assert_close(result, expected, atol=1e-4, rtol=0)


def test_crops_follow_the_random_resized_crop_distribution():
    torch.manual_seed(1)
    H, W, n = 32, 32, 4000
    scale, ratio = (0.25, 0.9), (3 / 4, 4 / 3)
    crop = augment(scale=scale, ratio=ratio).geometry_and_colour[0]
    top, left, h, w = crop_boxes(crop.forward_parameters((n, 3, H, W))).unbind(1)
    assert torch.all((top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W))
    area = h * w / (H * W)
    assert area.min() > scale[0] * 0.8 and area.max() < scale[1] * 1.2
    assert area.std() > 0.1  # really random, spread over the range
    aspect = w / h
    assert aspect.min() > ratio[0] * 0.85 and aspect.max() < ratio[1] * 1.15


def test_randaugment_jitter_and_erasing_run_per_image_and_repeat_under_the_seed():
    """The whole timm recipe on a batch: identical images come out different (draws per
    image), and the same seed gives the same batch."""
    batch = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(16, -1, -1, -1)
    recipe = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, hflip=0.0)
    for settings in (recipe, {**recipe, "auto_augment": None, "color_jitter": 0.4}):
        transform = augment(img_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), **settings)
        L.seed_everything(3, verbose=False)
        first = transform(batch, train=True)
        assert first.shape == (16, 3, 32, 32) and torch.isfinite(first).all()
        assert len({image.sum().item() for image in first}) > 8
        L.seed_everything(3, verbose=False)
        assert torch.equal(transform(batch, train=True), first)


def test_a_policy_without_a_batch_version_is_read_per_image_or_refused():
    data = ImageDataModule(**{**CIFAR, "auto_augment": "augmix-m5-w4-d2"})
    assert data.in_memory is False and data.batch_augment is None
    with pytest.raises(OptionError, match=r"auto_augment: invalid value augmix.*in_memory=auto"):
        ImageDataModule(**{**CIFAR, "auto_augment": "augmix-m5-w4-d2"}, in_memory=True)


def test_images_of_different_sizes_are_read_per_image_or_refused(tmp_path: Path, caplog):
    make_folder(tmp_path / "data", [(8 + i, 8) for i in range(8)])  # all sizes differ
    settings = {**CIFAR, "source": str(tmp_path / "data"), "val_split": None}
    settings.update(val_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    data = ImageDataModule(**settings)  # in_memory="auto"
    with caplog.at_level("INFO"):
        data.setup("fit")
    assert isinstance(data.train_dataset, DecodedImages)
    assert isinstance(data.val_dataset, InMemoryImages)  # resized and cropped to 32×32
    assert "read per image: its images differ in size" in caplog.text
    with pytest.raises(DataError, match=r"in_memory=true cannot hold .*differ in size.*auto"):
        ImageDataModule(**settings, in_memory=True).setup("fit")


def test_the_memory_budget_sends_a_split_per_image(monkeypatch):
    from lavit.training import batch_transforms

    monkeypatch.setattr(batch_transforms, "MAX_IN_MEMORY_BYTES", 4 * 2**20)
    data = ImageDataModule(**CIFAR)
    data.setup("fit")
    assert isinstance(data.train_dataset, DecodedImages)  # 4,000 × 3 KiB > 4 MiB
    assert isinstance(data.val_dataset, InMemoryImages)  # 1,000 × 3 KiB < 4 MiB
    with pytest.raises(DataError, match=r"would take 12 MiB \(budget: 4 MiB"):
        ImageDataModule(**CIFAR, in_memory=True).setup("fit")


def test_a_model_trains_on_in_memory_batches(tmp_path: Path):
    data = ImageDataModule(**{**CIFAR, "batch_size": 16, "auto_augment": "rand-m9-n2"})
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


@pytest.mark.slow
def test_base_config_trains_on_a_folder_of_photos_of_different_sizes(tmp_path: Path):
    """``lavit fit --config experiments/base.yaml --data.source=<JPEGs of many sizes>``
    trains (it stopped with "in_memory=True needs the images ... to share one size")."""
    import subprocess

    sizes = [(40 + 7 * i, 30 + 5 * (i % 4)) for i in range(24)]
    folder = make_folder(tmp_path / "photos", sizes, suffix=".jpg")
    run = subprocess.run(
        [sys.executable, "-m", "lavit", "fit", "--config", str(REPO / "experiments/base.yaml"),
         f"--data.source={folder}", "--data.val_split=null", "--data.val_fraction=0.25",
         "--data.in_memory=auto", "--data.batch_size=6", "--trainer.max_epochs=1",
         f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.accelerator=cpu",
         f"--model.model_kwargs={__import__('json').dumps(TINY_LAVIT)}",
         "--wandb.enabled=false", "--run_metadata.count_flops=false",
         "--attention_maps.num_images=0", "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "read per image: its images differ in size" in run.stderr
    assert list((tmp_path / "run").rglob("*.ckpt"))
