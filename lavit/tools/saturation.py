"""``lavit analyze``: attention saturation, how alike the attention maps of a stage's layers are.

The paper's motivation: within a stage, later layers' attention maps look much like the earlier
ones ("saturation"), so recomputing them is wasted work. For each stage this measures, per head and
averaged over images, the cosine similarity of the flattened attention map (N×N') of

* each layer and the layer before it (``consecutive``), and
* each layer and the stage's first layer (``to_first``).

Models: a Lightning checkpoint (``*.ckpt`` of ``LaViTModule``), or a LaViT / timm model name
(random weights; ``NAME/all-va`` for a LaViT without LA layers). LaViT maps come from
``forward_with_aux(collect_attn=True)``; timm attention modules (PVTv2, ViT) are switched to their
explicit path and their ``attn_drop`` input is hooked. Images: the embedded CIFAR-10 subset (the
default), ``--images DIR``, or ``--random`` noise.

    lavit analyze --model runs/base/checkpoints/last.ckpt --num-images 64 --out runs/base/saturation
    lavit analyze --model pvt_v2_b1 --random --img-size 224 --out saturation/pvt_v2_b1
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lavit.models.lavit import LaViT
from lavit.tools.bench import build_model, markdown_table, parse_model_name, write_csv

__all__ = [
    "AttentionMap",
    "SaturationAccumulator",
    "attention_maps",
    "load_model",
    "main",
    "plot_saturation",
    "saturation_table",
    "write_report",
]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class AttentionMap:
    """One layer's post-softmax attention for a batch."""

    stage: int  # 0-based
    layer: int  # 0-based, within the stage
    kind: str  # "va", "la" (LaViT) or "attn" (other models)
    probs: torch.Tensor  # (B, H, N, N')


# --- attention maps ------------------------------------------------------------------------------


def _stage_and_layer(module_name: str) -> tuple[int, int]:
    """``stages.2.blocks.1.attn`` → (2, 1); ``blocks.5.attn`` (a ViT) → (0, 5)."""
    match = re.search(r"stages\.(\d+)\.blocks\.(\d+)", module_name)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = re.search(r"blocks\.(\d+)", module_name)
    if match:
        return 0, int(match.group(1))
    raise ValueError(f"cannot tell the stage and layer of attention module {module_name!r}")


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> list[AttentionMap]:
    """Every attention layer's probabilities for ``images`` (B, 3, H, W), model in eval mode.

    LaViT: its own records. timm: attention modules with ``fused_attn`` and ``attn_drop`` are run
    on their explicit path and the probabilities entering ``attn_drop`` are captured.
    """
    model.eval()
    if isinstance(model, LaViT):
        records = model.forward_with_aux(images, collect_attn=True).attentions
        return [AttentionMap(r.stage, r.layer, r.kind, r.probs) for r in records]

    maps: list[AttentionMap] = []
    hooks, fused = [], []
    for name, module in model.named_modules():
        drop = getattr(module, "attn_drop", None)
        if hasattr(module, "fused_attn") and isinstance(drop, nn.Module):
            stage, layer = _stage_and_layer(name)
            fused.append((module, module.fused_attn))
            module.fused_attn = False  # the explicit path materialises softmax(QKᵀ)

            def capture(_module, inputs, _output, stage=stage, layer=layer):
                maps.append(AttentionMap(stage, layer, "attn", inputs[0].detach()))

            hooks.append(drop.register_forward_hook(capture))
    if not hooks:
        raise ValueError(
            f"{type(model).__name__} has no attention module this tool can read (one with "
            "`fused_attn` and `attn_drop`, as timm's ViT and PVTv2 have)"
        )
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
        for module, value in fused:
            module.fused_attn = value
    return maps


# --- similarity ----------------------------------------------------------------------------------


def cosine_per_head(a: torch.Tensor, b: torch.Tensor, centred: bool = False) -> torch.Tensor:
    """Cosine similarity of two (B, H, N, N') attention maps, per image and head → (B, H).

    ``centred``: of the maps minus uniform attention (1/N'), i.e. of where they deviate from
    "look everywhere"; near-uniform maps (an untrained model) are all alike otherwise.
    """
    if centred:
        a, b = a - 1.0 / a.shape[-1], b - 1.0 / b.shape[-1]
    a, b = a.flatten(2).double(), b.flatten(2).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def layer_pairs(maps: Sequence[AttentionMap]) -> Iterator[tuple[str, AttentionMap, AttentionMap]]:
    """(comparison, earlier, later) for every layer after the first of each stage."""
    by_stage: dict[int, list[AttentionMap]] = {}
    for m in maps:
        by_stage.setdefault(m.stage, []).append(m)
    for stage_maps in by_stage.values():
        stage_maps.sort(key=lambda m: m.layer)
        for previous, current in zip(stage_maps[:-1], stage_maps[1:], strict=True):
            yield "consecutive", previous, current
            yield "to_first", stage_maps[0], current  # = consecutive for the second layer


