"""The MAC counter (``lavit.analysis.flops``): a count by hand, training MACs included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lavit.analysis.flops import count_macs, count_model_macs


class KnownModel(nn.Module):
    """Patch conv → grouped conv → attention (2 heads) → head: MACs countable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)  # 32² → 8×8 = 64 tokens
        self.depthwise = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.patch(x)).flatten(2).transpose(1, 2)  # (B, 64, 8)
        q, k, v = self.qkv(x).reshape(x.shape[0], 64, 3, 2, 4).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, 2, 64, 4)
        return self.head(x.transpose(1, 2).reshape(x.shape[0], 64, 8).mean(1))


def test_mac_count_equals_a_count_by_hand():
    patch = 64 * 8 * 3 * 16  # tokens × out × in × kernel
    depthwise = 64 * 8 * 9  # one 3×3 filter per channel
    qkv = 64 * 8 * 24
    attention = 2 * (2 * 64 * 64 * 4)  # QKᵀ and AV, 2 heads of d = 4
    head = 8 * 10
    forward = patch + depthwise + qkv + attention + head
    # backward: every product twice (input and weight gradients), except the image's gradient
    training = forward + 2 * forward - patch

    counts = count_model_macs(KnownModel, 32)
    assert counts.macs == forward
    assert counts.train_macs == training  # torch's counter alone overcounts the grouped conv
    assert counts.params == sum(p.numel() for p in KnownModel().parameters())
    assert count_macs(KnownModel(), (3, 32, 32)) == forward  # in place, on a real model
