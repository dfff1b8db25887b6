"""The one MAC counter (``fit`` run metadata, ``lavit bench``, ``scripts/model_size.py``).

``torch.utils.flop_counter`` with MACs = FLOPs / 2, every matmul and convolution included (Ψ/Θ
and the attention matmuls too, as attention runs on its math backend while counting: the fused
kernels are invisible to the counter or counted differently per device). Fixed here: torch
counts a grouped convolution's weight gradient ``groups`` times too often.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, get_shape

__all__ = ["MacCount", "count_macs", "count_model_macs", "flop_counter"]


def _conv_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
    _output_padding, _groups, output_mask, out_shape, **kwargs,
) -> int:  # fmt: skip
    """Conv backward FLOPs that respect groups: each gradient costs what the forward conv costs."""
    flops = 0
    if output_mask[0]:  # grad_input: a transposed conv of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, get_shape(out_shape[0]), not transposed)
    if output_mask[1]:  # grad_weight: the forward conv's products, summed the other way
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` with the grouped-conv backward fix; run the counted code
    under ``sdpa_kernel(SDPBackend.MATH)`` too (as :func:`count_macs` does)."""
    return FlopCounterMode(
        display=False,
        custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop},
    )


@dataclass(frozen=True)
class MacCount:
    """Parameters and per-image MACs of a model (``train_macs``: forward + backward)."""

    params: int
    macs: float
    train_macs: float


def _image_shape(input_shape: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (3, input_shape, input_shape) if isinstance(input_shape, int) else tuple(input_shape)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: int | tuple[int, int, int]) -> int:
    """Forward MACs of ``model`` on one image of ``input_shape`` ((C, H, W) or a side): run
    once in place, in eval mode, on its own device and dtype (its mode is restored)."""
    param = next(model.parameters())
    x = torch.zeros(1, *_image_shape(input_shape), device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), flop_counter() as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def count_model_macs(
    model_factory: Callable[[], nn.Module], input_shape: int | tuple[int, int, int]
) -> MacCount:
    """Params, forward MACs and training MACs per image of the model ``model_factory`` builds,
    on the ``meta`` device (no memory, no compute): forward in eval mode, training in train mode."""
    with torch.device("meta"):
        model = model_factory()
        x = torch.empty(1, *_image_shape(input_shape))
        with sdpa_kernel(SDPBackend.MATH):
            model.eval()
            with torch.no_grad(), flop_counter() as forward:
                model(x)
            model.train()
            with flop_counter() as training:
                model(x).sum().backward()
    return MacCount(
        params=sum(p.numel() for p in model.parameters()),
        macs=forward.get_total_flops() / 2,
        train_macs=training.get_total_flops() / 2,
    )
