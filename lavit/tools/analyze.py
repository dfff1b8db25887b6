"""``lavit analyze``: the attention saturation of a model, as a table and a plot.

The measurement is :mod:`lavit.analysis.saturation` (the same as at the end of every
``lavit fit``). Models: a Lightning checkpoint (``*.ckpt`` of ``LaViTModule``, its EMA weights if
it has them; or of a dense run, ``RetinaNetModule`` / ``SemanticFPNModule``, whose LaViT
backbone is analysed), or a model name of :mod:`lavit.models.factory` (random weights;
``NAME/all-va`` for a LaViT without LA layers). Images: the embedded CIFAR-10 subset (the default), ``--images DIR``,
or ``--random`` noise.

    lavit analyze --model runs/base/checkpoints/last.ckpt --num-images 64 --out runs/base/saturation
    lavit analyze --model pvt_v2_b1 --random --img-size 224 --out saturation/pvt_v2_b1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from timm.data import create_transform
from torch import nn

from lavit.analysis.saturation import head_means, saturation_table, write_report
from lavit.dense.detection import RetinaNetModule
from lavit.dense.segmentation import SemanticFPNModule
from lavit.models import LaViT
from lavit.models.factory import create_model, parse_model_name
from lavit.tables import markdown_table
from lavit.tools._cli import add_out_option, fail, positive_int, tool_parser
from lavit.training.checkpoint_io import load_checkpoint_file
from lavit.training.data import ImageDataModule
from lavit.training.images import IMAGE_EXTENSIONS
from lavit.training.module import LaViTModule

__all__ = ["embedded_images", "folder_images", "load_model", "main"]

PROG = "lavit analyze"


def load_model(source: str, img_size: int | None) -> tuple[nn.Module, int, str]:
    """A model from a ``*.ckpt`` (``LaViTModule``; its EMA weights if it has them) or a name.

    Returns ``(model, img_size, label)``; ``img_size`` defaults to the model's own input size.
    """
    if source.endswith(".ckpt"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"checkpoint {source!r} does not exist")
        dense = _dense_class(path)
        if dense is not None:  # a detection / segmentation run: its backbone
            # backbone_checkpoint=None: the run's own weights replace the classification ones
            module = dense.load_from_checkpoint(path, map_location="cpu", backbone_checkpoint=None)
            model = module.backbone.body
            label = f"{module.hparams.backbone} backbone of {dense.__name__} ({path.name})"
        else:
            module = LaViTModule.load_from_checkpoint(path, map_location="cpu")
            model = module.eval_model
            label = f"{module.hparams.arch} ({path.name})"
    else:
        spec = parse_model_name(source)
        model = create_model(spec, img_size=img_size)
        label = spec.label
    native = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    if isinstance(model, LaViT):
        native = model.img_size[0]  # a dense backbone built for H×W is analysed at H×H
        if tuple(model.img_size) != ((img_size or native),) * 2:
            model.set_input_size(img_size or native)  # resamples position embeddings and Ψ/Θ
        native = img_size or native
    return model.eval(), img_size or native, label


def _dense_class(path: Path) -> type | None:
    """The dense task module a checkpoint was written by, or ``None`` (a classification run)."""
    state = load_checkpoint_file(path, mmap=True)["state_dict"]
    if any(k.startswith("detector.backbone.body.") for k in state):
        return RetinaNetModule
    if any(k.startswith("decoder.") for k in state) and any(
        k.startswith("backbone.") for k in state
    ):
        return SemanticFPNModule
    return None


def _normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(
        cfg.get("std", (0.229, 0.224, 0.225))
    )


def folder_images(folder: Path, model: nn.Module, img_size: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` images of ``folder`` (recursively), resized and centre-cropped."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {str(folder)!r}")
    mean, std = _normalisation(model)
    transform = create_transform(img_size, is_training=False, mean=mean, std=std, crop_pct=1.0)
    return torch.stack([transform(PIL.Image.open(f).convert("RGB")) for f in files])


def embedded_images(model: nn.Module, img_size: int, limit: int) -> torch.Tensor:
    """The first ``limit`` test images of the embedded CIFAR-10 subset, at ``img_size``."""
    mean, std = _normalisation(model)
    data = ImageDataModule(
        source="embedded", img_size=img_size, mean=mean, std=std, crop_pct=1.0, num_workers=0
    )
    data.setup("test")
    dataset = data.test_dataset
    return torch.stack([dataset[i][0] for i in range(min(limit, len(dataset)))])


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        help="a LaViTModule checkpoint (*.ckpt) or a model name (lavit_tiny, lavit_cifar/all-va, pvt_v2_b1, ...)",
    )
    parser.add_argument(
        "--img-size", type=positive_int, default=None, help="input side (default: the model's)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, default=None, help="a folder of images")
    source.add_argument("--random", action="store_true", help="Gaussian noise images")
    parser.add_argument("--num-images", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="for --random and random weights")
    add_out_option(parser, "runs/saturation", "saturation.{csv,json,png}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lavit analyze``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.manual_seed(args.seed)
    try:
        model, img_size, label = load_model(args.model, args.img_size)
        if args.random:
            images, source = torch.randn(args.num_images, 3, img_size, img_size), "random noise"
        elif args.images is not None:
            images = folder_images(args.images, model, img_size, args.num_images)
            source = str(args.images)
        else:
            images, source = embedded_images(model, img_size, args.num_images), "embedded CIFAR-10"
        rows = saturation_table(model, images.split(args.batch_size))
    except ValueError as err:
        return fail(PROG, str(err))
    if not rows:
        return fail(PROG, f"{label} has no stage with two or more attention layers")
    title = f"{label}, {img_size}², {len(images)} images ({source})"
    meta = {"model": label, "img_size": img_size, "images": len(images), "image_source": source}
    paths = write_report(rows, args.out, title, meta)
    print(f"# attention saturation: {title}\n")
    print(markdown_table(head_means(rows)))
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
