"""A small 32×32 LaViT with LA layers in every stage, shared by the fast model-level tests."""

import torch

from lavit.models import LaViT

SMALL = dict(
    img_size=32,
    stem_stride=2,
    embed_dims=(16, 32, 48, 64),
    depths=(2, 2, 3, 2),
    num_heads=(1, 2, 3, 4),
    mlp_ratios=(2, 2, 2, 2),
    sr_ratios=(4, 2, 1, 1),
    num_va_layers=(1, 1, 1, 1),
    num_classes=7,
)


def small_model(**overrides) -> LaViT:
    torch.manual_seed(0)
    return LaViT(**{**SMALL, **overrides})
