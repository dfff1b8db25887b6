"""``lavit analyze``: the attention saturation of a model, as a table and a plot.

The measurement is :mod:`lavit.analysis.saturation` (the same as at the end of every
``lavit fit``). Models: a checkpoint of ``lavit fit`` (read weights-only; its EMA weights if it
has them; images preprocessed with the run's data settings: size, mean, std, crop), or of a dense
run (``RetinaNetModule`` / ``SemanticFPNModule``, whose LaViT backbone is analysed), or a model
name of :mod:`lavit.models.factory` (random weights; ``NAME/all-va`` for a LaViT without LA
layers). Images: the embedded CIFAR-10 subset (the default), ``--images DIR``, or ``--random``
noise. ``--wandb`` logs the tables and the plot by ``lavit fit``'s W&B rule.

    lavit analyze --model runs/base/checkpoints/last.ckpt --num-images 64 --out runs/base/saturation
    lavit analyze --model pvt_v2_b1 --random --img-size 224 --out saturation/pvt_v2_b1
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from timm.data import resolve_model_data_config
from torch import nn

from lavit.analysis.saturation import head_means, saturation_table, write_report
from lavit.dense.detection import RetinaNetModule
from lavit.dense.segmentation import SemanticFPNModule
from lavit.models import LaViT
from lavit.models.factory import create_model, parse_model_name
from lavit.tables import markdown_table
from lavit.tools._cli import add_wandb_options, fail, log_to_wandb, positive_int, tool_parser
from lavit.training.checkpoint_io import load_checkpoint_file
from lavit.training.data import ImageDataModule
from lavit.training.images import IMAGE_EXTENSIONS
from lavit.training.trained import data_config, eval_transform, load_trained

PROG = "lavit analyze"


def load_model(source: str, img_size: int | None) -> tuple[nn.Module, int, str, dict[str, Any]]:
    """A model from a ``*.ckpt`` of ``lavit fit`` (its EMA weights if it has them) or a name.

    Returns ``(model, img_size, label, preprocessing)``: ``img_size`` defaults to the model's
    own input size; ``preprocessing`` (mean, std, crop_pct, interpolation) is the run's for a
    checkpoint (read weights-only), the model's default config for a name.
    """
    if source.endswith(".ckpt"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"checkpoint {source!r} does not exist")
        dense = _dense_class(path)
        if dense is not None:  # a detection / segmentation run: its backbone
            # backbone_checkpoint=None: the run's own weights replace the classification ones
            module = dense.load_from_checkpoint(
                path, map_location="cpu", weights_only=True, backbone_checkpoint=None
            )
            model = module.backbone.body
            label = f"{module.hparams.backbone} backbone of {dense.__name__} ({path.name})"
            config = data_config(load_checkpoint_file(path, mmap=True))
        else:
            model, config, checkpoint = load_trained(path)
            label = f"{checkpoint['hyper_parameters']['arch']} ({path.name})"
    else:
        spec = parse_model_name(source)
        model, label = create_model(spec, img_size=img_size), spec.label
        cfg = resolve_model_data_config(model)
        config = {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "crop_pct": 1.0}
    native = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    if isinstance(model, LaViT):
        native = model.img_size[0]  # a dense backbone built for H×W is analysed at H×H
        if tuple(model.img_size) != ((img_size or native),) * 2:
            model.set_input_size(img_size or native)  # resamples position embeddings and Ψ/Θ
        native = img_size or native
    preprocessing = {k: v for k, v in config.items() if k != "input_size"}
    return model.eval(), img_size or native, label, preprocessing


def _dense_class(path: Path) -> type | None:
    """The dense task module a checkpoint was written by, or ``None`` (a classification run)."""
    state = load_checkpoint_file(path, mmap=True)["state_dict"]
    if any(k.startswith("detector.backbone.body.") for k in state):
        return RetinaNetModule
    has = {k.split(".", 1)[0] for k in state}
    return SemanticFPNModule if {"decoder", "backbone"} <= has else None


def folder_images(
    folder: Path, img_size: int, limit: int, preprocessing: dict[str, Any]
) -> torch.Tensor:
    """Up to ``limit`` images of ``folder`` (recursively), preprocessed as ``preprocessing``."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {str(folder)!r}")
    transform = eval_transform({"input_size": (3, img_size, img_size), **preprocessing})
    return torch.stack([transform(PIL.Image.open(f).convert("RGB")) for f in files])


def embedded_images(img_size: int, limit: int, preprocessing: dict[str, Any]) -> torch.Tensor:
    """The first ``limit`` test images of the embedded CIFAR-10 subset, preprocessed alike."""
    data = ImageDataModule(source="embedded", img_size=img_size, num_workers=0, **preprocessing)
    data.setup("test")
    dataset = data.test_dataset
    return torch.stack([dataset[i][0] for i in range(min(limit, len(dataset)))])


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", required=True,
        help="a checkpoint (*.ckpt) or a model name (lavit_tiny, lavit_cifar/all-va, pvt_v2_b1, ...)")  # fmt: skip
    add("--img-size", type=positive_int, help="input side (default: the model's)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, help="a folder of images")
    source.add_argument("--random", action="store_true", help="Gaussian noise images")
    add("--num-images", type=positive_int, default=32)
    add("--batch-size", type=positive_int, default=16)
    add("--seed", type=int, default=0, help="for --random and random weights")
    add(
        "--out",
        type=Path,
        default=Path("runs/saturation"),
        help="folder for saturation.{csv,json,png}",
    )
    add_wandb_options(parser, "lavit-analyze", "the tables and plot")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lavit analyze``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        model, img_size, label, preprocessing = load_model(args.model, args.img_size)
        if args.random:
            images, source = torch.randn(args.num_images, 3, img_size, img_size), "random noise"
        elif args.images is not None:
            images = folder_images(args.images, img_size, args.num_images, preprocessing)
            source = str(args.images)
        else:
            images = embedded_images(img_size, args.num_images, preprocessing)
            source = "embedded CIFAR-10"
        rows = saturation_table(model, images.split(args.batch_size))
    except ValueError as err:  # CheckpointError included
        return fail(PROG, str(err))
    if not rows:
        return fail(PROG, f"{label} has no stage with two or more attention layers")
    title = f"{label}, {img_size}², {len(images)} images ({source})"
    meta = {"model": label, "img_size": img_size, "images": len(images), "image_source": source,
            "preprocessing": preprocessing}  # fmt: skip
    paths = write_report(rows, args.out, title, meta)
    print(f"# attention saturation: {title}\n")
    print(markdown_table(head_means(rows)))
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    if args.wandb:
        tables = {"saturation/per_head": rows, "saturation/summary": head_means(rows)}
        images = {"saturation/plot": (paths["png"], title)}
        log_to_wandb(args, "analyze", meta, tables, images)
    return 0
