"""``lavit bench``: params, MACs, throughput and share of the matmul peak, LaViT against PVTv2.

Everything is measured in one run on one machine, so that the rows compare:

* params, and MACs counted with ``FlopCounterMode`` (every matmul, Ψ/Θ included; SDPA forced to
  the math backend so that attention is counted; on the ``meta`` device, batch 1);
* inference and training-step (forward + backward + AdamW) throughput in images/s, the median of
  ``--iters`` timed iterations after ``--warmup``, the models interleaved round by round so that
  load from other processes hits them alike;
* the share of the machine's matmul peak each model reaches (achieved MACs/s ÷ the MACs/s of a
  large GEMM timed in the same rounds);
* per LaViT stage, the forward time of each LA layer against the VA layer it replaces, on the same
  stage input;
* with ``--loop-overhead``, the step time of the Lightning training loop against a bare loop
  (:mod:`lavit.tools.loop_overhead`).

The models are built by :mod:`lavit.models.factory`, MACs counted by :mod:`lavit.analysis.flops`,
timed by :mod:`lavit.tools.timing`. Results: a Markdown table on screen, JSON and CSV files in
``--out``, optionally W&B (``--wandb``, offline unless ``lavit fit`` would log online).

    lavit bench                                         # LaViT-T/S/B, their all-VA twins, PVTv2-b0/1/2
    lavit bench --models lavit_tiny pvt_v2_b1 --dtype bf16 --iters 10
    lavit bench --loop-overhead --models lavit_tiny
    lavit bench --img-size 800 1344 --batch-size 1 --no-layers \
        --models backbone:lavit_tiny backbone:pvt_v2_b1 retinanet:lavit_tiny retinanet:pvt_v2_b1

Dense rows: ``backbone:NAME`` is the model as a detection/segmentation backbone (its stride 4–32
maps, head pruned, :class:`lavit.dense.DenseBackbone`), ``retinanet:NAME`` the paper's whole
detector on it (:class:`lavit.dense.RetinaNetModule`: FPN + RetinaNet head, 80 classes; timed
and counted up to the head's outputs, i.e. without anchor decoding and NMS, which hold no
multiply-adds). Their training step is forward + backward of the mean output + AdamW.
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
from lavit.tools._cli import (
    add_out_option,
    add_wandb_options,
    fail,
    non_negative_int,
    positive_int,
    say,
    tool_parser,
)
from lavit.tools.loop_overhead import fit_overhead, loop_overhead
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
from lavit.training.wandb_runs import start_wandb_run

__all__ = ["DEFAULT_MODELS", "SPEED_TARGETS", "layer_comparison", "main", "run_throughput"]

DEFAULT_MODELS = (
    "lavit_tiny",
    "lavit_tiny/all-va",
    "lavit_small",
    "lavit_small/all-va",
    "lavit_base",
    "lavit_base/all-va",
    "pvt_v2_b0",
    "pvt_v2_b1",
    "pvt_v2_b2",
)
# The project's speed targets, as (inference, training-step) speedups of the first model over
# the second: LaViT-T at least 1.5× / 1.6× PVTv2-b1 (the throughput its ~25 % fewer MACs should
# buy, at 224², batch 32, fp32 on the CPU), and every LaViT at least as fast as its all-VA twin.
SPEED_TARGETS = {("lavit_tiny", "pvt_v2_b1"): (1.5, 1.6)}
ALL_VA_TARGET = 1.0


# --- dense rows ------------------------------------------------------------------------------
DENSE_TASKS = ("backbone", "retinanet")


def split_task(name: str) -> tuple[str | None, str]:
    """``"retinanet:lavit_tiny"`` → ``("retinanet", "lavit_tiny")``; a plain name → ``(None, name)``."""
    task, sep, model = name.partition(":")
    if not sep:
        return None, name
    if task not in DENSE_TASKS:
        raise ValueError(
            f"unknown task {task!r} in {name!r}: a dense row is "
            f"{' or '.join(t + ':NAME' for t in DENSE_TASKS)}"
        )
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
        features = list(self.detector.backbone(x).values())  # P3–P7
        out = self.detector.head(features)
        return torch.cat([out["cls_logits"], out["bbox_regression"]], dim=-1)


def build_bench_model(
    spec: ModelSpec, task: str | None, num_classes: int, img_size: tuple[int, int]
) -> nn.Module:
    """The model of a row: a classifier (``task=None``), a backbone or a whole detector.

    A LaViT with a size-independent ``la_mixing`` form is built at its native size with
    ``dynamic_img_size`` (its parameters are those of 224², whatever ``img_size``); the others
    are built for ``img_size`` (the dense form's Ψ/Θ and the position embeddings at that size).
    """
    kwargs = dict(spec.switches)
    if kwargs.get("la_mixing") in ("separable", "pooled"):
        kwargs["dynamic_img_size"] = True
        native = None
    else:
        native = img_size
    if task is None:
        return create_model(
            ModelSpec(spec.label, spec.arch), num_classes, native, model_kwargs=kwargs
        )
    if task == "backbone":
        return _PooledMaps(DenseBackbone(spec.arch, (4, 8, 16, 32), native, 0.0, kwargs))
    detector = RetinaNetModule(
        num_classes=80, backbone=spec.arch, backbone_kwargs=kwargs, img_size=native
    )
    return _DetectorOutputs(detector)


def dense_training_task(model: nn.Module, x: torch.Tensor, device, dtype: str):
    """Forward + backward of the mean output + AdamW (a dense row has no classification loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with autocast(device, dtype):
            loss = model(x).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --- per-layer VA vs LA --------------------------------------------------------------------------


def layer_comparison(
    spec: ModelSpec,
    img_size: tuple[int, int],
    batch_size: int,
    device: torch.device,
    dtype: str,
    warmup: int,
    iters: int,
) -> list[dict[str, Any]]:
    """Forward time of every LA layer of ``spec`` against the VA layer its all-VA twin has there.

    Both get the same input (captured from one forward of the LaViT): the LA layer also the
    attention handed to it. The VA layer is timed fused (a middle layer) and with explicit scores
    (a layer that must hand its attention on).
    """
    torch.manual_seed(0)
    model = create_model(spec, img_size=img_size).to(device).eval()
    twin = create_model(f"{spec.arch}/{ALL_VA}", img_size=img_size).to(device).eval()
    inputs: dict[tuple[int, int], tuple] = {}
    hooks = []
    for m, stage in enumerate(model.stages):
        for i, block in enumerate(stage.blocks):
            if block.kind == "la":

                def capture(module, args, key=(m, i)):
                    inputs[key] = args  # (x (B, N, C), grid, handed attention (B, H, N, N'))

                hooks.append(block.register_forward_pre_hook(capture))
    x = torch.randn(batch_size, 3, *img_size, device=device)
    with torch.inference_mode(), autocast(device, dtype):
        model(x)
    for hook in hooks:
        hook.remove()

    rows = []
    for (m, i), (tokens, grid, attn) in inputs.items():
        la, va = model.stages[m].blocks[i], twin.stages[m].blocks[i]
        timed = _time_va_and_la(va, la, tokens, grid, attn, device, dtype, warmup, iters)
        rows.append(
            {
                "model": spec.label,
                "stage": m + 1,
                "layer": i,
                "tokens": tokens.shape[1],
                "keys": attn.shape[-1],
                "heads": attn.shape[1],
                **timed,
            }
        )
    return rows


def _time_va_and_la(
    va: nn.Module,
    la: nn.Module,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    attn: torch.Tensor,
    device: torch.device,
    dtype: str,
    warmup: int,
    iters: int,
) -> dict[str, float]:
    """Forward times (interleaved) and per-image MACs of a VA layer and an LA layer."""

    def tasks(x: torch.Tensor, handed: torch.Tensor) -> dict[str, Callable[[], Any]]:
        return {
            "va_fused": lambda: va(x, grid),
            "va_scores": lambda: va(x, grid, return_probs=True),
            "la": lambda: la(x, grid, handed),
        }

    with torch.inference_mode(), autocast(device, dtype):
        times = time_interleaved(tasks(tokens, attn), warmup, iters, synchronizer(device))
    # MACs in fp32 on one image (the counter's decompositions bypass autocast).
    macs = {}
    with sdpa_kernel(SDPBackend.MATH):
        for name, task in tasks(tokens[:1].float(), attn[:1].float()).items():
            with torch.inference_mode(), flop_counter() as counter:
                task()
            macs[name] = counter.get_total_flops() / 2
    ms = {name: median(t) * 1e3 for name, t in times.items()}
    return {
        "va_fused_ms": ms["va_fused"],
        "va_scores_ms": ms["va_scores"],
        "la_ms": ms["la"],
        "la_speedup": paired_speedup(times["la"], times["va_fused"]),  # > 1: LA is faster
        "va_mmacs": macs["va_fused"] / 1e6,
        "la_mmacs": macs["la"] / 1e6,
    }


def _json_safe(value: Any) -> Any:
    """NaN (a phase that was skipped) → null, so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def log_to_wandb(result: dict[str, Any], project: str, out_dir: Path, init_timeout: float) -> None:
    """Log the tables to W&B by ``lavit fit``'s rule (``start_wandb_run``: offline when it must)."""
    import wandb

    run = start_wandb_run(
        init_timeout,
        project=project,
        job_type="bench",
        dir=str(out_dir),
        config={"args": result["args"], "environment": result["environment"]},
    )
    if run is None:  # WANDB_MODE=disabled
        return
    for key in ("models", "comparisons", "layers", "loop_overhead"):
        rows = result.get(key) or []
        if rows:
            columns = list(rows[0])
            run.log(
                {
                    f"bench/{key}": wandb.Table(
                        columns=columns, data=[[r[c] for c in columns] for r in rows]
                    )
                }
            )
    run.finish()


# --- the command ---------------------------------------------------------------------------------


PROG = "lavit bench"


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help=f"timm model names; 'NAME/{ALL_VA}' is a LaViT with every LA layer switched to VA; "
        "'backbone:NAME' / 'retinanet:NAME' the model as a dense backbone / in the whole "
        f"detector (default: {' '.join(DEFAULT_MODELS)}; with --loop-overhead: lavit_tiny)",
    )
    parser.add_argument(
        "--img-size",
        type=positive_int,
        nargs="+",
        default=[224],
        metavar=("H", "W"),
        help="input size in pixels: a side, or height and width (e.g. 800 1344)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="fp32, or autocast to bf16 / fp16 (fp16: CUDA only, with a GradScaler)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: TF32 for float32 matmuls and convolutions (without it, --device cuda turns "
        "TF32 off, cuDNN's default included, so that fp32 means fp32)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="channels-last model and input"
    )
    parser.add_argument("--iters", type=positive_int, default=5, help="timed iterations (median)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed iterations")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--no-cpu-tuning",
        action="store_true",
        help="leave glibc's allocator and denormals at their defaults (lavit.runtime; "
        "what plain PyTorch scripts get)",
    )
    parser.add_argument(
        "--gemm-size",
        type=positive_int,
        default=None,
        help="side of the peak GEMM (CPU 2048, CUDA 8192)",
    )
    parser.add_argument("--no-infer", action="store_true", help="skip inference throughput")
    parser.add_argument("--no-train", action="store_true", help="skip training-step throughput")
    parser.add_argument("--no-layers", action="store_true", help="skip the VA vs LA layer times")
    parser.add_argument(
        "--layer-iters", type=positive_int, default=10, help="timed iterations per layer"
    )
    parser.add_argument(
        "--loop-overhead",
        action="store_true",
        help="only compare a Lightning training loop's step time with a bare PyTorch loop",
    )
    parser.add_argument(
        "--loop-steps", type=positive_int, default=8, help="batches per loop run (≥ 2)"
    )
    parser.add_argument(
        "--loop-config",
        default=None,
        metavar="YAML",
        help="with --loop-overhead: time `lavit fit --config YAML` itself (its real data module, "
        "callbacks and loggers) against a bare step on the same batches, instead of synthetic "
        "batches; keep --loop-steps within one epoch",
    )
    add_out_option(parser, "runs/bench", "JSON/CSV")
    parser.add_argument("--tag", default=None, help="file name stem (default: from device/dtype)")
    add_wandb_options(parser, "lavit-bench", "the tables")
    return parser


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[ModelSpec]:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.loop_config and not args.loop_overhead:
        parser.error("--loop-config needs --loop-overhead")
    if args.loop_config and not Path(args.loop_config).is_file():
        parser.error(f"--loop-config: no such file {args.loop_config!r}")
    if args.loop_overhead and args.loop_steps < 2:
        parser.error("--loop-steps must be ≥ 2 (a step is the interval between two batches)")
    if args.dtype == "fp16" and args.device != "cuda":
        parser.error("--dtype fp16 needs --device cuda (use bf16 on the CPU)")
    if args.tf32 and args.device != "cuda":
        parser.error("--tf32 needs --device cuda (TF32 is a GPU number format)")
    if len(args.img_size) > 2:
        parser.error("--img-size: one side, or height and width")
    args.img_size = (args.img_size[0], args.img_size[-1])
    if args.loop_overhead and args.img_size[0] != args.img_size[1]:
        parser.error("--loop-overhead: a square --img-size only")
    names = args.models or (["lavit_tiny"] if args.loop_overhead else list(DEFAULT_MODELS))
    try:
        specs = []
        for name in names:
            task, model = split_task(name)
            spec = parse_model_name(model)
            specs.append(ModelSpec(name, spec.arch, spec.switches) if task else spec)
            if task and args.loop_overhead:
                parser.error(f"--loop-overhead: {name}: classification models only")
    except ValueError as err:
        parser.error(str(err))
    if len({s.label for s in specs}) != len(specs):
        parser.error("--models: a model is listed twice")
    return specs


def _comparisons(
    labels: Sequence[str], samples: dict[str, dict[str, list[float]]]
) -> list[dict[str, Any]]:
    """Speedups (paired per round) against SPEED_TARGETS: LaViT-T ÷ PVTv2-b1, each LaViT ÷ its twin."""
    pairs = [(a, b, *t) for (a, b), t in SPEED_TARGETS.items()]
    pairs += [(label, f"{label}/{ALL_VA}", ALL_VA_TARGET, ALL_VA_TARGET) for label in labels]
    out = []
    for a, b, infer_target, train_target in pairs:
        if a not in labels or b not in labels:
            continue
        infer, train = (
            paired_speedup(samples[phase].get(a, []), samples[phase].get(b, []))
            for phase in ("infer", "train")
        )
        out.append(
            {
                "comparison": f"{a} ÷ {b}",
                "infer_speedup": infer,
                "infer_target": infer_target,
                "train_speedup": train,
                "train_target": train_target,
                "met": bool(
                    (math.isnan(infer) or infer >= infer_target)
                    and (math.isnan(train) or train >= train_target)
                ),
            }
        )
    return out


def run_throughput(args: argparse.Namespace, specs: list[ModelSpec], device: torch.device) -> dict:
    """MACs, then interleaved inference and training rounds (with the peak GEMMs among them)."""
    say(PROG, f"counting params and MACs of {len(specs)} model(s) (meta device, batch 1)")
    tasks_of = {spec.label: split_task(spec.label)[0] for spec in specs}
    build = {
        spec.label: partial(
            build_bench_model, spec, tasks_of[spec.label], args.num_classes, args.img_size
        )
        for spec in specs
    }
    counts = {
        label: count_model_macs(factory, (3, *args.img_size)) for label, factory in build.items()
    }
    sync = synchronizer(device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, *args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    models = {}
    for spec in specs:
        model = build[spec.label]().to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[spec.label] = torch.compile(model) if args.compile else model

    gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    gemm_dtype = "fp32" if args.dtype == "fp32" else args.dtype
    gemm, gemm_macs = gemm_task(gemm_size, DTYPES[gemm_dtype], device)
    peak_name = f"gemm_{'tf32' if args.tf32 and gemm_dtype == 'fp32' else gemm_dtype}_{gemm_size}"

    def timed(phase: str, tasks: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
        say(
            PROG,
            f"timing {phase}: {len(models)} model(s) and {peak_name} round-robin on {device}, "
            f"batch {args.batch_size}, {args.warmup} warm-up + {args.iters} timed round(s)",
        )
        started = time.monotonic()
        return time_interleaved(
            {**tasks, peak_name: gemm},
            args.warmup,
            args.iters,
            sync,
            lambda done, total: say(
                PROG, f"{phase}: round {done}/{total} ({time.monotonic() - started:.0f} s)"
            ),
        )

    infer_times: dict[str, list[float]] = {}
    if not args.no_infer:
        for model in models.values():
            model.eval()
        infer_times = timed(
            "inference",
            {label: inference_task(m, x, device, args.dtype) for label, m in models.items()},
        )
    train_times: dict[str, list[float]] = {}
    if not args.no_train:
        for model in models.values():
            model.train()
        tasks = {
            label: training_task(m, x, y, device, args.dtype)
            if tasks_of[label] is None
            else dense_training_task(m, x, device, args.dtype)
            for label, m in models.items()
        }
        train_times = timed("training steps", tasks)

    gemm_samples = infer_times.get(peak_name, []) + train_times.get(peak_name, [])
    peak_macs_s = gemm_macs / median(gemm_samples)
    rows = []
    for spec in specs:
        macs, train_macs = counts[spec.label].macs, counts[spec.label].train_macs
        infer = infer_times.get(spec.label, [])
        train = train_times.get(spec.label, [])
        infer_img_s, train_img_s = (
            args.batch_size / median(infer),
            args.batch_size / median(train),
        )
        rows.append(
            {
                "model": spec.label,
                "params_m": counts[spec.label].params / 1e6,
                "gmacs": macs / 1e9,
                "train_gmacs": train_macs / 1e9,
                "infer_img_s": infer_img_s,
                "train_img_s": train_img_s,
                "infer_ms": 1e3 * args.batch_size / infer_img_s,
                "train_ms": 1e3 * args.batch_size / train_img_s,
                "infer_peak_pct": 100 * macs * infer_img_s / peak_macs_s,
                "train_peak_pct": 100 * train_macs * train_img_s / peak_macs_s,
                # the least disturbed iteration, for a machine shared with other jobs
                "infer_img_s_best": args.batch_size / min(infer, default=math.nan),
                "train_img_s_best": args.batch_size / min(train, default=math.nan),
            }
        )
    return {
        "models": rows,
        "peak": {"gemm": peak_name, "gmacs_per_s": peak_macs_s / 1e9, "samples_s": gemm_samples},
        "samples_s": {"infer": infer_times, "train": train_times},
    }


MODEL_COLUMNS = (
    "model", "params_m", "gmacs", "infer_img_s", "infer_img_s_best", "train_img_s",
    "train_img_s_best", "infer_peak_pct", "train_peak_pct",
)  # fmt: skip


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
    device = torch.device(args.device)
    started = time.time()
    result: dict[str, Any] = {
        "command": "lavit bench " + shlex.join(argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(device),
    }
    tag = (
        args.tag
        or f"{'loop_overhead' if args.loop_overhead else 'bench'}_{args.device}_{args.dtype}"
        + ("_tf32" if args.tf32 else "")
        + ("_compiled" if args.compile else "")
    )
    try:
        if args.loop_overhead and args.loop_config:
            say(PROG, f"timing `lavit fit --config {args.loop_config}` against a bare step")
            result["loop_overhead"] = [
                fit_overhead(
                    args.loop_config, args.loop_steps, min(args.warmup, args.loop_steps - 2)
                )
            ]
        elif args.loop_overhead:
            say(
                PROG,
                f"timing the Lightning loop against a bare loop, {args.loop_steps} steps each: "
                + ", ".join(spec.label for spec in specs),
            )
            result["loop_overhead"] = [
                row
                for spec in specs
                for row in loop_overhead(
                    spec,
                    args.img_size[0],
                    args.batch_size,
                    device,
                    args.dtype,
                    args.loop_steps,
                    min(args.warmup, args.loop_steps - 2),
                )  # fmt: skip
            ]
        else:
            result.update(run_throughput(args, specs, device))
            labels = [spec.label for spec in specs]
            result["comparisons"] = _comparisons(labels, result["samples_s"])
            lavit_specs = [
                spec
                for spec in specs
                if spec.is_lavit and not spec.switches and split_task(spec.label)[0] is None
            ]
            if not args.no_layers and lavit_specs:
                say(
                    PROG,
                    "timing each LA layer against the VA layer that would replace it: "
                    + ", ".join(spec.label for spec in lavit_specs),
                )
            if not args.no_layers:
                result["layers"] = [
                    row
                    for spec in specs
                    if spec.is_lavit and not spec.switches and split_task(spec.label)[0] is None
                    for row in layer_comparison(
                        spec,
                        args.img_size,
                        args.batch_size,
                        device,
                        args.dtype,
                        args.warmup,
                        args.layer_iters,
                    )  # fmt: skip
                ]
    except ValueError as err:  # a size the model cannot take, a bad model argument
        return fail(PROG, str(err))
    with contextlib.suppress(OSError):
        result["environment"]["load_avg_end"] = os.getloadavg()
    result["environment"]["wall_s"] = round(time.time() - started, 1)

    env = result["environment"]
    print(f"# {result['command']}")
    print(
        f"{env.get('gpu', env['cpu'])}, {env['cpu_count']} cores, {env['torch_threads']} threads, "
        f"torch {env['torch']}; {args.img_size[0]}×{args.img_size[1]} batch {args.batch_size} "
        f"{args.dtype}; "
        f"cpu tuning {'on' if any(env['cpu_tuning'].values()) else 'off'}"
        + (" TF32" if args.tf32 else "")
        + (" compiled" if args.compile else "")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    tables = {
        "models": MODEL_COLUMNS,
        "comparisons": None,
        "layers": None,
        "loop_overhead": None,
    }
    for key, columns in tables.items():
        rows = result.get(key)
        if rows:
            print(f"\n## {key}\n\n{markdown_table(rows, columns)}")
            suffix = (
                "" if key in ("models", "loop_overhead") else f"_{key}"
            )  # the mode's main table
            write_csv(args.out / f"{tag}{suffix}.csv", rows)
    if "peak" in result:
        print(
            f"\nmatmul peak ({result['peak']['gemm']}): {result['peak']['gmacs_per_s']:.1f} GMAC/s"
        )
    json_path = args.out / f"{tag}.json"
    json_path.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    print(f"\nwrote {json_path}")
    if args.wandb:
        log_to_wandb(result, args.wandb_project, args.out, args.wandb_init_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
