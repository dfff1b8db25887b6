"""A timm classifier as a dense-prediction backbone: its stage maps at chosen strides.

The classifier is built as for classification (same parameter names), its head pruned, and run
through timm's ``forward_intermediates``, so a classification checkpoint of the same arch loads
into it key for key. LaViT's size-dependent tensors (position embeddings, Ψ/Θ) are converted to
the backbone's input size by the model's own ``checkpoint_filter_fn``.

Strides: 8/16/32 for RetinaNet (C3–C5), 4–32 for Semantic FPN (C2–C5).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from lavit.errors import CheckpointError
from lavit.models.lavit import LaViT, checkpoint_filter_fn
from lavit.training.checkpoint_io import load_checkpoint_file

__all__ = ["BackboneLoadReport", "DenseBackbone", "classifier_state_dict"]

# Prefixes under which a LaViTModule checkpoint holds the classifier (EMA first: it is what the
# classification run validated when EMA was on).
CHECKPOINT_PREFIXES = ("ema.module.", "model.")
HEAD_KEYS = ("head.",)


@dataclass
class BackboneLoadReport:
    """What ``load_checkpoint`` took from a checkpoint (logged by the task modules)."""

    path: str
    prefix: str  # "" for a plain state dict
    loaded: int
    converted: list[str] = field(default_factory=list)  # tensors resized to the backbone's size
    dropped: list[str] = field(default_factory=list)  # the classifier head


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class DenseBackbone(nn.Module):
    """Stage maps of a timm model at ``out_strides`` (a dict ``{"0": finest, ...}``).

    Args:
        arch: a timm model with ``forward_intermediates`` (``lavit_tiny``, ``pvt_v2_b1``, ...).
        out_strides: strides of the maps to return, each one of the model's stage strides.
        img_size: input size the model is built for (LaViT: fixes its token grids); ignored by
            size-agnostic models such as PVTv2 and by a LaViT with ``dynamic_img_size``.
        drop_path_rate: stochastic depth of the backbone.
        model_kwargs: other model arguments (``la_mixing``, ``num_va_layers``, widths, ...).
    """

    def __init__(
        self,
        arch: str,
        out_strides: tuple[int, ...] = (8, 16, 32),
        img_size: int | tuple[int, int] | None = None,
        drop_path_rate: float = 0.1,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if arch.split(".")[0] not in timm.list_models():
            raise ValueError(
                f"backbone arch={arch!r} is not a timm model (e.g. lavit_tiny, lavit_small, "
                "pvt_v2_b1)"
            )
        kwargs = dict(model_kwargs or {})
        kwargs.update(num_classes=0, drop_path_rate=drop_path_rate)
        self.is_lavit = arch.startswith("lavit_")
        # A LaViT that takes any size (dynamic_img_size) keeps its native size, so that its
        # parameters stay those of the classification checkpoint; otherwise it is built for
        # the dense input size.
        if img_size is not None and self.is_lavit and not kwargs.get("dynamic_img_size"):
            kwargs["img_size"] = (
                tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
            )
        try:
            body = timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as err:
            raise ValueError(f"model_kwargs do not fit backbone arch={arch!r}: {err}") from None
        if not hasattr(body, "forward_intermediates"):
            raise ValueError(
                f"backbone arch={arch!r} has no forward_intermediates (timm's feature API): "
                "choose a hierarchical timm model such as lavit_tiny or pvt_v2_b1"
            )
        reductions = [info["reduction"] for info in body.feature_info]
        missing = [s for s in out_strides if s not in reductions]
        if missing or list(out_strides) != sorted(out_strides):
            raise ValueError(
                f"out_strides {list(out_strides)} must be increasing strides of {arch}'s stages "
                f"{reductions}"
            )
        self.indices = [reductions.index(s) for s in out_strides]
        if _accepts(body.prune_intermediate_layers, "prune_head"):
            body.prune_intermediate_layers(self.indices, prune_head=True)
        self.body = body
        self.arch = arch
        self.out_strides = tuple(out_strides)
        self.out_channels = [body.feature_info[i]["num_chs"] for i in self.indices]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))  # (B, C_i, H/s_i, W/s_i)

    def no_weight_decay(self) -> set[str]:
        """The body's own no-decay names (LaViT: position embeddings, Ψ/Θ), prefixed."""
        names = self.body.no_weight_decay() if hasattr(self.body, "no_weight_decay") else set()
        return {f"body.{n}" for n in names}

    # ------------------------------------------------------------------------- checkpoints
    def load_checkpoint(self, path: str) -> BackboneLoadReport:
        """Load a classification checkpoint of the same arch (any input size) into the body.

        Accepts a Lightning checkpoint of :class:`~lavit.training.module.LaViTModule` (the
        ``ema.module.`` weights when present, else ``model.``) or a plain state dict (timm's
        layout, optionally under ``state_dict``/``model``). The classifier head is dropped;
        LaViT's position embeddings and Ψ/Θ are converted to this backbone's size.
        """
        checkpoint = load_checkpoint_file(path, lightning=False)
        state, prefix = classifier_state_dict(checkpoint, path)
        dropped = [k for k in state if k.startswith(HEAD_KEYS)]
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
        converted: list[str] = []
        if isinstance(self.body, LaViT):
            target = self.body.state_dict()
            before = {k: tuple(v.shape) for k, v in state.items()}
            state = checkpoint_filter_fn(state, self.body)
            # resampled to this size, or turned into another la_mixing form's parameters
            converted = [
                k for k, v in state.items() if k in target and before.get(k) != tuple(v.shape)
            ]
        target_shapes = {k: tuple(v.shape) for k, v in self.body.state_dict().items()}
        missing = sorted(set(target_shapes) - set(state))
        unexpected = sorted(set(state) - set(target_shapes))
        wrong = sorted(
            f"{k} {tuple(state[k].shape)} vs {target_shapes[k]}"
            for k in set(state) & set(target_shapes)
            if tuple(state[k].shape) != target_shapes[k]
        )
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            if wrong:
                parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]})")
            raise CheckpointError(
                f"--model.backbone_checkpoint: {path} does not fit backbone arch={self.arch!r}: "
                f"{'; '.join(parts)}; pass a classification checkpoint of the same arch and "
                "model options (num_va_layers, widths, ...) as --model.backbone"
            )
        self.body.load_state_dict(state, strict=True)
        return BackboneLoadReport(path, prefix, len(state), converted, dropped)


def classifier_state_dict(checkpoint: Any, path: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """The classifier's state dict inside a checkpoint, and the prefix it was found under."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: holds a {type(checkpoint).__name__}, not a state dict or checkpoint"
        )
    state = checkpoint
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in CHECKPOINT_PREFIXES:
        inner = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if inner:
            return inner, prefix
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors, not a state dict or checkpoint")
    return tensors, ""
