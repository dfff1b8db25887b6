"""``lavit bench`` (end-to-end runs on tiny settings, argument errors) and the maintainer script
``scripts/loop_overhead.py`` (the Lightning loop against a bare loop)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from lavit.tools.bench import main


def loop_overhead_script():
    spec = importlib.util.spec_from_file_location(
        "loop_overhead", REPO / "scripts" / "loop_overhead.py"
    )
    module = sys.modules["loop_overhead"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# Tiny settings: 32² inputs, batch 2, one timed iteration, a small "peak" GEMM.
TINY = "--img-size 32 --batch-size 2 --iters 1 --warmup 0 --layer-iters 1 --gemm-size 256".split()
MODEL_COLUMNS = {
    "model", "params_m", "gmacs", "train_gmacs", "infer_img_s", "train_img_s", "infer_ms",
    "train_ms", "infer_peak_pct", "train_peak_pct", "infer_img_s_best", "train_img_s_best",
}  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_bench_writes_tables_with_positive_numbers(tmp_path, capsys):
    models = ["lavit_cifar", "lavit_cifar/all-va", "pvt_v2_b0"]
    assert main(["--models", *models, *TINY, "--out", str(tmp_path)]) == 0
    assert "| lavit_cifar |" in capsys.readouterr().out  # the Markdown table

    result = json.loads((tmp_path / "bench_cpu_fp32.json").read_text())
    assert [r["model"] for r in result["models"]] == models
    assert result["environment"]["torch"] == torch.__version__
    assert result["peak"]["gmacs_per_s"] > 0
    rows = read_csv(tmp_path / "bench_cpu_fp32.csv")
    assert MODEL_COLUMNS <= set(rows[0])
    for row in rows:
        assert all(float(row[c]) > 0 for c in MODEL_COLUMNS - {"model"}), row
    # the all-VA twin has no Ψ/Θ but one more VA layer's projections
    lavit, all_va = result["models"][0], result["models"][1]
    assert lavit["params_m"] != all_va["params_m"]

    (comparison,) = result["comparisons"]
    assert comparison["comparison"] == "lavit_cifar ÷ lavit_cifar/all-va"
    assert comparison["infer_speedup"] > 0 and comparison["train_speedup"] > 0

    layers = read_csv(tmp_path / "bench_cpu_fp32_layers.csv")
    assert {(r["stage"], r["layer"]) for r in layers} == {("3", "1"), ("3", "2"), ("4", "1")}
    for row in layers:
        assert float(row["la_ms"]) > 0 and float(row["va_fused_ms"]) > 0
        assert float(row["la_mmacs"]) < float(row["va_mmacs"])  # LA skips Q and K


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "no_such_model"], "unknown model 'no_such_model'"),
        (["--models", "pvt_v2_b0/all-va"], "only LaViT variants"),
        (["--img-size", "0"], "must be a positive integer"),
        (["--dtype", "fp16"], "needs --device cuda"),
        (["--tf32"], "needs --device cuda"),
        (["--models", "maskrcnn:lavit_tiny"], "unknown task 'maskrcnn'"),
        (["--img-size", "32", "64", "96"], "one side, or height and width"),
        (["--warmup", "-1"], "--warmup: must be ≥ 0"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dense_rows_at_a_non_square_size(tmp_path, capsys):
    """Backbones and whole detectors at H×W, counted and timed in the same run."""
    models = ["backbone:lavit_tiny", "retinanet:lavit_tiny", "lavit_tiny"]
    argv = ["--models", *models, "--img-size", "64", "96", "--batch-size", "1", "--iters", "1"]
    argv += ["--warmup", "0", "--gemm-size", "256", "--no-layers", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "64×96" in capsys.readouterr().out
    rows = {
        r["model"]: r for r in json.loads((tmp_path / "bench_cpu_fp32.json").read_text())["models"]
    }
    backbone, detector, classifier = (rows[m] for m in models)
    assert 0 < backbone["gmacs"] <= classifier["gmacs"]  # no head (a 1000-class linear layer)
    assert backbone["params_m"] < classifier["params_m"]
    assert detector["gmacs"] > backbone["gmacs"] and detector["params_m"] > backbone["params_m"]
    assert all(r["infer_img_s"] > 0 and r["train_img_s"] > 0 for r in rows.values())


def test_size_the_model_cannot_take_is_an_error(tmp_path, capsys):
    argv = ["--models", "lavit_cifar", "--img-size", "36", "--out", str(tmp_path), "--no-train"]
    assert main(argv) == 2
    assert "img_size" in capsys.readouterr().err


def test_loop_overhead_compares_lightning_with_a_bare_loop(tmp_path):
    argv = ["--models", "lavit_cifar", "--img-size", "32", "--batch-size", "2"]
    argv += ["--steps", "3", "--warmup", "0", "--out", str(tmp_path)]
    assert loop_overhead_script()(argv) == 0
    rows = read_csv(tmp_path / "loop_overhead_cpu_fp32.csv")
    assert [r["loop"] for r in rows] == ["minimal LightningModule", "LaViTModule"]
    for row in rows:
        assert int(row["steps"]) == 2  # 3 batches: 2 intervals
        assert float(row["lightning_step_ms"]) > 0 and float(row["bare_step_ms"]) > 0
        assert float(row["overhead_pct"]) > -100


@pytest.mark.slow
def test_loop_overhead_of_a_real_fit_with_its_data_module(tmp_path):
    config = tmp_path / "small.yaml"  # base.yaml at batch 8, in-memory batches
    config.write_text(
        f"""
trainer: {{default_root_dir: {tmp_path / "unused"}, max_epochs: 1}}
model: {{arch: lavit_cifar}}
data:
  {{source: embedded, val_split: test, img_size: 32, crop_pct: 1.0, scale: [0.5, 1.0],
   color_jitter: null, auto_augment: null, re_prob: 0.0, batch_size: 8, num_workers: 0,
   in_memory: true}}
"""
    )
    argv = ["--config", str(config), "--steps", "4", "--warmup", "0", "--out", str(tmp_path)]
    assert loop_overhead_script()(argv) == 0
    (row,) = read_csv(tmp_path / "loop_overhead_cpu_fp32.csv")
    assert row["model"] == "lavit_cifar" and row["loop"] == f"lavit fit --config {config}"
    assert int(row["steps"]) == 3  # 4 batches: 3 intervals
    assert float(row["lightning_step_ms"]) > 0 and float(row["bare_step_ms"]) > 0


def test_loop_overhead_needs_an_existing_config_and_two_steps(tmp_path, capsys):
    for argv, message in (
        (["--config", str(tmp_path / "missing.yaml")], "no such file"),
        (["--steps", "1"], "--steps must be ≥ 2"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            loop_overhead_script()(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_subprocess_smoke(tmp_path):
    argv = ["--models", "lavit_cifar", "--img-size", "32", "--batch-size", "2", "--iters", "1"]
    argv += ["--warmup", "0", "--no-train", "--no-layers", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "lavit", "bench", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (
        json.loads((tmp_path / "bench_cpu_fp32.json").read_text())["models"][0]["infer_img_s"] > 0
    )
