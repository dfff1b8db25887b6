"""Process-wide CPU settings that the ``lavit`` commands apply before they build a model.

Two avoidable costs of a PyTorch step on a CPU (measured in docs/benchmarks.md):

* **Fresh pages.** glibc serves large allocations (every activation of a batch) with their own
  ``mmap`` and unmaps them on free, so each step faults its activations in again and the kernel
  zeroes every page: 10–40 % of a 224² training step on the 2-core test machine. Keeping freed
  memory in the heap lets the next step reuse it; the process keeps its peak footprint instead
  of returning it (11–13 % more peak memory there).
* **Denormal floats.** Values below ~1e-38 (small gradients) take a slow path in every op.
  Flush-to-zero avoids it (``experiments/base.yaml`` ends with the same accuracy either way).

``LAVIT_CPU_TUNING=0`` in the environment leaves both alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from pathlib import Path

import torch

__all__ = ["CPU_TUNING_ENV", "cpu_model_name", "cpu_tuning_state", "tune_cpu_runtime"]

CPU_TUNING_ENV = "LAVIT_CPU_TUNING"

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied: dict[str, bool] | None = None


def _keep_freed_memory() -> bool:
    """glibc only: no ``mmap`` per allocation and no trimming of the heap's free top."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    no_mmap = libc.mallopt(_M_MMAP_MAX, 0) == 1
    # The largest positive int: freed memory at the top of the heap is never handed back.
    no_trim = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return no_mmap and no_trim


def tune_cpu_runtime(enabled: bool | None = None) -> dict[str, bool]:
    """Apply both settings once per process; returns what is in effect.

    ``enabled=None`` follows ``LAVIT_CPU_TUNING`` (on unless it is ``0``/``false``/``no``).
    """
    global _applied
    if enabled is None:
        enabled = os.environ.get(CPU_TUNING_ENV, "1").strip().lower() not in ("0", "false", "no")
    if enabled and _applied is None:
        _applied = {
            "keep_freed_memory": _keep_freed_memory(),
            "flush_denormal": torch.set_flush_denormal(True),
        }
    return cpu_tuning_state()


def cpu_tuning_state() -> dict[str, bool]:
    """Which of the two settings this process runs with (for run metadata and benchmarks)."""
    return dict(_applied or {"keep_freed_memory": False, "flush_denormal": False})


def cpu_model_name() -> str:
    """The CPU's marketing name (``lscpu``'s "Model name")."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
