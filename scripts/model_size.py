"""Print params and MACs of the LaViT variants at 224², 1000 classes, against the paper.

MACs from the project's one counter (``lavit.analysis.flops``: FLOPs / 2 of torch's
FlopCounterMode, every matmul and conv, the Ψ/Θ transforms and the attention matmuls included,
SDPA on its math path). Run: python scripts/model_size.py
"""

from functools import partial

from lavit.analysis.flops import count_model_macs
from lavit.models import LAVIT_CONFIGS
from lavit.models.factory import create_model

PUBLISHED = {"lavit_tiny": (10.9, 1.6), "lavit_small": (22.4, 3.3), "lavit_base": (39.6, 6.1)}


def params_and_macs(name: str, img_size: int = 224) -> tuple[float, float]:
    """Parameters (M) and forward MACs (G) of one image."""
    counts = count_model_macs(partial(create_model, name, 1000, img_size), img_size)
    return counts.params / 1e6, counts.macs / 1e9


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
