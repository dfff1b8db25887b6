"""The steps of ``scripts/gpu_check.sh``: CUDA tests, GPU benchmarks and a GPU fit, in one budget.

(One file of ~580 lines: it is copied to a bare GPU machine and run by whatever interpreter holds
torch there, with the standard library only, so it cannot lean on lavit or split into modules.)

Run through ``scripts/gpu_check.sh`` (which installs the project or picks an existing
environment); standard library only, so that it runs under any interpreter that holds torch.
Every step is a subprocess of this interpreter with a time limit taken from one budget, in
priority order (tests, the bf16 and fp32+TF32 benchmarks, the fit, then the compiled
benchmarks): a step the budget cannot hold is reported as not run, a benchmark that outruns its
share as stopped, neither as a failure; a failure (a failing or skipped-for-no-GPU test, a
crash) makes the exit code 1. Without a CUDA device the GPU steps are skipped with one line and tiny CPU runs of the
same commands keep them working.

Output folder: ``summary.md`` (every table), ``status.json`` (per step), ``console.log`` and
``gpu_check_details.tar.gz`` (logs, bench JSON/CSV, JUnit XML, the fit's run folder without
checkpoints); the details also lie unpacked in ``--details`` unless it is a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "[gpu_check]"
BENCH_GPU = "--device cuda --img-size 224 --batch-size 128 --iters 10 --warmup 3 --layer-iters 20"
BENCH_CPU = "--img-size 32 --batch-size 2 --iters 1 --warmup 0 --layer-iters 1 --gemm-size 256"
CPU_MODELS = ["lavit_cifar", "lavit_cifar/all-va", "pvt_v2_b0"]
HEADLINE_MODELS = ["lavit_tiny", "pvt_v2_b1"]  # compiled first: compiling takes minutes
OTHER_MODELS = [
    "lavit_tiny/all-va", "lavit_small", "lavit_small/all-va", "lavit_base", "lavit_base/all-va",
    "pvt_v2_b0", "pvt_v2_b2",
]  # fmt: skip
HEADLINE = "lavit_tiny ÷ pvt_v2_b1"
FIT_MINUTES = 2
# The dense backbones at 800×1344 (issue 14): set to the `lavit bench` arguments that time them
# once `lavit bench` can; until then a GPU run with `la_mixing` present fails this step loudly.
DENSE_BENCH_ARGS: list[str] | None = None
# Modules each step imports; a missing one fails that step at once with the fix, not a traceback.
# `python -m lavit` (bench too) imports the training stack.
CLI_MODULES = ["torch", "timm", "lightning", "torchmetrics", "jsonargparse", "datasets", "yaml"]
NEEDS = {"tests": ["torch", "timm", "pytest"], "bench": CLI_MODULES, "fit": CLI_MODULES}
FIT_PROFILE_ACTIONS = ("[_TrainingEpochLoop].train_dataloader_next", "run_training_batch")

ENV_SNIPPET = r"""
import importlib, importlib.metadata as md, inspect, json, os, platform, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable,
        "platform": platform.platform(), "cpu_count": os.cpu_count()}
import torch
info.update(torch=torch.__version__, cuda_build=torch.version.cuda,
            cuda_available=torch.cuda.is_available())
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                gpu_memory_gib=round(p.total_memory / 2**30, 1),
                cudnn=torch.backends.cudnn.version())
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
except (OSError, subprocess.SubprocessError, IndexError):
    info["driver"] = None
