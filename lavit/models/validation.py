"""What a LaViT accepts: its constructor arguments and its input sizes, each mistake a
``ValueError`` naming the argument (or the input size) and what is allowed."""

from __future__ import annotations

import math
from typing import get_args

import torch

from .resize import Grid

__all__ = ["check_choice", "checked_input", "input_size_problem", "validate_config"]


def check_choice(name: str, value, choices) -> None:
    """A ValueError unless ``value`` is one of the ``Literal`` type ``choices``."""
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {get_args(choices)}, got {value!r}")


def input_size_problem(img_size: Grid, stem_stride: int, sr_ratios) -> str | None:
    """Why an H×W input cannot go through the pyramid, or ``None`` if it can."""
    total_stride = stem_stride * 2 ** (len(sr_ratios) - 1)
    for side in img_size:
        if side < total_stride or side % total_stride != 0:
            nearest = total_stride * max(1, round(side / total_stride))
            return (
                f"each side must be a positive multiple of {total_stride} (stem stride "
                f"{stem_stride} × 2 per later stage), e.g. {nearest}"
            )
    for m, sr in enumerate(sr_ratios):
        side = [s // (stem_stride * 2**m) for s in img_size]
        if any(s % sr for s in side):
            return (
                f"it gives a {side[0]}×{side[1]} grid in stage {m + 1}, which sr_ratios[{m}] = "
                f"{sr} does not divide; choose a size or sr_ratios that divide it"
            )
    return None


def checked_input(
    x: torch.Tensor, img_size: Grid, dynamic: bool, stem_stride: int, sr_ratios: tuple[int, ...]
) -> torch.Tensor:
    """``x`` itself, or a ValueError if the model cannot take its size."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    if dynamic:
        problem = input_size_problem(size, stem_stride, sr_ratios)
        if problem:
            raise ValueError(f"input size {size[0]}×{size[1]} is not allowed: {problem}")
    elif size != tuple(img_size):
        raise ValueError(
            f"the model takes {img_size[0]}×{img_size[1]} inputs (its img_size) but got "
            f"{size[0]}×{size[1]}: build it with img_size={size[0] if size[0] == size[1] else size}, "
            "call model.set_input_size(...), or create it with dynamic_img_size=True"
        )
    return x


def validate_config(
    img_size: Grid, stem_stride: int, embed_dims, depths, num_heads, mlp_ratios, sr_ratios,
    num_va_layers, drop_rate: float, drop_path_rate: float, dp_loss_weight: float,
    residual_attn_init: float,
) -> None:  # fmt: skip
    """Raise a ValueError naming the argument and what is allowed (the shapes and numbers; the
    string choices are checked by :func:`check_choice`)."""
    per_stage = dict(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
                     sr_ratios=sr_ratios, num_va_layers=num_va_layers)  # fmt: skip
    for name, value in per_stage.items():
        if len(value) != len(depths):
            raise ValueError(
                f"{name} must have one entry per stage ({len(depths)}, as depths), got {list(value)}"
            )
    for name, value, low in (("depths", depths, 1), ("sr_ratios", sr_ratios, 1)):
        if any(v < low for v in value):
            raise ValueError(f"{name} must be ≥ {low} per stage, got {list(value)}")
    for m, (va, depth) in enumerate(zip(num_va_layers, depths, strict=True)):
        if not 1 <= va <= depth:
            raise ValueError(
                f"num_va_layers[{m}] = {va} is not allowed: each stage needs 1 ≤ num_va_layers ≤ "
                f"its depth ({depth}); num_va_layers = depth means no LA layer in that stage"
            )
    for m, (dim, heads) in enumerate(zip(embed_dims, num_heads, strict=True)):
        if heads < 1 or dim % heads != 0:
            raise ValueError(
                f"embed_dims[{m}] = {dim} must be divisible by num_heads[{m}] = {heads} (≥ 1)"
            )
    if any(r <= 0 for r in mlp_ratios):
        raise ValueError(f"mlp_ratios must be > 0, got {list(mlp_ratios)}")
    if stem_stride < 1:
        raise ValueError(f"stem_stride must be ≥ 1, got {stem_stride}")
    problem = input_size_problem(img_size, stem_stride, sr_ratios)
    if problem:
        raise ValueError(f"img_size {tuple(img_size)} is not allowed: {problem}")
    for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")
    if not (dp_loss_weight >= 0.0 and math.isfinite(dp_loss_weight)):
        raise ValueError(
            f"dp_loss_weight must be a finite number ≥ 0 (0: off), got {dp_loss_weight}"
        )
    if not math.isfinite(residual_attn_init):
        raise ValueError(f"residual_attn_init must be a finite number, got {residual_attn_init}")
