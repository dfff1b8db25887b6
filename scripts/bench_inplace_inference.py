"""What LaViT's two in-place inference steps buy: each switched off, in one interleaved run.

    python scripts/bench_inplace_inference.py --model lavit_tiny --batch-size 32 --iters 10

Without autograd (``torch.inference_mode``/``no_grad``: ``lavit bench``, validation, export),
``InferenceMlp`` runs its GELU in place on fc1's output and ``LaViTBlock.residual`` adds the
residual into the branch's fresh output. Both give bit-identical outputs (checked here first) and
save a buffer each. They matter most where freed memory goes back to the OS, so that every
buffer comes as fresh pages (``--no-cpu-tuning``: a plain ``timm.create_model`` user's process);
with ``lavit``'s CPU tuning (the default, as in ``lavit bench``) freed memory is reused and they
save memory traffic only. The four settings run round-robin on one model
(``lavit.tools.timing``); the table gives each one's median milliseconds and its throughput
relative to both steps on (paired per round).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from lavit.models.factory import create_model
from lavit.models.lavit import InferenceMlp, LaViTBlock
from lavit.runtime import cpu_model_name, cpu_tuning_state, tune_cpu_runtime
from lavit.tools.timing import median, paired_speedup, time_interleaved

SETTINGS = {  # name → (in-place GELU, in-place residual)
    "both in place (default)": (True, True),
    "GELU out of place": (False, True),
    "residual out of place": (True, False),
    "neither in place": (False, False),
}


@contextlib.contextmanager
def inplace(gelu: bool, residual: bool):
    saved = InferenceMlp.inplace_gelu, LaViTBlock.inplace_residual
    InferenceMlp.inplace_gelu, LaViTBlock.inplace_residual = gelu, residual
    try:
        yield
    finally:
        InferenceMlp.inplace_gelu, LaViTBlock.inplace_residual = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lavit_tiny", help="a LaViT model name")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--no-cpu-tuning",
        action="store_true",
        help="leave glibc's allocator and denormals alone (lavit bench tunes them, see runtime.py)",
    )
    args = parser.parse_args()
    tune_cpu_runtime(enabled=not args.no_cpu_tuning)

    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)

    def task(gelu: bool, residual: bool):
        def run():
            with torch.inference_mode(), inplace(gelu, residual):
                return model(x)

        return run

    tasks = {name: task(*flags) for name, flags in SETTINGS.items()}
    outputs = {name: run() for name, run in tasks.items()}
    reference = outputs["neither in place"]
    for name, out in outputs.items():
        if not torch.equal(out, reference):
            raise SystemExit(f"{name}: output differs from the out-of-place forward")

    times = time_interleaved(tasks, args.warmup, args.iters)
    base = times["both in place (default)"]
    print(
        f"{args.model}, {args.img_size}², batch {args.batch_size}, fp32 inference, "
        f"{torch.get_num_threads()} thread(s), {cpu_model_name()}, torch {torch.__version__}, "
        f"CPU tuning {cpu_tuning_state()}; {args.warmup} warm-up + {args.iters} interleaved rounds; outputs bit-identical\n"
    )
    print("| setting | median ms | throughput ÷ default (paired) |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * median(t):.1f} | {paired_speedup(base, t) ** -1:.3f} |")


if __name__ == "__main__":
    main()