class SaturationAccumulator:
    """Sums of per-image similarities over batches, so that no attention map is kept."""

    def __init__(self) -> None:
        self.sums: dict[tuple, torch.Tensor] = {}  # (stage, layer_a, layer_b, comparison) → (H,)
        self.squares: dict[tuple, torch.Tensor] = {}
        self.centred: dict[tuple, torch.Tensor] = {}
        self.kinds: dict[tuple, tuple[str, str]] = {}
        self.count = 0

    def add(self, maps: Sequence[AttentionMap]) -> None:
        batch = 0
        for comparison, a, b in layer_pairs(maps):
            if a.probs.shape != b.probs.shape:
                continue  # not comparable (does not happen within a stage)
            sim = cosine_per_head(a.probs, b.probs)  # (B, H)
            key = (a.stage, a.layer, b.layer, comparison)
            self.sums[key] = self.sums.get(key, 0) + sim.sum(0)
            self.squares[key] = self.squares.get(key, 0) + sim.square().sum(0)
            centred = cosine_per_head(a.probs, b.probs, centred=True).sum(0)
            self.centred[key] = self.centred.get(key, 0) + centred
            self.kinds[key] = (a.kind, b.kind)
            batch = sim.shape[0]
        self.count += batch

    def rows(self) -> list[dict[str, Any]]:
        """One row per (stage, layer pair, comparison, head): mean and std over images."""
        out = []
        for key in sorted(self.sums):
            stage, layer_a, layer_b, comparison = key
            mean = self.sums[key] / self.count
            std = (self.squares[key] / self.count - mean.square()).clamp_min(0).sqrt()
            centred = self.centred[key] / self.count
            for head, (m, sd, c) in enumerate(
                zip(mean.tolist(), std.tolist(), centred.tolist(), strict=True)
            ):
                out.append(
                    {
                        "stage": stage + 1,
                        "layer_a": layer_a,
                        "layer_b": layer_b,
                        "kind_a": self.kinds[key][0],
                        "kind_b": self.kinds[key][1],
                        "comparison": comparison,
                        "head": head,
                        "similarity": m,
                        "std": sd,
                        "centred_similarity": c,
                        "images": self.count,
                    }
                )
        return out


