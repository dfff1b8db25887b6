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
* with ``--loop-overhead``, the step time of the Lightning training loop against a bare loop.

Results: a Markdown table on screen, JSON and CSV files in ``--out``, optionally W&B (``--wandb``).

    lavit bench                                         # LaViT-T/S/B, their all-VA twins, PVTv2-b0/1/2
    lavit bench --models lavit_tiny pvt_v2_b1 --dtype bf16 --iters 10
    lavit bench --loop-overhead --models lavit_tiny
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, get_shape

import lavit
from lavit.models import LAVIT_CONFIGS
from lavit.models.lavit import LABlock
from lavit.runtime import cpu_tuning_state, tune_cpu_runtime

__all__ = [
    "DEFAULT_MODELS",
    "ModelSpec",
    "build_model",
    "count_macs",
    "main",
    "markdown_table",
    "parse_model_name",
]

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
ALL_VA = "all-va"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Targets of issue 6 (lavit_tiny against pvt_v2_b1; each LaViT against its all-VA twin).
SPEED_TARGETS = {("lavit_tiny", "pvt_v2_b1"): (1.5, 1.6)}
ALL_VA_TARGET = 1.0


# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model of the benchmark: its label, the timm architecture and extra constructor args."""

    label: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def is_lavit(self) -> bool:
        return self.arch in LAVIT_CONFIGS


def parse_model_name(label: str) -> ModelSpec:
    """``lavit_tiny``, ``pvt_v2_b1`` (any timm model) or ``lavit_tiny/all-va`` → a spec.

    ``/all-va`` switches every LA layer of a LaViT variant to VA (``num_va_layers`` = depths).
    """
    arch, _, variant = label.partition("/")
    if arch not in timm.list_models():
        raise ValueError(
            f"unknown model {label!r}: expected a timm model name such as "
            f"{', '.join(DEFAULT_MODELS[::2])}, optionally a LaViT one with '/{ALL_VA}'"
        )
    if not variant:
        return ModelSpec(label, arch)
    if variant != ALL_VA:
        raise ValueError(f"unknown model variant {variant!r} in {label!r}: only '/{ALL_VA}' exists")
    if arch not in LAVIT_CONFIGS:
        raise ValueError(
            f"{label!r}: only LaViT variants ({', '.join(LAVIT_CONFIGS)}) have LA layers"
        )
    return ModelSpec(label, arch, {"num_va_layers": tuple(LAVIT_CONFIGS[arch]["depths"])})


