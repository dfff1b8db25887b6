"""This tree's models against another commit's, in one process, interleaved, with the same weights.

    python scripts/bench_against_commit.py --commit 95979f4 \
        --models lavit_tiny lavit_tiny/all-va --iters 10 --train

Separate ``lavit bench`` runs of two commits differ by the machine's drift between processes
(±3 % on the shared 2-core test machine, even for a model whose code did not change). Here the
two versions of ``lavit/models`` live in one process: the other commit's package is extracted
with ``git archive`` and imported under another name (``lavit.models`` imports only itself,
torch and timm). Each model is built from the other commit (timm's registry then holds its
variants); this tree's model loads its weights and is checked to compute the same outputs. The
parameter names must match: commits before fddcca4 (Ψ/Θ outside ``token_mixing``,
AttentionDownsample as convolutions) are refused by the strict load. ``pvt_v2_b1`` runs twice as a control: two copies of
unchanged code show the noise floor of the ratios.

The table: median milliseconds per batch of each side, and ``this ÷ that`` throughput, the
median over rounds of the per-round ratio (``lavit.tools.timing.paired_speedup``); > 1 means
this tree is faster.
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import timm
import torch

from lavit.models.factory import create_model, parse_model_name
from lavit.runtime import cpu_model_name, cpu_tuning_state, tune_cpu_runtime
from lavit.tools.timing import (
    inference_task,
    median,
    paired_speedup,
    time_interleaved,
    training_task,
)

CONTROL = "pvt_v2_b1"
REPO = Path(__file__).resolve().parents[1]


def import_models_at(commit: str, into: Path):
    """``lavit/models`` of ``commit`` as the package ``lavit_models_<sha>`` (it registers with timm)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", commit], cwd=REPO, capture_output=True, text=True
    )
    if sha.returncode != 0:
        raise SystemExit(f"--commit {commit!r}: not a commit of {REPO} ({sha.stderr.strip()})")
    archive = subprocess.run(
        ["git", "archive", commit, "lavit/models"], cwd=REPO, capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # filter= exists from Python 3.11.4 on (the project allows 3.11.0); our own archive is trusted
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, **safe)
    name = f"lavit_models_{sha.stdout.strip()}"
    (into / "lavit" / "models").rename(into / name)
    sys.path.insert(0, str(into))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Overwriting .* in registry")
        return importlib.import_module(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", required=True, help="the commit to compare against")
    parser.add_argument("--models", nargs="+", default=["lavit_tiny", "lavit_tiny/all-va"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--train", action="store_true", help="also time a training step")
    args = parser.parse_args()
    tune_cpu_runtime()  # as lavit bench does
    device = torch.device("cpu")

    torch.manual_seed(0)
    size = args.img_size
    this = {name: create_model(name, img_size=size) for name in args.models}
    this[CONTROL] = create_model(CONTROL, img_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        import_models_at(args.commit, Path(tmp))
        that = {}
        for name, model in this.items():
            spec = parse_model_name(name)
            that[name] = (
                timm.create_model(spec.arch, img_size=size, **spec.switches)
                if spec.is_lavit
                else create_model(name, img_size=size)  # timm's own code, the same on both sides
            )
            model.load_state_dict(that[name].state_dict())

    x = torch.randn(args.batch_size, 3, size, size)
    y = torch.randint(0, 1000, (args.batch_size,))
    with torch.inference_mode():
        for name in this:
            a, b = this[name].eval()(x), that[name].eval()(x)
            err = (a - b).abs().max().item()
            if err > 1e-3 * a.abs().max().item():
                raise SystemExit(f"{name}: outputs differ between the commits (max |Δ| {err:.2e})")
            print(
                f"{name}: {type(this[name]).__module__} and {type(that[name]).__module__} give "
                f"the same outputs (max |Δ| {err:.1e})",
                file=sys.stderr,
            )

    tasks = {}
    for name in this:
        for side, models in (("this", this), ("that", that)):
            tasks[f"infer {name} {side}"] = inference_task(models[name].eval(), x, device, "fp32")
            if args.train:
                tasks[f"train {name} {side}"] = training_task(
                    models[name].train(), x, y, device, "fp32"
                )
    print(f"timing {len(tasks)} tasks, {args.iters} rounds", file=sys.stderr)
    times = time_interleaved(tasks, args.warmup, args.iters)

    print(
        f"this tree against {args.commit}: {size}², batch {args.batch_size}, fp32, "
        f"{torch.get_num_threads()} thread(s), {cpu_model_name()}, torch {torch.__version__}, "
        f"CPU tuning {cpu_tuning_state()}; {args.warmup} warm-up + {args.iters} interleaved "
        f"rounds; {CONTROL} is the same code on both sides (noise floor)\n"
    )
    print(f"| task | model | this ms | {args.commit} ms | this ÷ that throughput |")
    print("|---|---|---|---|---|")
    for key in tasks:
        task, name, side = key.split(" ")
        if side == "this":
            t_this, t_that = times[key], times[f"{task} {name} that"]
            print(
                f"| {task} | {name} | {1e3 * median(t_this):.1f} | {1e3 * median(t_that):.1f} "
                f"| {paired_speedup(t_this, t_that):.3f} |"
            )


if __name__ == "__main__":
    main()