versions, missing = {}, []
for name in ("lavit", "timm", "lightning", "torchmetrics", "jsonargparse", "datasets", "wandb",
             "numpy", "pyarrow", "triton", "pytest"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
for module in sorted({m for ms in json.loads(sys.argv[2]).values() for m in ms}):
    try:
        importlib.import_module(module)
    except Exception as err:
        missing.append(f"{module} ({type(err).__name__}: {err})")
info.update(versions=versions, missing_modules=missing)
from lavit.models import LaViT
keywords = inspect.signature(LaViT.__init__).parameters
info["features"] = {k: k in keywords for k in ("dynamic_img_size", "la_mixing")}
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
"""


@dataclass
class Check:
    """What the steps share: where to write, the clock, the environment found."""

    out: Path
    details: Path
    deadline: float
    env: dict
    console: list[str]
    bench_results: list[Path] = field(default_factory=list)  # made by this run, not earlier ones
    fit_report: dict | None = None

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.console.append(line)

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Step:
    name: str
    needs_cuda: bool
    cap_s: int  # longest this step may take
    min_s: int  # not started with less budget left than this
    run: Callable[[Check, float], tuple[str, str]]  # (check, timeout) → (status, detail)


def run_logged(check: Check, name: str, argv: list[str], timeout: float, **env: str) -> int | None:
    """Run ``argv`` from the repo root, output to ``logs/<name>.log``; None when it timed out.

    The child gets its own process group, so that a timeout also ends its workers (data
    loaders, compile workers).
    """
    log_path = check.details / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None


def last_line(check: Check, name: str) -> str:
    lines = (check.details / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1][:300] if lines else ""


def missing_for(check: Check, kind: str) -> str | None:
    missing = [m for m in check.env["missing_modules"] if m.split(" ")[0] in NEEDS[kind]]
    if not missing:
        return None
    return (
        f"{sys.executable} lacks {', '.join(missing)}; on a machine without a package registry "
        "carry wheels (scripts/gpu_check.sh --fetch-wheels DIR here, --wheels DIR there)"
    )


# --- steps ---------------------------------------------------------------------------------------


def cuda_tests(check: Check, timeout: float) -> tuple[str, str]:
    if problem := missing_for(check, "tests"):
        return "fail", problem
    xml = check.details / "cuda_tests.xml"
    argv = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rA"]
    argv += ["-p", "no:cacheprovider", f"--junitxml={xml}", "-o", "junit_family=xunit1"]
    rc = run_logged(check, "cuda_tests", argv, timeout, LAVIT_REQUIRE_CUDA="1")
    if rc is None:
        return "fail", f"timed out after {timeout:.0f} s"
    if not xml.exists():
        return "fail", f"pytest exit {rc}, no report: {last_line(check, 'cuda_tests')}"
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [
        case.get("name")
        for case in suite.iter("testcase")
        if any(child.tag in ("failure", "error") for child in case)
    ]
    detail = (
        f"{passed} passed, {len(failed)} failed, {counts['skipped']} skipped (features not "
        "built yet)" + (f"; failed: {', '.join(failed[:6])}" if failed else "")
    )
    return ("pass" if rc == 0 and passed > 0 else "fail"), detail


def bench_step(name: str, args: list[str]) -> Callable[[Check, float], tuple[str, str]]:
    def run(check: Check, timeout: float) -> tuple[str, str]:
        if problem := missing_for(check, "bench"):
            return "fail", problem
        out = ["--out", str(check.details / "bench"), "--tag", name]
        rc = run_logged(check, name, [sys.executable, "-m", "lavit", "bench", *args, *out], timeout)
        if rc is None:
            # Out of budget, not wrong: reported apart from failures (rerun: --steps NAME).
            return "timeout", f"stopped after {timeout:.0f} s (rerun: --steps {name} --budget ...)"
        if rc != 0:
            return "fail", f"exit {rc}: {last_line(check, name)}"
        path = check.details / "bench" / f"{name}.json"
        result = json.loads(path.read_text())
        check.bench_results.append(path)
        ratio = next((c for c in result["comparisons"] if c["comparison"] == HEADLINE), None)
        headline = (
            f"; {HEADLINE}: inference {ratio['infer_speedup']:.2f}×, "
            f"training {ratio['train_speedup']:.2f}×"
            if ratio
            else ""
        )
        return "pass", f"{len(result['models'])} models{headline}"

    return run


def fit_argv(check: Check, seconds: int | None) -> list[str]:
    """``lavit fit`` of base.yaml in bf16-mixed; ``seconds=None``: the CPU's 2-step smoke run."""
    run_dir = check.details / "fit"
    argv = [sys.executable, "-m", "lavit", "fit", "--config", "experiments/base.yaml"]
    argv += [
        "--trainer.precision=bf16-mixed",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.profiler=lightning.pytorch.profilers.SimpleProfiler",
        f"--trainer.profiler.dirpath={run_dir}",
        "--trainer.profiler.filename=profile",
        "--wandb.enabled=false",  # no network there, and W&B is not needed for the numbers
    ]
    if seconds is None:
        return argv + [
            "--trainer.accelerator=cpu",
            "--trainer.max_time=00:00:00:60",  # the GPU run's limit, parsed the same way
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--saturation.num_images=0",
        ]
    return argv + ["--trainer.accelerator=gpu", f"--trainer.max_time=00:00:00:{seconds}"]


def fit_report(run_dir: Path) -> dict:
    """Images/s and the data loader's share of the training step, from the profiler's report.

    A step is the time Lightning waits for the next batch plus ``run_training_batch`` (forward,
    backward, optimizer; the non-finite guard reads the gradients every step, so it includes the
    GPU's work). Images/s = batch size × steps ÷ that time (validation excluded).
    """
    profile = run_dir / "fit-profile.txt"  # SimpleProfiler: <stage>-<filename>.txt
    totals: dict[str, tuple[int, float]] = {}
    for line in profile.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 6 and cells[1] in FIT_PROFILE_ACTIONS:
            totals[cells[1]] = (int(cells[3]), float(cells[4]))
    versions = run_dir.glob("version_*/run_info.json")
    latest = max(versions, key=lambda p: int(p.parent.name.removeprefix("version_")))
    info = json.loads(latest.read_text())
    steps, step_s = totals["run_training_batch"]
    loader_s = totals[FIT_PROFILE_ACTIONS[0]][1]
    batch = info["config"]["data"]["batch_size"]
    metrics = info.get("final", {}).get("metrics", {})
    return {
        "images_per_s": batch * steps / (step_s + loader_s),
        "loader_share": loader_s / (step_s + loader_s),
        "steps": steps,
        "batch_size": batch,
        "num_workers": info["config"]["data"]["num_workers"],
        "epochs": info.get("final", {}).get("epoch"),
        "val_top1": metrics.get("val/top1"),
        "precision": info.get("precision"),
    }


def fit_step(smoke: bool) -> Callable[[Check, float], tuple[str, str]]:
    def run(check: Check, timeout: float) -> tuple[str, str]:
        if problem := missing_for(check, "fit"):
            return "fail", problem
        seconds = None if smoke else int(min(FIT_MINUTES * 60, timeout - 60))
        name = "fit_cpu" if smoke else "fit"
        rc = run_logged(check, name, fit_argv(check, seconds), timeout, WANDB_MODE="offline")
        if rc is None:
            return "fail", f"timed out after {timeout:.0f} s"
        if rc != 0:
            return "fail", f"exit {rc}: {last_line(check, name)}"
        report = check.fit_report = fit_report(check.details / "fit")
        (check.details / "fit_report.json").write_text(json.dumps(report, indent=2))
        top1 = f", val top-1 {report['val_top1']:.3f}" if report["val_top1"] is not None else ""
        return "pass", (
            f"{report['images_per_s']:.0f} images/s, data loader {100 * report['loader_share']:.0f} % "
            f"of the step, {report['steps']} steps{top1}"
        )

    return run


def dense_bench(check: Check, timeout: float) -> tuple[str, str]:
    if not check.env["features"]["la_mixing"]:
        return "skip", "no dense backbone yet (la_mixing, issue 14)"
    if DENSE_BENCH_ARGS is None:
        return "fail", "la_mixing exists: set DENSE_BENCH_ARGS in scripts/gpu_check.py"
    return bench_step("bench_dense", DENSE_BENCH_ARGS)(check, timeout)


STEPS = [
    Step("tests", True, 180, 60, cuda_tests),
    Step(
        "bench_bf16",
        True,
        150,
        60,
        bench_step("bench_bf16", [*BENCH_GPU.split(), "--dtype", "bf16"]),
    ),
    Step("bench_tf32", True, 150, 60, bench_step("bench_tf32", [*BENCH_GPU.split(), "--tf32"])),
    Step("fit", True, FIT_MINUTES * 60 + 90, 120, fit_step(smoke=False)),
    Step(
        "bench_compiled",
        True,
        240,
        90,
        bench_step(
            "bench_compiled",
            [
                *BENCH_GPU.split(),
                "--dtype",
                "bf16",
                "--compile",
                "--no-layers",
                "--models",
                *HEADLINE_MODELS,
            ],
        ),
    ),
    Step(
        "bench_compiled_rest",
        True,
        300,
        150,
        bench_step(
            "bench_compiled_rest",
            [
                *BENCH_GPU.split(),
                "--dtype",
                "bf16",
                "--compile",
                "--no-layers",
                "--models",
                *OTHER_MODELS,
            ],
        ),
    ),
    Step("dense_bench", True, 120, 60, dense_bench),
    Step(
        "bench_cpu",
        False,
        120,
        10,
        bench_step("bench_cpu", [*BENCH_CPU.split(), "--models", *CPU_MODELS]),
    ),
    Step("fit_cpu", False, 180, 10, fit_step(smoke=True)),
]


# --- report --------------------------------------------------------------------------------------


def short(text: str) -> str:
    """A recorded number to 3 significant digits (other text as it is)."""
    try:
        return f"{float(text):.3g}"
    except ValueError:
        return text


def md_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(
        lines + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    )


def summary(check: Check, results: list[dict], skip_line: str | None) -> tuple[str, str]:
    """(the head: environment, steps, headline, fit; the whole: also tests and bench tables)."""
    env = check.env
    parts = [f"# GPU check, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", ""]
    hardware = (
        f"{env['gpu']} ({env['gpu_memory_gib']} GiB, compute {env['capability']}), driver "
        f"{env['driver']}, CUDA {env['cuda_build']}, cuDNN {env['cudnn']}"
        if env["cuda_available"]
        else "no CUDA device"
    )
    parts += [
        f"{hardware}; torch {env['torch']}, Python {env['python']}, {env['cpu_count']} CPU cores; "
        f"timm {env['versions']['timm']}, lightning {env['versions']['lightning']}",
        "",
    ]
    if skip_line:  # without the console prefix: the console shows it once, as it happens
        parts += [skip_line.removeprefix(f"{PREFIX} "), ""]
    parts += [md_table(results, ["step", "status", "seconds", "detail"]), ""]
    headline = []
    for path in check.bench_results:
        result = json.loads(path.read_text())
        for c in result["comparisons"]:
            if c["comparison"] == HEADLINE:
                headline.append({"run": path.stem, **c})
    if headline:
        columns = ["run", "infer_speedup", "train_speedup"]
        parts += [f"## Headline: {HEADLINE}", "", md_table(headline, columns), ""]
    if check.fit_report:
        report = check.fit_report
        parts += ["## fit (experiments/base.yaml)", "", md_table([report], list(report)), ""]
    brief = len(parts)  # what the console shows: its tail is all a lent machine returns
    xml = check.details / "cuda_tests.xml"
    if xml.exists():
        rows = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = next(
                (c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed"
            )
            measured = ", ".join(
                f"{p.get('name')} {short(p.get('value'))}" for p in case.iter("property")
            )
            rows.append(
                {"test": case.get("name"), "outcome": outcome, "measured": measured or None}
            )
        parts += ["## CUDA tests", "", md_table(rows, ["test", "outcome", "measured"]), ""]
    for path in check.bench_results:
        result = json.loads(path.read_text())
        peak = result.get("peak", {})
        parts += [
            f"## {path.stem}",
            "",
            f"`{result['command']}`; matmul peak ({peak.get('gemm')}): "
            f"{peak.get('gmacs_per_s', 0):.4g} GMAC/s",
            "",
            md_table(
                result["models"],
                [
                    "model",
                    "params_m",
                    "gmacs",
                    "infer_img_s",
                    "train_img_s",
                    "infer_peak_pct",
                    "train_peak_pct",
                ],
            ),
            "",
            md_table(result["comparisons"], ["comparison", "infer_speedup", "train_speedup"]),
            "",
        ]
    return "\n".join(parts[:brief]), "\n".join(parts)


def pack(check: Check) -> Path:
    """Every detail in one tarball (the lent machine brings back a few files only), no checkpoints."""
    archive = check.out / "gpu_check_details.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(
            check.details,
            arcname="details",
            filter=lambda info: None if info.name.endswith((".ckpt", ".partial")) else info,
        )
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--details", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps")
    parser.add_argument("--steps", default="", help="comma-separated step names (default: all)")
    args = parser.parse_args(argv)
    names = [s.name for s in STEPS]
    chosen = [n for n in args.steps.split(",") if n] or names
    if unknown := sorted(set(chosen) - set(names)):
        parser.error(f"--steps: unknown {', '.join(unknown)} (known: {', '.join(names)})")
    args.out.mkdir(parents=True, exist_ok=True)
    args.details.mkdir(parents=True, exist_ok=True)

    env_path = args.details / "environment.json"
    env_run = subprocess.run(
        [sys.executable, "-c", ENV_SNIPPET, str(env_path), json.dumps(NEEDS)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if env_run.returncode != 0:
        print(f"{PREFIX} FAIL: {sys.executable} cannot import torch and lavit:\n{env_run.stderr}")
        return 1
    env = json.loads(env_path.read_text())
    with (args.details / "nvidia-smi.txt").open("w") as f:
        try:
            f.write(
                subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
            )
        except (OSError, subprocess.SubprocessError) as err:
            f.write(f"nvidia-smi: {err}\n")
    check = Check(args.out, args.details, time.monotonic() + args.budget, env, [])
    check.say(
        f"{PREFIX} {env.get('gpu', 'no GPU')}, driver {env['driver']}; torch {env['torch']} "
        f"(CUDA build {env['cuda_build']}), Python {env['python']} at {sys.executable}"
    )
    for problem in env["missing_modules"]:
        check.say(f"{PREFIX} missing: {problem}")
    skip_line = None
    if not env["cuda_available"]:
        skip_line = (
            f"{PREFIX} SKIP GPU parts: no CUDA device (torch.cuda.is_available() is False for torch "
            f"{env['torch']}); skipped the cuda tests, lavit bench --device cuda and the GPU fit; "
            "ran tiny CPU versions of the bench and fit commands instead"
        )
        check.say(skip_line)

    results = []
    for step in STEPS:
        if step.name not in chosen:
            continue
        if not step.needs_cuda and env["cuda_available"]:
            continue  # the CPU stand-ins, not needed where the real steps run
        started = time.monotonic()
        timeout = min(step.cap_s, check.left())
        if step.needs_cuda and not env["cuda_available"]:
            status, detail = "skip", "needs a CUDA device"
        elif timeout < step.min_s:
            status, detail = (
                "not run",
                f"{max(0, check.left()):.0f} s of the budget left, needs {step.min_s} s",
            )
        else:
            try:
                status, detail = step.run(check, timeout)
            except Exception as err:  # a report that cannot be read is a failure of that step
                status, detail = "fail", f"{type(err).__name__}: {err}"
        seconds = round(time.monotonic() - started, 1)
        results.append({"step": step.name, "status": status, "seconds": seconds, "detail": detail})
        if not (step.needs_cuda and not env["cuda_available"]):  # those: the one SKIP line
            check.say(f"{PREFIX} {step.name}: {status.upper()} ({seconds:.0f} s) {detail}")

    failed = [r["step"] for r in results if r["status"] == "fail"]
    not_run = [r["step"] for r in results if r["status"] in ("not run", "timeout")]
    brief, text = summary(check, results, skip_line)
    (args.out / "summary.md").write_text(text)
    verdict = f"FAILED: {', '.join(failed)}" if failed else "every step run passed"
    if not_run:
        verdict += f"; not run or stopped (budget): {', '.join(not_run)}"
    (args.out / "status.json").write_text(
        json.dumps(
            {
                "ok": not failed,
                "cuda": env["cuda_available"],
                "skip_line": skip_line,
                "steps": results,
            },
            indent=2,
        )
    )
    check.say(f"{PREFIX} {verdict}; summary: {args.out / 'summary.md'}")
    (args.out / "console.log").write_text("\n".join(check.console) + "\n")
    pack(check)
    print("\n" + brief)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
