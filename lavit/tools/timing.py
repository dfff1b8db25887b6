"""The timing harness of ``lavit bench`` and of the report's throughput column.

Tasks (an inference, a training step, a large GEMM) are timed round-robin, one iteration each per
round with the order rotating, so that load from other processes, which drifts over minutes on a
shared machine, hits every task alike; a speedup between two tasks is the median of their
per-round ratios (:func:`paired_speedup`). ``torch.utils.benchmark`` times one statement at a
time (blocked autorange), without interleaving tasks, hence this loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import lavit
from lavit.runtime import cpu_model_name, cpu_tuning_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work (CUDA), or nothing (CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_interleaved(
    tasks: dict[str, Callable[[], Any]],
    warmup: int,
    iters: int,
    sync: Callable[[], None] = lambda: None,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each task per iteration, the tasks run round-robin, the order rotating every
    round (no task always follows the same neighbour); ``on_round(done, total)`` after each."""
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
        if on_round is not None:
            on_round(i + 1, iters)
    return times


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values (a phase that was skipped)."""
    return statistics.median(values) if values else math.nan


def paired_speedup(times_a: Sequence[float], times_b: Sequence[float]) -> float:
    """How many times faster A is than B: the median over rounds of ``t_B / t_A`` (a ratio per
    round cancels the load drift that separate medians keep)."""
    return median([b / a for a, b in zip(times_a, times_b, strict=True)])


def gemm_task(size: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], Any], int]:
    """A square GEMM (the machine's matmul peak) and its MACs."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    return (lambda: torch.mm(a, b)), size**3


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for float32 matmuls and cuDNN convolutions (CUDA). Only the legacy flags:
    torch refuses to read them once the newer ``fp32_precision`` API set some differently."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def inference_task(model: nn.Module, x: torch.Tensor, device, dtype: str) -> Callable[[], Any]:
    def step() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    return step


def training_task(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, device, dtype: str
) -> Callable[[], Any]:
    """One forward + backward + AdamW step (a GradScaler for fp16): cross-entropy against ``y``,
    or the mean output for ``y=None`` (a dense row has no classification loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    def step() -> None:
        with autocast(device, dtype):
            out = model(x)
            loss = out.float().mean() if y is None else F.cross_entropy(out, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


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
