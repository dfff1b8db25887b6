"""``lavit bench``: params, MACs, throughput and share of the matmul peak, LaViT against PVTv2.

Measured in one run on one machine, so that the rows compare: params and MACs (counted by
:mod:`lavit.analysis.flops` on the ``meta`` device, attention included); inference and
training-step (forward + backward + AdamW) images/s, the models and a large GEMM (the matmul
peak) timed round-robin (:mod:`lavit.tools.timing`); and, per LaViT stage, each LA layer's
forward time against the VA layer it replaces. Prints Markdown, writes JSON and CSV to ``--out``.

    lavit bench                                         # LaViT-T/S/B, their all-VA twins, PVTv2-b0/1/2
    lavit bench --models lavit_tiny pvt_v2_b1 --dtype bf16 --iters 10
    lavit bench --img-size 800 1344 --batch-size 1 --no-layers \
        --models backbone:lavit_tiny backbone:pvt_v2_b1 retinanet:lavit_tiny retinanet:pvt_v2_b1

``backbone:NAME`` is the model as a dense backbone (stride 4–32 maps), ``retinanet:NAME`` the
paper's detector on it (FPN + RetinaNet head, 80 classes, up to the head's outputs: anchor
decoding and NMS hold no multiply-adds); their training step backpropagates the mean output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lavit.analysis.flops import count_model_macs, flop_counter
from lavit.dense.backbone import DenseBackbone
from lavit.dense.detection import RetinaNetModule
from lavit.models.factory import ALL_VA, ModelSpec, create_model, parse_model_name
from lavit.runtime import tune_cpu_runtime
from lavit.tables import markdown_table, write_csv
from lavit.tools._cli import add_wandb_options, fail, log_to_wandb, positive_int, say, tool_parser
from lavit.tools.timing import (
    DTYPES,
    autocast,
    environment,
    gemm_task,
    inference_task,
    median,
    paired_speedup,
    set_tf32,
    synchronizer,
    time_interleaved,
    training_task,
)

PROG = "lavit bench"
DEFAULT_MODELS = (
    "lavit_tiny", "lavit_tiny/all-va", "lavit_small", "lavit_small/all-va", "lavit_base",
    "lavit_base/all-va", "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2",
)  # fmt: skip
# The project's speed targets, as (inference, training-step) speedups of the first model over
# the second: LaViT-T at least 1.5× / 1.6× PVTv2-b1 (what its ~25 % fewer MACs should buy, at
# 224², batch 32, fp32 on the CPU), and every LaViT at least as fast as its all-VA twin.
SPEED_TARGETS = {("lavit_tiny", "pvt_v2_b1"): (1.5, 1.6)}
ALL_VA_TARGET = 1.0
DENSE_TASKS = ("backbone", "retinanet")
MODEL_COLUMNS = (
    "model", "params_m", "gmacs", "infer_img_s", "infer_img_s_best", "train_img_s",
    "train_img_s_best", "infer_peak_pct", "train_peak_pct",
)  # fmt: skip


def split_task(name: str) -> tuple[str | None, str]:
    """``"retinanet:lavit_tiny"`` → ``("retinanet", "lavit_tiny")``; a plain name → ``(None, name)``."""
    task, sep, model = name.partition(":")
    if not sep:
        return None, name
    if task not in DENSE_TASKS:
        rows = " or ".join(t + ":NAME" for t in DENSE_TASKS)
        raise ValueError(f"unknown task {task!r} in {name!r}: a dense row is {rows}")
    return task, model


class _PooledMaps(nn.Module):
    """A backbone's stage maps as one (B, ΣC) tensor (global means), for the timing harness."""

    def __init__(self, backbone: DenseBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.flatten(2).mean(-1) for m in self.backbone(x).values()], dim=1)


class _DetectorOutputs(nn.Module):
    """RetinaNet up to its head: (B, anchors, classes + 4) logits and box deltas."""

    def __init__(self, module: RetinaNetModule) -> None:
        super().__init__()
        self.detector = module.detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.detector.head(list(self.detector.backbone(x).values()))  # P3–P7
        return torch.cat([out["cls_logits"], out["bbox_regression"]], dim=-1)


