"""Attention saturation: how alike the attention maps of a stage's layers are.

The paper's motivation: within a stage, later layers' attention maps look much like the earlier
ones ("saturation"), so recomputing them is wasted work. For each stage this measures, per head and
averaged over images, the cosine similarity of the flattened attention map (N×N') of

* each layer and the layer before it (``consecutive``), and
* each layer and the stage's first layer (``to_first``),

and the same of the maps minus uniform attention (``centred_similarity``), which separates real
reuse from the near-uniform maps of an untrained model. LaViT maps come from
``forward_with_aux(collect_attn=True)``; timm attention modules (PVTv2, ViT) are switched to their
explicit path and their ``attn_drop`` input is hooked.

Used by the training callback (``lavit.training.saturation_callback``) and ``lavit analyze``
(``lavit.tools.analyze``) alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lavit.models import LaViT
from lavit.tables import write_csv

__all__ = [
    "AttentionMap",
    "SaturationAccumulator",
    "attention_maps",
    "head_means",
    "plot_saturation",
    "saturation_table",
    "write_report",
]


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
