"""Images held decoded in memory, with the training crop and flip applied to whole batches.

For small images (CIFAR's 32×32) the per-image path — PNG decode, PIL crop and resize,
``ToTensor``, ``Normalize``, collation — costs about 1 ms an image on one core, as much as a
third of a training step of ``lavit_cifar`` (BENCHMARKS.md, "Training loop"). Here every image
is decoded once into one ``uint8`` tensor; a batch is an index into it, and the random resized
crop, the flips and the normalisation run on the batch as tensor ops on the training device.

The crop follows torchvision's ``RandomResizedCrop`` distribution (area in ``scale``, log-uniform
aspect in ``ratio``, ten attempts, then the centre crop its fallback takes), resampled with
``grid_sample``. What differs from the per-image path: the resampling has no antialiasing, so it
matches PIL's when the crop is enlarged (always the case for ``img_size`` ≥ the image side) and
aliases when it is shrunk; bicubic weights near the crop's edge reach the pixel just outside it
(the per-image path repeats the edge pixel; bilinear resampling matches exactly); and per-image augmentations (RandAugment, colour jitter, random
erasing) are not available — :class:`~lavit.training.data.ImageDataModule` refuses them with
``in_memory=True``. Evaluation images get timm's evaluation resize and centre crop once, when
decoded, so an evaluation batch is exactly what the per-image path gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lavit.errors import DataError
from lavit.training.images import DecodedImages

__all__ = ["BatchAugment", "InMemoryImages", "keep_batch"]

# Decoding more than this into memory is refused: the per-image path is meant for such data.
MAX_IN_MEMORY_BYTES = 8 * 2**30


class InMemoryImages(Dataset):
    """Every image of ``rows`` decoded once into a ``uint8`` tensor (N, 3, H, W).

    A DataLoader over it fetches a whole batch at once (``__getitems__``) and, with
    :func:`keep_batch` as ``collate_fn``, hands on ``(images (B, 3, H, W) uint8, labels (B,))``.

    Args:
        rows: a dataset with ``image`` (encoded) and ``label`` columns.
        split: the split's name, for error messages.
        row_ids: the rows' indices in the original split, for error messages.
        geometry: applied to each decoded PIL image before it is stored (the evaluation resize
            and centre crop); ``None`` stores images as decoded, which must then share one size.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        split: str,
        row_ids: Sequence[int] | None = None,
        geometry: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None,
    ) -> None:
        self.rows, self.split, self.row_ids = rows, split, row_ids  # for per-image reading
        decoder = DecodedImages(rows, transform=None, split=split, row_ids=row_ids)
        arrays, first_size = [], None
        for index in range(len(rows)):
            image = decoder._decode(rows[index]["image"], index)
            if geometry is not None:
                image = geometry(image)
            if first_size is None:
                first_size = image.size
                needed = len(rows) * 3 * image.size[0] * image.size[1]
                if needed > MAX_IN_MEMORY_BYTES:
                    raise DataError(
                        f"in_memory=True would hold {needed / 2**30:.1f} GiB of split {split!r} "
                        f"in memory (limit {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB); set "
                        "--data.in_memory=false to decode images as they are read"
                    )
            elif image.size != first_size:
                raise DataError(
                    f"in_memory=True needs the images of split {split!r} to share one size, "
                    f"but {decoder._describe(rows[index]['image'], index)} is "
                    f"{image.size[0]}×{image.size[1]} and the first is "
                    f"{first_size[0]}×{first_size[1]}; set --data.in_memory=false"
                )
            arrays.append(np.asarray(image, dtype=np.uint8))
        if not arrays:
            raise DataError(f"split {split!r} has no images")
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(np.asarray(rows.with_format("numpy")["label"]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]  # (B, 3, H, W) uint8, (B,)


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``collate_fn`` for :class:`InMemoryImages`: its batches come already stacked."""
    return batch


class BatchAugment(nn.Module):
    """uint8 batches → normalised float batches; in training also random resized crop and flips.

    Args:
        img_size: side of the square output.
        mean, std: per-channel normalisation (of values in [0, 1]).
        scale, ratio: area and aspect-ratio ranges of the random resized crop.
        hflip, vflip: flip probabilities.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
    """

    ATTEMPTS = 10  # torchvision's RandomResizedCrop tries ten crops before its fallback

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float],
        ratio: tuple[float, float],
        hflip: float,
        vflip: float,
        interpolation: str,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.scale, self.ratio = scale, ratio
        self.hflip, self.vflip = hflip, vflip
        self.interpolation = interpolation

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → (x / 255 − mean) / std, as ``ToTensor`` + ``Normalize`` do."""
        return (images.float() / 255.0 - self.mean.to(images.device)) / self.std.to(images.device)

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if not train:
            return self.normalize(images)
        B, _, H, W = images.shape
        theta = self.crop_transforms(B, H, W, images.device)  # (B, 2, 3)
        grid = F.affine_grid(theta, [B, 3, self.img_size, self.img_size], align_corners=False)
        grid = _clamp_to_crop(grid, theta, H, W)  # (B, S, S, 2)
        x = images.float() / 255.0
        x = F.grid_sample(
            x, grid, mode=self.interpolation, padding_mode="border", align_corners=False
        )  # (B, 3, S, S)
        return (x.clamp_(0.0, 1.0) - self.mean.to(x.device)) / self.std.to(x.device)

    def crop_transforms(self, B: int, H: int, W: int, device: torch.device) -> torch.Tensor:
        """Affine maps of output to input coordinates: one random resized crop per image.

        Crop boxes follow ``torchvision.transforms.RandomResizedCrop.get_params``; a flip is a
        negated axis of the map (the crop mirrored about its centre).
        """
        area = H * W
        log_ratio = torch.log(torch.tensor(self.ratio, device=device))
        shape = (B, self.ATTEMPTS)
        target_area = area * torch.empty(shape, device=device).uniform_(*self.scale)
        aspect = torch.exp(
            torch.empty(shape, device=device).uniform_(float(log_ratio[0]), float(log_ratio[1]))
        )
        w = torch.sqrt(target_area * aspect).round()  # (B, attempts)
        h = torch.sqrt(target_area / aspect).round()
        fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = fits.float().argmax(dim=1, keepdim=True)  # the first attempt that fits
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # (B,)
        # torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio.
        fw, fh = _fallback_crop(H, W, self.ratio)
        found = fits.any(dim=1)
        w = torch.where(found, w, torch.full_like(w, fw))
        h = torch.where(found, h, torch.full_like(h, fh))
        # Top-left corner uniform over the integer positions, like torch.randint(0, H − h + 1).
        top = torch.floor(torch.rand(B, device=device) * (H - h + 1))
        left = torch.floor(torch.rand(B, device=device) * (W - w + 1))
        top = torch.where(found, top, torch.div(H - h, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(W - w, 2, rounding_mode="floor"))
        # Normalised coordinates (align_corners=False): the image spans [−1, 1] edge to edge.
        sx, sy = w / W, h / H
        cx, cy = (2 * left + w) / W - 1, (2 * top + h) / H - 1
        sx = torch.where(torch.rand(B, device=device) < self.hflip, -sx, sx)
        sy = torch.where(torch.rand(B, device=device) < self.vflip, -sy, sy)
        zero = torch.zeros_like(sx)
        return torch.stack(
            [torch.stack([sx, zero, cx], dim=1), torch.stack([zero, sy, cy], dim=1)], dim=1
        )  # (B, 2, 3)


def _clamp_to_crop(grid: torch.Tensor, theta: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Sampling points kept between the crop's outer pixel centres.

    Resizing a cropped image repeats its edge pixels past them; sampling the whole image would
    mix in the pixels just outside the crop instead. (Bicubic weights still reach one pixel
    beyond the crop for points within 1.5 pixels of its edge.)
    """
    half_w, half_h = theta[:, 0, 0].abs(), theta[:, 1, 1].abs()  # (B,): crop half-sizes
    cx, cy = theta[:, 0, 2], theta[:, 1, 2]
    x_lo, x_hi = cx - half_w + 1 / W, cx + half_w - 1 / W  # centres of the outer pixels
    y_lo, y_hi = cy - half_h + 1 / H, cy + half_h - 1 / H
    x = torch.maximum(torch.minimum(grid[..., 0], x_hi[:, None, None]), x_lo[:, None, None])
    y = torch.maximum(torch.minimum(grid[..., 1], y_hi[:, None, None]), y_lo[:, None, None])
    return torch.stack([x, y], dim=-1)


def _fallback_crop(H: int, W: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """The (w, h) of torchvision's fallback crop: the image cut to the allowed aspect range."""
    in_ratio = W / H
    if in_ratio < min(ratio):
        return float(W), float(round(W / min(ratio)))
    if in_ratio > max(ratio):
        return float(round(H * max(ratio))), float(H)
    return float(W), float(H)
