"""``scripts/gpu_check.sh`` on a machine without a GPU: the skip line, the CPU runs, the files.

The script is run as the lent GPU machine runs it (an existing interpreter, ``$OUT`` set), with
CUDA hidden, so that it takes its CPU path on any machine and keeps working between GPU sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
SKIP_LINE = "[gpu_check] SKIP GPU parts: no CUDA device"
GPU_STEPS = {"tests", "bench_bf16", "bench_tf32", "fit", "bench_compiled", "bench_compiled_rest"}


def run_script(*args: str, out=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(
        ["bash", str(SCRIPT), "--python", sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cpu_run_skips_the_gpu_parts_in_one_line_and_writes_its_files(tmp_path):
    out = tmp_path / "out"
    done = run_script(out=out)
    assert done.returncode == 0, done.stdout + done.stderr

    skip_lines = [line for line in done.stdout.splitlines() if line.startswith(SKIP_LINE)]
    assert len(skip_lines) == 1, done.stdout
    assert "[gpu_check] bench_cpu: PASS" in done.stdout
    assert "[gpu_check] fit_cpu: PASS" in done.stdout
    # $OUT (what a lent machine sends back, a few files only): the details travel packed.
    assert sorted(p.name for p in out.iterdir()) == [
        "console.log", "gpu_check_details.tar.gz", "status.json", "summary.md",
    ]  # fmt: skip

    status = json.loads((out / "status.json").read_text())
    assert status["ok"] is True and status["cuda"] is False
    assert status["skip_line"] == skip_lines[0]
    by_step = {s["step"]: s for s in status["steps"]}
    assert {name for name, s in by_step.items() if s["status"] == "skip"} >= GPU_STEPS
    assert by_step["bench_cpu"]["status"] == by_step["fit_cpu"]["status"] == "pass"

    with tarfile.open(out / "gpu_check_details.tar.gz") as tar:
        names = set(tar.getnames())
        assert not [n for n in names if n.endswith(".ckpt")]  # checkpoints stay behind
        bench = json.load(tar.extractfile("details/bench/bench_cpu.json"))
        report = json.load(tar.extractfile("details/fit_report.json"))
        environment = json.load(tar.extractfile("details/environment.json"))
    assert {"details/logs/bench_cpu.log", "details/logs/fit_cpu.log"} <= names
    assert "details/fit/fit-profile.txt" in names
    assert [row["model"] for row in bench["models"]] == [
        "lavit_cifar", "lavit_cifar/all-va", "pvt_v2_b0",
    ]  # fmt: skip
    assert report["images_per_s"] > 0 and 0 < report["loader_share"] < 1
    assert report["steps"] == 2 and report["precision"] == "bf16-mixed"
    assert environment["cuda_available"] is False and environment["missing_modules"] == []

    summary = (out / "summary.md").read_text()
    assert skip_lines[0].removeprefix("[gpu_check] ") in summary
    assert "| lavit_cifar |" in summary and "| fit_cpu | pass |" in summary


def test_bad_arguments_stop_before_any_work(tmp_path):
    done = run_script("--steps", "tests,nope", "--out", str(tmp_path / "a"))
    assert done.returncode == 2
    assert "unknown nope" in done.stderr and "bench_bf16" in done.stderr

    done = subprocess.run(
        ["bash", str(SCRIPT), "--python", "/no/such/python"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "no such interpreter" in done.stderr

    done = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --frobnicate" in done.stderr
