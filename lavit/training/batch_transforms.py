"""Images held decoded in memory (one ``uint8`` tensor per split) and augmented as whole batches
on the device with kornia, for small images (CIFAR's), where per-image work in the workers costs
up to a third of a training step. Each image gets its own draws from torch's seeded global RNG.
Evaluation images get timm's evaluation resize and crop once, when decoded, so that evaluation
batches are exactly the per-image path's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import datasets
import kornia.augmentation as K
import numpy as np
import torch
from kornia.augmentation.auto import RandAugment
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import nn
from torch.utils.data import Dataset

from lavit.training.images import DecodedImages

# More than this is left to the per-image path (in_memory=auto) or refused (in_memory=true).
MAX_IN_MEMORY_BYTES = min(8 * 2**30, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)


class NotInMemory(Exception):
    """Why a split is not held in memory (the reason, as one phrase)."""


class InMemoryImages(Dataset):
    """Every image of ``rows`` decoded once (after ``geometry``) into a ``uint8`` tensor (N, 3,
    H, W); ``__getitems__`` hands a DataLoader whole batches (use ``collate_fn=lambda b: b``).
    Raises :class:`NotInMemory` when the images differ in size or pass the memory budget.
    """

    def __init__(self, rows: datasets.Dataset, split: str, geometry: Callable) -> None:
        decoder = DecodedImages(rows, transform=None, split=split)
        arrays, first = [], None
        for index in range(len(rows)):
            image = geometry(decoder.decode(index))
            if first is None:
                first = image.size
                needed = len(rows) * 3 * first[0] * first[1]
                if needed > MAX_IN_MEMORY_BYTES:
                    raise NotInMemory(
                        f"its {len(rows)} images would take {needed / 2**20:.0f} MiB (budget: "
                        f"{MAX_IN_MEMORY_BYTES / 2**20:.0f} MiB, 8 GiB or a quarter of the RAM)"
                    )
            elif image.size != first:
                raise NotInMemory(
                    f"its images differ in size ({decoder.describe(index)} is "
                    f"{image.size[0]}×{image.size[1]}, the first {first[0]}×{first[1]})"
                )
            arrays.append(np.asarray(image, dtype=np.uint8))
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(np.asarray(rows.with_format("numpy")["label"]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]  # (B, 3, H, W) uint8, (B,)


class BatchAugment(nn.Module):
    """uint8 batches → normalised float batches; in training, timm's recipe on the batch
    (arguments as ImageDataModule's)."""

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        interpolation: str = "bicubic",
        color_jitter: float | None = None,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
    ) -> None:
        super().__init__()
        self.normalize = K.Normalize(torch.tensor(mean), torch.tensor(std))  # of x in [0, 1]
        size, resample = (img_size, img_size), interpolation.upper()
        steps = [K.RandomResizedCrop(size, scale, ratio, resample, align_corners=False)]
        steps += [K.RandomHorizontalFlip(p=hflip)] if hflip else []
        steps += [K.RandomVerticalFlip(p=vflip)] if vflip else []
        if color_jitter and not auto_augment:  # timm, too, drops the jitter under auto-augment
            steps.append(K.ColorJitter(color_jitter, color_jitter, color_jitter, p=1.0))
        self.geometry_and_colour = nn.Sequential(*steps)
        self.rand_augment = None
        # RandAugment: kornia's, at timm's magnitude (0–10) ×3 on kornia's 0–30 scale (timm's
        # magnitude noise "mstd" and "inc" ops are not kornia's).
        if auto_augment:
            policy = rand_augment_transform(auto_augment, {})
            m = min(29, max(1, round(3 * policy.ops[0].magnitude)))
            self.rand_augment = RandAugment(n=policy.num_layers, m=m)
        self.erasing = (re_prob, re_mode, re_count)

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.float() / 255.0
        if not train:
            return self.normalize(x)
        x = self.geometry_and_colour(x)
        if self.rand_augment is not None:
            # kornia's RandAugment draws its operations once per call: one call per image.
            x = torch.cat([self.rand_augment(image[None]) for image in x])
        x = self.normalize(x.clamp(0.0, 1.0))
        re_prob, re_mode, re_count = self.erasing
        if re_prob:
            x = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=x.device)(x)
        return x
