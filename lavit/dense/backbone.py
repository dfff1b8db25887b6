"""A timm classifier as a dense-prediction backbone: its stage maps at chosen strides.

The classifier is built as for classification (same parameter names), its head pruned, and run
through timm's ``forward_intermediates``, so a classification checkpoint of the same arch loads
into it key for key. (timm's ``features_only`` wrappers rename the parameters, and its
pretrained loader turns non-strict when it drops a classifier: neither is used.)

Strides: 8/16/32 for RetinaNet (C3–C5), 4–32 for Semantic FPN (C2–C5).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any

import timm
import torch
from torch import nn

from lavit.errors import CheckpointError
from lavit.training.checkpoint_io import load_checkpoint_file, state_dict_mismatch
from lavit.training.pretrained import model_state_dict

__all__ = ["DenseBackbone"]


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
        kwargs = {**(model_kwargs or {}), "num_classes": 0, "drop_path_rate": drop_path_rate}
        # A LaViT that takes any size (dynamic_img_size) keeps its native size, so that its
        # parameters stay those of the classification checkpoint.
        if (
            img_size is not None
            and arch.startswith("lavit_")
            and not kwargs.get("dynamic_img_size")
        ):
            kwargs["img_size"] = (
                tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
            )
        try:
            body = timm.create_model(arch, **kwargs)
        except TypeError as err:
            raise ValueError(f"model_kwargs do not fit backbone arch={arch!r}: {err}") from None
        if not hasattr(body, "forward_intermediates"):
            raise ValueError(
                f"backbone arch={arch!r} has no forward_intermediates (timm's feature API): "
                "choose a hierarchical timm model such as lavit_tiny or pvt_v2_b1"
            )
        reductions = [info["reduction"] for info in body.feature_info]
        if any(s not in reductions for s in out_strides) or list(out_strides) != sorted(
            out_strides
        ):
            raise ValueError(
                f"out_strides {list(out_strides)} must be increasing strides of {arch}'s stages "
                f"{reductions}"
            )
        self.indices = [reductions.index(s) for s in out_strides]
        body.prune_intermediate_layers(self.indices)  # and the classifier head
        self.body = body
        self.arch = arch
        self.out_strides = tuple(out_strides)
        self.out_channels = [body.feature_info[i]["num_chs"] for i in self.indices]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))  # (B, C_i, H/s_i, W/s_i)

    def load_checkpoint(self, path: str) -> int:
        """Load a classification checkpoint of the same arch (any input size) into the body.

        Accepts a ``lavit fit`` checkpoint (its EMA weights when it kept them) or a plain state
        dict (optionally under ``model``). The classifier is dropped; the model file's own
        ``checkpoint_filter_fn`` converts the rest (LaViT: position embeddings and Ψ/Θ to this
        size; PVTv2: the original release's names). Returns the number of tensors loaded.
        """
        where = f"--model.backbone_checkpoint: {path}"
        try:
            checkpoint = load_checkpoint_file(path, lightning=False)
        except CheckpointError as err:
            raise CheckpointError(f"--model.backbone_checkpoint: {err}") from None
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"{where} holds a {type(checkpoint).__name__}, not a state dict")
        state = model_state_dict(checkpoint.get("model", checkpoint))
        head = self.body.pretrained_cfg.get("classifier") or "head"
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
        model_file = importlib.import_module(type(self.body).__module__)
        if hasattr(model_file, "checkpoint_filter_fn"):
            state = model_file.checkpoint_filter_fn(state, self.body)
        problem = state_dict_mismatch(self.body.state_dict(), state)
        if problem:
            raise CheckpointError(
                f"{where} does not fit backbone arch={self.arch!r}: {problem}; pass a "
                "classification checkpoint of the same arch and model options (num_va_layers, "
                "widths, ...) as --model.backbone"
            )
        self.body.load_state_dict(state)
        return len(state)
