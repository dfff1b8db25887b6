"""What the CPU tuning (``lavit/runtime.py``) costs in memory and saves in time.

Runs the same training steps of a model in two fresh processes, ``LAVIT_CPU_TUNING=1`` and ``0``
(the setting is process-wide, so it cannot be compared inside one process), and prints the
median step time, the page faults per step after the first and the peak resident memory.

    python scripts/cpu_tuning_memory.py --model lavit_tiny --batch-size 32 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, statistics, sys, time
import torch
import torch.nn.functional as F
from lavit.runtime import tune_cpu_runtime
from lavit.models.factory import create_model

model_name = sys.argv[1]
img_size, batch_size, steps = (int(a) for a in sys.argv[2:5])
state = tune_cpu_runtime()
torch.manual_seed(0)
model = create_model(model_name, img_size=img_size)  # as lavit bench builds it
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(batch_size, 3, img_size, img_size)
y = torch.randint(0, 1000, (batch_size,))
times, faults = [], []
for _ in range(steps):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({
    "tuning": any(state.values()),
    "step_ms": 1e3 * statistics.median(times[1:]),
    "faults_per_step": statistics.median(faults[1:]),
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def measure(tuning: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "LAVIT_CPU_TUNING": tuning}
    argv = [args.model, str(args.img_size), str(args.batch_size), str(args.steps)]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"error: the measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lavit_tiny", help="as for lavit bench --models")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=8, help="training steps (≥ 2; the first is dropped)"
    )
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be ≥ 2")
    rows = [measure("1", args), measure("0", args)]
    print(f"{args.model}, {args.img_size}², batch {args.batch_size}, {args.steps} training steps")
    print()
    print("| cpu tuning | step_ms (median) | page faults per step | peak RSS MiB |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {'on' if row['tuning'] else 'off'} | {row['step_ms']:.0f} | "
            f"{row['faults_per_step']:.0f} | {row['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