def build_model(spec: ModelSpec, img_size: int, num_classes: int = 1000) -> nn.Module:
    """The model through timm's factory (as in training); size-agnostic models ignore ``img_size``."""
    kwargs = {**spec.kwargs, "num_classes": num_classes}
    try:
        return timm.create_model(spec.arch, img_size=img_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(spec.arch, **kwargs)  # PVTv2, CNNs: any input size


# --- MACs ----------------------------------------------------------------------------------------


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    """Conv backward FLOPs that respect groups.

    torch's own formula counts the weight gradient of a grouped (e.g. depth-wise) conv ``groups``
    times too often; both gradients cost exactly what the forward conv costs.
    """
    flops = 0
    if output_mask[0]:  # grad_input: a transposed conv of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, get_shape(out_shape[0]), not transposed)
    if output_mask[1]:  # grad_weight: the forward conv's products, summed the other way
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` with the grouped-conv backward fix."""
    return FlopCounterMode(
        display=False,
        custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop},
    )


def count_macs(model_factory: Callable[[], nn.Module], img_size: int) -> dict[str, float]:
    """Params, forward MACs and training-step MACs (forward + backward) per image.

    The model is built by ``model_factory`` on the ``meta`` device and run with batch 1 under the
    math SDPA backend (the fused CPU kernel is invisible to the counter). MACs = FLOPs / 2.
    """
    with torch.device("meta"):
        model = model_factory()
        x = torch.empty(1, 3, img_size, img_size)
        with sdpa_kernel(SDPBackend.MATH):
            model.eval()
            with torch.no_grad(), flop_counter() as forward:
                model(x)
            model.train()
            with flop_counter() as training:
                model(x).sum().backward()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": forward.get_total_flops() / 2,
        "train_macs": training.get_total_flops() / 2,
    }


# --- timing --------------------------------------------------------------------------------------


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_interleaved(
    tasks: dict[str, Callable[[], Any]],
    warmup: int,
    iters: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds of each task per iteration, the tasks run round-robin.

    The order rotates every round, so no task always follows the same neighbour (caches, turbo).
    """
    names = list(tasks)
    for _ in range(warmup):
        for name in names:
            tasks[name]()
            sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            tasks[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def gemm_task(size: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], Any], int]:
    """A square GEMM (the machine's matmul peak) and its MACs."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), size**3


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for float32 matmuls and cuDNN convolutions (CUDA; Ampere and later).

    Only the legacy flags are used: torch refuses to read them once the newer ``fp32_precision``
    API has set some of them differently.
    """
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def inference_task(model: nn.Module, x: torch.Tensor, device, dtype: str) -> Callable[[], Any]:
    def step() -> None:
        with torch.inference_mode(), _autocast(device, dtype):
            model(x)

    return step


def training_task(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, dtype: str
) -> Callable[[], Any]:
    """One forward + backward + AdamW step (a GradScaler for fp16 on CUDA)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None

    def step() -> None:
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def paired_speedup(times_a: Sequence[float], times_b: Sequence[float]) -> float:
    """How many times faster A is than B: the median over rounds of ``t_B / t_A``.

    Both ran in the same round, seconds apart; on a shared machine whose load drifts over
    minutes, a ratio per round cancels the drift that separate medians keep.
    """
    return _median([b / a for a, b in zip(times_a, times_b, strict=True)])


# --- per-layer VA vs LA --------------------------------------------------------------------------


def layer_comparison(
    spec: ModelSpec,
    img_size: int,
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
    model = build_model(spec, img_size).to(device).eval()
    twin = build_model(parse_model_name(f"{spec.arch}/{ALL_VA}"), img_size).to(device).eval()
    inputs: dict[tuple[int, int], tuple] = {}
    hooks = []
    for m, stage in enumerate(model.stages):
        for i, block in enumerate(stage.blocks):
            if isinstance(block, LABlock):

                def capture(module, args, key=(m, i)):
                    inputs[key] = args  # (x (B, N, C), grid, handed attention (B, H, N, N'))

                hooks.append(block.register_forward_pre_hook(capture))
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    with torch.inference_mode(), _autocast(device, dtype):
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
            "va_scores": lambda: va(x, grid, return_scores=True),
            "la": lambda: la(x, grid, handed),
        }

    with torch.inference_mode(), _autocast(device, dtype):
        times = time_interleaved(tasks(tokens, attn), warmup, iters, _synchronizer(device))
    # MACs in fp32 on one image (the counter's decompositions bypass autocast).
    macs = {}
    with sdpa_kernel(SDPBackend.MATH):
        for name, task in tasks(tokens[:1].float(), attn[:1].float()).items():
            with torch.inference_mode(), flop_counter() as counter:
                task()
            macs[name] = counter.get_total_flops() / 2
    ms = {name: _median(t) * 1e3 for name, t in times.items()}
    return {
        "va_fused_ms": ms["va_fused"],
        "va_scores_ms": ms["va_scores"],
        "la_ms": ms["la"],
        "la_speedup": paired_speedup(times["la"], times["va_fused"]),  # > 1: LA is faster
        "va_mmacs": macs["va_fused"] / 1e6,
        "la_mmacs": macs["la"] / 1e6,
    }


# --- Lightning loop overhead ---------------------------------------------------------------------


def loop_overhead(
    spec: ModelSpec,
    img_size: int,
    batch_size: int,
    device: torch.device,
    dtype: str,
    steps: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Step time of a Lightning training loop against a bare PyTorch loop, paired step by step.

    Lightning trains the model (a minimal ``LightningModule``, then the project's
    ``LaViTModule``) on in-memory batches (a ``TensorDataset``); after each of its steps a
    callback runs one bare step (forward, loss, backward, AdamW, zero_grad, one ``.item()``) of
    a copy of the model on the same batch, alternately at the start and at the end of the
    batch. A Lightning step is the time between the starts of consecutive batches minus the
    bare step run in between, so data fetching, hooks and logging count. ``overhead_pct`` is the
    median over steps of Lightning ÷ bare, minus one; the first ``warmup`` pairs are dropped.
    """
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    num_classes = 1000
    images = torch.randn(batch_size * steps, 3, img_size, img_size)
    labels = torch.randint(0, num_classes, (batch_size * steps,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, drop_last=True)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[dtype]

    class MinimalModule(L.LightningModule):
        """The least a LightningModule needs: forward, loss, optimizer (and a logged loss)."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    class PairedSteps(L.Callback):
        """Times Lightning's steps and, inside each, a bare step of a copy of the model.

        The bare step runs right after a batch starts on even batches and right before it ends
        on odd ones: whichever position is favoured (caches, the other model's gradients still
        in memory) favours both loops alike over the median.
        """

        def __init__(self, model: nn.Module) -> None:
            self.model = copy.deepcopy(model).to(device).train()
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
            self.lightning: list[float] = []
            self.bare: list[float] = []
            self.start: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.start is not None:  # the interval held one bare step: take it out
                self.lightning.append(now - self.start - self.bare[-1])
            self.start = now
            if batch_idx % 2 == 0:
                self.bare_step(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx % 2 == 1:
                self.bare_step(batch)

        def bare_step(self, batch) -> None:
            start = time.perf_counter()
            x, y = (t.to(device) for t in batch)
            with _autocast(device, dtype):
                loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss.item()  # what logging a loss costs: one sync
            self.bare.append(time.perf_counter() - start)

    def minimal_module() -> L.LightningModule:
        return MinimalModule(build_model(spec, img_size, num_classes))

    def project_module() -> L.LightningModule:
        from lavit.training.module import LaViTModule

        return LaViTModule(
            arch=spec.arch,
            num_classes=num_classes,
            img_size=img_size if spec.is_lavit else None,
            num_va_layers=list(spec.kwargs["num_va_layers"]) if spec.kwargs else None,
            drop_path_rate=0.0,
            label_smoothing=0.0,
            warmup_epochs=0.0,
            scale_lr_by_batch=False,
        )

    rows = []
    for name, make in (
        ("minimal LightningModule", minimal_module),
        ("LaViTModule", project_module),
    ):
        try:
            module = make()
        except Exception as err:  # the project's module is optional for the benchmark
            print(f"note: {name} not measured ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        timer = PairedSteps(module.model)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=steps,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=loader)
        lightning, bare = timer.lightning[warmup:], timer.bare[warmup : len(timer.lightning)]
        rows.append(
            {
                "model": spec.label,
                "loop": name,
                "steps": len(lightning),
                "lightning_step_ms": _median(lightning) * 1e3,
                "bare_step_ms": _median(bare) * 1e3,
                "overhead_pct": (_median([a / b for a, b in zip(lightning, bare, strict=True)]) - 1)
                * 100,
            }
        )
    return rows


# --- output --------------------------------------------------------------------------------------


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (floats to 3 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts as CSV, columns in the order of the first row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _json_safe(value: Any) -> Any:
    """NaN (a phase that was skipped) → null, so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def cpu_model_name() -> str:
    """The CPU's marketing name (``lscpu``'s "Model name")."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """The hardware and software a result was measured on."""
    info = {
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lavit": lavit.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "cpu_tuning": cpu_tuning_state(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32"] = {  # the legacy flags, the API that set_tf32 uses
            "matmul": torch.get_float32_matmul_precision() != "highest",
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
    with contextlib.suppress(OSError):
        info["load_avg_start"] = os.getloadavg()
    return info


def log_to_wandb(result: dict[str, Any], project: str, out_dir: Path) -> None:
    """Log the tables to W&B; offline unless credentials (or ``WANDB_MODE``) say otherwise."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )
    run = wandb.init(
        project=project,
        job_type="bench",
        mode=mode,
        dir=str(out_dir),
        config={"args": result["args"], "environment": result["environment"]},
    )
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavit bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help=f"timm model names; 'NAME/{ALL_VA}' is a LaViT with every LA layer switched to VA "
        f"(default: {' '.join(DEFAULT_MODELS)}; with --loop-overhead: lavit_tiny)",
    )
    parser.add_argument("--img-size", type=_positive_int, default=224, help="input side (pixels)")
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--num-classes", type=_positive_int, default=1000)
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
    parser.add_argument("--iters", type=_positive_int, default=5, help="timed iterations (median)")
    parser.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed iterations")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--no-cpu-tuning",
        action="store_true",
        help="leave glibc's allocator and denormals at their defaults (lavit.runtime; "
        "what plain PyTorch scripts get)",
    )
    parser.add_argument(
        "--gemm-size",
        type=_positive_int,
        default=None,
        help="side of the peak GEMM (CPU 2048, CUDA 8192)",
    )
    parser.add_argument("--no-infer", action="store_true", help="skip inference throughput")
    parser.add_argument("--no-train", action="store_true", help="skip training-step throughput")
    parser.add_argument("--no-layers", action="store_true", help="skip the VA vs LA layer times")
    parser.add_argument(
        "--layer-iters", type=_positive_int, default=10, help="timed iterations per layer"
    )
    parser.add_argument(
        "--loop-overhead",
        action="store_true",
        help="only compare a Lightning training loop's step time with a bare PyTorch loop",
    )
    parser.add_argument(
        "--loop-steps", type=_positive_int, default=8, help="batches per loop run (≥ 2)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON/CSV")
    parser.add_argument("--tag", default=None, help="file name stem (default: from device/dtype)")
    parser.add_argument("--wandb", action="store_true", help="also log the tables to W&B")
    parser.add_argument("--wandb-project", default="lavit-bench")
    return parser


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[ModelSpec]:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.loop_overhead and args.loop_steps < 2:
        parser.error("--loop-steps must be ≥ 2 (a step is the interval between two batches)")
    if args.dtype == "fp16" and args.device != "cuda":
        parser.error("--dtype fp16 needs --device cuda (use bf16 on the CPU)")
    if args.tf32 and args.device != "cuda":
        parser.error("--tf32 needs --device cuda (TF32 is a GPU number format)")
    names = args.models or (["lavit_tiny"] if args.loop_overhead else list(DEFAULT_MODELS))
    try:
        specs = [parse_model_name(name) for name in names]
    except ValueError as err:
        parser.error(str(err))
    if len({s.label for s in specs}) != len(specs):
        parser.error("--models: a model is listed twice")
    return specs


def _comparisons(
    labels: Sequence[str], samples: dict[str, dict[str, list[float]]]
) -> list[dict[str, Any]]:
    """Speedups (paired per round): each LaViT against its all-VA twin, and the issue's targets."""
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
    counts = {
        spec.label: count_macs(
            partial(build_model, spec, args.img_size, args.num_classes), args.img_size
        )
        for spec in specs
    }
    sync = _synchronizer(device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    models = {}
    for spec in specs:
        model = build_model(spec, args.img_size, args.num_classes).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[spec.label] = torch.compile(model) if args.compile else model

    gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    gemm_dtype = "fp32" if args.dtype == "fp32" else args.dtype
    gemm, gemm_macs = gemm_task(gemm_size, DTYPES[gemm_dtype], device)
    peak_name = f"gemm_{'tf32' if args.tf32 and gemm_dtype == 'fp32' else gemm_dtype}_{gemm_size}"

    infer_times: dict[str, list[float]] = {}
    if not args.no_infer:
        for model in models.values():
            model.eval()
        tasks = {label: inference_task(m, x, device, args.dtype) for label, m in models.items()}
        infer_times = time_interleaved({**tasks, peak_name: gemm}, args.warmup, args.iters, sync)
    train_times: dict[str, list[float]] = {}
    if not args.no_train:
        for model in models.values():
            model.train()
        tasks = {label: training_task(m, x, y, device, args.dtype) for label, m in models.items()}
        train_times = time_interleaved({**tasks, peak_name: gemm}, args.warmup, args.iters, sync)

    gemm_samples = infer_times.get(peak_name, []) + train_times.get(peak_name, [])
    peak_macs_s = gemm_macs / _median(gemm_samples)
    rows = []
    for spec in specs:
        macs, train_macs = counts[spec.label]["macs"], counts[spec.label]["train_macs"]
        infer = infer_times.get(spec.label, [])
        train = train_times.get(spec.label, [])
        infer_img_s, train_img_s = (
            args.batch_size / _median(infer),
            args.batch_size / _median(train),
        )
        rows.append(
            {
                "model": spec.label,
                "params_m": counts[spec.label]["params"] / 1e6,
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
        if args.loop_overhead:
            result["loop_overhead"] = [
                row
                for spec in specs
                for row in loop_overhead(
                    spec,
                    args.img_size,
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
            if not args.no_layers:
                result["layers"] = [
                    row
                    for spec in specs
                    if spec.is_lavit and not spec.kwargs
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
        print(f"error: {err}", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError):
        result["environment"]["load_avg_end"] = os.getloadavg()
    result["environment"]["wall_s"] = round(time.time() - started, 1)

    env = result["environment"]
    print(f"# {result['command']}")
    print(
        f"{env.get('gpu', env['cpu'])}, {env['cpu_count']} cores, {env['torch_threads']} threads, "
        f"torch {env['torch']}; {args.img_size}² batch {args.batch_size} {args.dtype}; "
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
        log_to_wandb(result, args.wandb_project, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
