"""What ``dynamic_img_size=True`` costs: the dynamic model against fixed-size ones, in one run.

    python scripts/dynamic_img_size_cost.py --model lavit_tiny --sizes 224 256 --batch-size 32

For each size S, two models with the same weights run interleaved (``lavit.tools.timing``):

* ``fixed``: built for S (``set_input_size(S)`` on a copy of the model: position embeddings and
  Ψ/Θ resampled once, ahead of time);
* ``dynamic``: native size ``--native`` (the variant's default), ``dynamic_img_size=True``, fed S
  directly: at its native size it runs the fixed model's code path, at another size it resamples
  the position embeddings and Ψ/Θ in every forward (matmuls with cached interpolation matrices).

It prints, per size and task (inference, training step), the median milliseconds of each and the
paired ratio dynamic / fixed (1.00 = free), as a Markdown table.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

import lavit  # noqa: F401  (registers the models)
from lavit.tools.timing import (
    inference_task,
    median,
    paired_speedup,
    synchronizer,
    time_interleaved,
    training_task,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lavit_tiny")
    parser.add_argument(
        "--native", type=int, default=None, help="native img_size (default: the variant's)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    native = {} if args.native is None else {"img_size": args.native}
    torch.manual_seed(0)
    dynamic = timm.create_model(args.model, dynamic_img_size=True, **native).to(device)
    print(
        f"{args.model}, native {dynamic.img_size}, batch {args.batch_size}, {args.dtype}, {device}"
    )
    print("| input | task | fixed ms | dynamic ms | dynamic / fixed |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        fixed = copy.deepcopy(dynamic)
        fixed.dynamic_img_size = False
        fixed.set_input_size(size)
        x = torch.randn(args.batch_size, 3, size, size, device=device)
        y = torch.randint(0, dynamic.num_classes, (args.batch_size,), device=device)
        for task, make in (("inference", inference_task), ("train step", training_task)):
            extra = () if task == "inference" else (y,)
            tasks = {
                name: make(model, x, *extra, device, args.dtype)
                for name, model in (("fixed", fixed), ("dynamic", dynamic))
            }
            times = time_interleaved(tasks, args.warmup, args.iters, synchronizer(device))
            ms = {name: median(t) * 1e3 for name, t in times.items()}
            ratio = paired_speedup(
                times["fixed"], times["dynamic"]
            )  # median of t_dynamic / t_fixed
            print(f"| {size}² | {task} | {ms['fixed']:.1f} | {ms['dynamic']:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