def build_bench_model(
    spec: ModelSpec, task: str | None, num_classes: int, img_size: tuple[int, int]
) -> nn.Module:
    """The model of a row: a classifier (``task=None``), a backbone or a whole detector.

    A LaViT with a size-independent ``la_mixing`` is built at its native size with
    ``dynamic_img_size`` (the parameters of 224², whatever ``img_size``); the others for
    ``img_size`` (the dense form's Ψ/Θ and the position embeddings at that size).
    """
    kwargs = dict(spec.switches)
    native = img_size
    if kwargs.get("la_mixing") in ("separable", "pooled"):
        kwargs["dynamic_img_size"], native = True, None
    if task is None:
        return create_model(
            ModelSpec(spec.label, spec.arch), num_classes, native, model_kwargs=kwargs
        )
    if task == "backbone":
        return _PooledMaps(DenseBackbone(spec.arch, (4, 8, 16, 32), native, 0.0, kwargs))
    return _DetectorOutputs(
        RetinaNetModule(num_classes=80, backbone=spec.arch, backbone_kwargs=kwargs, img_size=native)
    )


def layer_comparison(
    spec: ModelSpec, img_size: tuple[int, int], batch_size: int, device: torch.device,
    dtype: str, warmup: int, iters: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Forward time and MACs of every LA layer of ``spec`` against the VA layer its all-VA twin
    has there, on the same input (captured from one forward of the LaViT, with the attention
    handed to the LA layer). The VA layer is timed fused (a middle layer) and with explicit
    scores (a layer that must hand its attention on)."""
    torch.manual_seed(0)
    model = create_model(spec, img_size=img_size).to(device).eval()
    twin = create_model(f"{spec.arch}/{ALL_VA}", img_size=img_size).to(device).eval()
    inputs: dict[tuple[int, int], tuple] = {}  # (stage, layer) → (x, grid, handed attention)

    def capture(module, args, key) -> None:
        inputs[key] = args

    hooks = [
        block.register_forward_pre_hook(partial(capture, key=(m, i)))
        for m, stage in enumerate(model.stages)
        for i, block in enumerate(stage.blocks)
        if block.kind == "la"
    ]
    with torch.inference_mode(), autocast(device, dtype):
        model(torch.randn(batch_size, 3, *img_size, device=device))
    for hook in hooks:
        hook.remove()
    rows = []
    # the stage calls a block as (x, grid, handed, return_probs)
    for (m, i), (tokens, grid, attn, _) in inputs.items():
        la, va = model.stages[m].blocks[i], twin.stages[m].blocks[i]

        def tasks(x, handed, la=la, va=va, grid=grid) -> dict[str, Callable[[], Any]]:
            return {
                "va_fused": lambda: va(x, grid),
                "va_scores": lambda: va(x, grid, return_probs=True),
                "la": lambda: la(x, grid, handed),
            }

        with torch.inference_mode(), autocast(device, dtype):
            times = time_interleaved(tasks(tokens, attn), warmup, iters, synchronizer(device))
        macs = {}  # in fp32 on one image (the counter's decompositions bypass autocast)
        with sdpa_kernel(SDPBackend.MATH):
            for name, task in tasks(tokens[:1].float(), attn[:1].float()).items():
                with torch.inference_mode(), flop_counter() as counter:
                    task()
                macs[name] = counter.get_total_flops() / 2
        shape = {"tokens": tokens.shape[1], "keys": attn.shape[-1], "heads": attn.shape[1]}
        rows.append(
            {"model": spec.label, "stage": m + 1, "layer": i, **shape}
            | {f"{name}_ms": median(times[name]) * 1e3 for name in ("va_fused", "va_scores", "la")}
            | {
                "la_speedup": paired_speedup(times["la"], times["va_fused"]),  # > 1: LA faster
                "va_mmacs": macs["va_fused"] / 1e6,
                "la_mmacs": macs["la"] / 1e6,
            }
        )
    return rows


def comparisons(labels: Sequence[str], samples: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Speedups (paired per round) against SPEED_TARGETS: LaViT-T ÷ PVTv2-b1, each LaViT ÷ its twin."""
    pairs = [(a, b, *t) for (a, b), t in SPEED_TARGETS.items()]
    pairs += [(label, f"{label}/{ALL_VA}", ALL_VA_TARGET, ALL_VA_TARGET) for label in labels]
    out = []
    for a, b, *targets in (pair for pair in pairs if pair[0] in labels and pair[1] in labels):
        row: dict[str, Any] = {"comparison": f"{a} ÷ {b}"}
        met = True  # a skipped phase (NaN) does not count against it
        for phase, target in zip(("infer", "train"), targets, strict=True):
            speedup = paired_speedup(samples[phase].get(a, []), samples[phase].get(b, []))
            row |= {f"{phase}_speedup": speedup, f"{phase}_target": target}
            met = met and (math.isnan(speedup) or speedup >= target)
        out.append(row | {"met": met})
    return out


def run_throughput(args: argparse.Namespace, specs: list[ModelSpec], device: torch.device) -> dict:
    """MACs, then interleaved inference and training rounds (with the peak GEMM among them)."""
    say(PROG, f"counting params and MACs of {len(specs)} model(s) (meta device, batch 1)")
    tasks_of = {spec.label: split_task(spec.label)[0] for spec in specs}
    build = {
        s.label: partial(build_bench_model, s, tasks_of[s.label], args.num_classes, args.img_size)
        for s in specs
    }
    counts = {label: count_model_macs(make, (3, *args.img_size)) for label, make in build.items()}
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, *args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    models = {}
    for label, make in build.items():
        model = make().to(device, memory_format=memory_format)
        models[label] = torch.compile(model) if args.compile else model
    gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    gemm, gemm_macs = gemm_task(gemm_size, DTYPES[args.dtype], device)
    peak_name = f"gemm_{'tf32' if args.tf32 and args.dtype == 'fp32' else args.dtype}_{gemm_size}"

    def timed(phase: str, tasks: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
        say(
            PROG,
            f"timing {phase}: {len(models)} model(s) and {peak_name} round-robin on {device}, "
            f"batch {args.batch_size}, {args.warmup} warm-up + {args.iters} timed round(s)",
        )
        started = time.monotonic()
        return time_interleaved(
            {**tasks, peak_name: gemm}, args.warmup, args.iters, synchronizer(device),
            lambda done, total: say(
                PROG, f"{phase}: round {done}/{total} ({time.monotonic() - started:.0f} s)"
            ),
        )  # fmt: skip

    times: dict[str, dict[str, list[float]]] = {"infer": {}, "train": {}}
    if not args.no_infer:
        tasks = {
            label: inference_task(m.eval(), x, device, args.dtype) for label, m in models.items()
        }
        times["infer"] = timed("inference", tasks)
    if not args.no_train:
        tasks = {
            label: training_task(m.train(), x, None if tasks_of[label] else y, device, args.dtype)
            for label, m in models.items()
        }
        times["train"] = timed("training steps", tasks)
    gemm_samples = times["infer"].get(peak_name, []) + times["train"].get(peak_name, [])
    peak_macs_s = gemm_macs / median(gemm_samples)
    rows = []
    for spec in specs:
        count, row = counts[spec.label], {"model": spec.label}
        row |= {"params_m": count.params / 1e6, "gmacs": count.macs / 1e9}
        row["train_gmacs"] = count.train_macs / 1e9
        for phase, macs in (("infer", count.macs), ("train", count.train_macs)):
            samples = times[phase].get(spec.label, [])
            img_s = args.batch_size / median(samples)
            row[f"{phase}_img_s"], row[f"{phase}_ms"] = img_s, 1e3 * args.batch_size / img_s
            row[f"{phase}_peak_pct"] = 100 * macs * img_s / peak_macs_s
            # the least disturbed iteration, for a machine shared with other jobs
            row[f"{phase}_img_s_best"] = args.batch_size / min(samples, default=math.nan)
        rows.append(row)
    return {
        "models": rows,
        "peak": {"gemm": peak_name, "gmacs_per_s": peak_macs_s / 1e9, "samples_s": gemm_samples},
        "samples_s": times,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--models", nargs="+", default=list(DEFAULT_MODELS),
        help=f"timm model names; 'NAME/{ALL_VA}': a LaViT with every LA layer switched to VA; "
        "'backbone:NAME' / 'retinanet:NAME': the model as a dense backbone / in the detector")  # fmt: skip
    add("--img-size", type=positive_int, nargs="+", default=[224], metavar=("H", "W"),
        help="input size in pixels: a side, or height and width (e.g. 800 1344)")  # fmt: skip
    add("--batch-size", type=positive_int, default=32)
    add("--num-classes", type=positive_int, default=1000)
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--dtype", choices=tuple(DTYPES), default="fp32",
        help="fp32, or autocast to bf16 / fp16 (fp16: CUDA only, with a GradScaler)")  # fmt: skip
    add("--compile", action="store_true", help="torch.compile every model")
    add("--tf32", action="store_true",
        help="CUDA: TF32 for float32 matmuls and convolutions (without it, --device cuda turns "
        "TF32 off, cuDNN's default included, so that fp32 means fp32)")  # fmt: skip
    add("--channels-last", action="store_true", help="channels-last model and input")
    add("--iters", type=positive_int, default=5, help="timed rounds (median)")
    add("--warmup", type=int, default=2, help="untimed rounds")
    add("--threads", type=positive_int, help="torch CPU threads")
    add("--no-cpu-tuning", action="store_true",
        help="leave glibc's allocator and denormals at their defaults (lavit.runtime)")  # fmt: skip
    add("--gemm-size", type=positive_int, help="side of the peak GEMM (CPU 2048, CUDA 8192)")
    add("--no-infer", action="store_true", help="skip inference throughput")
    add("--no-train", action="store_true", help="skip training-step throughput")
    add("--no-layers", action="store_true", help="skip the VA vs LA layer times")
    add("--layer-iters", type=positive_int, default=10, help="timed rounds per layer")
    add("--out", type=Path, default=Path("runs/bench"), help="folder for JSON/CSV")
    add("--tag", help="file name stem (default: from device/dtype)")
    add_wandb_options(parser, "lavit-bench", "the tables")
    return parser


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[ModelSpec]:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.dtype == "fp16" and args.device != "cuda":
        parser.error("--dtype fp16 needs --device cuda (use bf16 on the CPU)")
    if args.tf32 and args.device != "cuda":
        parser.error("--tf32 needs --device cuda (TF32 is a GPU number format)")
    if args.warmup < 0:
        parser.error(f"--warmup: must be ≥ 0, got {args.warmup}")
    if len(args.img_size) > 2:
        parser.error("--img-size: one side, or height and width")
    args.img_size = (args.img_size[0], args.img_size[-1])
    specs = []
    try:
        for name in args.models:
            task, model = split_task(name)
            spec = parse_model_name(model)
            specs.append(ModelSpec(name, spec.arch, spec.switches) if task else spec)
    except ValueError as err:
        parser.error(str(err))
    if len({s.label for s in specs}) != len(specs):
        parser.error("--models: a model is listed twice")
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    """``lavit bench``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    specs = _check_args(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_runtime(enabled=not args.no_cpu_tuning)
    if args.device == "cuda":
        set_tf32(args.tf32)
    device, started = torch.device(args.device), time.time()
    result: dict[str, Any] = {
        "command": "lavit bench " + shlex.join(argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(device),
    }
    layered = [s for s in specs if s.is_lavit and not s.switches and not split_task(s.label)[0]]
    try:
        result |= run_throughput(args, specs, device)
        result["comparisons"] = comparisons([s.label for s in specs], result["samples_s"])
        if not args.no_layers and layered:
            names = ", ".join(spec.label for spec in layered)
            say(PROG, f"timing each LA layer against the VA layer that would replace it: {names}")
            setting = (args.img_size, args.batch_size, device, args.dtype, args.warmup)
            result["layers"] = [
                row
                for spec in layered
                for row in layer_comparison(spec, *setting, args.layer_iters)
            ]
    except ValueError as err:  # a size the model cannot take, a bad model argument
        return fail(PROG, str(err))
    env = result["environment"]
    with contextlib.suppress(OSError):
        env["load_avg_end"] = os.getloadavg()
    env["wall_s"] = round(time.time() - started, 1)
    print(f"# {result['command']}")
    print(
        f"{env.get('gpu', env['cpu'])}, {env['cpu_count']} cores, {env['torch_threads']} threads, "
        f"torch {env['torch']}; {args.img_size[0]}×{args.img_size[1]} batch {args.batch_size} "
        f"{args.dtype}; cpu tuning {'on' if any(env['cpu_tuning'].values()) else 'off'}"
        + (" TF32" if args.tf32 else "")
        + (" compiled" if args.compile else "")
    )
    flags = ("_tf32" if args.tf32 else "") + ("_compiled" if args.compile else "")
    tag = args.tag or f"bench_{args.device}_{args.dtype}{flags}"
    args.out.mkdir(parents=True, exist_ok=True)
    for key, columns in (("models", MODEL_COLUMNS), ("comparisons", None), ("layers", None)):
        if rows := result.get(key):
            print(f"\n## {key}\n\n{markdown_table(rows, columns)}")
            write_csv(args.out / f"{tag}{'' if key == 'models' else '_' + key}.csv", rows)
    print(f"\nmatmul peak ({result['peak']['gemm']}): {result['peak']['gmacs_per_s']:.1f} GMAC/s")
    json_path = args.out / f"{tag}.json"
    strict = json.loads(json.dumps(result), parse_constant=lambda _: None)  # NaN (skipped) → null
    json_path.write_text(json.dumps(strict, indent=2, allow_nan=False))
    print(f"\nwrote {json_path}")
    if args.wandb:
        config = {"args": result["args"], "environment": env}
        tables = {f"bench/{key}": result.get(key) for key in ("models", "comparisons", "layers")}
        log_to_wandb(args, "bench", config, tables)
    return 0