def saturation_table(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
    """Per-head similarity rows of ``model`` over image ``batches`` (see the module docstring)."""
    accumulator = SaturationAccumulator()
    for images in batches:
        accumulator.add(attention_maps(model, images))
    return accumulator.rows()


def head_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows averaged over heads: one per (stage, layer pair, comparison), heads listed."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["stage"], row["layer_a"], row["layer_b"], row["comparison"])
        grouped.setdefault(key, []).append(row)
    out = []
    for (stage, a, b, comparison), group in grouped.items():
        sims = [r["similarity"] for r in group]
        centred = [r["centred_similarity"] for r in group]
        out.append(
            {
                "stage": stage,
                "layers": f"{a}→{b}",
                "kinds": f"{group[0]['kind_a']}→{group[0]['kind_b']}",
                "comparison": comparison,
                "mean": sum(sims) / len(sims),
                "centred_mean": sum(centred) / len(centred),
                "per_head": " ".join(f"{s:.4f}" for s in sims),
            }
        )
    return out


# --- outputs -------------------------------------------------------------------------------------


def plot_saturation(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Per stage (columns): similarity against layer, raw (top) and centred (bottom).

    Thick lines: mean over heads, to the previous layer and to the stage's first; thin: heads.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r["stage"] for r in rows})
    fig, axes = plt.subplots(
        2, max(1, len(stages)), figsize=(3.4 * max(1, len(stages)), 5.6), squeeze=False
    )
    styles = {
        "consecutive": ("tab:blue", "o", "to previous layer"),
        "to_first": ("tab:orange", "s", "to first layer"),
    }
    metrics = {"similarity": "cosine similarity", "centred_similarity": "centred cosine"}
    for row_axes, (metric, ylabel) in zip(axes, metrics.items(), strict=True):
        for ax, stage in zip(row_axes, stages, strict=False):
            in_stage = [r for r in rows if r["stage"] == stage]
            for comparison, (color, marker, label) in styles.items():
                selected = [r for r in in_stage if r["comparison"] == comparison]
                layers = sorted({r["layer_b"] for r in selected})
                for head in sorted({r["head"] for r in selected}):
                    ys = [
                        r[metric]
                        for r in sorted(selected, key=lambda r: r["layer_b"])
                        if r["head"] == head
                    ]
                    ax.plot(layers, ys, color=color, alpha=0.3, lw=0.8)
                means = [
                    sum(r[metric] for r in selected if r["layer_b"] == layer)
                    / sum(1 for r in selected if r["layer_b"] == layer)
                    for layer in layers
                ]
                ax.plot(layers, means, color=color, marker=marker, label=label)
            kinds = {r["layer_b"]: r["kind_b"] for r in in_stage}
            ax.set_xticks(sorted(kinds), [f"{k}\n{kinds[k]}" for k in sorted(kinds)])
            ax.set_ylim(min(0.0, min(r[metric] for r in rows)) - 0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(f"stage {stage}", fontsize=9)
        row_axes[0].set_ylabel(ylabel)
    for ax in axes[-1]:
        ax.set_xlabel("layer (kind)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    rows: Sequence[dict[str, Any]], out_dir: Path, title: str, meta: dict[str, Any] | None = None
) -> dict[str, Path]:
    """``saturation.csv``, ``saturation.json`` and ``saturation.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "saturation.csv",
        "json": out_dir / "saturation.json",
        "png": out_dir / "saturation.png",
    }
    write_csv(paths["csv"], rows)
    paths["json"].write_text(
        json.dumps({**(meta or {}), "rows": list(rows), "summary": head_means(rows)}, indent=2)
    )
    plot_saturation(rows, paths["png"], title)
    return paths


# --- models and images ---------------------------------------------------------------------------


def load_model(source: str, img_size: int | None) -> tuple[nn.Module, int, str]:
    """A model from a ``*.ckpt`` (``LaViTModule``; its EMA weights if it has them) or a name.

    Returns ``(model, img_size, label)``; ``img_size`` defaults to the model's own input size.
    """
    if source.endswith(".ckpt"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"checkpoint {source!r} does not exist")
        from lavit.training.module import LaViTModule

        module = LaViTModule.load_from_checkpoint(path, map_location="cpu")
        model = module.eval_model
        label = f"{module.hparams.arch} ({path.name})"
    else:
        spec = parse_model_name(source)
        model = (
            build_model(spec, img_size)
            if img_size is not None
            else timm.create_model(spec.arch, **spec.kwargs)
        )
        label = spec.label
    native = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    if isinstance(model, LaViT):
        native = model.img_size[0]
        if img_size is not None and img_size != native:
            model.set_input_size(img_size)  # resamples position embeddings and Ψ/Θ
            native = img_size
    return model.eval(), img_size or native, label


def _normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(
        cfg.get("std", (0.229, 0.224, 0.225))
    )


def folder_images(folder: Path, model: nn.Module, img_size: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` images of ``folder`` (recursively), resized and centre-cropped."""
    import PIL.Image
    from timm.data import create_transform

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {str(folder)!r}")
    mean, std = _normalisation(model)
    transform = create_transform(img_size, is_training=False, mean=mean, std=std, crop_pct=1.0)
    return torch.stack([transform(PIL.Image.open(f).convert("RGB")) for f in files])


def embedded_images(model: nn.Module, img_size: int, limit: int) -> torch.Tensor:
    """The first ``limit`` test images of the embedded CIFAR-10 subset, at ``img_size``."""
    from lavit.training.data import ImageDataModule

    mean, std = _normalisation(model)
    data = ImageDataModule(
        source="embedded", img_size=img_size, mean=mean, std=std, crop_pct=1.0, num_workers=0
    )
    data.setup("test")
    dataset = data.test_dataset
    return torch.stack([dataset[i][0] for i in range(min(limit, len(dataset)))])


# --- the command ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavit analyze",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a LaViTModule checkpoint (*.ckpt) or a model name (lavit_tiny, lavit_cifar/all-va, pvt_v2_b1, ...)",
    )
    parser.add_argument(
        "--img-size", type=int, default=None, help="input side (default: the model's)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, default=None, help="a folder of images")
    source.add_argument("--random", action="store_true", help="Gaussian noise images")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="for --random and random weights")
    parser.add_argument("--out", type=Path, default=Path("runs/saturation"), help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lavit analyze``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("img_size", "num_images", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
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
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {label} has no stage with two or more attention layers", file=sys.stderr)
        return 2
    title = f"{label}, {img_size}², {len(images)} images ({source})"
    meta = {"model": label, "img_size": img_size, "images": len(images), "image_source": source}
    paths = write_report(rows, args.out, title, meta)
    print(f"# attention saturation: {title}\n")
    print(markdown_table(head_means(rows)))
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
