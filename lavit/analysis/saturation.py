"""Attention saturation: how alike the attention maps of a stage's layers are.

Per stage, head and image: the cosine similarity of each layer's flattened attention map (N×N')
with the layer before (``consecutive``) and with the stage's first (``to_first``), raw and minus
uniform attention (``centred_similarity``, which tells real reuse from an untrained model's
near-uniform maps). Maps come from ``forward_with_aux(collect_attn=True)`` for LaViT and from
``timm.utils.AttentionExtract`` for other timm models (PVTv2, ViT).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import AttentionExtract
from torch import nn

from lavit.models import LaViT
from lavit.tables import write_csv

__all__ = ["AttentionMap", "attention_maps", "head_means", "saturation_table", "write_report"]


@dataclass
class AttentionMap:
    """One layer's post-softmax attention for a batch."""

    stage: int  # 0-based
    layer: int  # 0-based, within the stage
    kind: str  # "va", "la" (LaViT) or "attn" (other models)
    probs: torch.Tensor  # (B, H, N, N')


def _stage_and_layer(name: str) -> tuple[int, int]:
    """``stages.2.blocks.1.attn.softmax`` → (2, 1); ``blocks.5.attn.softmax`` (a ViT) → (0, 5)."""
    match = re.search(r"(?:stages\.(\d+)\.)?blocks\.(\d+)", name)
    if not match:
        raise ValueError(f"cannot tell the stage and layer of attention node {name!r}")
    return int(match.group(1) or 0), int(match.group(2))


def attention_reader(model: nn.Module) -> Callable[[torch.Tensor], list[AttentionMap]]:
    """A function giving every attention layer's probabilities for a batch, model in eval mode."""
    model.eval()
    if isinstance(model, LaViT):
        return lambda images: [
            AttentionMap(r.stage, r.layer, r.kind, r.probs)
            for r in model.forward_with_aux(images, collect_attn=True).attentions
        ]
    # AttentionExtract finds no softmax in a fused attention: it traces the explicit path.
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    try:
        for module in fused:
            module.fused_attn = False
        extract = AttentionExtract(model).eval()
    except Exception as err:  # no softmax node, or a model torch.fx cannot trace
        raise ValueError(f"{type(model).__name__}: no attention maps to read ({err})") from None
    finally:
        for module, value in fused.items():
            module.fused_attn = value
    return lambda images: [
        AttentionMap(*_stage_and_layer(name), "attn", probs)
        for name, probs in extract(images).items()
    ]


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> list[AttentionMap]:
    """Every attention layer's probabilities for ``images`` (B, 3, H, W), model in eval mode."""
    return attention_reader(model)(images)


def cosine_per_head(a: torch.Tensor, b: torch.Tensor, centred: bool = False) -> torch.Tensor:
    """Cosine similarity of two (B, H, N, N') maps per image and head → (B, H); ``centred``: of
    the maps minus uniform attention (1/N'), where they deviate from "look everywhere"."""
    if centred:
        a, b = a - 1.0 / a.shape[-1], b - 1.0 / b.shape[-1]
    return torch.cosine_similarity(a.flatten(2).double(), b.flatten(2).double(), dim=-1)


@torch.no_grad()
def saturation_table(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
    """One row per (stage, layer pair, comparison, head): mean and std over the images of
    ``batches``; only the per-image similarities outlive a batch, not its attention maps."""
    read = attention_reader(model)
    sims: dict[tuple, list[torch.Tensor]] = {}  # (stage, a, b, comparison, kinds) → [(B, H, 2)]
    for images in batches:
        maps = sorted(read(images), key=lambda m: (m.stage, m.layer))
        for prev, cur in zip(maps[:-1], maps[1:], strict=True):
            if prev.stage != cur.stage:
                continue
            first = next(m for m in maps if m.stage == cur.stage)
            for comparison, a in (("consecutive", prev), ("to_first", first)):
                key = (a.stage, a.layer, cur.layer, comparison, a.kind, cur.kind)
                raw, centred = (cosine_per_head(a.probs, cur.probs, c) for c in (False, True))
                sims.setdefault(key, []).append(torch.stack([raw, centred], -1))
    rows = []
    for (stage, layer_a, layer_b, comparison, kind_a, kind_b), parts in sorted(sims.items()):
        sim = torch.cat(parts)  # (images, H, 2): raw and centred
        mean, std = sim.mean(0).tolist(), sim[..., 0].std(0, correction=0).tolist()
        for head, ((m, c), sd) in enumerate(zip(mean, std, strict=True)):
            rows.append(dict(
                stage=stage + 1, layer_a=layer_a, layer_b=layer_b, kind_a=kind_a, kind_b=kind_b,
                comparison=comparison, head=head, similarity=m, std=sd, centred_similarity=c,
                images=len(sim),
            ))  # fmt: skip
    return rows


def head_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows averaged over heads: one per (stage, layer pair, comparison), heads listed."""
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["stage"], row["layer_a"], row["layer_b"], row["comparison"])
        grouped.setdefault(key, []).append(row)
    return [
        {
            "stage": stage,
            "layers": f"{a}→{b}",
            "kinds": f"{group[0]['kind_a']}→{group[0]['kind_b']}",
            "comparison": comparison,
            "mean": sum(r["similarity"] for r in group) / len(group),
            "centred_mean": sum(r["centred_similarity"] for r in group) / len(group),
            "per_head": " ".join(f"{r['similarity']:.4f}" for r in group),
        }
        for (stage, a, b, comparison), group in grouped.items()
    ]


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
                # saturation_table's rows: in layer order, one per head at each layer
                selected = [r for r in in_stage if r["comparison"] == comparison]
                layers, heads = (sorted({r[k] for r in selected}) for k in ("layer_b", "head"))
                for head in heads:
                    ys = [r[metric] for r in selected if r["head"] == head]
                    ax.plot(layers, ys, color=color, alpha=0.3, lw=0.8)
                sums = [sum(r[metric] for r in selected if r["layer_b"] == b) for b in layers]
                means = [total / len(heads) for total in sums]
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
    paths = {ext: out_dir / f"saturation.{ext}" for ext in ("csv", "json", "png")}
    write_csv(paths["csv"], rows)
    paths["json"].write_text(
        json.dumps({**(meta or {}), "rows": list(rows), "summary": head_means(rows)}, indent=2)
    )
    plot_saturation(rows, paths["png"], title)
    return paths
