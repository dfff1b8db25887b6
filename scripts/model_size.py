"""Print params and MACs of the LaViT variants at 224², 1000 classes, against the paper.

MACs = FLOPs / 2 from torch's FlopCounterMode (every matmul and conv, the Ψ/Θ transforms and the
attention matmuls included; SDPA forced to its math path because the fused CPU kernel is not
counted). Run: python scripts/model_size.py
"""

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import lavit  # noqa: F401
from lavit.models import LAVIT_CONFIGS

PUBLISHED = {"lavit_tiny": (10.9, 1.6), "lavit_small": (22.4, 3.3), "lavit_base": (39.6, 6.1)}


def params_and_macs(name: str, img_size: int = 224) -> tuple[float, float]:
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000, img_size=img_size).eval()
        with (
            torch.no_grad(),
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
        ):
            model(torch.empty(1, 3, img_size, img_size))
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 2e9


def main() -> None:
    print(
        "| variant | depths | mlp_ratios | num_va_layers | params (M) | paper | MACs (G) | paper |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (paper_params, paper_macs) in PUBLISHED.items():
        cfg = LAVIT_CONFIGS[name]
        params, macs = params_and_macs(name)
        print(
            f"| {name} | {cfg['depths']} | {cfg['mlp_ratios']} | {cfg['num_va_layers']} "
            f"| {params:.2f} ({params / paper_params - 1:+.1%}) | {paper_params} "
            f"| {macs:.3f} ({macs / paper_macs - 1:+.1%}) | {paper_macs} |"
        )


if __name__ == "__main__":
    main()
